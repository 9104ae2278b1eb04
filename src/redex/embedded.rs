//! The embedded RedEX backend: a crash-safe, append-only log in one local directory.
//!
//! Layout: `DIR/<base position as 20 digits>.seg` segment files, `DIR/LOCK` (held
//! with `File::try_lock` by the one writer) and `DIR/quarantine/` (bytes recovery
//! dropped; never deleted). A segment starts with a 32-byte header (`SEGMENT_MAGIC`,
//! base position u64 LE, zero padding, CRC-32C of bytes 0..28 in bytes 28..32),
//! followed back to back by wire frames of kind `Record` whose `seq` is the position
//! and whose `time_ms` is the commit time. Frames are padded to 16 bytes, so a
//! segment read into a 16-aligned buffer has every payload aligned for rkyv.
//! A new segment is started when the next frame would push the current one past
//! `segment_bytes_max`; it is created as a `.seg.tmp` file holding only its header,
//! fsynced, renamed into place and the directory fsynced, so a segment file never
//! exists without a whole header.
//!
//! Writes are buffered in user space and flushed before a sync, a rollover, a read
//! and whenever the buffer grows past `WRITE_BUFFER_BYTES`. `config.fsync` decides
//! when `fdatasync` runs (after each record, after a group of records or bytes, only
//! on `sync()`, or never by itself); `durable_position` advances only after an fsync
//! covering every record up to it (closed segments with unsynced records are
//! fsynced too). After any failed write or fsync the handle refuses further work
//! (`RedexError::Poisoned`): reopening recovers from what reached the disk.
//!
//! Recovery (`open`): every segment is scanned in base order; the first failure (a
//! bad segment header, a bad frame or checksum, a position gap, a time going
//! backwards, a truncated frame) ends the log. Every byte from there on (the tail of
//! that segment and all later segments) is copied into one quarantine file named
//! after the segment and offset, which is fsynced before the segment is truncated
//! (and fsynced) and later segments are removed. That is right for a torn tail; when
//! a resynchronising scan finds intact records after the damage (damage in the
//! middle: a flipped byte, a bad segment header, a missing segment), `open_with` with
//! `MidLogDamage::Refuse` changes nothing and fails with `DamagedMidLog` instead, and
//! `salvage` repairs the log in place (intact records kept at their positions, an
//! empty record at each lost one, the old files quarantined whole). An in-memory
//! index (segment bases and record offsets) built by the scan lets `read_from` seek
//! straight to a record and then read sequentially in large chunks into one reusable
//! aligned buffer.
//!
//! Invariants: positions are dense from the first segment's base (1 for a new log),
//! times never decrease, `durable_position <= last_position`, every record in the
//! index is a complete checked frame on disk or in the write buffer, and recovery
//! never deletes a byte it did not first copy into the quarantine and fsync.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rkyv::util::AlignedVec;

use crate::config::{Config, FsyncPolicy};
use crate::redex::{io_error, RecordView, Redex, RedexError, Stamp};
use crate::wire::{self, FrameKind};

/// User-space write buffer size: flushed to the file once it grows past this.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Size of one sequential read in `read_from` (at least one largest frame).
const READ_CHUNK_BYTES: usize = 8 << 20;
const SEGMENT_SUFFIX: &str = ".seg";
const TEMP_SUFFIX: &str = ".seg.tmp";
const QUARANTINE_DIR: &str = "quarantine";
const LOCK_FILE: &str = "LOCK";

/// What `open` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: u32,
    /// Records kept.
    pub records: u64,
    /// Position of the last record kept (0 for an empty log).
    pub last_position: u64,
    /// Bytes moved into the quarantine.
    pub dropped_bytes: u64,
    /// Frames whose headers could still be parsed in the dropped bytes (at least 1
    /// when any byte was dropped).
    pub dropped_records: u64,
    /// The first failure, which ended the log.
    pub damage: Option<Damage>,
    /// The quarantine file holding every dropped byte, in log order.
    pub quarantine_path: Option<PathBuf>,
}

/// Where a log stops being valid and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// The position the damaged record has (or would have).
    pub position: u64,
    /// Byte offset of the damaged record (or segment header) in the file.
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: record {} at byte offset {}: {}", self.path.display(), self.position, self.offset, self.reason)
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Segment files found.
    pub segments: u32,
    /// Valid records before any damage.
    pub records: u64,
    /// Events in those records.
    pub events: u64,
    /// Bytes of segment files before any damage (headers and frames).
    pub bytes: u64,
    /// First and last valid positions (0 when there is none).
    pub first_position: u64,
    pub last_position: u64,
    /// The first failure.
    pub damage: Option<Damage>,
    /// Bytes from the damage to the end of the last segment.
    pub bytes_after_damage: u64,
    /// Intact records (counted in `records`) whose payload is not a valid event batch:
    /// open keeps them and fold rejects each as `bad_payload`.
    pub invalid_payloads: u64,
    /// The first of them.
    pub first_invalid_payload: Option<Damage>,
    /// After the first damage: intact records found further on (a resynchronising
    /// scan), and the positions whose records are damaged or missing up to the last
    /// of them, in ranges `(first, last)`. Intact records after the damage mean the
    /// log is damaged in the middle: a single node refuses to start, and
    /// `salvage` repairs it.
    pub intact_after_damage: u64,
    pub damaged_positions: Vec<(u64, u64)>,
}

