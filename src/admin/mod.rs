//! Signed admin events: operator keys, the canonical signed bytes, signing and
//! verification; `preview` (what an admin event would do, for `--dry-run`) and
//! `submit` (send one to the local node and confirm it was applied).
//!
//! Admin commands reach the cluster only through the log, each signed with an
//! operator's ed25519 key. Fold applies one only when the signature verifies
//! (`verify_strict`), the key is in the cluster keyring and the event's `admin_seq`
//! is above the last one applied from that key; the keyring itself changes only by a
//! signed `SetKeyring` (see `state::keyring` for the genesis rule).
//!
//! The signed bytes are a hand-written canonical encoding, not the rkyv archive (whose
//! layout is an implementation detail of the wire format), produced by one function
//! used by both signer and verifier ([`signed_bytes`]):
//!
//! ```text
//! b"meshos-admin-v1\0"            domain separation
//! u32 LE length + operator bytes
//! u64 LE admin_seq
//! u8 command code + fields        strings: u32 LE length + bytes; Option: 0 | 1 + value;
//!                                 hashes and keys: raw 32 bytes; Vec: u32 LE count + items
//! ```
//!
//! Command codes: 0 enter_maintenance, 1 exit_maintenance, 2 drain, 3 cordon,
//! 4 uncordon, 5 restart_all_daemons, 6 clear_avoid, 7 drop_replicas,
//! 8 invalidate_placement, 9 set_keyring. The signer's public key is bound by ed25519
//! itself (it is hashed into every signature), so it is not repeated in the bytes.
//!
//! Key files hold the 32-byte secret seed as 64 lowercase hex characters and a
//! newline, readable by their owner only (mode 0600); `OperatorKey::load` refuses a
//! file that group or others may read. Keys are generated from `/dev/urandom`.
//!
//! Invariants: `signed_bytes` is a pure function of (operator, admin_seq, command),
//! pinned by a golden test (`tests/admin.rs`); changing it changes the domain string;
//! `verify` never panics on any input; nothing here is called by fold except
//! `verify`, which is pure. Errors are typed (`AdminError`).

pub mod preview;
pub mod submit;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::event::{AdminCommand, BlobHash, SignedAdmin};
use crate::state::keyring::PublicKey;

/// The domain string every signed admin message starts with.
pub const SIGNED_DOMAIN: &[u8] = b"meshos-admin-v1\0";
/// Where key generation reads its randomness.
const RANDOM_SOURCE: &str = "/dev/urandom";

