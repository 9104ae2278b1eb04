//! Checkpoints: the folded state at a log position, archived with rkyv in a file, so
//! a node restarts from it instead of replaying its log from position 1, and a new
//! node starts from a file copied from another node.
//!
//! File layout (all integers little-endian):
//!
//! ```text
//!  0..8   magic `MESHCKPT`
//!  8..12  format version (FORMAT_VERSION)
//! 12..16  length of the settings text
//! 16..24  position of the last record folded into the state
//! 24..32  log time (now_ms) of the state
//! 32..48  state hash (`State::state_hash`, u128)
//! 48..64  settings fingerprint (blake3 of the settings text, first 16 bytes)
//! 64..72  length of the archive
//! 72..76  CRC-32C of everything after the header
//! 76..80  CRC-32C of bytes 0..76
//! 80..    settings text: `Debug` of the fold limits and of the reconcile settings,
//!         one line each, zero-padded to a multiple of 16 bytes
//! then    the rkyv archive of the `State` (root last), 16-aligned
//! ```
//!
//! What is stored: every column of every table, the counters, the gates, the
//! in-flight actions, the keyring (public keys as bytes), the rejections. What is not:
//! the hash maps that only find a row by key (each table's `index`, rebuilt from the
//! columns by `rebuild_index` after a load), and the fold limits and reconcile
//! settings, which are config: the file carries their text and fingerprint, and a load
//! takes them from the loading node's config after checking that they are equal (a
//! state folded under other limits would diverge from the cluster's).
//!
//! Invariants: a file is published whole (temporary file, fsync, rename, directory
//! fsync), so a crash leaves the previous checkpoint or the new one; a load returns a
//! state only after the header, both checksums, rkyv's bytecheck validation, the
//! settings, the column lengths, the rebuilt indexes, the state hash (recomputed,
//! equal to the header's) and every cross-table invariant (`State::verify_invariants`)
//! passed, so a loaded state is the state the writer had, with the same hash. Every
//! defect is a `CheckpointError` naming the file and what is wrong, never a panic.
//! Adding a column to a table needs nothing here: the derives archive it (its type
//! must be archivable), and `check_columns` of its table must list it.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rkyv::rancor::{self, Fallible, Source};
use rkyv::ser::Writer;
use rkyv::string::{ArchivedString, StringResolver};
use rkyv::util::AlignedVec;
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::Place;

use super::hash::hash_hex;
use super::{ArchivedState, State};
use crate::config::{Config, FoldLimits, ReconcileConfig};

pub const MAGIC: [u8; 8] = *b"MESHCKPT";
/// Bumped whenever the layout or the archived `State` changes shape.
pub const FORMAT_VERSION: u32 = 2;
pub const HEADER_BYTES: usize = 80;
/// The archive's alignment (rkyv's `aligned` feature aligns to 16).
pub const ALIGN_BYTES: usize = 16;
const _: () = assert!(HEADER_BYTES.is_multiple_of(ALIGN_BYTES));
/// Longest settings text a reader accepts (two `Debug` lines of a few hundred bytes).
const SETTINGS_BYTES_MAX: usize = 64 << 10;

/// Everything that can be wrong with a checkpoint, each naming its file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a checkpoint (magic {found:?}, expected \"MESHCKPT\")", .path.display())]
    BadMagic { path: PathBuf, found: String },
    #[error("{}: checkpoint format version {found}, this build reads version {expected}", .path.display())]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("{}: checkpoint is damaged: {what}", .path.display())]
    Damaged { path: PathBuf, what: String },
    #[error("{}: checkpoint was made with different [{section}] settings: {field}", .path.display())]
    ConfigMismatch { path: PathBuf, section: &'static str, field: String },
    #[error(
        "{}: the loaded state hashes to {} but the checkpoint was written with {}",
        .path.display(), hash_hex(*.computed), hash_hex(*.expected)
    )]
    HashMismatch { path: PathBuf, expected: u128, computed: u128 },
    #[error("{}: the loaded state breaks an invariant: {what}", .path.display())]
    Invariant { path: PathBuf, what: String },
    #[error("{}: the state could not be archived: {reason}", .path.display())]
    Archive { path: PathBuf, reason: String },
}

