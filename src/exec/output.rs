//! A daemon's stdout or stderr, copied from its pipe into a rotating file:
//! `NAME.log`, then `NAME.log.1` .. `NAME.log.K` (oldest last) once it passes
//! `bytes_max`. One thread per stream, ending at the pipe's end of file.
//!
//! Invariants: a live file is at most `bytes_max` plus one read chunk; at most
//! `files_kept` rotated files exist; a write error is logged once and the rest of
//! the stream is read and discarded (a full disk never blocks the daemon on its pipe).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Starts copying `pipe` into `dir/NAME.log` with rotation.
pub fn spawn_copier(
    mut pipe: impl Read + Send + 'static,
    dir: &Path,
    name: &str,
    bytes_max: u64,
    files_kept: u32,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let path = dir.join(format!("{name}.log"));
    let mut file = Rotating::open(path, bytes_max, files_kept)?;
    std::thread::Builder::new().name(format!("meshos-out-{name}")).spawn(move || {
        let mut chunk = [0u8; 16 * 1024];
        let mut failed = false;
        loop {
            let read = match pipe.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if failed {
                continue;
            }
            if let Err(error) = file.write(&chunk[..read]) {
                tracing::warn!(path = %file.path.display(), "daemon output not written from here on: {error}");
                failed = true;
            }
        }
        let _ = file.file.flush();
    })
}

struct Rotating {
    path: PathBuf,
    file: File,
    written: u64,
    bytes_max: u64,
    files_kept: u32,
}

impl Rotating {
    fn open(path: PathBuf, bytes_max: u64, files_kept: u32) -> std::io::Result<Rotating> {
        assert!(bytes_max > 0, "a rotating file needs room");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Rotating { path, file, written, bytes_max, files_kept })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + bytes.len() as u64 > self.bytes_max {
            self.rotate()?;
        }
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |index: u32| PathBuf::from(format!("{}.{index}", self.path.display()));
        if self.files_kept == 0 {
            self.file = File::create(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.files_kept));
            for index in (1..self.files_kept).rev() {
                let _ = std::fs::rename(numbered(index), numbered(index + 1));
            }
            std::fs::rename(&self.path, numbered(1))?;
            self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        }
        self.written = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_rotates_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text: Vec<u8> = (0..10_000u32).flat_map(|line| format!("line {line}\n").into_bytes()).collect();
        let thread = spawn_copier(std::io::Cursor::new(text.clone()), dir.path(), "stdout", 4096, 2).expect("starts");
        thread.join().expect("copies");
        let live = std::fs::read(dir.path().join("stdout.log")).expect("live file");
        assert!(!live.is_empty() && live.len() <= 4096 + 16 * 1024);
        assert!(dir.path().join("stdout.log.1").exists() && dir.path().join("stdout.log.2").exists());
        assert!(!dir.path().join("stdout.log.3").exists(), "at most files_kept rotated files");
        assert!(text.ends_with(&live), "the live file holds the newest bytes");
    }
}
