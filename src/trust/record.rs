//! Signed sections: the unit of trust in the log. A record's payload is one or more
//! sections back to back; each is a 208-byte header naming its signer, then an
//! archived `EventBatch` (the body), zero-padded to 16 bytes. A node's record holds
//! one section, signed by the node's key; an operator's holds one signed by an
//! operator key; a test or simulated log may put several signers' sections in one
//! record (fold treats each on its own).
//!
//! ```text
//! offset size  field
//!   0     4    magic "MSIG"
//!   4     1    version (1)
//!   5     1    signer kind: 0 unsigned (only from the node's own Unix socket: the
//!              sequencer stamps and signs it as the node's), 1 node, 2 operator
//!   6     1    signer name length (at most 64 bytes of UTF-8)
//!   7     1    zero
//!   8     4    body length (u32 LE), padding excluded
//!  12     4    zero
//!  16     8    expires_ms (u64 LE): operator sections only, the log time after which
//!              the section is refused (0 for node sections)
//!  24    16    nonce: operator sections only, random per section (zero for nodes)
//!  40    32    signer's ed25519 public key
//!  72    64    signer name (node name, or the operator's name for the record),
//!              zero-padded
//! 136    64    ed25519 signature
//! 200     8    zero
//! 208     n    body: an archived EventBatch, then zero padding to 16 bytes
//! ```
//!
//! The signature covers `RECORD_DOMAIN`, the cluster id, header bytes 0..136 and the
//! blake3 hash of the body: it binds who, which cluster, replay protection fields and
//! every event, and verifying a large record hashes it once with blake3 instead of
//! twice with SHA-512. Verification (`verify`) is a pure function of the bytes and
//! the cluster id, so it can run ahead of fold on another thread; fold then checks
//! only that the key is the one the state admits for the signer.
//!
//! Invariants: `sections` accepts exactly what `Sealer::seal_into` and
//! `unsigned_into` produce and returns a typed `SectionError` for anything else; no
//! input panics it; a body handed out starts 16-byte aligned relative to the payload.

use rkyv::util::AlignedVec;

use super::keys::{verify_bytes, KeyPair, PublicKey};
use crate::event::EventBatch;
use crate::wire::{self, ALIGN_BYTES};

pub const SECTION_MAGIC: [u8; 4] = *b"MSIG";
pub const SECTION_VERSION: u8 = 1;
pub const SECTION_HEADER_BYTES: usize = 208;
/// Header bytes the signature covers (everything before the signature).
pub const SIGNED_HEADER_BYTES: usize = 136;
pub const SIGNER_NAME_BYTES_MAX: usize = 64;
/// The domain string every record signature's message starts with.
pub const RECORD_DOMAIN: &[u8; 17] = b"meshos-record-v1\0";
/// A cluster's id: derived from its genesis (`trust::genesis`).
pub type ClusterId = [u8; 16];

const _: () = assert!(SECTION_HEADER_BYTES.is_multiple_of(ALIGN_BYTES));
const _: () = assert!(SIGNED_HEADER_BYTES == 72 + SIGNER_NAME_BYTES_MAX);

/// Who signed a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SignerKind {
    /// Not signed: only the node's own Unix socket may send it; never folded.
    Unsigned = 0,
    Node = 1,
    Operator = 2,
}

/// One section of a payload, checked for shape (not for its signature).
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    pub kind: SignerKind,
    pub name: &'a str,
    pub key: PublicKey,
    pub expires_ms: u64,
    pub nonce: [u8; 16],
    pub signature: [u8; 64],
    /// The signed header bytes (0..136).
    pub signed_header: &'a [u8],
    /// The archived `EventBatch`, without padding.
    pub body: &'a [u8],
    /// Offset of this section in the payload.
    pub offset: usize,
}