/// The fixed header of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub settings_bytes: u32,
    pub position: u64,
    pub now_ms: u64,
    pub state_hash: u128,
    pub settings_fingerprint: u128,
    pub archive_bytes: u64,
    pub body_crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&self.version.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.settings_bytes.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.position.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.now_ms.to_le_bytes());
        bytes[32..48].copy_from_slice(&self.state_hash.to_le_bytes());
        bytes[48..64].copy_from_slice(&self.settings_fingerprint.to_le_bytes());
        bytes[64..72].copy_from_slice(&self.archive_bytes.to_le_bytes());
        bytes[72..76].copy_from_slice(&self.body_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[..76]);
        bytes[76..80].copy_from_slice(&header_crc.to_le_bytes());
        bytes
    }

    /// Parses and checks the header of `bytes` (magic, version, header checksum).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Header, CheckpointError> {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(CheckpointError::BadMagic {
                path: path.to_path_buf(),
                found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
            });
        }
        if bytes.len() < HEADER_BYTES {
            return Err(damaged(path, format!("{} bytes is shorter than the {HEADER_BYTES}-byte header", bytes.len())));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let u128_at = |at: usize| u128::from_le_bytes(bytes[at..at + 16].try_into().expect("16 bytes"));
        let version = u32_at(8);
        if u32_at(76) != crc32c::crc32c(&bytes[..76]) {
            return Err(damaged(path, "header checksum mismatch".to_string()));
        }
        if version != FORMAT_VERSION {
            return Err(CheckpointError::Version {
                path: path.to_path_buf(),
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        Ok(Header {
            version,
            settings_bytes: u32_at(12),
            position: u64_at(16),
            now_ms: u64_at(24),
            state_hash: u128_at(32),
            settings_fingerprint: u128_at(48),
            archive_bytes: u64_at(64),
            body_crc: u32_at(72),
        })
    }
}

fn damaged(path: &Path, what: String) -> CheckpointError {
    CheckpointError::Damaged { path: path.to_path_buf(), what }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// The settings that shape the state, as text: `[fold]` then `[reconcile]`, each the
/// `Debug` of its struct on one line (a state carries the ones it was folded with).
pub fn settings_text(fold: &FoldLimits, reconcile: &ReconcileConfig) -> String {
    format!("{fold:?}\n{reconcile:?}")
}

/// blake3 of the settings text, first 16 bytes (LE).
pub fn settings_fingerprint(text: &str) -> u128 {
    u128::from_le_bytes(blake3::hash(text.as_bytes()).as_bytes()[..16].try_into().expect("16 bytes"))
}

/// `name: value` pairs of a `Debug` line `Name { a: 1, b: 2 }` (flat structs of numbers).
fn debug_fields(line: &str) -> Vec<(&str, &str)> {
    let inner = line.split_once('{').map_or("", |(_, rest)| rest).trim_end().trim_end_matches('}');
    inner
        .split(',')
        .filter_map(|field| field.split_once(':'))
        .map(|(name, value)| (name.trim(), value.trim()))
        .collect()
}

/// The first field that differs between the checkpoint's settings and the node's, as
/// `(section, "field: checkpoint X, this node Y")`; None when equal.
fn settings_difference(stored: &str, expected: &str) -> Option<(&'static str, String)> {
    let mut stored_lines = stored.lines();
    let mut expected_lines = expected.lines();
    for section in ["fold", "reconcile"] {
        let (stored, expected) = (stored_lines.next().unwrap_or(""), expected_lines.next().unwrap_or(""));
        if stored == expected {
            continue;
        }
        let (stored_fields, expected_fields) = (debug_fields(stored), debug_fields(expected));
        for (name, value) in &expected_fields {
            match stored_fields.iter().find(|(stored_name, _)| stored_name == name) {
                Some((_, stored_value)) if stored_value == value => {}
                Some((_, stored_value)) => {
                    return Some((section, format!("{name} (checkpoint {stored_value}, this node {value})")));
                }
                None => return Some((section, format!("{name} (not in the checkpoint, this node {value})"))),
            }
        }
        for (name, value) in &stored_fields {
            if !expected_fields.iter().any(|(expected_name, _)| expected_name == name) {
                return Some((section, format!("{name} (checkpoint {value}, unknown to this node)")));
            }
        }
        return Some((section, "the settings text differs".to_string()));
    }
    if stored != expected {
        return Some(("fold", "the settings text differs".to_string()));
    }
    None
}

/// Writes the checkpoint image of `state` (header, settings, archive) into `buffer`
/// (cleared first) and returns it.
pub fn encode_into(state: &State, buffer: AlignedVec<ALIGN_BYTES>) -> Result<AlignedVec<ALIGN_BYTES>, rancor::Error> {
    let settings = settings_text(&state.limits, &state.reconcile);
    let settings_padded = settings.len().next_multiple_of(ALIGN_BYTES);
    let mut buffer = buffer;
    buffer.clear();
    buffer.extend_from_slice(&[0; HEADER_BYTES]);
    buffer.extend_from_slice(settings.as_bytes());
    buffer.extend_from_slice(&[0; ALIGN_BYTES][..settings_padded - settings.len()]);
    let archive_start = buffer.len();
    // The archive starts at a multiple of its alignment and rkyv pads from the start
    // of the buffer, so the archive alone is a valid, aligned rkyv buffer.
    let mut buffer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(state, buffer)?;
    let header = Header {
        version: FORMAT_VERSION,
        settings_bytes: settings.len() as u32,
        position: state.position,
        now_ms: state.now_ms,
        state_hash: state.state_hash(),
        settings_fingerprint: settings_fingerprint(&settings),
        archive_bytes: (buffer.len() - archive_start) as u64,
        body_crc: crc32c::crc32c(&buffer[HEADER_BYTES..]),
    };
    buffer[..HEADER_BYTES].copy_from_slice(&header.encode());
    Ok(buffer)
}

/// Validates a whole checkpoint image and returns the owned state it holds, with its
/// indexes rebuilt and `expected`'s settings (see the module docs for every check).
/// `path` only names the file in errors. `bytes` must be 16-aligned (an `AlignedVec`).
pub fn decode(path: &Path, bytes: &[u8], expected: &Config) -> Result<State, CheckpointError> {
    let header = Header::decode(path, bytes)?;
    let settings_bytes = header.settings_bytes as usize;
    if settings_bytes > SETTINGS_BYTES_MAX {
        return Err(damaged(path, format!("settings text of {settings_bytes} bytes")));
    }
    let archive_start = HEADER_BYTES + settings_bytes.next_multiple_of(ALIGN_BYTES);
    let file_bytes = (archive_start as u64).saturating_add(header.archive_bytes);
    if bytes.len() as u64 != file_bytes {
        return Err(damaged(
            path,
            format!("{} bytes, the header says {file_bytes} (truncated or extended)", bytes.len()),
        ));
    }
    if crc32c::crc32c(&bytes[HEADER_BYTES..]) != header.body_crc {
        return Err(damaged(path, "checksum mismatch (bytes changed after writing)".to_string()));
    }
    let settings = std::str::from_utf8(&bytes[HEADER_BYTES..HEADER_BYTES + settings_bytes])
        .map_err(|_| damaged(path, "settings text is not UTF-8".to_string()))?;
    if settings_fingerprint(settings) != header.settings_fingerprint {
        return Err(damaged(path, "settings fingerprint does not match the settings text".to_string()));
    }
    let archive = &bytes[archive_start..];
    if !(archive.as_ptr() as usize).is_multiple_of(ALIGN_BYTES) {
        return Err(damaged(path, "archive is not 16-aligned in memory (read it into an AlignedVec)".to_string()));
    }
    let archived = rkyv::access::<ArchivedState, rancor::Error>(archive)
        .map_err(|error| damaged(path, format!("archive does not validate: {error}")))?;
    let expected_settings = settings_text(&expected.fold, &expected.reconcile);
    if let Some((section, field)) = settings_difference(settings, &expected_settings) {
        return Err(CheckpointError::ConfigMismatch { path: path.to_path_buf(), section, field });
    }
    let mut state = rkyv::deserialize::<State, rancor::Error>(archived)
        .map_err(|error| damaged(path, format!("archive does not deserialize: {error}")))?;
    if state.position != header.position || state.now_ms != header.now_ms {
        return Err(damaged(
            path,
            format!(
                "header says position {} at {} ms, the state is at position {} at {} ms",
                header.position, header.now_ms, state.position, state.now_ms
            ),
        ));
    }
    if state.keyring.cluster_id != expected.genesis.cluster_id() {
        return Err(CheckpointError::ConfigMismatch {
            path: path.to_path_buf(),
            section: "cluster",
            field: format!(
                "genesis: the checkpoint is of cluster {}, this node's genesis is of cluster {}",
                crate::event::hex(&state.keyring.cluster_id),
                expected.genesis.cluster_id_hex()
            ),
        });
    }
    state.limits = expected.fold;
    state.reconcile = expected.reconcile;
    let invariant = |what: String| CheckpointError::Invariant { path: path.to_path_buf(), what };
    if state.rejections.kept_max != expected.fold.rejections_kept_max as usize
        || state.inflight.capacity != expected.reconcile.tracked_inflight_max()
    {
        return Err(invariant(format!(
            "rejection ring of {} and in-flight capacity of {} do not follow from the settings",
            state.rejections.kept_max, state.inflight.capacity
        )));
    }
    // Column lengths before anything indexes by row (the hash does).
    state.check_columns().map_err(invariant)?;
    state.rebuild_indexes().map_err(invariant)?;
    let computed = state.state_hash();
    if computed != header.state_hash {
        return Err(CheckpointError::HashMismatch { path: path.to_path_buf(), expected: header.state_hash, computed });
    }
    state.verify_invariants().map_err(invariant)?;
    Ok(state)
}

/// Reads the checkpoint at `path` into an aligned buffer and `decode`s it.
pub fn read_file(path: &Path, expected: &Config) -> Result<State, CheckpointError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let file_bytes = file.metadata().map_err(io_error(path))?.len();
    if file_bytes >= HEADER_BYTES as u64 {
        // The header first: a file that is not a checkpoint, or whose length is not
        // the one its header gives, is refused before its body is read into memory.
        let mut header = [0u8; HEADER_BYTES];
        file.read_exact(&mut header).map_err(io_error(path))?;
        let header = Header::decode(path, &header)?;
        let expected_bytes = (HEADER_BYTES as u64)
            .saturating_add((header.settings_bytes as u64).next_multiple_of(ALIGN_BYTES as u64))
            .saturating_add(header.archive_bytes);
        if file_bytes != expected_bytes {
            return Err(damaged(
                path,
                format!("{file_bytes} bytes, the header says {expected_bytes} (truncated or extended)"),
            ));
        }
        file.rewind().map_err(io_error(path))?;
    }
    let file_bytes = usize::try_from(file_bytes).map_err(|_| damaged(path, "larger than memory".to_string()))?;
    let mut buffer = AlignedVec::<ALIGN_BYTES>::with_capacity(file_bytes);
    buffer.resize(file_bytes, 0);
    file.read_exact(&mut buffer).map_err(io_error(path))?;
    // A file that shrank meanwhile fails `read_exact`; one that changed is refused by
    // the checks of `decode`.
    decode(path, &buffer, expected)
}

pub use crate::sys::files::temporary_path;

/// Publishes `bytes` at `path` atomically (`sys::files::write_atomically`).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::sys::files::write_atomically(path, bytes).map_err(|(path, source)| CheckpointError::Io { path, source })
}

/// Encodes `state` and publishes it at `path`; returns the file's size in bytes.
pub fn write_file(path: &Path, state: &State) -> Result<u64, CheckpointError> {
    let buffer = encode_into(state, AlignedVec::new())
        .map_err(|error| CheckpointError::Archive { path: path.to_path_buf(), reason: error.to_string() })?;
    write_file_atomically(path, &buffer)?;
    Ok(buffer.len() as u64)
}

/// A directory of checkpoints `checkpoint-<position, 20 digits>.rkyv`, of which the
/// newest `keep` are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointStore {
    pub dir: PathBuf,
    /// How many checkpoints `write` leaves (at least 1).
    pub keep: usize,
}