/// What `open_with` does with damage that intact records follow: damage in the
/// middle of the log, as opposed to a torn tail (no intact record after it), which is
/// always cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidLogDamage {
    /// Cut the log at the damage, as at a torn tail: for a copy that can be refilled
    /// (a clustered node's mirror of the stream).
    Cut,
    /// Refuse to open (`RedexError::DamagedMidLog`), changing nothing: for the only
    /// copy of acknowledged records (a single node's log). `salvage` repairs.
    Refuse,
}

/// An intact record a resynchronising scan found: a whole `Record` frame whose
/// checksum holds, wherever it lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntactRecord {
    pub path: PathBuf,
    pub offset: u64,
    pub position: u64,
    pub time_ms: u64,
    pub frame_bytes: u64,
}

/// A whole record frame found in a segment file: its byte offset, position, commit
/// time and size.
#[derive(Debug, Clone, Copy)]
struct FoundFrame {
    offset: u64,
    position: u64,
    time_ms: u64,
    frame_bytes: u64,
}

/// Every intact record frame of one segment file's `bytes`, in file order, and the
/// byte ranges `(from, to)` that are none (a bad header included): after a frame that
/// does not decode, the scan tries again every 16 bytes (frames start 16-aligned).
fn scan_intact(bytes: &[u8], frame_bytes_max: u32) -> (Vec<FoundFrame>, Vec<(u64, u64)>) {
    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut damaged_from: Option<usize> = None;
    if decode_segment_header(bytes).is_err() {
        damaged_from = Some(0);
    }
    let mut offset = wire::SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        match wire::decode_frame(&bytes[offset..], frame_bytes_max) {
            Ok(frame) if frame.header.kind == FrameKind::Record => {
                if let Some(from) = damaged_from.take() {
                    damaged.push((from as u64, offset as u64));
                }
                let frame_bytes = frame.header.frame_bytes();
                records.push(FoundFrame {
                    offset: offset as u64,
                    position: frame.header.seq,
                    time_ms: frame.header.time_ms,
                    frame_bytes: frame_bytes as u64,
                });
                offset += frame_bytes;
            }
            _ => {
                damaged_from.get_or_insert(offset);
                offset += wire::ALIGN_BYTES;
            }
        }
    }
    if let Some(from) = damaged_from {
        damaged.push((from as u64, bytes.len() as u64));
    }
    (records, damaged)
}

/// Intact records of `segments` (from byte `offset` of the first) whose position is
/// above `position`: how many, and the highest position among them.
fn intact_after(
    segments: &[(u64, PathBuf)],
    offset: u64,
    position: u64,
    config: &Config,
    buffer: &mut AlignedVec<{ wire::ALIGN_BYTES }>,
) -> Result<(u64, u64), RedexError> {
    let (mut count, mut last) = (0, 0);
    for (index, (_, path)) in segments.iter().enumerate() {
        read_whole(path, buffer)?;
        let (records, _) = scan_intact(buffer, config.frame_bytes_max);
        for found in records {
            if (index > 0 || found.offset > offset) && found.position >= position {
                count += 1;
                last = last.max(found.position);
            }
        }
    }
    Ok((count, last))
}

/// One segment in the in-memory index.
#[derive(Debug)]
struct Segment {
    base_position: u64,
    path: PathBuf,
    /// Byte offset of each record, in position order from `base_position`.
    record_offsets: Vec<u64>,
    /// Length of the segment including records still in the write buffer.
    length_bytes: u64,
}

/// The embedded, crash-safe log. See the module documentation.
#[derive(Debug)]
pub struct EmbeddedLog {
    dir: PathBuf,
    config: Config,
    /// Held for the life of the handle: the exclusive lock on `DIR/LOCK`.
    _lock: File,
    segments: Vec<Segment>,
    /// Write handle of the last segment (None until the first segment exists).
    active: Option<File>,
    /// Closed segments holding records not yet fsynced.
    closed_unsynced: Vec<(PathBuf, File)>,
    write_buffer: Vec<u8>,
    read_buffer: AlignedVec<{ wire::ALIGN_BYTES }>,
    last_position: u64,
    last_time_ms: u64,
    durable_position: u64,
    unsynced_records: u64,
    unsynced_bytes: u64,
    poisoned: bool,
}

fn segment_file_name(base_position: u64) -> String {
    format!("{base_position:020}{SEGMENT_SUFFIX}")
}

/// The 32 header bytes of a segment starting at `base_position`.
fn segment_header(base_position: u64) -> [u8; wire::SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; wire::SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(&wire::SEGMENT_MAGIC);
    header[8..16].copy_from_slice(&base_position.to_le_bytes());
    let crc = crc32c::crc32c(&header[..wire::SEGMENT_HEADER_BYTES - 4]);
    header[wire::SEGMENT_HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a segment header; returns its base position or why it is bad.
fn decode_segment_header(bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() < wire::SEGMENT_HEADER_BYTES {
        return Err(format!("segment header truncated: {} of {} bytes", bytes.len(), wire::SEGMENT_HEADER_BYTES));
    }
    let header = &bytes[..wire::SEGMENT_HEADER_BYTES];
    if header[0..8] != wire::SEGMENT_MAGIC {
        return Err(format!("bad segment magic {:02x?}", &header[0..8]));
    }
    let stored = u32::from_le_bytes(header[28..32].try_into().expect("4 bytes"));
    let actual = crc32c::crc32c(&header[..28]);
    if stored != actual {
        return Err(format!("segment header checksum mismatch: header says {stored:08x}, bytes hash to {actual:08x}"));
    }
    if header[16..28].iter().any(|&byte| byte != 0) {
        return Err("segment header padding is not zero".to_string());
    }
    Ok(u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")))
}

/// Segment files of `dir` as (base position from the name, path), sorted by base.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, RedexError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else { continue };
        if stem.len() != 20 || !stem.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        let Ok(base) = stem.parse::<u64>() else { continue };
        found.push((base, entry.path()));
    }
    found.sort();
    Ok(found)
}

/// Reads a whole file into `buffer` (16-aligned).
fn read_whole(path: &Path, buffer: &mut AlignedVec<{ wire::ALIGN_BYTES }>) -> Result<(), RedexError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let length = file.metadata().map_err(io_error(path))?.len();
    let length = usize::try_from(length).map_err(|_| RedexError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other("segment larger than the address space"),
    })?;
    buffer.clear();
    buffer.resize(length, 0);
    file.read_exact(buffer.as_mut_slice()).map_err(io_error(path))
}

