//! RedEX, the ordered log: the trait every log backend meets, and its backends.
//!
//! A record is one committed batch of events (an archived `EventBatch` payload),
//! stamped by the log with a dense position (the first record is 1; 0 means
//! "before everything") and a commit time in milliseconds that never goes
//! backwards. Records are read back in position order, byte for byte as appended.
//!
//! Invariants: positions are dense and strictly increasing; a stamped time is
//! `max(previous time, clock)`; `durable_position() <= last_position()`; a record
//! at or below a reported durable position survives any crash of this process.

pub mod embedded;
pub mod jetstream;
pub mod mirror;

/// Where and when the log put a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub position: u64,
    pub time_ms: u64,
}

/// One record as read back. `payload` is 16-byte aligned in memory, ready for
/// `wire::access_batch`.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub position: u64,
    pub time_ms: u64,
    pub payload: &'a [u8],
}

/// A log failure. I/O errors name the file; damage names the record and offset.
#[derive(Debug, thiserror::Error)]
pub enum RedexError {
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: record {position} at byte offset {offset} is damaged: {reason}")]
    Damaged { path: std::path::PathBuf, position: u64, offset: u64, reason: String },
    #[error(
        "{damage}; {intact_after} intact records follow it (up to position {last_intact}): the log is damaged in \
         the middle, not torn at its end, and cutting it there would lose acknowledged records. Nothing was \
         changed. `meshos log verify {dir}` lists every damaged record; `meshos log salvage {dir}` keeps every \
         intact record at its position and turns each damaged one into an empty record that fold counts as \
         rejected (the damaged bytes go to {dir}/quarantine)"
    )]
    DamagedMidLog {
        dir: std::path::PathBuf,
        damage: crate::redex::embedded::Damage,
        intact_after: u64,
        last_intact: u64,
    },
    #[error("record of {frame_bytes} bytes exceeds the limit of {frame_bytes_max} bytes (frame_bytes_max)")]
    RecordTooLarge { frame_bytes: u64, frame_bytes_max: u32 },
    #[error(
        "{path}: record {position} at byte offset {offset} is an intact frame of {frame_bytes} bytes, above \
         frame_bytes_max {frame_bytes_max}: the log was written with a larger limit; open it with that limit (--frame-bytes-max)"
    )]
    FrameLimitTooSmall { path: std::path::PathBuf, position: u64, offset: u64, frame_bytes: u64, frame_bytes_max: u32 },
    #[error("position {position} is beyond the end of the log ({last})")]
    BeyondEnd { position: u64, last: u64 },
    #[error("{path}: the log is locked by another process")]
    Locked { path: std::path::PathBuf },
    #[error("position {position} lies before the first record of the log ({first})")]
    BeforeStart { position: u64, first: u64 },
    #[error("{path}: an earlier write or fsync failed; reopen the log to recover")]
    Poisoned { path: std::path::PathBuf },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// An I/O error of `path`, for `map_err`.
pub(crate) fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RedexError + '_ {
    move |source| RedexError::Io { path: path.to_path_buf(), source }
}

