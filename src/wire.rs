//! One frame format for sockets and the log: header, checksum, rkyv payload.
//!
//! ```text
//! offset  size  field
//!  0      4     magic "MSHF"
//!  4      2     version (u16 LE), currently 2
//!  6      2     kind (u16 LE): 1 events (a batch on a socket), 2 record (a log record), 3 error,
//!               4 events with an acknowledgement wanted, 5 acknowledgement
//!  8      4     payload length in bytes (u32 LE), padding excluded
//! 12      4     CRC-32C (u32 LE) over bytes 0..12, bytes 16..32 and the payload
//! 16      8     seq (u64 LE): the log position of a record; the sender's frame number on a socket
//!               (an acknowledgement repeats the sender's frame number it acknowledges)
//! 24      8     time_ms (u64 LE): the commit time a log stamps on a record (and an
//!               acknowledgement carries); 0 from a client
//! 32      n     payload: signed sections, each an archived `EventBatch` (`trust::record`;
//!               records, events), or UTF-8 text (error)
//! 32+n    p     zero padding up to a multiple of 16, so frames stay aligned back to back
//! ```
//!
//! Invariants: `decode_frame` accepts exactly the byte strings `encode_frame`
//! produces (given the same limit) and returns a typed `FrameError` for anything
//! else; no input panics it. A frame's total size never exceeds `frame_bytes_max`.
//! Changing this layout or the archived event types bumps `VERSION` and the
//! golden test in `tests/wire_golden.rs`.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::event::{ArchivedEventBatch, EventBatch};

pub const MAGIC: [u8; 4] = *b"MSHF";
pub const VERSION: u16 = 6;
pub const HEADER_BYTES: usize = 32;
/// Frames and payloads start on this alignment, enough for every archived type.
pub const ALIGN_BYTES: usize = 16;
/// Segment files of the embedded log start with this many header bytes.
pub const SEGMENT_HEADER_BYTES: usize = 32;
pub const SEGMENT_MAGIC: [u8; 8] = *b"MSHSEG01";

const _: () = assert!(HEADER_BYTES.is_multiple_of(ALIGN_BYTES));
const _: () = assert!(SEGMENT_HEADER_BYTES.is_multiple_of(ALIGN_BYTES));

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// A batch of events sent over a socket.
    Events = 1,
    /// A committed log record: a batch of events, stamped with position and time.
    Record = 2,
    /// A UTF-8 error message, answering a bad frame.
    Error = 3,
    /// A batch of events whose sender wants an acknowledgement once it is durable.
    EventsAckWanted = 4,
    /// The node's answer to `EventsAckWanted`: every frame of this connection up to
    /// `seq` is durable in the log; the payload is the last record's position (u64 LE)
    /// and 8 zero bytes.
    Ack = 5,
}

impl FrameKind {
    fn from_u16(value: u16) -> Option<FrameKind> {
        match value {
            1 => Some(FrameKind::Events),
            2 => Some(FrameKind::Record),
            3 => Some(FrameKind::Error),
            4 => Some(FrameKind::EventsAckWanted),
            5 => Some(FrameKind::Ack),
            _ => None,
        }
    }
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub payload_bytes: u32,
    pub checksum: u32,
    pub seq: u64,
    pub time_ms: u64,
}

impl FrameHeader {
    /// Total size of the frame: header, payload and padding.
    pub fn frame_bytes(&self) -> usize {
        frame_bytes(self.payload_bytes as usize)
    }
}

/// A frame decoded from a byte slice; `payload` borrows from it.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: u64, available: u64 },
    #[error("frame of {frame_bytes} bytes exceeds the limit of {frame_bytes_max} bytes (frame_bytes_max)")]
    Oversized { frame_bytes: u64, frame_bytes_max: u32 },
    #[error("bad magic {found:02x?}: not a MeshOS frame (expected \"MSHF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported frame version {found}: this build reads version {VERSION}")]
    BadVersion { found: u16 },
    #[error("unknown frame kind {found}")]
    BadKind { found: u16 },
    #[error("checksum mismatch: header says {expected:08x}, bytes hash to {actual:08x}")]
    BadChecksum { expected: u32, actual: u32 },
    #[error("padding after the payload is not zero")]
    BadPadding,
    #[error("payload fails validation: {reason}")]
    BadPayload { reason: String },
}

