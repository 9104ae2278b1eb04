//! Writing snapshot files: the header and archive into one reused buffer, published
//! atomically (temporary file, fsync, rename, directory fsync), at a bounded rate.
//!
//! Invariants: a file at the snapshot's path is always a whole snapshot (a crash
//! leaves the previous one or the new one, never a mix); a published file is never
//! opened for writing again (the next snapshot is a new file renamed over it), so a
//! reader's mapping stays valid and unchanged; `SnapshotWriter` starts at most one
//! write per interval and none while the position has not moved since the last one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rkyv::rancor;
use rkyv::util::AlignedVec;

use super::{IngestView, Snapshot, SnapshotError, ALIGN_BYTES, FORMAT_VERSION, HEADER_BYTES, MAGIC};
use crate::config::SnapshotLimits;
use crate::state::State;

/// Writes `snapshot` as a whole file image (header, then archive) into `buffer`
/// (cleared first) and returns it.
pub fn encode_into(
    snapshot: &Snapshot,
    buffer: AlignedVec<ALIGN_BYTES>,
) -> Result<AlignedVec<ALIGN_BYTES>, SnapshotError> {
    let mut buffer = buffer;
    buffer.clear();
    buffer.extend_from_slice(&[0; HEADER_BYTES]);
    // The archive starts at a multiple of its alignment, and rkyv pads from the start
    // of the buffer, so the archive alone is a valid, aligned rkyv buffer.
    let mut buffer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(snapshot, buffer)
        .map_err(|error| SnapshotError::Archive { reason: error.to_string() })?;
    let checksum = crc32c::crc32c(&buffer[HEADER_BYTES..]);
    buffer[..8].copy_from_slice(&MAGIC);
    buffer[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    buffer[12..16].copy_from_slice(&checksum.to_le_bytes());
    Ok(buffer)
}

pub use crate::sys::files::temporary_path;

/// Publishes `bytes` at `path` atomically (`sys::files::write_atomically`).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    crate::sys::files::write_atomically(path, bytes).map_err(|(path, source)| SnapshotError::Io { path, source })
}

/// One snapshot written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReport {
    pub position: u64,
    pub file_bytes: u64,
    /// Build, archive, write, fsync and rename.
    pub elapsed: Duration,
}

/// Builds the snapshot of `state` and publishes it at `path` (a one-off: the
/// `SnapshotWriter` reuses its buffers and bounds the rate).
pub fn write_atomically(
    path: &Path,
    state: &State,
    writer_node: &str,
    limits: &SnapshotLimits,
) -> Result<WriteReport, SnapshotError> {
    let mut writer = SnapshotWriter::new(path.to_path_buf(), writer_node, 1, *limits);
    writer.write_now(state, Instant::now())
}

/// Counters of a writer's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    pub written: u64,
    pub failed: u64,
    pub last_file_bytes: u64,
    pub last_elapsed: Duration,
}

/// Writes the node's snapshot at most once per interval, reusing one `Snapshot` and
/// one buffer, so a write allocates little once warm.
pub struct SnapshotWriter {
    path: PathBuf,
    writer_node: String,
    /// None: snapshots are off (`interval_ms = 0`).
    interval: Option<Duration>,
    limits: SnapshotLimits,
    snapshot: Snapshot,
    buffer: AlignedVec<ALIGN_BYTES>,
    last_attempt: Option<Instant>,
    /// The position of the last snapshot written.
    last_position: Option<u64>,
    /// The last attempt failed (one warning per run of failures).
    failing: bool,
    fence: String,
    ingest: IngestView,
    pub stats: WriterStats,
}

