//! The JetStream backend's client: our own minimal NATS JetStream client, one I/O
//! thread over `mio`, one TCP connection at a time.
//!
//! Purpose: carry the cluster's log through a NATS JetStream stream. The main thread
//! owns a [`JetStream`] handle; it queues records with [`JetStream::publish`], learns
//! where each one was stored with [`JetStream::poll_acks`], and reads every record of
//! the stream (its own and other nodes') in stream order with
//! [`JetStream::poll_records`]. The client thread (`client.rs`) connects to the
//! servers in rotation with capped backoff, creates or updates the stream, publishes
//! (`HPUB` with a `Nats-Msg-Id` header, up to `publish_window_max` in flight, each
//! with its own reply token under one wildcard inbox), and reads through an ordered
//! push consumer (ephemeral, no acks, flow control, idle heartbeats) that it
//! recreates from the next wanted position after a reconnect, a gap or 3 missed
//! heartbeats. The wire format is in `proto.rs`.
//!
//! Invariants:
//! 1. Every ticket returned by `publish` gets exactly one [`PublishOutcome`]: stored
//!    (at a position; `duplicate` when the msg id was already stored there) or
//!    failed for a definite server answer (a JSON error such as a failed pin,
//!    `err_code` 10071). Ambiguous cases (no reply in `ack_timeout_ms`, status 503
//!    "no responders", a lost connection) are resent with the same msg id, so the
//!    server's duplicate window makes the retry safe, until they resolve. Pending
//!    publishes are abandoned only by `stop`.
//! 2. After the first ambiguous case, no new record is sent until every record in
//!    flight has resolved; then sending resumes in ticket order.
//! 3. `poll_records` hands out records at strictly increasing, dense positions from
//!    the `next_position` given to `start`, each exactly once, across reconnects,
//!    server restarts and consumer recreation. A gap or reorder seen on delivery is
//!    never handed out: the consumer is recreated from the next wanted position. A
//!    consumer whose first record lies beyond the wanted position (the stream was
//!    purged past it) ends reading with [`JetStreamError::BeforeStart`].
//! 4. Memory is bounded: at most `publish_window_max + publish_queue_max` records
//!    are pending; at most `delivered_queue_max` delivered records wait for the main
//!    thread in the shared queue (and as many in the handle), beyond which the
//!    thread holds further deliveries and withholds its flow-control replies, so the
//!    server stops sending (nothing is dropped); should it hold 16 times
//!    `delivered_queue_max` records or 128 MiB anyway, it stops reading the socket
//!    until the main thread drains. Read buffers are bounded by the payload cap.
//! 5. Malformed server input is counted as a protocol error and ends the
//!    connection (the client reconnects); it never panics.

mod client;
pub mod proto;

use crate::ingest::park::Signal;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Everything the client needs; see the field docs for units and defaults.
#[derive(Debug, Clone)]
pub struct JetStreamConfig {
    /// `host:port` of each server, tried in rotation.
    pub servers: Vec<String>,
    /// NATS `auth_token` sent in `CONNECT`.
    pub token: Option<String>,
    /// The client's name in `CONNECT` and in consumer names (the MeshOS node name).
    pub client_name: String,
    /// The stream's name, e.g. `MESHOS`.
    pub stream: String,
    /// The stream's one subject, e.g. `meshos.log`.
    pub subject: String,
    /// Stream replicas: 3 for a 3-server cluster, 1 for one server.
    pub stream_replicas: u32,
    /// The server's msg-id duplicate window.
    pub duplicate_window_ms: u64,
    /// Publishes in flight at once.
    pub publish_window_max: u32,
    /// Publishes queued in the handle beyond the window; more is `PublishError::Full`.
    pub publish_queue_max: u32,
    /// Delivered records buffered for the main thread.
    pub delivered_queue_max: u32,
    /// Timeout of one API request.
    pub request_timeout_ms: u32,
    /// A publish without a reply this long is resent with the same msg id.
    pub ack_timeout_ms: u32,
    /// The consumer's idle heartbeat; 3 missed mean the consumer is recreated.
    pub heartbeat_ms: u32,
    /// Cap of the reconnect and retry backoff.
    pub reconnect_backoff_max_ms: u32,
    /// Payload cap of one record; also capped by the server's `max_payload` minus headers.
    pub record_bytes_max: u32,
    /// When set, the client thread checks each delivered record's signatures for this
    /// cluster ahead of fold (`Delivered::verified`).
    pub verify_cluster_id: Option<crate::trust::ClusterId>,
}

