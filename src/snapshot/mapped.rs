//! Reading a snapshot file in place: mapped read-only, validated once, then read
//! through references into the mapping (no copy, no deserialisation).
//!
//! `libc::mmap` is called directly (libc is already an engine dependency; memmap2
//! would add a crate for the two calls used here).
//!
//! Invariants: `MappedSnapshot::open` returns a value only after the header (magic,
//! version), the checksum, rkyv's bytecheck validation of the whole archive, the
//! archived format version and the shape (column lengths, CSR offsets, row
//! references) all passed, so every reference `get` hands out points into a mapping
//! whose bytes are a valid `ArchivedSnapshot`; the mapping lives exactly as long as the
//! value. A file with any defect is an error, never a panic or undefined behaviour.
//! The one thing this cannot guard against is another process truncating or writing
//! the mapped file in place (a mapped page then reads the new bytes or faults);
//! MeshOS never does that (`file.rs`: snapshots are replaced by rename, never
//! rewritten), and a file replaced by rename stays mapped unchanged.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rkyv::rancor;

use super::shape::check_archived_shape;
use super::{ArchivedSnapshot, SnapshotError, FORMAT_VERSION, HEADER_BYTES, MAGIC};

/// A snapshot file mapped read-only and validated.
pub struct MappedSnapshot {
    /// Start and length of the mapping (the whole file).
    mapping: NonNull<u8>,
    mapping_bytes: usize,
    /// The validated root, inside the mapping.
    root: NonNull<ArchivedSnapshot>,
    path: PathBuf,
}

// SAFETY: the mapping is read-only (PROT_READ) and owned by this value alone (unmapped
// once, in `drop`); shared references to immutable bytes may cross threads, and
// moving the owner to another thread moves nothing the mapping depends on.
unsafe impl Send for MappedSnapshot {}
// SAFETY: `&MappedSnapshot` only gives shared, read-only access to immutable memory.
unsafe impl Sync for MappedSnapshot {}

impl MappedSnapshot {
    /// Maps `path` read-only and validates it once (see the module docs).
    pub fn open(path: &Path) -> Result<MappedSnapshot, SnapshotError> {
        let io_error = |source| SnapshotError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io_error)?;
        let file_bytes = file.metadata().map_err(io_error)?.len();
        if file_bytes <= HEADER_BYTES as u64 {
            return Err(SnapshotError::TooShort { path: path.to_path_buf(), file_bytes });
        }
        let mapping_bytes = usize::try_from(file_bytes).map_err(|_| SnapshotError::Map {
            path: path.to_path_buf(),
            source: std::io::Error::other("file larger than the address space"),
        })?;
        // SAFETY: a fresh private read-only mapping of `mapping_bytes` (> 0) bytes of an
        // open file descriptor at offset 0; the kernel picks the address. The result is
        // checked for MAP_FAILED before use. The descriptor may close afterwards: the
        // mapping keeps the file alive.
        let address = unsafe {
            libc::mmap(std::ptr::null_mut(), mapping_bytes, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0)
        };
        if address == libc::MAP_FAILED {
            return Err(SnapshotError::Map { path: path.to_path_buf(), source: std::io::Error::last_os_error() });
        }
        let mapping = NonNull::new(address.cast::<u8>()).expect("mmap never returns null on success");
        // From here the mapping is owned: `Unmapped` unmaps it on every early return.
        let owner = Unmapped { mapping, mapping_bytes };
        // SAFETY: the mapping is `mapping_bytes` readable bytes that live until `owner`
        // (then the returned value) unmaps them; nothing writes to them (PROT_READ,
        // MAP_PRIVATE, and MeshOS never rewrites a published snapshot in place).
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(mapping.as_ptr(), mapping_bytes) };
        let root = validate(path, bytes)?;
        let root = NonNull::from(root);
        std::mem::forget(owner);
        Ok(MappedSnapshot { mapping, mapping_bytes, root, path: path.to_path_buf() })
    }

    /// The snapshot, read in place from the mapping.
    pub fn get(&self) -> &ArchivedSnapshot {
        // SAFETY: `root` was validated as an `ArchivedSnapshot` inside the mapping at
        // open; the mapping is read-only, never written in place, and unmapped only when
        // `self` drops, which the returned borrow of `self` cannot outlive.
        unsafe { self.root.as_ref() }
    }

    /// The whole mapped file (header and archive).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: as in `get`: `mapping_bytes` readable bytes, immutable, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.mapping.as_ptr(), self.mapping_bytes) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MappedSnapshot {
    fn drop(&mut self) {
        drop(Unmapped { mapping: self.mapping, mapping_bytes: self.mapping_bytes });
    }
}

impl std::fmt::Debug for MappedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedSnapshot").field("path", &self.path).field("bytes", &self.mapping_bytes).finish()
    }
}

/// A mapping to unmap when dropped.
struct Unmapped {
    mapping: NonNull<u8>,
    mapping_bytes: usize,
}

impl Drop for Unmapped {
    fn drop(&mut self) {
        // SAFETY: the address and length of a mapping made by `mmap` in `open`, unmapped
        // once: its owner is dropped exactly once (`open` forgets its guard when the
        // `MappedSnapshot` takes the mapping over), and no reference into it outlives
        // the owner.
        let result = unsafe { libc::munmap(self.mapping.as_ptr().cast(), self.mapping_bytes) };
        debug_assert_eq!(result, 0, "munmap of our own mapping failed");
    }
}

/// Checks the header, the checksum, the archive (bytecheck), the format version
/// inside it and its shape; returns the root.
fn validate<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a ArchivedSnapshot, SnapshotError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() <= HEADER_BYTES {
        return Err(SnapshotError::TooShort { path: path_buf(), file_bytes: bytes.len() as u64 });
    }
    let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(SnapshotError::NotASnapshot { path: path_buf(), found: magic });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion { path: path_buf(), found: version });
    }
    let expected = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let archive = &bytes[HEADER_BYTES..];
    let actual = crc32c::crc32c(archive);
    if actual != expected {
        return Err(SnapshotError::Checksum { path: path_buf(), expected, actual });
    }
    if !(archive.as_ptr() as usize).is_multiple_of(super::ALIGN_BYTES) {
        let reason = "the archive is not 16-byte aligned in memory".to_string();
        return Err(SnapshotError::Invalid { path: path_buf(), reason });
    }
    let root = rkyv::access::<ArchivedSnapshot, rancor::Error>(archive)
        .map_err(|error| SnapshotError::Invalid { path: path_buf(), reason: error.to_string() })?;
    if root.format_version != FORMAT_VERSION {
        let reason = format!("format version {} inside, {version} in the header", root.format_version);
        return Err(SnapshotError::Invalid { path: path_buf(), reason });
    }
    check_archived_shape(root).map_err(|reason| SnapshotError::Invalid { path: path_buf(), reason })?;
    Ok(root)
}

/// Validates `bytes` (a whole file image) as `open` validates a mapping, without a
/// file: for tests and tools holding the bytes in an aligned buffer.
pub fn validate_bytes(bytes: &[u8]) -> Result<&ArchivedSnapshot, SnapshotError> {
    validate(Path::new("<memory>"), bytes)
}
