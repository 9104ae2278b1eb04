//! The node's blob store: content-addressed files under `DATA_DIR/blobs/`, one per
//! blake3 hash, at `blobs/XX/HASH` (`XX` the first byte in hex, so no directory holds
//! more than 1/256 of the blobs).
//!
//! A blob is written to `blobs/tmp/` while its hash is computed, fsynced, checked
//! against the hash it must have (when one is expected), renamed into place and the
//! directory fsynced: a crash at any moment leaves either the whole blob under its
//! name or a temporary file, and opening the store deletes every temporary file, so
//! a half-written blob never counts. Re-hashing a stored blob (`verify`) says whether
//! its bytes still match its name.
//!
//! Invariants: a file under its hash's name was complete and matched when it was
//! renamed there; nothing here panics on what is on disk; every error names the path.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::event::BlobHash;

/// Bytes read or written per step.
const CHUNK_BYTES: usize = 256 * 1024;
const TEMPORARY_DIR: &str = "tmp";

#[derive(Debug, thiserror::Error)]
pub enum BlobStoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("blob {expected} arrived with hash {actual}: not stored")]
    HashMismatch { expected: String, actual: String },
    #[error("blob of {bytes} bytes is larger than the limit of {max}")]
    TooLarge { bytes: u64, max: u64 },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BlobStoreError + '_ {
    move |source| BlobStoreError::Io { path: path.to_path_buf(), source }
}

/// Lowercase hex of a blob hash.
pub fn hex(hash: &BlobHash) -> String {
    crate::event::blob_hex(hash)
}