impl SnapshotWriter {
    /// A writer of `path` for node `writer_node`, at most one write per `interval_ms`
    /// (0: never writes).
    pub fn new(path: PathBuf, writer_node: &str, interval_ms: u32, limits: SnapshotLimits) -> SnapshotWriter {
        SnapshotWriter {
            path,
            writer_node: writer_node.to_string(),
            interval: (interval_ms > 0).then(|| Duration::from_millis(interval_ms as u64)),
            limits,
            snapshot: Snapshot::default(),
            buffer: AlignedVec::new(),
            last_attempt: None,
            last_position: None,
            failing: false,
            fence: String::new(),
            ingest: IngestView::default(),
            stats: WriterStats::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a write is due at `now`: snapshots are on, the position moved since
    /// the last snapshot written, and the interval passed since the last attempt.
    pub fn is_due(&self, state: &State, now: Instant) -> bool {
        let Some(interval) = self.interval else { return false };
        self.last_position != Some(state.position)
            && self.last_attempt.is_none_or(|last| now.saturating_duration_since(last) >= interval)
    }

    /// Writes a snapshot of `state` if one is due (`is_due`); `Ok(None)` when not.
    pub fn maybe_write(&mut self, state: &State, now: Instant) -> Result<Option<WriteReport>, SnapshotError> {
        if !self.is_due(state, now) {
            return Ok(None);
        }
        self.write_now(state, now).map(Some)
    }

    /// Writes a snapshot of `state` now, whatever the interval; `now` counts as the
    /// attempt's time for the rate bound.
    pub fn write_now(&mut self, state: &State, now: Instant) -> Result<WriteReport, SnapshotError> {
        let started = Instant::now();
        self.last_attempt = Some(now);
        let result = self.write_inner(state);
        match &result {
            Ok(file_bytes) => {
                self.last_position = Some(state.position);
                self.stats.written += 1;
                self.stats.last_file_bytes = *file_bytes;
                self.stats.last_elapsed = started.elapsed();
            }
            Err(_) => self.stats.failed += 1,
        }
        result.map(|file_bytes| WriteReport { position: state.position, file_bytes, elapsed: started.elapsed() })
    }

    /// Why this node stopped acting (empty: it acts); written into every snapshot.
    pub fn set_fence(&mut self, fence: &str) {
        if self.fence != fence {
            self.fence = fence.to_string();
            // A new alarm is news: the next tick writes even if the log has not moved.
            self.last_position = None;
        }
    }

    /// The node's ingest counters, written into every snapshot from now on (set them
    /// when `is_due` says a write comes).
    pub fn set_ingest(&mut self, ingest: &IngestView) {
        self.ingest.clone_from(ingest);
    }

    fn write_inner(&mut self, state: &State) -> Result<u64, SnapshotError> {
        self.snapshot.fill_from(state, &self.writer_node, &self.limits);
        self.snapshot.fence.clone_from(&self.fence);
        self.snapshot.ingest.clone_from(&self.ingest);
        self.snapshot.written_unix_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64);
        let buffer = encode_into(&self.snapshot, std::mem::take(&mut self.buffer))?;
        let result = write_file_atomically(&self.path, &buffer);
        let file_bytes = buffer.len() as u64;
        self.buffer = buffer;
        result.map(|()| file_bytes)
    }

    /// `maybe_write` for the node's loop: a failure is logged (a warning at the first
    /// of a run of failures), never returned: the node does not stop for a snapshot.
    pub fn tick(&mut self, state: &State, now: Instant) {
        let result = self.maybe_write(state, now);
        self.log(result);
    }

    /// The last snapshot at stop: written now unless the position has not moved since
    /// the last one (the interval does not apply); failures are logged.
    pub fn finish(&mut self, state: &State) {
        if self.interval.is_none() || self.last_position == Some(state.position) {
            return;
        }
        let result = self.write_now(state, Instant::now()).map(Some);
        self.log(result);
    }

    fn log(&mut self, result: Result<Option<WriteReport>, SnapshotError>) {
        match result {
            Ok(None) => {}
            Ok(Some(report)) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!(path = %self.path.display(), "snapshot written again");
                }
                tracing::debug!(
                    position = report.position,
                    file_bytes = report.file_bytes,
                    elapsed_us = report.elapsed.as_micros() as u64,
                    "snapshot written"
                );
            }
            Err(error) if !self.failing => {
                self.failing = true;
                tracing::warn!("snapshot not written (retried every interval): {error}");
            }
            Err(error) => tracing::debug!("snapshot not written: {error}"),
        }
    }
}