impl JetStreamConfig {
    /// The defaults for one local server, stream `MESHOS` on `meshos.log`.
    pub fn new(servers: Vec<String>, client_name: &str) -> JetStreamConfig {
        JetStreamConfig {
            servers,
            token: None,
            client_name: client_name.to_string(),
            stream: "MESHOS".to_string(),
            subject: "meshos.log".to_string(),
            stream_replicas: 1,
            duplicate_window_ms: 120_000,
            publish_window_max: 256,
            publish_queue_max: 4096,
            delivered_queue_max: 4096,
            request_timeout_ms: 2_000,
            ack_timeout_ms: 2_000,
            heartbeat_ms: 1_000,
            reconnect_backoff_max_ms: 2_000,
            record_bytes_max: 4 << 20,
            verify_cluster_id: None,
        }
    }

    /// Names the first field that cannot work.
    pub fn validate(&self) -> Result<(), JetStreamError> {
        let bad = |field: &str, why: &str| Err(JetStreamError::Config(format!("{field}: {why}")));
        let name_ok = |name: &str| {
            !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
        };
        if self.servers.is_empty() {
            return bad("servers", "at least one server is needed");
        }
        if !name_ok(&self.stream) {
            return bad("stream", "use letters, digits, '_' and '-' only");
        }
        if !proto::is_subject(&self.subject) || self.subject.contains(['*', '>']) {
            return bad("subject", "a subject without spaces, empty tokens or wildcards");
        }
        if self.client_name.is_empty() || self.client_name.len() > 64 {
            return bad("client_name", "1 to 64 bytes");
        }
        if self.stream_replicas == 0 || self.stream_replicas > 5 {
            return bad("stream_replicas", "1 to 5");
        }
        if self.duplicate_window_ms < 100 {
            return bad("duplicate_window_ms", "at least 100");
        }
        if self.publish_window_max == 0 || self.publish_queue_max == 0 || self.delivered_queue_max == 0 {
            return bad("publish_window_max, publish_queue_max, delivered_queue_max", "must be positive");
        }
        if self.request_timeout_ms == 0 || self.ack_timeout_ms == 0 || self.heartbeat_ms < 100 {
            return bad("request_timeout_ms, ack_timeout_ms, heartbeat_ms", "positive, heartbeat at least 100");
        }
        if self.record_bytes_max == 0 {
            return bad("record_bytes_max", "must be positive");
        }
        Ok(())
    }
}

/// A failure of the client as a whole.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("invalid JetStream configuration: {0}")]
    Config(String),
    #[error("cannot start the JetStream client: {0}")]
    Io(#[from] std::io::Error),
    #[error("position {requested} lies before the first record of the stream ({first}): it was purged")]
    BeforeStart { requested: u64, first: u64 },
    #[error("the JetStream client thread is gone")]
    Stopped,
}

/// Why a record was not queued. The caller keeps it: nothing is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("{pending} publishes pending: retry after poll_acks")]
    Full { pending: u64 },
    #[error("record of {bytes} bytes exceeds the cap of {max_bytes} bytes")]
    TooLarge { bytes: usize, max_bytes: u64 },
}

/// Where the stream stored a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The stream sequence: the record's log position.
    pub position: u64,
    /// The msg id was already stored (at `position`) before this publish.
    pub duplicate: bool,
}

/// The one outcome of a ticket: stored, or a definite failure with the server's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    pub ticket: u64,
    pub result: Result<Stored, String>,
}

/// One delivered record, borrowed for the duration of the visit.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    /// The stream sequence.
    pub position: u64,
    /// The stream leader's clock when it stored the record, ns since the Unix epoch
    /// (not monotonic across leaders: take `max` with the previous one).
    pub timestamp_ns: u64,
    /// The publisher's `Nats-Msg-Id`, when it was 32 hex digits.
    pub msg_id: Option<[u8; 16]>,
    /// The time a republished record was first stamped with (`Meshos-Time-Ms`, see
    /// `publish_restamped`), in ms since the Unix epoch.
    pub stamped_ms: Option<u64>,
    pub payload: &'a [u8],
    /// The payload's sections whose signatures the client thread found valid for
    /// `JetStreamConfig::verify_cluster_id` (`fold::verified_sections`; 0 without it):
    /// fold skips those checks, so they run beside the fold thread, not on it.
    pub verified: crate::fold::VerifiedSections,
}

