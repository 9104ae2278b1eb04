//! Files published whole: written to `PATH.tmp`, fsynced, renamed over `PATH`, and the
//! directory fsynced, so a reader sees the old file or the new one, never a part, and
//! the new one survives a crash once the call returns. Snapshots, checkpoints, the
//! node's address file and the mirror's base all go through here.
//!
//! Invariants: `PATH` is only ever replaced by a rename; an error names the file the
//! failing call was about.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `PATH.tmp`: where a file is written before it is renamed to `path`.
pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Publishes `bytes` at `path` atomically; on failure, the file the failing step was
/// about and the error.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), (PathBuf, std::io::Error)> {
    let temporary = temporary_path(path);
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |error| (path, error)
    };
    let mut file = File::create(&temporary).map_err(at(&temporary))?;
    file.write_all(bytes).map_err(at(&temporary))?;
    file.sync_all().map_err(at(&temporary))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(at(path))?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(directory).and_then(|directory| directory.sync_all()).map_err(at(directory))
}