/// Everything that can go wrong with keys, signing and talking to the node.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists: refusing to overwrite a key file (move it away or pick another --out)")]
    KeyFileExists { path: PathBuf },
    #[error(
        "{path} has mode {mode:04o}: a key file must be readable by its owner only; fix it with `chmod 600 {path}` \
         (and consider the key leaked if others could read it)"
    )]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("{path}: not a key file: {reason} (expected 64 hex characters of the secret seed and a newline)")]
    KeyFileFormat { path: PathBuf, reason: String },
    #[error("`{text}` is not a {what}: {reason}")]
    BadHex { what: &'static str, text: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Client(#[from] crate::sys::client::ClientError),
    #[error(transparent)]
    Log(#[from] crate::redex::RedexError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// An operator's ed25519 signing key (zeroized on drop).
pub struct OperatorKey {
    signing: SigningKey,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperatorKey({})", self.public_key_hex())
    }
}

impl OperatorKey {
    /// The key of a 32-byte secret seed: deterministic, for tests and the simulator.
    pub fn from_seed(seed: [u8; 32]) -> OperatorKey {
        OperatorKey { signing: SigningKey::from_bytes(&seed) }
    }

    /// Generates a key from `/dev/urandom` and writes it to `path` with mode 0600;
    /// refuses to overwrite an existing file.
    pub fn generate(path: &Path) -> Result<OperatorKey, AdminError> {
        let io_error = |source| AdminError::Io { path: path.to_path_buf(), source };
        let mut seed = [0u8; 32];
        crate::sys::process::random_bytes(&mut seed)
            .map_err(|source| AdminError::Io { path: PathBuf::from(RANDOM_SOURCE), source })?;
        let key = OperatorKey::from_seed(seed);
        wipe(&mut seed);
        let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(AdminError::KeyFileExists { path: path.to_path_buf() })
            }
            Err(error) => return Err(io_error(error)),
        };
        let mut text = hex(key.signing.as_bytes()).into_bytes();
        text.push(b'\n');
        let written = file.write_all(&text).and_then(|()| file.sync_all());
        wipe(&mut text);
        written.map_err(io_error)?;
        Ok(key)
    }

    /// Loads a key file written by `generate`; refuses one that group or others may
    /// access (any mode bit in 0o077).
    pub fn load(path: &Path) -> Result<OperatorKey, AdminError> {
        let io_error = |source| AdminError::Io { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io_error)?;
        let mode = file.metadata().map_err(io_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AdminError::KeyFileMode { path: path.to_path_buf(), mode });
        }
        let mut text = Vec::with_capacity(65);
        // One byte more than a key file holds, to see a file that is too long.
        Read::by_ref(&mut file).take(66).read_to_end(&mut text).map_err(io_error)?;
        let parsed = parse_seed(&text);
        wipe(&mut text);
        let mut seed =
            parsed.map_err(|reason| AdminError::KeyFileFormat { path: path.to_path_buf(), reason: reason.into() })?;
        let key = OperatorKey::from_seed(seed);
        wipe(&mut seed);
        Ok(key)
    }

    pub fn public_key(&self) -> PublicKey {
        self.signing.verifying_key().to_bytes()
    }

    pub fn public_key_hex(&self) -> String {
        hex(&self.public_key())
    }

    /// Signs `command` as `operator` with sequence number `admin_seq`.
    pub fn sign(&self, operator: &str, admin_seq: u64, command: AdminCommand) -> SignedAdmin {
        let bytes = signed_bytes(operator, admin_seq, &command);
        let signature = self.signing.sign(&bytes).to_bytes();
        SignedAdmin { operator: operator.to_string(), key: self.public_key(), admin_seq, command, signature }
    }
}

/// Parses a key file's bytes: 64 hex characters, then an optional newline.
fn parse_seed(text: &[u8]) -> Result<[u8; 32], &'static str> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    if body.len() != 64 {
        return Err("wrong length");
    }
    let mut seed = [0u8; 32];
    for (index, pair) in body.chunks_exact(2).enumerate() {
        let (Some(high), Some(low)) = (hex_value(pair[0]), hex_value(pair[1])) else {
            return Err("a character is not hex");
        };
        seed[index] = high << 4 | low;
    }
    Ok(seed)
}

/// Overwrites secret bytes before they are dropped (volatile, so it is not elided).
fn wipe(bytes: &mut [u8]) {
    for byte in bytes.iter_mut() {
        // SAFETY: `byte` is a valid, aligned, exclusive reference to one byte.
        unsafe { std::ptr::write_volatile(byte, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

fn hex_value(character: u8) -> Option<u8> {
    match character {
        b'0'..=b'9' => Some(character - b'0'),
        b'a'..=b'f' => Some(character - b'a' + 10),
        b'A'..=b'F' => Some(character - b'A' + 10),
        _ => None,
    }
}

pub use crate::event::hex;

/// Parses 64 hex characters into 32 bytes (a public key or a blob hash).
pub fn parse_hex32(what: &'static str, text: &str) -> Result<[u8; 32], AdminError> {
    let bad = |reason: &str| AdminError::BadHex { what, text: text.to_string(), reason: reason.to_string() };
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(bad(&format!("{} characters, expected 64 hex characters", bytes.len())));
    }
    let mut out = [0u8; 32];
    for (index, pair) in bytes.chunks_exact(2).enumerate() {
        let (Some(high), Some(low)) = (hex_value(pair[0]), hex_value(pair[1])) else {
            return Err(bad("not hex"));
        };
        out[index] = high << 4 | low;
    }
    Ok(out)
}

/// Parses an operator's public key in hex; refuses bytes that are not an ed25519 point.
pub fn parse_public_key(text: &str) -> Result<PublicKey, AdminError> {
    let key = parse_hex32("public key", text)?;
    if !is_public_key(&key) {
        return Err(AdminError::BadHex {
            what: "public key",
            text: text.to_string(),
            reason: "not an ed25519 public key".to_string(),
        });
    }
    Ok(key)
}

/// Parses a blob hash in hex.
pub fn parse_blob(text: &str) -> Result<BlobHash, AdminError> {
    parse_hex32("blob hash", text)
}

/// Whether `key` is a usable ed25519 public key: a curve point that is not of small
/// order (a weak key can never pass `verify_strict`).
pub fn is_public_key(key: &PublicKey) -> bool {
    VerifyingKey::from_bytes(key).is_ok_and(|key| !key.is_weak())
}

/// The canonical bytes an admin event's signature covers (module docs).
pub fn signed_bytes(operator: &str, admin_seq: u64, command: &AdminCommand) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNED_DOMAIN.len() + operator.len() + 96);
    out.extend_from_slice(SIGNED_DOMAIN);
    put_str(&mut out, operator);
    out.extend_from_slice(&admin_seq.to_le_bytes());
    out.push(command_code(command));
    match command {
        AdminCommand::EnterMaintenance { node }
        | AdminCommand::ExitMaintenance { node }
        | AdminCommand::Drain { node }
        | AdminCommand::Cordon { node }
        | AdminCommand::Uncordon { node } => put_str(&mut out, node),
        AdminCommand::RestartAllDaemons { node } | AdminCommand::ClearAvoid { node } => match node {
            None => out.push(0),
            Some(node) => {
                out.push(1);
                put_str(&mut out, node);
            }
        },
        AdminCommand::DropReplicas { node, blob } => {
            put_str(&mut out, node);
            put_hash(&mut out, blob.as_ref());
        }
        AdminCommand::InvalidatePlacement { blob } => put_hash(&mut out, blob.as_ref()),
        AdminCommand::SetKeyring { version, keys } => {
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&length_u32(keys.len()).to_le_bytes());
            for key in keys {
                out.extend_from_slice(key);
            }
        }
    }
    out
}