/// Counters since `start`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JetStreamStats {
    pub connected: bool,
    /// `host:port` of the current (or last) server.
    pub server: String,
    pub connects: u64,
    /// Records sent for the first time.
    pub published: u64,
    /// Tickets stored (duplicates included).
    pub stored: u64,
    /// Tickets stored as duplicates.
    pub duplicates: u64,
    /// Records sent again after an ambiguous case.
    pub resent: u64,
    /// Tickets that failed definitely.
    pub failed: u64,
    /// Records delivered by the consumer and accepted.
    pub delivered: u64,
    /// Consumers created after the first one.
    pub consumer_recreated: u64,
    /// Successful purges.
    pub purges: u64,
    pub protocol_errors: u64,
}

/// A record waiting to be sent, with its ticket.
#[derive(Debug)]
struct Outgoing {
    ticket: u64,
    msg_id: [u8; 16],
    payload: Vec<u8>,
    expected_last: Option<u64>,
    stamped_ms: Option<u64>,
}

/// A delivered record owned by the queue between the threads.
#[derive(Debug)]
struct OwnedRecord {
    position: u64,
    timestamp_ns: u64,
    msg_id: Option<[u8; 16]>,
    stamped_ms: Option<u64>,
    payload: Vec<u8>,
    verified: crate::fold::VerifiedSections,
}

/// What the two threads share, under one mutex (each side takes it once per round).
#[derive(Debug, Default)]
struct Shared {
    /// Records queued by `publish`, not yet taken by the thread.
    queue: VecDeque<Outgoing>,
    outcomes: VecDeque<PublishOutcome>,
    /// At most `delivered_queue_max` records.
    records: VecDeque<OwnedRecord>,
    /// The thread holds deliveries because `records` was full: wake it when drained.
    records_blocked: bool,
    before_start: Option<(u64, u64)>,
    /// The highest position at which the consumer reported nothing pending.
    caught_up_through: Option<u64>,
    bounds: Option<(u64, u64)>,
    /// The stream's last position when a connection found it below what was delivered.
    regressed: Option<u64>,
    /// The caller gave the lost tail back (or gave up): publishing resumes.
    resume_publishing: bool,
    /// The highest position `purge_below` asked for, not yet sent.
    purge_wanted: Option<u64>,
    stats: JetStreamStats,
    stop: bool,
}

/// The state both threads reach.
struct Inner {
    shared: Mutex<Shared>,
    waker: mio::Waker,
    /// The payload cap `publish` checks: `record_bytes_max`, lowered to the server's
    /// `max_payload` minus the header allowance once connected.
    payload_bytes_max: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        if let Err(error) = self.waker.wake() {
            tracing::warn!(%error, "cannot wake the JetStream client thread");
        }
    }
}

/// The main thread's handle on the client thread.
pub struct JetStream {
    inner: Arc<Inner>,
    thread: Option<std::thread::JoinHandle<()>>,
    next_ticket: u64,
    /// Tickets issued whose outcome `poll_acks` has not yet returned.
    pending: u64,
    pending_max: u64,
    /// Records taken from the shared queue, handed out by `poll_records` in order.
    records: VecDeque<OwnedRecord>,
    /// The last position handed out (`next_position - 1` at start).
    handed_through: u64,
    caught_up_through: Option<u64>,
    /// Kept to start reading again from another position (`restart_from`).
    config: JetStreamConfig,
    wake: crate::sync::Arc<Signal>,
}