impl FrameError {
    /// A stable short name per failure, for counters.
    pub fn reason_code(&self) -> &'static str {
        match self {
            FrameError::Truncated { .. } => "truncated",
            FrameError::Oversized { .. } => "oversized",
            FrameError::BadMagic { .. } => "bad_magic",
            FrameError::BadVersion { .. } => "bad_version",
            FrameError::BadKind { .. } => "bad_kind",
            FrameError::BadChecksum { .. } => "bad_checksum",
            FrameError::BadPadding => "bad_padding",
            FrameError::BadPayload { .. } => "bad_payload",
        }
    }
}

/// Bytes of zero padding after a payload of `payload_bytes`.
pub const fn padding_bytes(payload_bytes: usize) -> usize {
    (ALIGN_BYTES - payload_bytes % ALIGN_BYTES) % ALIGN_BYTES
}

/// Total frame size for a payload of `payload_bytes`.
pub const fn frame_bytes(payload_bytes: usize) -> usize {
    HEADER_BYTES + payload_bytes + padding_bytes(payload_bytes)
}

fn checksum(header: &[u8; HEADER_BYTES], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[0..12]);
    let crc = crc32c::crc32c_append(crc, &header[16..32]);
    crc32c::crc32c_append(crc, payload)
}

/// The 32 header bytes for a frame carrying `payload`.
pub fn header_bytes(kind: FrameKind, seq: u64, time_ms: u64, payload: &[u8]) -> [u8; HEADER_BYTES] {
    assert!(payload.len() <= u32::MAX as usize, "payload of {} bytes cannot be framed", payload.len());
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[16..24].copy_from_slice(&seq.to_le_bytes());
    header[24..32].copy_from_slice(&time_ms.to_le_bytes());
    let crc = checksum(&header, payload);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Appends one whole frame (header, payload, padding) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, kind: FrameKind, seq: u64, time_ms: u64, payload: &[u8]) {
    out.extend_from_slice(&header_bytes(kind, seq, time_ms, payload));
    out.extend_from_slice(payload);
    out.resize(out.len() + padding_bytes(payload.len()), 0);
}

/// Bytes of an `Ack` frame's payload.
pub const ACK_PAYLOAD_BYTES: usize = 16;

/// Appends an `Ack` frame: frames up to `seq` are durable, the last at log `position`
/// committed at `time_ms`.
pub fn encode_ack(out: &mut Vec<u8>, seq: u64, position: u64, time_ms: u64) {
    let mut payload = [0u8; ACK_PAYLOAD_BYTES];
    payload[0..8].copy_from_slice(&position.to_le_bytes());
    encode_frame(out, FrameKind::Ack, seq, time_ms, &payload);
}