/// The command's code in the signed bytes and its stable name.
pub fn command_code(command: &AdminCommand) -> u8 {
    match command {
        AdminCommand::EnterMaintenance { .. } => 0,
        AdminCommand::ExitMaintenance { .. } => 1,
        AdminCommand::Drain { .. } => 2,
        AdminCommand::Cordon { .. } => 3,
        AdminCommand::Uncordon { .. } => 4,
        AdminCommand::RestartAllDaemons { .. } => 5,
        AdminCommand::ClearAvoid { .. } => 6,
        AdminCommand::DropReplicas { .. } => 7,
        AdminCommand::InvalidatePlacement { .. } => 8,
        AdminCommand::SetKeyring { .. } => 9,
    }
}

/// Names of the commands, indexed by `command_code`.
pub const COMMAND_NAMES: [&str; 10] = [
    "enter_maintenance",
    "exit_maintenance",
    "drain",
    "cordon",
    "uncordon",
    "restart_all_daemons",
    "clear_avoid",
    "drop_replicas",
    "invalidate_placement",
    "set_keyring",
];

/// Frames are at most 64 MiB, so no length reaches u32::MAX; saturate regardless.
fn length_u32(length: usize) -> u32 {
    u32::try_from(length).unwrap_or(u32::MAX)
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&length_u32(text.len()).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_hash(out: &mut Vec<u8>, hash: Option<&BlobHash>) {
    match hash {
        None => out.push(0),
        Some(hash) => {
            out.push(1);
            out.extend_from_slice(hash);
        }
    }
}

/// Whether `signed.signature` is a valid (strict) ed25519 signature by `signed.key`
/// over the event's signed bytes. False for a key that is not a valid point.
pub fn verify(signed: &SignedAdmin) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(&signed.key) else { return false };
    let signature = Signature::from_bytes(&signed.signature);
    let bytes = signed_bytes(&signed.operator, signed.admin_seq, &signed.command);
    key.verify_strict(&bytes, &signature).is_ok()
}

/// An admin sequence number from the wall clock: microseconds since the Unix epoch.
/// For the CLI only (fold never reads a clock); strictly increasing per key as long
/// as one operator does not sign two events within the same microsecond.
pub fn admin_seq_from_clock() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_micros()).unwrap_or(u64::MAX)
}

/// The fixed key the simulator and `meshos log gen` sign their admin events with
/// (seed: 32 bytes of 0x5e). Public in the code, so never trust it in a real keyring.
pub fn test_key() -> OperatorKey {
    OperatorKey::from_seed([0x5e; 32])
}
