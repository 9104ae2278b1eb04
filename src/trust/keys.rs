//! ed25519 key pairs of operators and nodes, and their key files.
//!
//! Key files hold the 32-byte secret seed as 64 lowercase hex characters and a
//! newline, readable by their owner only (mode 0600); `KeyPair::load` refuses a file
//! that group or others may read. Keys are generated from `/dev/urandom`.
//!
//! Invariants: a secret never leaves this module except as a signature (or, for the
//! secure channel, the `SigningKey` itself); secret bytes read or written are wiped;
//! `load` never panics on any file content.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::TrustError;

/// An ed25519 public key, 32 bytes.
pub type PublicKey = [u8; 32];

/// Where key generation reads its randomness.
const RANDOM_SOURCE: &str = "/dev/urandom";

/// An ed25519 signing key (zeroized on drop): an operator's or a node's.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", self.public_key_hex())
    }
}

impl KeyPair {
    /// The key of a 32-byte secret seed: deterministic, for tests and the simulator.
    pub fn from_seed(seed: [u8; 32]) -> KeyPair {
        KeyPair { signing: SigningKey::from_bytes(&seed) }
    }

    /// A fresh key from `/dev/urandom`, not written anywhere.
    pub fn random() -> Result<KeyPair, TrustError> {
        let mut seed = [0u8; 32];
        crate::sys::process::random_bytes(&mut seed)
            .map_err(|source| TrustError::Io { path: PathBuf::from(RANDOM_SOURCE), source })?;
        let key = KeyPair::from_seed(seed);
        wipe(&mut seed);
        Ok(key)
    }

    /// Generates a key and writes it to `path` with mode 0600; refuses to overwrite an
    /// existing file.
    pub fn generate(path: &Path) -> Result<KeyPair, TrustError> {
        let key = KeyPair::random()?;
        key.write_new(path)?;
        Ok(key)
    }

    /// Writes this key to a new file `path` (mode 0600, fsynced).
    pub fn write_new(&self, path: &Path) -> Result<(), TrustError> {
        let io_error = |source| TrustError::Io { path: path.to_path_buf(), source };
        let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(TrustError::KeyFileExists { path: path.to_path_buf() })
            }
            Err(error) => return Err(io_error(error)),
        };
        let mut text = crate::event::hex(self.signing.as_bytes()).into_bytes();
        text.push(b'\n');
        let written = file.write_all(&text).and_then(|()| file.sync_all());
        wipe(&mut text);
        written.map_err(io_error)
    }

    /// Loads a key file written by `generate`; refuses one that group or others may
    /// access (any mode bit in 0o077).
    pub fn load(path: &Path) -> Result<KeyPair, TrustError> {
        let io_error = |source| TrustError::Io { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io_error)?;
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TrustError::KeyFileMode { path: path.to_path_buf(), mode });
        }
        let mut text = Vec::with_capacity(65);
        // One byte more than a key file holds, to see a file that is too long.
        Read::by_ref(&mut file).take(66).read_to_end(&mut text).map_err(io_error)?;
        let parsed = parse_seed(&text);
        wipe(&mut text);
        let mut seed =
            parsed.map_err(|reason| TrustError::KeyFileFormat { path: path.to_path_buf(), reason: reason.into() })?;
        let key = KeyPair::from_seed(seed);
        wipe(&mut seed);
        Ok(key)
    }

    /// Loads `path`, or creates it (mode 0600) when it does not exist yet: a node's
    /// own key on its first start. The bool says whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(KeyPair, bool), TrustError> {
        match KeyPair::generate(path) {
            Ok(key) => Ok((key, true)),
            Err(TrustError::KeyFileExists { .. }) => Ok((KeyPair::load(path)?, false)),
            Err(error) => Err(error),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.signing.verifying_key().to_bytes()
    }

    pub fn public_key_hex(&self) -> String {
        crate::event::hex(&self.public_key())
    }

    /// An ed25519 signature over `message`.
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The dalek signing key (for the secure channel's identity proof).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

/// Whether `signature` is a valid strict ed25519 signature by `key` over `message`.
/// False for a key that is not a usable point; never panics.
pub fn verify_bytes(key: &PublicKey, message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(key) else { return false };
    key.verify_strict(message, &Signature::from_bytes(signature)).is_ok()
}

/// Whether `key` is a usable ed25519 public key: a curve point that is not of small
/// order (a weak key can never pass `verify_strict`).
pub fn is_public_key(key: &PublicKey) -> bool {
    VerifyingKey::from_bytes(key).is_ok_and(|key| !key.is_weak())
}

/// Parses a key file's bytes: 64 hex characters, then an optional newline.
fn parse_seed(text: &[u8]) -> Result<[u8; 32], &'static str> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    if body.len() != 64 {
        return Err("wrong length");
    }
    parse_hex_bytes(body).ok_or("a character is not hex")
}

/// 64 hex characters as 32 bytes.
pub fn parse_hex_bytes(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, pair) in text.chunks_exact(2).enumerate() {
        out[index] = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Some(out)
}

fn hex_value(character: u8) -> Option<u8> {
    match character {
        b'0'..=b'9' => Some(character - b'0'),
        b'a'..=b'f' => Some(character - b'a' + 10),
        b'A'..=b'F' => Some(character - b'A' + 10),
        _ => None,
    }
}

/// Overwrites secret bytes before they are dropped (volatile, so it is not elided).
fn wipe(bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        // SAFETY: `byte` is a valid, aligned, exclusive reference to one byte.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// The deterministic key of a name, for tests, the simulator and generated logs
/// (blake3 of a fixed label and the name). Anyone can compute it: only a genesis
/// written for a test may admit it.
pub fn test_key_of(name: &str) -> KeyPair {
    KeyPair::from_seed(blake3::derive_key("meshos 2026 test key of a name", name.as_bytes()))
}