impl JetStream {
    /// Starts the client thread, which connects (retrying forever, logging with
    /// tracing), creates or updates the stream and runs an ordered push consumer from
    /// `next_position` (1 for a fresh node). Returns at once; `wake.notify()` is
    /// called whenever acks or records become available.
    pub fn start(
        config: JetStreamConfig,
        next_position: u64,
        wake: crate::sync::Arc<Signal>,
    ) -> Result<JetStream, JetStreamError> {
        config.validate()?;
        if next_position == 0 {
            return Err(JetStreamError::Config("next_position: positions start at 1".into()));
        }
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), client::WAKER)?;
        let inner = Arc::new(Inner {
            shared: Mutex::new(Shared::default()),
            waker,
            payload_bytes_max: AtomicU64::new(u64::from(config.record_bytes_max)),
        });
        let pending_max = u64::from(config.publish_window_max) + u64::from(config.publish_queue_max);
        let thread_inner = Arc::clone(&inner);
        let (thread_config, thread_wake) = (config.clone(), crate::sync::Arc::clone(&wake));
        let thread = std::thread::Builder::new()
            .name("jetstream".into())
            .spawn(move || client::run(thread_config, next_position, thread_inner, thread_wake, poll))?;
        Ok(JetStream {
            inner,
            thread: Some(thread),
            next_ticket: 1,
            pending: 0,
            pending_max,
            records: VecDeque::new(),
            handed_through: next_position - 1,
            caught_up_through: None,
            config,
            wake,
        })
    }

    /// Stops the client and starts a new one reading from `next_position` (a node
    /// rolling back to a stream that lost its tail). Publishes pending in the old
    /// client are abandoned: they get no outcome. Tickets keep rising across the
    /// restart, so an old ticket never names a new record.
    pub fn restart_from(&mut self, next_position: u64) -> Result<(), JetStreamError> {
        self.shut_down();
        let next_ticket = self.next_ticket;
        *self = JetStream::start(self.config.clone(), next_position, crate::sync::Arc::clone(&self.wake))?;
        self.next_ticket = next_ticket;
        Ok(())
    }

    /// Tickets issued whose outcome `poll_acks` has not returned yet.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Queues one record under `msg_id` (sent as 32 hex digits in `Nats-Msg-Id`);
    /// returns its ticket (1, 2, ...).
    pub fn publish(&mut self, msg_id: [u8; 16], payload: &[u8]) -> Result<u64, PublishError> {
        self.enqueue(msg_id, payload, None, None)
    }

    /// Like `publish`, with `Nats-Expected-Last-Sequence: expected_last`: stored only
    /// if the stream's last record is then at `expected_last`.
    pub fn publish_pinned(
        &mut self,
        msg_id: [u8; 16],
        payload: &[u8],
        expected_last: u64,
    ) -> Result<u64, PublishError> {
        self.enqueue(msg_id, payload, Some(expected_last), None)
    }

    /// Like `publish_pinned`, for a record republished after the stream lost it: it
    /// carries the time it was first folded at (`Meshos-Time-Ms`), delivered as
    /// `Delivered::stamped_ms`, so a reader folds it at that time, not the server's new one.
    pub fn publish_restamped(
        &mut self,
        msg_id: [u8; 16],
        payload: &[u8],
        expected_last: u64,
        stamped_ms: u64,
    ) -> Result<u64, PublishError> {
        self.enqueue(msg_id, payload, Some(expected_last), Some(stamped_ms))
    }

    fn enqueue(
        &mut self,
        msg_id: [u8; 16],
        payload: &[u8],
        expected_last: Option<u64>,
        stamped_ms: Option<u64>,
    ) -> Result<u64, PublishError> {
        let max_bytes = self.inner.payload_bytes_max.load(Ordering::Relaxed);
        if payload.len() as u64 > max_bytes {
            return Err(PublishError::TooLarge { bytes: payload.len(), max_bytes });
        }
        if self.pending >= self.pending_max {
            return Err(PublishError::Full { pending: self.pending });
        }
        let ticket = self.next_ticket;
        let outgoing = Outgoing { ticket, msg_id, payload: payload.to_vec(), expected_last, stamped_ms };
        let was_empty = {
            let mut shared = self.inner.lock();
            shared.queue.push_back(outgoing);
            shared.queue.len() == 1
        };
        if was_empty {
            self.inner.wake();
        }
        self.next_ticket += 1;
        self.pending += 1;
        Ok(ticket)
    }

    /// Appends every outcome available to `out` (in no particular ticket order).
    pub fn poll_acks(&mut self, out: &mut Vec<PublishOutcome>) {
        let before = out.len();
        out.extend(self.inner.lock().outcomes.drain(..));
        let taken = (out.len() - before) as u64;
        assert!(taken <= self.pending, "more outcomes ({taken}) than pending tickets ({})", self.pending);
        self.pending -= taken;
    }

    /// Visits at most `max` delivered records in position order; returns how many.
    /// `Err(BeforeStart)` once every record before the purge point was handed out.
    pub fn poll_records(&mut self, max: usize, visit: &mut dyn FnMut(Delivered<'_>)) -> Result<usize, JetStreamError> {
        if self.records.is_empty() {
            let mut shared = self.inner.lock();
            std::mem::swap(&mut self.records, &mut shared.records);
            self.caught_up_through = shared.caught_up_through;
            let blocked = std::mem::take(&mut shared.records_blocked);
            let before_start = shared.before_start;
            drop(shared);
            if blocked {
                self.inner.wake();
            }
            if self.records.is_empty() {
                if let Some((requested, first)) = before_start {
                    return Err(JetStreamError::BeforeStart { requested, first });
                }
            }
        }
        let mut visited = 0;
        while visited < max {
            let Some(record) = self.records.pop_front() else { break };
            assert_eq!(record.position, self.handed_through + 1, "records are handed out dense and in order");
            self.handed_through = record.position;
            visit(Delivered {
                position: record.position,
                timestamp_ns: record.timestamp_ns,
                msg_id: record.msg_id,
                stamped_ms: record.stamped_ms,
                payload: &record.payload,
                verified: record.verified,
            });
            visited += 1;
        }
        Ok(visited)
    }

    /// True once the consumer reported nothing pending beyond a delivered position
    /// and every record up to it has been handed out.
    pub fn caught_up(&self) -> bool {
        self.records.is_empty() && self.caught_up_through.is_some_and(|through| self.handed_through >= through)
    }

    /// Asks the server to purge every record below `position` (idempotent; the
    /// result is logged and counted in `stats().purges`).
    pub fn purge_below(&mut self, position: u64) {
        {
            let mut shared = self.inner.lock();
            shared.purge_wanted = Some(shared.purge_wanted.map_or(position, |wanted| wanted.max(position)));
        }
        self.inner.wake();
    }

    /// The stream's last position when a (re)connection found the stream ending below
    /// what this client had already delivered: every server lost the tail (an
    /// acknowledgement is replication, not fsync). Taken once; the caller repairs.
    /// Until `resume_publishing`, only pinned records are sent (the tail given back
    /// must take its old positions before anything new is stored).
    pub fn take_regression(&mut self) -> Option<u64> {
        self.inner.lock().regressed.take()
    }

    /// Ends the hold `take_regression` reported: every queued record goes out again.
    pub fn resume_publishing(&mut self) {
        self.inner.lock().resume_publishing = true;
        self.inner.wake();
    }

    /// `(first, last)` stream sequence from the latest stream info.
    pub fn stream_bounds(&self) -> Option<(u64, u64)> {
        self.inner.lock().bounds
    }

    pub fn stats(&self) -> JetStreamStats {
        self.inner.lock().stats.clone()
    }

    /// Stops the thread and waits for it; pending publishes are abandoned.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.inner.lock().stop = true;
        self.inner.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the JetStream client thread panicked");
            }
        }
    }
}