const FILE_PREFIX: &str = "checkpoint-";
const FILE_SUFFIX: &str = ".rkyv";

impl CheckpointStore {
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> CheckpointStore {
        CheckpointStore { dir: dir.into(), keep: keep.max(1) }
    }

    /// The file name of the checkpoint at `position`.
    pub fn file_name(position: u64) -> String {
        format!("{FILE_PREFIX}{position:020}{FILE_SUFFIX}")
    }

    /// The position a checkpoint file name stands for (None: not a checkpoint name).
    pub fn parse_file_name(name: &str) -> Option<u64> {
        let digits = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
        if digits.len() != 20 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    pub fn path_for(&self, position: u64) -> PathBuf {
        self.dir.join(Self::file_name(position))
    }

    /// Writes a checkpoint of `state` at its position, then removes all but the
    /// newest `keep`. Creates the directory if needed.
    pub fn write(&self, state: &State) -> Result<PathBuf, CheckpointError> {
        std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let path = self.path_for(state.position);
        write_file(&path, state)?;
        let checkpoints = self.list()?;
        let excess = checkpoints.len().saturating_sub(self.keep);
        for (_, old) in &checkpoints[..excess] {
            std::fs::remove_file(old).map_err(io_error(old))?;
        }
        Ok(path)
    }

    /// Every checkpoint in the directory, oldest (lowest position) first; an absent
    /// directory holds none. Temporary files and other names are ignored.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error(&self.dir)(error)),
        };
        let mut checkpoints = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error(&self.dir))?;
            if let Some(position) = entry.file_name().to_str().and_then(Self::parse_file_name) {
                checkpoints.push((position, entry.path()));
            }
        }
        checkpoints.sort();
        Ok(checkpoints)
    }

    /// The newest checkpoint (None: none, or the directory cannot be read; `list`
    /// says why).
    pub fn latest(&self) -> Option<(u64, PathBuf)> {
        self.list().ok()?.pop()
    }

    /// Deletes every checkpoint past `position` (a node rolling back to a stream that
    /// lost records those checkpoints folded); returns how many.
    pub fn remove_above(&self, position: u64) -> Result<usize, CheckpointError> {
        let mut removed = 0;
        for (at, path) in self.list()? {
            if at > position {
                std::fs::remove_file(&path).map_err(io_error(&path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The position of the oldest checkpoint kept (None: none, or unreadable).
    pub fn oldest(&self) -> Option<u64> {
        self.list().ok()?.first().map(|(position, _)| *position)
    }

    /// The newest checkpoint at or below `position` (a node whose log ends at
    /// `position` cannot use a checkpoint past it).
    pub fn latest_at_or_below(&self, position: u64) -> Option<(u64, PathBuf)> {
        self.list().ok()?.into_iter().rev().find(|(at, _)| *at <= position)
    }

    /// Loads and checks the checkpoint at `path` for a node with config `expected`.
    pub fn load(&self, path: &Path, expected: &Config) -> Result<State, CheckpointError> {
        read_file(path, expected)
    }
}

/// rkyv wrapper for `&'static str` fields (rejection kinds and reasons): archived as a
/// string, and interned on deserialisation so that loading gives a `&'static str`
/// again. The texts are the fixed names and messages fold uses, so the interned set
/// stays small; it is bounded all the same (`STATIC_TEXTS_MAX`, then an error).
pub struct StaticText;

/// Most distinct texts interned over the process's life.
const STATIC_TEXTS_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("more than {STATIC_TEXTS_MAX} distinct rejection texts")]
struct TooManyTexts;

fn intern(text: &str) -> Option<&'static str> {
    static TEXTS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut texts = TEXTS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(&text) = texts.get(text) {
        return Some(text);
    }
    if texts.len() >= STATIC_TEXTS_MAX {
        return None;
    }
    let text: &'static str = Box::leak(text.into());
    texts.insert(text);
    Some(text)
}

impl ArchiveWith<&'static str> for StaticText {
    type Archived = ArchivedString;
    type Resolver = StringResolver;

    fn resolve_with(field: &&'static str, resolver: StringResolver, out: Place<ArchivedString>) {
        ArchivedString::resolve_from_str(field, resolver, out);
    }
}

impl<S> SerializeWith<&'static str, S> for StaticText
where
    S: Fallible + Writer + ?Sized,
    S::Error: Source,
{
    fn serialize_with(field: &&'static str, serializer: &mut S) -> Result<StringResolver, S::Error> {
        ArchivedString::serialize_from_str(field, serializer)
    }
}

impl<D> DeserializeWith<ArchivedString, &'static str, D> for StaticText
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(field: &ArchivedString, _: &mut D) -> Result<&'static str, D::Error> {
        intern(field.as_str()).ok_or_else(|| D::Error::new(TooManyTexts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip_and_sort_by_position() {
        assert_eq!(CheckpointStore::file_name(42), "checkpoint-00000000000000000042.rkyv");
        assert_eq!(CheckpointStore::parse_file_name("checkpoint-00000000000000000042.rkyv"), Some(42));
        assert_eq!(CheckpointStore::parse_file_name("checkpoint-00000000000000000042.rkyv.tmp"), None);
        assert_eq!(CheckpointStore::parse_file_name("checkpoint-42.rkyv"), None);
        assert_eq!(CheckpointStore::parse_file_name(&CheckpointStore::file_name(u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn settings_differences_name_the_field() {
        let config = Config::default();
        let mut other = config.clone();
        other.fold.nodes_max = 7;
        let text = |config: &Config| settings_text(&config.fold, &config.reconcile);
        let (a, b) = (text(&config), text(&other));
        assert_eq!(settings_difference(&a, &a), None);
        let (section, field) = settings_difference(&a, &b).expect("differs");
        assert_eq!(section, "fold");
        assert!(field.starts_with("nodes_max (checkpoint 65536, this node 7)"), "{field}");
        let mut other = config.clone();
        other.reconcile.recovery_ms += 1;
        let (section, field) = settings_difference(&a, &text(&other)).expect("differs");
        assert_eq!(section, "reconcile");
        assert!(field.starts_with("recovery_ms"), "{field}");
    }

    #[test]
    fn an_empty_state_round_trips() {
        let config = Config::default();
        let state = State::new(&config);
        let bytes = encode_into(&state, AlignedVec::new()).expect("encode");
        let loaded = decode(Path::new("mem"), &bytes, &config).expect("decode");
        assert_eq!(loaded.state_hash(), state.state_hash());
    }
}