/// The result of scanning one segment's bytes.
#[derive(Debug, Default)]
struct SegmentScan {
    record_offsets: Vec<u64>,
    events: u64,
    /// Bytes of valid header and records.
    valid_bytes: u64,
    /// The next position expected after this segment's valid records.
    next_position: u64,
    last_time_ms: u64,
    /// (offset, position, reason) of the first failure.
    damage: Option<(u64, u64, String)>,
    /// Intact records whose payload fails validation, and the first of them.
    invalid_payloads: u64,
    first_invalid_payload: Option<(u64, u64, String)>,
    /// (offset, position, frame bytes) of an intact record larger than the configured
    /// `frame_bytes_max`: a configuration mismatch, not damage.
    too_large: Option<(u64, u64, u64)>,
}

/// Scans one segment held in `bytes` (16-aligned). `expected_base` is the position
/// the segment must start at (None for the first segment: any base from 1).
fn scan_segment(
    bytes: &[u8],
    name_base: u64,
    expected_base: Option<u64>,
    last_time_ms: u64,
    frame_bytes_max: u32,
    validate_payloads: bool,
) -> SegmentScan {
    let mut scan =
        SegmentScan { next_position: expected_base.unwrap_or(name_base), last_time_ms, ..SegmentScan::default() };
    let base = match decode_segment_header(bytes) {
        Ok(base) => base,
        Err(reason) => {
            scan.damage = Some((0, scan.next_position, reason));
            return scan;
        }
    };
    let header_problem = if base != name_base {
        Some(format!("segment header says base position {base} but the file name says {name_base}"))
    } else if base == 0 {
        Some("segment base position 0 (positions start at 1)".to_string())
    } else if expected_base.is_some_and(|expected| expected != base) {
        Some(format!("segment starts at position {base}, expected {} (gap or overlap)", scan.next_position))
    } else {
        None
    };
    if let Some(reason) = header_problem {
        scan.damage = Some((0, scan.next_position, reason));
        return scan;
    }
    scan.next_position = base;
    let mut offset = wire::SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        let position = scan.next_position;
        let frame = match wire::decode_frame(&bytes[offset..], frame_bytes_max) {
            Ok(frame) => frame,
            Err(wire::FrameError::Oversized { frame_bytes, .. })
                if wire::decode_frame(&bytes[offset..], crate::config::FRAME_BYTES_MAX_LIMIT).is_ok() =>
            {
                scan.too_large = Some((offset as u64, position, frame_bytes));
                break;
            }
            Err(error) => {
                scan.damage = Some((offset as u64, position, error.to_string()));
                break;
            }
        };
        let header = frame.header;
        let problem = if header.kind != FrameKind::Record {
            Some(format!("frame of kind {:?} where a record was expected", header.kind))
        } else if header.seq != position {
            Some(format!("frame says position {}, expected {position}", header.seq))
        } else if header.time_ms < scan.last_time_ms {
            Some(format!("time {} ms goes backwards from {} ms", header.time_ms, scan.last_time_ms))
        } else {
            None
        };
        if problem.is_none() && validate_payloads {
            // An intact frame whose payload is not an event batch was written that way: it
            // is not damage (open keeps it, fold rejects it as bad_payload), but say so.
            match wire::validate_sections(frame.payload) {
                Ok(events) => scan.events += events,
                Err(error) => {
                    scan.invalid_payloads += 1;
                    if scan.first_invalid_payload.is_none() {
                        scan.first_invalid_payload = Some((offset as u64, position, error.to_string()));
                    }
                }
            }
        }
        if let Some(reason) = problem {
            scan.damage = Some((offset as u64, position, reason));
            break;
        }
        scan.record_offsets.push(offset as u64);
        scan.last_time_ms = header.time_ms;
        scan.next_position = position.saturating_add(1);
        offset += header.frame_bytes();
    }
    scan.valid_bytes = scan.damage.as_ref().map_or(bytes.len() as u64, |damage| damage.0);
    scan
}

/// Frames whose headers parse in `bytes` (16-byte steps past unparseable bytes).
fn count_parseable_frames(bytes: &[u8], frame_bytes_max: u32) -> u64 {
    let mut count = 0;
    let mut offset = 0;
    while offset + wire::HEADER_BYTES <= bytes.len() {
        match wire::decode_header(&bytes[offset..], frame_bytes_max) {
            Ok(header) => {
                count += 1;
                offset += header.frame_bytes();
            }
            Err(_) => offset += wire::ALIGN_BYTES,
        }
    }
    count
}

/// An intact record above `frame_bytes_max` means the log was written with a larger
/// limit: refuse to go on rather than treat good records as damage.
fn too_large(path: &Path, scan: &SegmentScan, config: &Config) -> Result<(), RedexError> {
    match scan.too_large {
        None => Ok(()),
        Some((offset, position, frame_bytes)) => Err(RedexError::FrameLimitTooSmall {
            path: path.to_path_buf(),
            position,
            offset,
            frame_bytes,
            frame_bytes_max: config.frame_bytes_max,
        }),
    }
}