impl Drop for JetStream {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_bad_field() {
        let good = JetStreamConfig::new(vec!["127.0.0.1:4222".into()], "node-1");
        assert!(good.validate().is_ok());
        let bad = |change: fn(&mut JetStreamConfig), field: &str| {
            let mut config = good.clone();
            change(&mut config);
            match config.validate() {
                Err(JetStreamError::Config(text)) => assert!(text.starts_with(field), "{text}"),
                other => panic!("{field}: {other:?}"),
            }
        };
        bad(|c| c.servers.clear(), "servers");
        bad(|c| c.stream = "ME.SHOS".into(), "stream");
        bad(|c| c.subject = "meshos.*".into(), "subject");
        bad(|c| c.subject = "meshos log".into(), "subject");
        bad(|c| c.client_name.clear(), "client_name");
        bad(|c| c.stream_replicas = 0, "stream_replicas");
        bad(|c| c.duplicate_window_ms = 10, "duplicate_window_ms");
        bad(|c| c.publish_window_max = 0, "publish_window_max");
        bad(|c| c.heartbeat_ms = 10, "request_timeout_ms");
        bad(|c| c.record_bytes_max = 0, "record_bytes_max");
        let signal = Signal::new();
        let error = JetStream::start(good.clone(), 0, signal).err().expect("position 0 is refused");
        assert!(matches!(error, JetStreamError::Config(_)));
    }

    #[test]
    fn the_handle_bounds_what_is_pending_and_checks_the_cap() {
        // No server listens on port 1: nothing is ever sent, so tickets stay pending.
        let mut config = JetStreamConfig::new(vec!["127.0.0.1:1".into()], "node-1");
        config.publish_window_max = 2;
        config.publish_queue_max = 3;
        config.record_bytes_max = 8;
        let mut js = JetStream::start(config, 1, Signal::new()).expect("start");
        assert_eq!(js.publish([0; 16], b"123456789"), Err(PublishError::TooLarge { bytes: 9, max_bytes: 8 }));
        for ticket in 1..=5 {
            assert_eq!(js.publish([ticket as u8; 16], b"x"), Ok(ticket));
        }
        assert_eq!(js.publish([9; 16], b"x"), Err(PublishError::Full { pending: 5 }));
        let mut out = Vec::new();
        js.poll_acks(&mut out);
        assert!(out.is_empty());
        assert_eq!(js.poll_records(10, &mut |_| panic!("no records")).unwrap(), 0);
        assert!(!js.caught_up());
        assert_eq!(js.stream_bounds(), None);
        assert!(!js.stats().connected);
        js.stop();
    }
}