/// Why bytes are not a well-formed section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SectionError {
    #[error("payload is empty: a record carries at least one signed section")]
    Empty,
    #[error("section at byte {offset} is cut short: {needed} bytes needed, {available} there")]
    Truncated { offset: usize, needed: u64, available: u64 },
    #[error("section at byte {offset} does not start with \"MSIG\": not a signed section")]
    BadMagic { offset: usize },
    #[error("section at byte {offset} has version {found}: this build reads version {SECTION_VERSION}")]
    BadVersion { offset: usize, found: u8 },
    #[error("section at byte {offset} names signer kind {found} (0 unsigned, 1 node, 2 operator)")]
    BadKind { offset: usize, found: u8 },
    #[error("section at byte {offset}: signer name of {length} bytes is empty, longer than 64 or not UTF-8")]
    BadName { offset: usize, length: u8 },
    #[error("section at byte {offset}: reserved or padding bytes are not zero")]
    BadPadding { offset: usize },
}

impl SectionError {
    /// A stable short name per failure, for counters.
    pub fn reason_code(&self) -> &'static str {
        match self {
            SectionError::Empty => "empty_payload",
            SectionError::Truncated { .. } => "truncated_section",
            SectionError::BadMagic { .. } => "unsigned_payload",
            SectionError::BadVersion { .. } => "bad_section_version",
            SectionError::BadKind { .. } => "bad_signer_kind",
            SectionError::BadName { .. } => "bad_signer_name",
            SectionError::BadPadding { .. } => "bad_section_padding",
        }
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The section starting at `offset` of `payload`, and the offset of the next one.
pub fn section_at(payload: &[u8], offset: usize) -> Result<(Section<'_>, usize), SectionError> {
    let available = payload.len().saturating_sub(offset);
    if available < SECTION_HEADER_BYTES {
        return Err(SectionError::Truncated {
            offset,
            needed: SECTION_HEADER_BYTES as u64,
            available: available as u64,
        });
    }
    let header = &payload[offset..offset + SECTION_HEADER_BYTES];
    if header[0..4] != SECTION_MAGIC {
        return Err(SectionError::BadMagic { offset });
    }
    if header[4] != SECTION_VERSION {
        return Err(SectionError::BadVersion { offset, found: header[4] });
    }
    let kind = match header[5] {
        0 => SignerKind::Unsigned,
        1 => SignerKind::Node,
        2 => SignerKind::Operator,
        found => return Err(SectionError::BadKind { offset, found }),
    };
    let name_bytes = header[6] as usize;
    if header[7] != 0 || read_u32(header, 12) != 0 || header[200..208].iter().any(|&byte| byte != 0) {
        return Err(SectionError::BadPadding { offset });
    }
    let name_field = &header[72..72 + SIGNER_NAME_BYTES_MAX];
    let name = match (kind, name_bytes) {
        (SignerKind::Unsigned, 0) => "",
        (_, 1..=SIGNER_NAME_BYTES_MAX) => std::str::from_utf8(&name_field[..name_bytes])
            .map_err(|_| SectionError::BadName { offset, length: name_bytes as u8 })?,
        _ => return Err(SectionError::BadName { offset, length: name_bytes as u8 }),
    };
    if name_field[name_bytes.min(SIGNER_NAME_BYTES_MAX)..].iter().any(|&byte| byte != 0) {
        return Err(SectionError::BadPadding { offset });
    }
    let body_bytes = read_u32(header, 8) as usize;
    let body_start = offset + SECTION_HEADER_BYTES;
    let padded = body_bytes as u64 + wire::padding_bytes(body_bytes) as u64;
    let remaining = (payload.len() - body_start) as u64;
    if padded > remaining {
        return Err(SectionError::Truncated {
            offset,
            needed: SECTION_HEADER_BYTES as u64 + padded,
            available: available as u64,
        });
    }
    let body_end = body_start + body_bytes;
    let next = body_start + padded as usize;
    if payload[body_end..next].iter().any(|&byte| byte != 0) {
        return Err(SectionError::BadPadding { offset });
    }
    let section = Section {
        kind,
        name,
        key: header[40..72].try_into().expect("32 bytes"),
        expires_ms: read_u64(header, 16),
        nonce: header[24..40].try_into().expect("16 bytes"),
        signature: header[136..200].try_into().expect("64 bytes"),
        signed_header: &header[..SIGNED_HEADER_BYTES],
        body: &payload[body_start..body_end],
        offset,
    };
    Ok((section, next))
}

/// Every section of `payload` in order; the first malformed one ends the walk with
/// its error (what follows it cannot be found).
pub fn sections(payload: &[u8]) -> Sections<'_> {
    Sections { payload, offset: 0, done: false }
}