/// Takes the one writer's lock of the log in `dir` (`DIR/LOCK`), held while the
/// returned file lives.
fn lock_dir(dir: &Path) -> Result<File, RedexError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(RedexError::Locked { path: lock_path }),
        Err(std::fs::TryLockError::Error(source)) => Err(RedexError::Io { path: lock_path, source }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), RedexError> {
    File::open(dir).and_then(|file| file.sync_all()).map_err(io_error(dir))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl EmbeddedLog {
    /// Opens (creating the directory if missing) and recovers: scans every segment,
    /// truncates a torn or corrupt tail, moves the dropped bytes into
    /// `DIR/quarantine/` (never deletes them), and reports what it did.
    pub fn open(dir: &Path, config: &Config) -> Result<(EmbeddedLog, RecoveryReport), RedexError> {
        EmbeddedLog::open_with(dir, config, MidLogDamage::Cut)
    }

    /// `open`, deciding what damage in the middle of the log does (`MidLogDamage`):
    /// a torn tail is always cut; damage that intact records follow is cut like it or
    /// refused, with nothing changed.
    pub fn open_with(
        dir: &Path,
        config: &Config,
        mid_log: MidLogDamage,
    ) -> Result<(EmbeddedLog, RecoveryReport), RedexError> {
        config.validate()?;
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let lock = lock_dir(dir)?;
        // A leftover temporary segment holds only a header (no record): remove it.
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let entry = entry.map_err(io_error(dir))?;
            if entry.file_name().to_str().is_some_and(|name| name.ends_with(TEMP_SUFFIX)) {
                std::fs::remove_file(entry.path()).map_err(io_error(&entry.path()))?;
            }
        }

        let mut report = RecoveryReport::default();
        let mut segments: Vec<Segment> = Vec::new();
        let mut buffer = AlignedVec::<{ wire::ALIGN_BYTES }>::new();
        let mut last_time_ms = 0;
        let mut next_position: Option<u64> = None;
        let listed = list_segments(dir)?;
        let mut damaged_at: Option<(usize, u64)> = None;
        for (index, (name_base, path)) in listed.iter().enumerate() {
            read_whole(path, &mut buffer)?;
            let scan = scan_segment(&buffer, *name_base, next_position, last_time_ms, config.frame_bytes_max, false);
            too_large(path, &scan, config)?;
            if let Some((offset, position, reason)) = scan.damage {
                report.damage = Some(Damage { path: path.clone(), position, offset, reason });
                damaged_at = Some((index, offset));
            }
            if scan.valid_bytes >= wire::SEGMENT_HEADER_BYTES as u64 {
                segments.push(Segment {
                    base_position: *name_base,
                    path: path.clone(),
                    record_offsets: scan.record_offsets,
                    length_bytes: scan.valid_bytes,
                });
                last_time_ms = scan.last_time_ms;
                next_position = Some(scan.next_position);
            }
            if damaged_at.is_some() {
                break;
            }
        }
        if let Some((index, offset)) = damaged_at {
            let damage = report.damage.clone().expect("set with damaged_at");
            if mid_log == MidLogDamage::Refuse {
                let (intact_after, last_intact) =
                    intact_after(&listed[index..], offset, damage.position, config, &mut buffer)?;
                if intact_after > 0 {
                    return Err(RedexError::DamagedMidLog {
                        dir: dir.to_path_buf(),
                        damage,
                        intact_after,
                        last_intact,
                    });
                }
            }
            Self::quarantine(dir, config, &listed[index..], offset, &mut buffer, &mut report)?;
        }

        // What a killed writer left in the page cache is now part of the log: make it
        // durable before reporting it as such.
        for segment in &segments {
            File::open(&segment.path).and_then(|file| file.sync_data()).map_err(io_error(&segment.path))?;
        }
        let last_position = next_position.map_or(0, |next| next - 1);
        report.segments = segments.len() as u32;
        report.records = segments.iter().map(|segment| segment.record_offsets.len() as u64).sum();
        report.last_position = last_position;
        let active = match segments.last() {
            Some(segment) => {
                Some(OpenOptions::new().append(true).open(&segment.path).map_err(io_error(&segment.path))?)
            }
            None => None,
        };
        let log = EmbeddedLog {
            dir: dir.to_path_buf(),
            config: config.clone(),
            _lock: lock,
            segments,
            active,
            closed_unsynced: Vec::new(),
            write_buffer: Vec::with_capacity(WRITE_BUFFER_BYTES + config.frame_bytes_max as usize),
            read_buffer: AlignedVec::new(),
            last_position,
            last_time_ms,
            durable_position: last_position,
            unsynced_records: 0,
            unsynced_bytes: 0,
            poisoned: false,
        };
        Ok((log, report))
    }

    /// Copies every byte from `offset` in `damaged[0]` to the end of the last
    /// segment into one quarantine file, fsyncs it, then truncates the damaged
    /// segment (or removes it when its header is bad) and removes later segments.
    fn quarantine(
        dir: &Path,
        config: &Config,
        damaged: &[(u64, PathBuf)],
        offset: u64,
        buffer: &mut AlignedVec<{ wire::ALIGN_BYTES }>,
        report: &mut RecoveryReport,
    ) -> Result<(), RedexError> {
        assert!(!damaged.is_empty(), "quarantine needs the damaged segment");
        let quarantine_dir = dir.join(QUARANTINE_DIR);
        std::fs::create_dir_all(&quarantine_dir).map_err(io_error(&quarantine_dir))?;
        let stem = segment_file_name(damaged[0].0);
        let mut quarantine_path = quarantine_dir.join(format!("{stem}.{offset}.dropped"));
        let mut attempt = 1;
        while quarantine_path.exists() {
            quarantine_path = quarantine_dir.join(format!("{stem}.{offset}.dropped.{attempt}"));
            attempt += 1;
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&quarantine_path)
            .map_err(io_error(&quarantine_path))?;
        for (index, (_, path)) in damaged.iter().enumerate() {
            read_whole(path, buffer)?;
            let start = if index == 0 { (offset as usize).min(buffer.len()) } else { 0 };
            let dropped = &buffer[start..];
            out.write_all(dropped).map_err(io_error(&quarantine_path))?;
            report.dropped_bytes += dropped.len() as u64;
            // A segment header never parses as a frame header, so the count may start at 0.
            report.dropped_records += count_parseable_frames(dropped, config.frame_bytes_max);
        }
        out.sync_all().map_err(io_error(&quarantine_path))?;
        drop(out);
        sync_dir(&quarantine_dir)?;
        if report.dropped_bytes > 0 {
            report.dropped_records = report.dropped_records.max(1);
        }
        report.quarantine_path = Some(quarantine_path);

        let (_, first_path) = &damaged[0];
        if offset >= wire::SEGMENT_HEADER_BYTES as u64 {
            let file = OpenOptions::new().write(true).open(first_path).map_err(io_error(first_path))?;
            file.set_len(offset).map_err(io_error(first_path))?;
            file.sync_all().map_err(io_error(first_path))?;
        } else {
            std::fs::remove_file(first_path).map_err(io_error(first_path))?;
        }
        for (_, path) in &damaged[1..] {
            std::fs::remove_file(path).map_err(io_error(path))?;
        }
        sync_dir(dir)
    }

    /// Like `Redex::append` but stamps `time_ms` instead of the wall clock (still
    /// clamped so time never goes backwards). Used by the deterministic log
    /// generator and tests.
    pub fn append_at(&mut self, payload: &[u8], time_ms: u64) -> Result<Stamp, RedexError> {
        self.check_usable()?;
        let frame_bytes = wire::frame_bytes(payload.len()) as u64;
        if payload.len() > u32::MAX as usize || frame_bytes > self.config.frame_bytes_max as u64 {
            return Err(RedexError::RecordTooLarge { frame_bytes, frame_bytes_max: self.config.frame_bytes_max });
        }
        let position = self.last_position + 1;
        let time_ms = time_ms.max(self.last_time_ms);
        let needs_segment = match self.segments.last() {
            None => true,
            Some(segment) => {
                !segment.record_offsets.is_empty() && segment.length_bytes + frame_bytes > self.config.segment_bytes_max
            }
        };
        if needs_segment {
            self.start_segment(position)?;
        }
        let segment = self.segments.last_mut().expect("a segment exists after start_segment");
        self.write_buffer.extend_from_slice(&wire::header_bytes(FrameKind::Record, position, time_ms, payload));
        self.write_buffer.extend_from_slice(payload);
        self.write_buffer.resize(self.write_buffer.len() + wire::padding_bytes(payload.len()), 0);
        segment.record_offsets.push(segment.length_bytes);
        segment.length_bytes += frame_bytes;
        self.last_position = position;
        self.last_time_ms = time_ms;
        self.unsynced_records += 1;
        self.unsynced_bytes += frame_bytes;
        let sync_now = match self.config.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Group { records, bytes } => {
                self.unsynced_records >= records as u64 || self.unsynced_bytes >= bytes
            }
            FsyncPolicy::Manual | FsyncPolicy::Never => false,
        };
        if sync_now {
            self.sync_all_pending()?;
        } else if self.write_buffer.len() >= WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(Stamp { position, time_ms })
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_usable(&self) -> Result<(), RedexError> {
        if self.poisoned {
            return Err(RedexError::Poisoned { path: self.dir.clone() });
        }
        Ok(())
    }

    fn active_path(&self) -> PathBuf {
        self.segments.last().map_or_else(|| self.dir.clone(), |segment| segment.path.clone())
    }

    /// Writes the user-space buffer to the active segment.
    fn flush(&mut self) -> Result<(), RedexError> {
        if self.write_buffer.is_empty() {
            return Ok(());
        }
        let path = self.active_path();
        let file = self.active.as_mut().expect("buffered records imply an active segment");
        if let Err(source) = file.write_all(&self.write_buffer) {
            self.poisoned = true;
            return Err(RedexError::Io { path, source });
        }
        self.write_buffer.clear();
        Ok(())
    }

    /// Flushes and fsyncs every segment holding unsynced records.
    fn sync_all_pending(&mut self) -> Result<u64, RedexError> {
        self.check_usable()?;
        self.flush()?;
        if self.unsynced_records == 0 && self.closed_unsynced.is_empty() {
            return Ok(self.durable_position);
        }
        for (path, file) in &self.closed_unsynced {
            if let Err(source) = file.sync_data() {
                self.poisoned = true;
                return Err(RedexError::Io { path: path.clone(), source });
            }
        }
        self.closed_unsynced.clear();
        if let Some(file) = &self.active {
            if let Err(source) = file.sync_data() {
                self.poisoned = true;
                return Err(RedexError::Io { path: self.active_path(), source });
            }
        }
        self.durable_position = self.last_position;
        self.unsynced_records = 0;
        self.unsynced_bytes = 0;
        Ok(self.durable_position)
    }

    /// Closes the active segment and creates a new one starting at `base_position`:
    /// header written to a temporary file, fsynced, renamed, directory fsynced.
    fn start_segment(&mut self, base_position: u64) -> Result<(), RedexError> {
        self.flush()?;
        if let Some(file) = self.active.take() {
            if self.unsynced_records > 0 {
                self.closed_unsynced.push((self.active_path(), file));
            }
        }
        let name = segment_file_name(base_position);
        let path = self.dir.join(&name);
        let temp_path = self.dir.join(format!("{base_position:020}{TEMP_SUFFIX}"));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp_path)
                .map_err(io_error(&temp_path))?;
            file.write_all(&segment_header(base_position)).map_err(io_error(&temp_path))?;
            file.sync_all().map_err(io_error(&temp_path))?;
            drop(file);
            std::fs::rename(&temp_path, &path).map_err(io_error(&path))?;
            sync_dir(&self.dir)?;
            OpenOptions::new().append(true).open(&path).map_err(io_error(&path))
        })();
        let file = match result {
            Ok(file) => file,
            Err(error) => {
                self.poisoned = true;
                return Err(error);
            }
        };
        self.active = Some(file);
        self.segments.push(Segment {
            base_position,
            path,
            record_offsets: Vec::new(),
            length_bytes: wire::SEGMENT_HEADER_BYTES as u64,
        });
        Ok(())
    }
}