/// The ordered log.
pub trait Redex {
    /// Appends one record holding `payload` (an archived `EventBatch`), stamped with
    /// the next position and the commit time. Durable once `durable_position()`
    /// reaches the returned position.
    fn append(&mut self, payload: &[u8]) -> Result<Stamp, RedexError>;
    /// Makes every appended record durable; returns the durable position.
    fn sync(&mut self) -> Result<u64, RedexError>;
    /// The highest position known to be durable.
    fn durable_position(&self) -> u64;
    /// The highest position appended (durable or not).
    fn last_position(&self) -> u64;
    /// Calls `visit` for each record from `from` (inclusive) in order until the end
    /// or until `visit` returns false; returns the position of the last record visited
    /// (or `from - 1` when none was).
    fn read_from(&mut self, from: u64, visit: &mut dyn FnMut(RecordView<'_>) -> bool) -> Result<u64, RedexError>;
}

/// A log many nodes write, whose order is decided elsewhere (a clustered node's NATS
/// JetStream stream, `jetstream::JetStream`): a record's position and time are known
/// only once it is read back, with other nodes' records in between, so appending and
/// reading are apart. Records are published under a message id (a resend of the same
/// bytes is stored once); every publish gets exactly one outcome; records are read
/// back densely, in position order, from a start position.
///
/// Invariants (of every implementation): positions are dense and never reused but
/// after `restart_from` a lower one (a lost tail); a record read back is byte for byte
/// what was published; `caught_up` means nothing stored beyond the last record handed
/// out was known when it was last asked.
pub trait SharedRedex {
    /// Queues a record; returns its ticket, or `Full` (backpressure: keep it, retry).
    fn publish(&mut self, msg_id: [u8; 16], payload: &[u8]) -> Result<u64, jetstream::PublishError>;
    /// Queues a record that must land right after `expected_last`, read back with
    /// `time_ms` as its time (a lost tail given back).
    fn publish_restamped(
        &mut self,
        msg_id: [u8; 16],
        payload: &[u8],
        expected_last: u64,
        time_ms: u64,
    ) -> Result<u64, jetstream::PublishError>;
    /// Outcomes of earlier publishes, one per ticket.
    fn poll_acks(&mut self, out: &mut Vec<jetstream::PublishOutcome>);
    /// Tickets issued without an outcome yet.
    fn pending(&self) -> u64;
    /// Hands out at most `max` records read back, in order; returns how many.
    fn poll_records(
        &mut self,
        max: usize,
        visit: &mut dyn FnMut(jetstream::Delivered<'_>),
    ) -> Result<usize, jetstream::JetStreamError>;
    fn caught_up(&self) -> bool;
    /// `(first, last)` position of the log, as last seen.
    fn bounds(&self) -> Option<(u64, u64)>;
    /// The log's last position when it was found ending below what was read from it
    /// (it lost its tail); new records are held back until `resume_publishing`.
    fn take_regression(&mut self) -> Option<u64>;
    fn resume_publishing(&mut self);
    /// Asks for every record below `position` to be removed (idempotent).
    fn purge_below(&mut self, position: u64);
    /// Reads again from `position` (a rollback); pending publishes are abandoned.
    fn restart_from(&mut self, position: u64) -> Result<(), jetstream::JetStreamError>;
}

impl SharedRedex for jetstream::JetStream {
    fn publish(&mut self, msg_id: [u8; 16], payload: &[u8]) -> Result<u64, jetstream::PublishError> {
        jetstream::JetStream::publish(self, msg_id, payload)
    }

    fn publish_restamped(
        &mut self,
        msg_id: [u8; 16],
        payload: &[u8],
        expected_last: u64,
        time_ms: u64,
    ) -> Result<u64, jetstream::PublishError> {
        jetstream::JetStream::publish_restamped(self, msg_id, payload, expected_last, time_ms)
    }

    fn poll_acks(&mut self, out: &mut Vec<jetstream::PublishOutcome>) {
        jetstream::JetStream::poll_acks(self, out)
    }

    fn pending(&self) -> u64 {
        jetstream::JetStream::pending(self)
    }

    fn poll_records(
        &mut self,
        max: usize,
        visit: &mut dyn FnMut(jetstream::Delivered<'_>),
    ) -> Result<usize, jetstream::JetStreamError> {
        jetstream::JetStream::poll_records(self, max, visit)
    }

    fn caught_up(&self) -> bool {
        jetstream::JetStream::caught_up(self)
    }

    fn bounds(&self) -> Option<(u64, u64)> {
        self.stream_bounds()
    }

    fn take_regression(&mut self) -> Option<u64> {
        jetstream::JetStream::take_regression(self)
    }

    fn resume_publishing(&mut self) {
        jetstream::JetStream::resume_publishing(self)
    }

    fn purge_below(&mut self, position: u64) {
        jetstream::JetStream::purge_below(self, position)
    }

    fn restart_from(&mut self, position: u64) -> Result<(), jetstream::JetStreamError> {
        jetstream::JetStream::restart_from(self, position)
    }
}