pub struct Sections<'a> {
    payload: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> Iterator for Sections<'a> {
    type Item = Result<Section<'a>, SectionError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.offset == self.payload.len() {
            self.done = true;
            return (self.offset == 0).then_some(Err(SectionError::Empty));
        }
        match section_at(self.payload, self.offset) {
            Ok((section, next)) => {
                self.offset = next;
                Some(Ok(section))
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}

/// The message a section's signature covers.
fn signed_message(cluster_id: &ClusterId, signed_header: &[u8], body: &[u8]) -> [u8; 201] {
    let mut message = [0u8; 17 + 16 + SIGNED_HEADER_BYTES + 32];
    message[..17].copy_from_slice(RECORD_DOMAIN);
    message[17..33].copy_from_slice(cluster_id);
    message[33..33 + SIGNED_HEADER_BYTES].copy_from_slice(signed_header);
    message[33 + SIGNED_HEADER_BYTES..].copy_from_slice(blake3::hash(body).as_bytes());
    message
}

/// Whether the section's signature is valid for its own key in cluster `cluster_id`.
/// Pure; false for an unsigned section. Does not say the key may sign: fold decides.
pub fn verify(section: &Section<'_>, cluster_id: &ClusterId) -> bool {
    if section.kind == SignerKind::Unsigned {
        return false;
    }
    let message = signed_message(cluster_id, section.signed_header, section.body);
    verify_bytes(&section.key, &message, &section.signature)
}

/// Writes a section header (everything but the signature) for `body`.
fn write_header(
    header: &mut [u8],
    kind: SignerKind,
    name: &str,
    key: &PublicKey,
    expires_ms: u64,
    nonce: &[u8; 16],
    body_bytes: usize,
) {
    assert!(name.len() <= SIGNER_NAME_BYTES_MAX, "signer names are checked at config time");
    assert!(body_bytes <= u32::MAX as usize);
    header[..SECTION_HEADER_BYTES].fill(0);
    header[0..4].copy_from_slice(&SECTION_MAGIC);
    header[4] = SECTION_VERSION;
    header[5] = kind as u8;
    header[6] = name.len() as u8;
    header[8..12].copy_from_slice(&(body_bytes as u32).to_le_bytes());
    header[16..24].copy_from_slice(&expires_ms.to_le_bytes());
    header[24..40].copy_from_slice(nonce);
    header[40..72].copy_from_slice(key);
    header[72..72 + name.len()].copy_from_slice(name.as_bytes());
}

/// Appends an unsigned section carrying `body` (a local client's events, which the
/// node's sequencer stamps and signs as its own).
pub fn unsigned_into(out: &mut AlignedVec<ALIGN_BYTES>, body: &[u8]) {
    let start = out.len();
    assert!(start.is_multiple_of(ALIGN_BYTES));
    out.resize(start + SECTION_HEADER_BYTES, 0);
    write_header(&mut out[start..], SignerKind::Unsigned, "", &[0; 32], 0, &[0; 16], body.len());
    out.extend_from_slice(body);
    out.resize(out.len() + wire::padding_bytes(body.len()), 0);
}

/// Signs as a node or an operator of one cluster.
#[derive(Debug, Clone)]
pub struct Sealer {
    pub kind: SignerKind,
    pub name: String,
    pub key: KeyPair,
    pub cluster_id: ClusterId,
}

impl Sealer {
    pub fn node(name: &str, key: KeyPair, cluster_id: ClusterId) -> Sealer {
        assert!(!name.is_empty() && name.len() <= SIGNER_NAME_BYTES_MAX, "node names are checked at config time");
        Sealer { kind: SignerKind::Node, name: name.to_string(), key, cluster_id }
    }

    /// `name` is for the record only (the key is what is trusted); it is cut to 64 bytes.
    pub fn operator(name: &str, key: KeyPair, cluster_id: ClusterId) -> Sealer {
        let mut end = name.len().min(SIGNER_NAME_BYTES_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let name = if end == 0 { "operator" } else { &name[..end] };
        Sealer { kind: SignerKind::Operator, name: name.to_string(), key, cluster_id }
    }

    /// Appends one signed section carrying `body` to `out` (16-aligned length).
    pub fn seal_into(&self, out: &mut AlignedVec<ALIGN_BYTES>, body: &[u8], expires_ms: u64, nonce: &[u8; 16]) {
        let start = out.len();
        assert!(start.is_multiple_of(ALIGN_BYTES));
        out.resize(start + SECTION_HEADER_BYTES, 0);
        write_header(&mut out[start..], self.kind, &self.name, &self.key.public_key(), expires_ms, nonce, body.len());
        out.extend_from_slice(body);
        out.resize(out.len() + wire::padding_bytes(body.len()), 0);
        self.sign_at(out, start);
    }

    /// Signs again, in place, a section this sealer sealed whose body changed since
    /// (a load generator renumbering its events).
    pub fn sign_section_at(&self, payload: &mut [u8], start: usize) {
        assert_eq!(&payload[start + 40..start + 72], &self.key.public_key(), "a section of this sealer");
        self.sign_at(payload, start);
    }

    /// Signs, in place, the section whose header starts at `start` of `payload` (its
    /// header fields and body already written).
    fn sign_at(&self, payload: &mut [u8], start: usize) {
        let body_bytes = read_u32(&payload[start..], 8) as usize;
        let body_start = start + SECTION_HEADER_BYTES;
        let message = signed_message(
            &self.cluster_id,
            &payload[start..start + SIGNED_HEADER_BYTES],
            &payload[body_start..body_start + body_bytes],
        );
        let signature = self.key.sign_bytes(&message);
        payload[start + 136..start + 200].copy_from_slice(&signature);
    }

    /// Turns the unsigned section at `start` of `payload` into one signed by this
    /// node (after the sequencer stamped its events): header fields, then signature.
    pub fn sign_unsigned_at(&self, payload: &mut [u8], start: usize) {
        assert_eq!(self.kind, SignerKind::Node);
        assert_eq!(payload[start + 5], SignerKind::Unsigned as u8, "only an unsigned section is signed in place");
        let body_bytes = read_u32(&payload[start..], 8) as usize;
        write_header(&mut payload[start..], self.kind, &self.name, &self.key.public_key(), 0, &[0; 16], body_bytes);
        self.sign_at(payload, start);
    }

    /// A payload of one node section carrying `batch`.
    pub fn seal_batch(&self, batch: &EventBatch) -> AlignedVec<ALIGN_BYTES> {
        let body = wire::encode_batch(batch);
        let mut out = AlignedVec::with_capacity(SECTION_HEADER_BYTES + body.len() + ALIGN_BYTES);
        self.seal_into(&mut out, &body, 0, &[0; 16]);
        out
    }
}

/// A payload of one unsigned section carrying `batch` (a local client's frame).
pub fn unsigned_batch(batch: &EventBatch) -> AlignedVec<ALIGN_BYTES> {
    let body = wire::encode_batch(batch);
    let mut out = AlignedVec::with_capacity(SECTION_HEADER_BYTES + body.len() + ALIGN_BYTES);
    unsigned_into(&mut out, &body);
    out
}
