//! The local mirror of a shared log: every record a clustered node read back from
//! JetStream, in stream order, in an [`EmbeddedLog`] on this node's disk.
//!
//! The mirror lets a node restart without reading the whole stream again (it replays
//! the mirror past its newest checkpoint, then reads the stream from there), and it
//! holds the node's copy of a tail the stream lost when every server crashed at once
//! (a JetStream acknowledgement is replication, not fsync), so that tail can be
//! published again. A node that starts from a checkpoint newer than its mirror
//! begins a new mirror at that position: the mirror's first record is then `base + 1`,
//! with `base` kept in a small file beside it.
//!
//! Invariants: mirror record `k` is stream position `base + k`; positions are
//! appended densely (`append` asserts the next one); times never go backwards (the
//! embedded log clamps them, and the caller already stamps `max(previous, server)`).

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::redex::embedded::{EmbeddedLog, RecoveryReport};
use crate::redex::{io_error, RecordView, Redex, RedexError, Stamp};

pub struct Mirror {
    /// Always Some, but for the moment `reset` closes it (its lock goes with it).
    log: Option<EmbeddedLog>,
    base: u64,
    log_dir: PathBuf,
    base_file: PathBuf,
    config: Config,
}

impl Mirror {
    /// Opens (or creates) the mirror in `log_dir`, its base in `base_file`.
    pub fn open(log_dir: &Path, base_file: &Path, config: &Config) -> Result<(Mirror, RecoveryReport), RedexError> {
        let base = match std::fs::read_to_string(base_file) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| RedexError::Damaged {
                path: base_file.to_path_buf(),
                position: 0,
                offset: 0,
                reason: format!("`{}` is not a log position", text.trim()),
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(RedexError::Io { path: base_file.to_path_buf(), source }),
        };
        let (log, report) = EmbeddedLog::open(log_dir, config)?;
        let mirror = Mirror {
            log: Some(log),
            base,
            log_dir: log_dir.to_path_buf(),
            base_file: base_file.to_path_buf(),
            config: config.clone(),
        };
        Ok((mirror, report))
    }

    /// The stream position of the mirror's first record, minus one.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The stream position of the last record mirrored (the base when empty).
    pub fn last_position(&self) -> u64 {
        self.base + self.log.as_ref().map_or(0, |log| log.last_position())
    }

    /// Throws the mirror away and starts an empty one after stream position `base`
    /// (a node starting from a checkpoint its mirror does not reach, or rolling back).
    pub fn reset(&mut self, base: u64) -> Result<(), RedexError> {
        // Closing the log releases its lock before its files go.
        drop(self.log.take());
        std::fs::remove_dir_all(&self.log_dir).map_err(io_error(&self.log_dir))?;
        crate::sys::files::write_atomically(&self.base_file, format!("{base}\n").as_bytes())
            .map_err(|(path, source)| RedexError::Io { path, source })?;
        let (log, _) = EmbeddedLog::open(&self.log_dir, &self.config)?;
        self.log = Some(log);
        self.base = base;
        Ok(())
    }

    fn log(&mut self) -> &mut EmbeddedLog {
        self.log.as_mut().expect("the mirror's log is open (reset reopens it)")
    }

    /// Mirrors the record at stream `position` (the next one), stamped `time_ms`.
    pub fn append(&mut self, position: u64, time_ms: u64, payload: &[u8]) -> Result<Stamp, RedexError> {
        assert_eq!(position, self.last_position() + 1, "the mirror is appended densely, in stream order");
        let stamp = self.log().append_at(payload, time_ms)?;
        debug_assert_eq!(self.base + stamp.position, position);
        Ok(Stamp { position, time_ms: stamp.time_ms })
    }

    /// Makes every mirrored record durable.
    pub fn sync(&mut self) -> Result<u64, RedexError> {
        Ok(self.base + self.log().sync()?)
    }

    /// Visits mirrored records from stream position `from` (at least `base + 1`), in order,
    /// with their stream positions, until the end or until `visit` returns false.
    pub fn read_from(&mut self, from: u64, visit: &mut dyn FnMut(RecordView<'_>) -> bool) -> Result<u64, RedexError> {
        if from <= self.base {
            return Err(RedexError::BeforeStart { position: from, first: self.base + 1 });
        }
        let base = self.base;
        let last = self.log().read_from(from - base, &mut |record| {
            visit(RecordView { position: base + record.position, time_ms: record.time_ms, payload: record.payload })
        })?;
        Ok(base + last)
    }
}