impl Redex for EmbeddedLog {
    fn append(&mut self, payload: &[u8]) -> Result<Stamp, RedexError> {
        self.append_at(payload, now_ms())
    }

    fn sync(&mut self) -> Result<u64, RedexError> {
        self.sync_all_pending()
    }

    fn durable_position(&self) -> u64 {
        self.durable_position
    }

    fn last_position(&self) -> u64 {
        self.last_position
    }

    fn read_from(&mut self, from: u64, visit: &mut dyn FnMut(RecordView<'_>) -> bool) -> Result<u64, RedexError> {
        let from = from.max(1);
        if from > self.last_position + 1 {
            return Err(RedexError::BeyondEnd { position: from, last: self.last_position });
        }
        if from == self.last_position + 1 {
            return Ok(from - 1);
        }
        self.check_usable()?;
        self.flush()?;
        let mut buffer = std::mem::take(&mut self.read_buffer);
        let result = self.read_segments(from, visit, &mut buffer);
        self.read_buffer = buffer;
        result
    }
}

impl EmbeddedLog {
    /// Visits records from `from` (at most the last position) sequentially across segments.
    fn read_segments(
        &self,
        from: u64,
        visit: &mut dyn FnMut(RecordView<'_>) -> bool,
        buffer: &mut AlignedVec<{ wire::ALIGN_BYTES }>,
    ) -> Result<u64, RedexError> {
        let first = self.segments.partition_point(|segment| segment.base_position <= from);
        if first == 0 {
            let first_position = self.segments.first().map_or(0, |segment| segment.base_position);
            return Err(RedexError::BeforeStart { position: from, first: first_position });
        }
        let chunk_bytes = READ_CHUNK_BYTES.max(self.config.frame_bytes_max as usize);
        let mut position = from;
        for segment in &self.segments[first - 1..] {
            let Some(&start) = segment.record_offsets.get((position - segment.base_position) as usize) else {
                continue;
            };
            let mut file = File::open(&segment.path).map_err(io_error(&segment.path))?;
            let mut offset = start;
            while offset < segment.length_bytes {
                let want = (segment.length_bytes - offset).min(chunk_bytes as u64) as usize;
                buffer.clear();
                buffer.resize(want, 0);
                file.seek(SeekFrom::Start(offset)).map_err(io_error(&segment.path))?;
                file.read_exact(buffer.as_mut_slice()).map_err(io_error(&segment.path))?;
                let mut cursor = 0;
                while cursor < want {
                    let frame = match wire::decode_frame(&buffer[cursor..], self.config.frame_bytes_max) {
                        Ok(frame) => frame,
                        // The frame continues past this chunk: read again from its start.
                        Err(wire::FrameError::Truncated { .. }) if cursor > 0 => break,
                        Err(error) => {
                            return Err(RedexError::Damaged {
                                path: segment.path.clone(),
                                position,
                                offset: offset + cursor as u64,
                                reason: error.to_string(),
                            })
                        }
                    };
                    if frame.header.seq != position {
                        return Err(RedexError::Damaged {
                            path: segment.path.clone(),
                            position,
                            offset: offset + cursor as u64,
                            reason: format!("frame says position {}, expected {position}", frame.header.seq),
                        });
                    }
                    let view = RecordView { position, time_ms: frame.header.time_ms, payload: frame.payload };
                    cursor += frame.header.frame_bytes();
                    if !visit(view) {
                        return Ok(position);
                    }
                    position += 1;
                }
                offset += cursor as u64;
            }
        }
        Ok(position - 1)
    }
}

/// Read-only check of every record of a log directory: never writes, truncates or
/// locks. Checks segment headers, frame headers, checksums, positions dense and
/// increasing across segments, times non-decreasing, and that each payload
/// validates as an archived `EventBatch`.
pub fn verify(dir: &Path, config: &Config) -> Result<VerifyReport, RedexError> {
    let listed = list_segments(dir)?;
    let mut report = VerifyReport { segments: listed.len() as u32, ..VerifyReport::default() };
    let mut buffer = AlignedVec::<{ wire::ALIGN_BYTES }>::new();
    let mut next_position: Option<u64> = None;
    let mut last_time_ms = 0;
    for (name_base, path) in &listed {
        read_whole(path, &mut buffer)?;
        if report.damage.is_some() {
            report.bytes_after_damage += buffer.len() as u64;
            continue;
        }
        let scan = scan_segment(&buffer, *name_base, next_position, last_time_ms, config.frame_bytes_max, true);
        too_large(path, &scan, config)?;
        if report.first_position == 0 && !scan.record_offsets.is_empty() {
            report.first_position = scan.next_position - scan.record_offsets.len() as u64;
        }
        report.records += scan.record_offsets.len() as u64;
        report.events += scan.events;
        report.invalid_payloads += scan.invalid_payloads;
        if report.first_invalid_payload.is_none() {
            report.first_invalid_payload = scan.first_invalid_payload.map(|(offset, position, reason)| Damage {
                path: path.clone(),
                position,
                offset,
                reason,
            });
        }
        report.bytes += scan.valid_bytes;
        if !scan.record_offsets.is_empty() {
            report.last_position = scan.next_position - 1;
        }
        next_position = Some(scan.next_position);
        last_time_ms = scan.last_time_ms;
        if let Some((offset, position, reason)) = scan.damage {
            report.bytes_after_damage = buffer.len() as u64 - offset;
            report.damage = Some(Damage { path: path.clone(), position, offset, reason });
        }
    }
    if let Some(damage) = &report.damage {
        // Every damaged record, not the first only: the intact records past the
        // damage, and the positions between them that none holds.
        let mut after = std::collections::BTreeSet::new();
        for (_, path) in &listed {
            read_whole(path, &mut buffer)?;
            let (records, _) = scan_intact(&buffer, config.frame_bytes_max);
            after.extend(records.into_iter().map(|found| found.position).filter(|&p| p >= damage.position));
        }
        report.intact_after_damage = after.len() as u64;
        let mut expected = damage.position;
        for &position in &after {
            if position > expected {
                report.damaged_positions.push((expected, position - 1));
            }
            expected = position + 1;
        }
        if after.is_empty() {
            report.damaged_positions.push((damage.position, damage.position));
        }
    }
    Ok(report)
}

/// What `read_unlocked` read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnlockedRead {
    /// Complete, checked records visited (from the first, up to the stop).
    pub records: u64,
    /// Position of the last record visited (0 when none was).
    pub last_position: u64,
    /// Where the complete records ended short of the files' end, and why: a record
    /// a running writer is still appending (a torn tail) or damage that the writer's
    /// next open would cut off. Nothing is changed either way.
    pub stopped_at: Option<Damage>,
}

/// Reads the complete records of the log in `dir` in position order, WITHOUT taking
/// the writer's lock and without changing a byte: for tools that look at a log a
/// running node holds open (`meshos admin --dry-run`). Each segment is read whole and
/// scanned as recovery does (headers, checksums, dense positions, monotone times);
/// the first record that is not complete and intact ends the read, and everything
/// before it is visited (payloads are not validated here: fold validates them).
/// `visit` returns false to stop early. A record above `frame_bytes_max` refuses
/// with `FrameLimitTooSmall`, as `open` does.
pub fn read_unlocked(
    dir: &Path,
    config: &Config,
    visit: &mut dyn FnMut(RecordView<'_>) -> bool,
) -> Result<UnlockedRead, RedexError> {
    config.validate()?;
    let listed = list_segments(dir)?;
    let mut report = UnlockedRead::default();
    let mut buffer = AlignedVec::<{ wire::ALIGN_BYTES }>::new();
    let mut next_position: Option<u64> = None;
    let mut last_time_ms = 0;
    for (name_base, path) in &listed {
        read_whole(path, &mut buffer)?;
        let scan = scan_segment(&buffer, *name_base, next_position, last_time_ms, config.frame_bytes_max, false);
        too_large(path, &scan, config)?;
        let base = scan.next_position - scan.record_offsets.len() as u64;
        for (index, &offset) in scan.record_offsets.iter().enumerate() {
            let frame = wire::decode_frame(&buffer[offset as usize..], config.frame_bytes_max)
                .expect("the scan checked this frame");
            let position = base + index as u64;
            report.records += 1;
            report.last_position = position;
            let view = RecordView { position, time_ms: frame.header.time_ms, payload: frame.payload };
            if !visit(view) {
                return Ok(report);
            }
        }
        if let Some((offset, position, reason)) = scan.damage {
            report.stopped_at = Some(Damage { path: path.clone(), position, offset, reason });
            return Ok(report);
        }
        next_position = Some(scan.next_position);
        last_time_ms = scan.last_time_ms;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trip_and_failures() {
        let header = segment_header(42);
        assert_eq!(decode_segment_header(&header), Ok(42));
        assert!(decode_segment_header(&header[..10]).unwrap_err().contains("truncated"));
        let mut bad = header;
        bad[9] ^= 1;
        assert!(decode_segment_header(&bad).unwrap_err().contains("checksum"));
        let mut bad = header;
        bad[0] = b'X';
        assert!(decode_segment_header(&bad).unwrap_err().contains("magic"));
    }

    #[test]
    fn segment_names_sort_by_position() {
        assert_eq!(segment_file_name(1), "00000000000000000001.seg");
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    #[test]
    fn counting_frames_skips_garbage() {
        let mut bytes = vec![0xAAu8; 48];
        wire::encode_frame(&mut bytes, FrameKind::Record, 1, 0, &[1, 2, 3]);
        wire::encode_frame(&mut bytes, FrameKind::Record, 2, 0, &[4; 40]);
        assert_eq!(count_parseable_frames(&bytes, 1 << 20), 2);
        assert_eq!(count_parseable_frames(&[], 1 << 20), 0);
    }
}

/// What `salvage` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    /// Positions of the salvaged log: `first_position..=last_position`.
    pub first_position: u64,
    pub last_position: u64,
    /// Intact records kept, each at its position with its bytes.
    pub kept: u64,
    /// Positions whose record was lost: each is now an empty record (fold counts it as
    /// a rejected record), in ranges `(first, last)`.
    pub holes: u64,
    pub hole_ranges: Vec<(u64, u64)>,
    /// Damaged byte ranges found, as (segment file, from, to).
    pub damaged_ranges: Vec<(PathBuf, u64, u64)>,
    /// Where the old segment files went (every byte of them, untouched).
    pub quarantined_to: Option<PathBuf>,
}

/// Repairs a log damaged in the middle: keeps every intact record at its position,
/// writes an empty record (a hole, which fold rejects and counts) at each position
/// whose record is lost, never renumbers, and drops only what follows the last intact
/// record (a torn tail). The new segments are written beside the old ones and fsynced
/// first; then the old segment files move, whole, into `DIR/quarantine/salvaged-<ms>/`
/// and the new ones take their place. Takes the writer's lock: not while a node runs.
/// A log with no damage is left as it is (`holes` 0, nothing quarantined).
pub fn salvage(dir: &Path, config: &Config) -> Result<SalvageReport, RedexError> {
    config.validate()?;
    let _lock = lock_dir(dir)?;
    let listed = list_segments(dir)?;
    let mut report = SalvageReport::default();
    let mut buffer = AlignedVec::<{ wire::ALIGN_BYTES }>::new();
    // Every intact record, by position (the first found wins), with its bytes.
    let mut found: std::collections::BTreeMap<u64, (u64, Vec<u8>)> = std::collections::BTreeMap::new();
    for (_, path) in &listed {
        read_whole(path, &mut buffer)?;
        let (records, damaged) = scan_intact(&buffer, config.frame_bytes_max);
        for frame in records {
            let bytes = buffer[frame.offset as usize..(frame.offset + frame.frame_bytes) as usize].to_vec();
            found.entry(frame.position).or_insert((frame.time_ms, bytes));
        }
        report.damaged_ranges.extend(damaged.into_iter().map(|(from, to)| (path.clone(), from, to)));
    }
    let Some((&last, _)) = found.iter().next_back() else {
        return Ok(report);
    };
    let first = listed.first().map_or(1, |(base, _)| *base).clamp(1, *found.keys().next().expect("not empty"));
    report.first_position = first;
    report.last_position = last;
    if report.damaged_ranges.is_empty() && found.len() as u64 == last - first + 1 {
        report.kept = found.len() as u64;
        return Ok(report);
    }
    // The salvaged segments, written beside the old ones.
    let staging = dir.join("salvage.tmp");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_error(&staging))?;
    let mut written: Vec<PathBuf> = Vec::new();
    let mut segment: Option<(File, PathBuf, u64)> = None;
    let mut time_ms = 0u64;
    let mut hole = Vec::new();
    for position in first..=last {
        let record = match found.get(&position) {
            // A record whose time would go backwards is not kept: a hole instead.
            Some((record_time, bytes)) if *record_time >= time_ms => {
                time_ms = *record_time;
                report.kept += 1;
                bytes.as_slice()
            }
            _ => {
                report.holes += 1;
                match report.hole_ranges.last_mut() {
                    Some((_, end)) if *end + 1 == position => *end = position,
                    _ => report.hole_ranges.push((position, position)),
                }
                hole.clear();
                wire::encode_frame(&mut hole, FrameKind::Record, position, time_ms, &[]);
                hole.as_slice()
            }
        };
        let roll = segment.as_ref().is_some_and(|(_, _, length)| {
            *length > wire::SEGMENT_HEADER_BYTES as u64 && length + record.len() as u64 > config.segment_bytes_max
        });
        if roll || segment.is_none() {
            if let Some((file, path, _)) = segment.take() {
                file.sync_all().map_err(io_error(&path))?;
                written.push(path);
            }
            let path = staging.join(segment_file_name(position));
            let mut file = File::create(&path).map_err(io_error(&path))?;
            file.write_all(&segment_header(position)).map_err(io_error(&path))?;
            segment = Some((file, path, wire::SEGMENT_HEADER_BYTES as u64));
        }
        let (file, path, length) = segment.as_mut().expect("opened above");
        file.write_all(record).map_err(io_error(path))?;
        *length += record.len() as u64;
    }
    if let Some((file, path, _)) = segment.take() {
        file.sync_all().map_err(io_error(&path))?;
        written.push(path);
    }
    sync_dir(&staging)?;
    // The old segments, whole, into the quarantine; then the new ones in their place.
    let quarantine = dir.join(QUARANTINE_DIR).join(format!("salvaged-{}", now_ms()));
    std::fs::create_dir_all(&quarantine).map_err(io_error(&quarantine))?;
    for (_, path) in &listed {
        let target = quarantine.join(path.file_name().expect("a segment file name"));
        std::fs::rename(path, &target).map_err(io_error(path))?;
    }
    sync_dir(&quarantine)?;
    sync_dir(dir)?;
    for path in &written {
        let target = dir.join(path.file_name().expect("a segment file name"));
        std::fs::rename(path, &target).map_err(io_error(path))?;
    }
    sync_dir(dir)?;
    std::fs::remove_dir(&staging).map_err(io_error(&staging))?;
    report.quarantined_to = Some(quarantine);
    Ok(report)
}