/// The log position an `Ack` frame's payload carries.
pub fn ack_position(payload: &[u8]) -> Option<u64> {
    (payload.len() == ACK_PAYLOAD_BYTES).then(|| read_u64(payload, 0))
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks the first 32 bytes of `bytes` as a frame header: magic, version, kind and
/// size limit. Does not look at the payload or the checksum.
pub fn decode_header(bytes: &[u8], frame_bytes_max: u32) -> Result<FrameHeader, FrameError> {
    if bytes.len() < HEADER_BYTES {
        return Err(FrameError::Truncated { needed: HEADER_BYTES as u64, available: bytes.len() as u64 });
    }
    let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = read_u16(bytes, 4);
    if version != VERSION {
        return Err(FrameError::BadVersion { found: version });
    }
    let kind_raw = read_u16(bytes, 6);
    let kind = FrameKind::from_u16(kind_raw).ok_or(FrameError::BadKind { found: kind_raw })?;
    let payload_bytes = read_u32(bytes, 8);
    // In u64: a hostile length near u32::MAX must not overflow a 32-bit usize.
    let total = HEADER_BYTES as u64 + payload_bytes as u64 + padding_bytes(payload_bytes as usize) as u64;
    if total > frame_bytes_max as u64 {
        return Err(FrameError::Oversized { frame_bytes: total, frame_bytes_max });
    }
    Ok(FrameHeader {
        kind,
        payload_bytes,
        checksum: read_u32(bytes, 12),
        seq: read_u64(bytes, 16),
        time_ms: read_u64(bytes, 24),
    })
}

/// Decodes and checks one whole frame at the start of `bytes` (trailing bytes are
/// left alone; `header.frame_bytes()` says how many this frame used).
pub fn decode_frame(bytes: &[u8], frame_bytes_max: u32) -> Result<Frame<'_>, FrameError> {
    let header = decode_header(bytes, frame_bytes_max)?;
    let total = header.frame_bytes();
    if bytes.len() < total {
        return Err(FrameError::Truncated { needed: total as u64, available: bytes.len() as u64 });
    }
    let payload_end = HEADER_BYTES + header.payload_bytes as usize;
    let payload = &bytes[HEADER_BYTES..payload_end];
    let header_array: &[u8; HEADER_BYTES] = bytes[..HEADER_BYTES].try_into().expect("32 bytes");
    let actual = checksum(header_array, payload);
    if actual != header.checksum {
        return Err(FrameError::BadChecksum { expected: header.checksum, actual });
    }
    if bytes[payload_end..total].iter().any(|&byte| byte != 0) {
        return Err(FrameError::BadPadding);
    }
    Ok(Frame { header, payload })
}

/// Archives a batch of events into `out` (cleared first), ready to be framed.
pub fn encode_batch_into(batch: &EventBatch, out: AlignedVec<ALIGN_BYTES>) -> AlignedVec<ALIGN_BYTES> {
    let mut out = out;
    out.clear();
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(batch, out).expect("archiving into memory cannot fail")
}

/// Archives a batch of events into a fresh aligned buffer.
pub fn encode_batch(batch: &EventBatch) -> AlignedVec<ALIGN_BYTES> {
    encode_batch_into(batch, AlignedVec::new())
}

/// Validates an archived `EventBatch` in place and returns a reference into `payload`.
/// `payload` must start on an 8-byte boundary (frames in an `AlignedVec` do).
pub fn access_batch(payload: &[u8]) -> Result<&ArchivedEventBatch, FrameError> {
    if !(payload.as_ptr() as usize).is_multiple_of(8) {
        return Err(FrameError::BadPayload { reason: "payload is not 8-byte aligned in memory".to_string() });
    }
    // `BoxedError`, not `rancor::Error`: the latter keeps its detail only in builds
    // with debug assertions and says "failed without error information" in release.
    rkyv::access::<ArchivedEventBatch, rancor::BoxedError>(payload).map_err(|error| FrameError::BadPayload {
        reason: format!(
            "payload of {} bytes is not an archived EventBatch of wire version {VERSION}: {}",
            payload.len(),
            without_addresses(&error.to_string())
        ),
    })
}