/// Parses 64 hex characters into a blob hash.
pub fn parse_hex(text: &str) -> Option<BlobHash> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (index, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// Numbers temporary files: unique within the process, so writers on several threads
/// never share one.
static TEMPORARY_COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The store; `&self` everywhere, so one handle serves every transfer thread.
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating) the store at `root`, deleting any half-written blob a crash left.
    /// Only the node, at its start, may do this (see `attach`).
    pub fn open(root: &Path) -> Result<BlobStore, BlobStoreError> {
        let temporary = root.join(TEMPORARY_DIR);
        std::fs::create_dir_all(&temporary).map_err(io_error(&temporary))?;
        for entry in std::fs::read_dir(&temporary).map_err(io_error(&temporary))?.flatten() {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            tracing::info!(path = %path.display(), "removed a half-written blob");
        }
        Ok(BlobStore { root: root.to_path_buf() })
    }

    /// The store at `root` for a reader or a second writer beside the node (the CLI):
    /// creates what is missing, removes nothing (the node's transfers may be running).
    pub fn attach(root: &Path) -> Result<BlobStore, BlobStoreError> {
        let temporary = root.join(TEMPORARY_DIR);
        std::fs::create_dir_all(&temporary).map_err(io_error(&temporary))?;
        Ok(BlobStore { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `hash` lives (whether or not it is there).
    pub fn path_of(&self, hash: &BlobHash) -> PathBuf {
        let name = hex(hash);
        self.root.join(&name[..2]).join(name)
    }

    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// The stored blob's size, if it is stored.
    pub fn size_of(&self, hash: &BlobHash) -> Option<u64> {
        std::fs::metadata(self.path_of(hash)).ok().map(|metadata| metadata.len())
    }

    /// Opens a stored blob for reading.
    pub fn open_blob(&self, hash: &BlobHash) -> Result<File, BlobStoreError> {
        let path = self.path_of(hash);
        File::open(&path).map_err(io_error(&path))
    }

    /// Stores what `source` yields (at most `bytes_max`), hashing as it goes. With
    /// `expected`, the bytes must hash to it or nothing is stored. Returns the hash and
    /// the size. `progress` sees each chunk's length (for rate limits).
    pub fn put(
        &self,
        source: &mut dyn Read,
        expected: Option<&BlobHash>,
        bytes_max: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(BlobHash, u64), BlobStoreError> {
        let count = TEMPORARY_COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temporary = self.root.join(TEMPORARY_DIR).join(format!("{}-{count}", std::process::id()));
        let result = self.put_through(&temporary, source, expected, bytes_max, progress);
        if result.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        result
    }

    fn put_through(
        &self,
        temporary: &Path,
        source: &mut dyn Read,
        expected: Option<&BlobHash>,
        bytes_max: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(BlobHash, u64), BlobStoreError> {
        let mut file = OpenOptions::new().write(true).create_new(true).open(temporary).map_err(io_error(temporary))?;
        let mut hasher = blake3::Hasher::new();
        let mut chunk = vec![0u8; CHUNK_BYTES];
        let mut size = 0u64;
        loop {
            let read = match source.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(BlobStoreError::Io { path: PathBuf::from("<source>"), source }),
            };
            size += read as u64;
            if size > bytes_max {
                return Err(BlobStoreError::TooLarge { bytes: size, max: bytes_max });
            }
            hasher.update(&chunk[..read]);
            file.write_all(&chunk[..read]).map_err(io_error(temporary))?;
            progress(read);
        }
        let hash = *hasher.finalize().as_bytes();
        if let Some(expected) = expected {
            if *expected != hash {
                return Err(BlobStoreError::HashMismatch { expected: hex(expected), actual: hex(&hash) });
            }
        }
        file.sync_all().map_err(io_error(temporary))?;
        let path = self.path_of(&hash);
        let dir = path.parent().expect("blobs/XX");
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        std::fs::rename(temporary, &path).map_err(io_error(&path))?;
        File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_error(dir))?;
        Ok((hash, size))
    }

    /// Re-hashes a stored blob: `Ok(true)` when its bytes match its name, `Ok(false)`
    /// when they do not (corrupt), an error when it cannot be read.
    pub fn verify(&self, hash: &BlobHash, progress: &mut dyn FnMut(usize)) -> Result<bool, BlobStoreError> {
        let path = self.path_of(hash);
        let mut file = File::open(&path).map_err(io_error(&path))?;
        let mut hasher = blake3::Hasher::new();
        let mut chunk = vec![0u8; CHUNK_BYTES];
        loop {
            let read = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(BlobStoreError::Io { path, source }),
            };
            hasher.update(&chunk[..read]);
            progress(read);
        }
        Ok(hasher.finalize().as_bytes() == hash)
    }

    /// Deletes a stored blob (absent is fine).
    pub fn delete(&self, hash: &BlobHash) -> Result<(), BlobStoreError> {
        let path = self.path_of(hash);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BlobStoreError::Io { path, source }),
        }
    }

    /// Every stored blob's hash, sorted (files whose names are not hashes are skipped).
    pub fn list(&self) -> Result<Vec<BlobHash>, BlobStoreError> {
        let mut hashes = Vec::new();
        for shard in std::fs::read_dir(&self.root).map_err(io_error(&self.root))?.flatten() {
            if shard.file_name().len() != 2 || !shard.path().is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(shard.path()).map_err(io_error(&shard.path()))?.flatten() {
                if let Some(hash) = entry.file_name().to_str().and_then(parse_hex) {
                    hashes.push(hash);
                }
            }
        }
        hashes.sort_unstable();
        Ok(hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_stored_under_its_hash_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = vec![7u8; 600_000];
        let (hash, size) = store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
        assert_eq!((hash, size), (*blake3::hash(&bytes).as_bytes(), 600_000));
        assert!(store.contains(&hash) && store.verify(&hash, &mut |_| {}).unwrap());
        assert_eq!(store.list().unwrap(), vec![hash]);
        assert_eq!(parse_hex(&hex(&hash)), Some(hash));
        // Flip one byte on disk: verification says corrupt.
        let path = store.path_of(&hash);
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[1000] ^= 1;
        std::fs::write(&path, on_disk).unwrap();
        assert!(!store.verify(&hash, &mut |_| {}).unwrap());
        store.delete(&hash).unwrap();
        assert!(!store.contains(&hash) && store.list().unwrap().is_empty());
    }

    #[test]
    fn a_wrong_hash_or_a_too_large_blob_stores_nothing_and_half_blobs_never_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let wrong = [1u8; 32];
        let error = store.put(&mut &b"abc"[..], Some(&wrong), u64::MAX, &mut |_| {}).unwrap_err();
        assert!(matches!(error, BlobStoreError::HashMismatch { .. }), "{error}");
        let error = store.put(&mut &b"abcdef"[..], None, 3, &mut |_| {}).unwrap_err();
        assert!(matches!(error, BlobStoreError::TooLarge { .. }), "{error}");
        assert!(store.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join(TEMPORARY_DIR)).unwrap().count(), 0, "no temporary left");
        // A crash mid-write leaves a temporary file: the next open removes it.
        std::fs::write(dir.path().join(TEMPORARY_DIR).join("crashed"), b"half").unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(TEMPORARY_DIR)).unwrap().count(), 0);
        assert!(store.list().unwrap().is_empty());
    }
}