/// Validator messages name memory addresses (`ptr 0x00005622bdc70601`), which differ
/// from run to run; reports must depend only on the bytes, so addresses become `0x_`.
fn without_addresses(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("0x") {
        out.push_str(&rest[..at + 2]);
        rest = &rest[at + 2..];
        let digits = rest.find(|character: char| !character.is_ascii_hexdigit()).unwrap_or(rest.len());
        if digits > 0 {
            out.push('_');
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// Validates a record's payload as signed sections (`trust::record`) whose bodies are
/// archived batches, and counts their events (signatures are fold's to check). The
/// payload must start 8-byte aligned in memory.
pub fn validate_sections(payload: &[u8]) -> Result<u64, FrameError> {
    let mut events = 0u64;
    for section in crate::trust::sections(payload) {
        let section = section.map_err(|error| FrameError::BadPayload { reason: error.to_string() })?;
        let batch = access_batch(section.body).map_err(|error| FrameError::BadPayload {
            reason: format!("section at byte {} (signer `{}`): {error}", section.offset, section.name),
        })?;
        events += batch.events.len() as u64;
    }
    Ok(events)
}

/// Deserialises every section's batch of a record's payload (tests and tools).
pub fn decode_sections(payload: &[u8]) -> Result<Vec<EventBatch>, FrameError> {
    let mut aligned = AlignedVec::<ALIGN_BYTES>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    let mut batches = Vec::new();
    for section in crate::trust::sections(&aligned) {
        let section = section.map_err(|error| FrameError::BadPayload { reason: error.to_string() })?;
        batches.push(decode_batch(section.body)?);
    }
    Ok(batches)
}

/// Deserialises a batch (for tests and tools; the hot path reads archived events in place).
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, FrameError> {
    let mut aligned = AlignedVec::<ALIGN_BYTES>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    rkyv::from_bytes::<EventBatch, rancor::BoxedError>(&aligned).map_err(|error| FrameError::BadPayload {
        reason: format!(
            "payload of {} bytes is not an archived EventBatch of wire version {VERSION}: {}",
            payload.len(),
            without_addresses(&error.to_string())
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind, NodeHealth};

    fn sample_frame() -> Vec<u8> {
        let batch = EventBatch {
            events: vec![Event {
                origin: "node-1".into(),
                origin_seq: 7,
                kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 250 }),
            }],
        };
        let payload = encode_batch(&batch);
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Record, 3, 1_000, &payload);
        out
    }

    #[test]
    fn addresses_are_removed_from_reasons() {
        assert_eq!(without_addresses("ptr 0x00005622bdc70601 unaligned for 0x10"), "ptr 0x_ unaligned for 0x_");
        assert_eq!(without_addresses("no address, 0x"), "no address, 0x");
    }

    #[test]
    fn round_trip() {
        let bytes = sample_frame();
        assert_eq!(bytes.len() % ALIGN_BYTES, 0);
        let frame = decode_frame(&bytes, 1 << 20).unwrap();
        assert_eq!(frame.header.kind, FrameKind::Record);
        assert_eq!((frame.header.seq, frame.header.time_ms), (3, 1_000));
        let mut aligned = AlignedVec::<16>::new();
        aligned.extend_from_slice(frame.payload);
        let batch = access_batch(&aligned).unwrap();
        assert_eq!(batch.events.len(), 1);
        assert_eq!(batch.events[0].origin.as_str(), "node-1");
    }

    #[test]
    fn every_failure_has_its_error() {
        let good = sample_frame();
        assert!(matches!(decode_frame(&good[..10], 1 << 20), Err(FrameError::Truncated { .. })));
        assert!(matches!(decode_frame(&good[..good.len() - 1], 1 << 20), Err(FrameError::Truncated { .. })));
        assert!(matches!(decode_frame(&good, 64), Err(FrameError::Oversized { .. })));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode_frame(&bad, 1 << 20), Err(FrameError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(decode_frame(&bad, 1 << 20), Err(FrameError::BadVersion { found: 9 })));
        let mut bad = good.clone();
        bad[6] = 77;
        assert!(matches!(decode_frame(&bad, 1 << 20), Err(FrameError::BadKind { found: 77 })));
        let mut bad = good.clone();
        bad[HEADER_BYTES + 2] ^= 0x40;
        assert!(matches!(decode_frame(&bad, 1 << 20), Err(FrameError::BadChecksum { .. })));
        let payload_end = HEADER_BYTES + read_u32(&good, 8) as usize;
        if payload_end < good.len() {
            let mut bad = good.clone();
            bad[payload_end] = 1;
            assert!(matches!(decode_frame(&bad, 1 << 20), Err(FrameError::BadPadding)));
        }
        let mut garbage = AlignedVec::<16>::new();
        garbage.extend_from_slice(&[0xffu8; 48]);
        let error = access_batch(&garbage).unwrap_err();
        assert!(matches!(error, FrameError::BadPayload { .. }));
        // The text says what failed, in every build (release included).
        let text = error.to_string();
        assert!(
            text.contains(&format!("payload of 48 bytes is not an archived EventBatch of wire version {VERSION}: "))
        );
        assert!(!text.contains("without error information"), "{text}");
        let text = decode_batch(&[0xffu8; 48]).unwrap_err().to_string();
        assert!(text.contains("not an archived EventBatch") && !text.contains("without error information"), "{text}");
    }
}
