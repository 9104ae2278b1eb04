//! The ingest reactor: one thread, mio readiness, every client socket of a node.
//!
//! Purpose: accept clients on a TCP and/or a Unix listener, read what they send
//! without blocking, cut it into whole wire frames, check each frame
//! (`wire::decode_frame` against `frame_bytes_max`, kind `Events` or
//! `EventsAckWanted` only) and push it, as received (header included), into that
//! connection's SPSC ring for the sequencer, which reads the kind from the header.
//! Each accepted connection becomes a [`Source`] handed to the consumer through an
//! mpsc channel; [`Signal::notify`] wakes the consumer after each round of pushes,
//! each new source and each closed connection. The consumer answers through
//! [`Command`]s (resume, acknowledge, close), which the reactor alone turns into
//! socket operations.
//!
//! Back-pressure without loss: when a ring is full the frame stays in the
//! connection's buffer, the reactor calls `mark_blocked`; if that returns true the
//! connection is paused: READABLE is withdrawn from its registration, the kernel
//! buffers fill and TCP pushes back on the sender. The consumer's `take_unblocked`
//! tells it to send [`Command::Resume`] (or call `resume`); the reactor asks for
//! READABLE again and pushes the buffered frames first. All rings together hold at
//! most `queue_bytes_total_max`: a frame that would pass it stays buffered and its
//! connection waits unread in `queue_waiters` (no ring protocol can wake it: its own
//! ring may be empty), so while anyone waits, or a closed connection's ring still
//! holds frames (they count until the consumer drained them), the reactor counts
//! every ring again each `QUEUE_RECOUNT_INTERVAL` and reads the waiting connections,
//! oldest first, while there is room.
//!
//! The secure port: started with a [`SecureConfig`], every TCP connection is first a
//! stranger in its handshake (`sys::secure`, stream mode, responder): it holds one of
//! `handshake_connections_max` slots (`handshake_per_address_max` per IP), its buffer
//! at most `HANDSHAKE_BUFFER_BYTES` (under the floor, never charged to the budget),
//! no ring and no [`Source`], and it is closed at `handshake_timeout_ms`. Whole
//! handshake frames are fed to the channel one at a time, so the bytes after the
//! handshake stay in the buffer. Once the peer proved an admitted identity the
//! connection becomes a source; from then its buffer holds the decrypted frames
//! (`..plain_end`, decrypted in place) and at most one partial encrypted frame, and
//! its acks and error frames are encrypted. Each frame's signed sections are
//! verified here, once ([`ClientFrame::verified`]), so fold need not on its thread.
//!
//! The command path: [`Resumer::send`] / [`Reactor::send`] append commands to one
//! shared queue under one lock and wake the reactor through a `mio::Waker`; the
//! reactor takes the whole queue once per round and acts on it in order. A command
//! for a source that is unknown or already closed is ignored.
//!
//! The reply path: [`Command::Ack`] says every frame of a source up to `seq` is
//! durable. Each connection keeps at most one pending ack (not yet encoded) and an
//! output buffer holding at most one frame being written (an `Ack`, or the error
//! frame of a close), never more than `OUTPUT_BYTES_MAX`. An ack whose seq is not
//! above the highest one pending, being written or written is ignored; a newer ack
//! replaces the pending one (counted in `acks_coalesced`). Acks are cumulative, so
//! the newest says everything the older ones said: coalescing loses nothing, and a
//! client that never reads its acks costs O(1) memory and never stalls the reactor
//! or other connections. The pending ack is encoded only when the output is empty,
//! so it stays replaceable as long as possible. Writes never block: on WouldBlock
//! the connection asks for WRITABLE and finishes when the socket is writable.
//!
//! Registration: a connection wants READABLE unless paused or starved, plus
//! WRITABLE while it has anything to write; wanting neither means deregistered (mio
//! has no empty interest set). `interest` records what is registered; changes go
//! through register / reregister / deregister, and a failure closes the connection.
//!
//! Memory: a read buffer holds up to `BUFFER_FLOOR_BYTES` of capacity for free;
//! every capacity byte above it is charged to one budget shared by all connections
//! (`partial_frame_bytes_max`). A connection whose buffer is full to its capacity
//! and may not grow is *starved*: READABLE is withdrawn (TCP pushes back, as for a
//! full ring) and it waits, oldest first, in `starved`; each round after budget
//! frees, the waiting connections are read again while budget is left. Budget
//! frees when a buffer empties or shrinks (frames pushed) or a connection closes,
//! and the frame deadline guarantees that: a partial frame that does not complete
//! within `frame_timeout_ms` of its first byte closes its connection, so no
//! connection holds budget forever and waiting ones cannot deadlock.
//!
//! Time: the reactor reads `Instant::now()` once per round (it is I/O code, not
//! fold). A connection not sending a byte for `idle_timeout_ms`, or not completing
//! a frame within `frame_timeout_ms`, is closed with an error frame and counted
//! (`closed_idle`, `closed_frame_timeout`); a paused or quiesced connection is not
//! waiting on its peer, so neither timer runs against it (both restart at resume).
//! The check is a sweep over the connections at most once per sweep interval (a
//! quarter of the shorter timeout, between 5 ms and 1 s), never a per-round scan;
//! the poll timeout wakes the thread for it. For 4,096 connections a sweep costs
//! microseconds.
//!
//! Limits on connections: TCP connections at most `connections_max`, and at most
//! `connections_per_address_max` from one remote IP address; the Unix socket is
//! counted apart, at most `local_connections_max`, so a TCP flood never locks out
//! local tools. The Unix socket is made mode 0600 right after bind (whatever the
//! umask); a connection that reached it before that is closed unserved.
//!
//! The log: every rejection (frame error by reason, a frame of the wrong kind, a
//! connection refused or closed by a limit, a wait for the budget) is counted in
//! [`ReactorStats`] and logged at warn level with its peer, at most one line per
//! reason per `rejection_log_interval_ms`; the lines held back are counted in the
//! reason's next line (or a summary line at the next sweep after the interval).
//!
//! Invariants:
//! 1. A frame is pushed only whole and checked; a partial frame left by a peer that
//!    disconnects is discarded and counted (`disconnected_mid_frame`), never pushed.
//! 2. Nothing received is dropped: a frame leaves the buffer only once `try_push`
//!    took it.
//! 3. Per connection, frames are pushed in the order received, and acks are written
//!    with strictly increasing seqs; each frame on the wire is whole unless the
//!    connection closes while it is being written.
//! 4. A bad frame (any `FrameError`, or a kind other than `Events` and
//!    `EventsAckWanted`), or a [`Command::Close`], gets one error frame
//!    (`FrameKind::Error`, the error's text) written best effort without blocking,
//!    after the ack being written and the pending one if the socket takes them all
//!    (otherwise no error frame, since it cannot be written without blocking), then
//!    that connection alone is closed; the count is kept per
//!    `FrameError::reason_code` ([`ERROR_REASONS`]).
//! 5. At most `connections_max` TCP connections are open, at most
//!    `connections_per_address_max` of them from one IP address, and at most
//!    `local_connections_max` Unix ones; one more is accepted, sent an error frame
//!    naming the limit, closed and counted (`rejected_connections`,
//!    `rejected_per_address`, `rejected_local_connections`). On a secure port at
//!    most `handshake_connections_max` TCP connections are in their handshake (and
//!    `handshake_per_address_max` from one address; refused the same way), none of
//!    them is a source, and each is closed by `handshake_timeout_ms` after its accept.
//! 6. A connection's read buffer starts empty (an idle connection costs nothing but
//!    its struct) and never holds more than `connection_buffer_bytes` (on a secure
//!    connection, plus one encrypted frame; in its handshake, at most
//!    `HANDSHAKE_BUFFER_BYTES`); start refuses a
//!    configuration where one frame of `frame_bytes_max` would not fit. The bytes
//!    counted in all rings never pass `queue_bytes_total_max`. Its output
//!    buffer starts empty and never holds more than `OUTPUT_BYTES_MAX`; its pending
//!    ack is one fixed-size value. The read buffers' capacity above
//!    `BUFFER_FLOOR_BYTES`, summed over all connections, never passes
//!    `partial_frame_bytes_max` (`partial_frame_bytes` is that sum now); start
//!    refuses a budget smaller than one `connection_buffer_bytes`.
//! 7. `paused` means READABLE is withheld, whatever the output needs; `paused_now`
//!    counts the paused connections that are open. `starved` means READABLE is
//!    withheld for want of budget and the connection is listed in `starved`;
//!    `waiting_for_budget_now` counts the starved connections that are open. A
//!    connection is never both.
//! 8. Nothing here panics on input; socket errors (reading or writing) close the one
//!    connection. A peer that closes while acks are pending is simply closed.
//! 9. A connection that is read (not paused, not quiesced) is closed within one
//!    sweep interval after `idle_timeout_ms` without a byte, or after
//!    `frame_timeout_ms` since its partial frame began; each close gets an error
//!    frame (best effort) and is counted.
//! 10. Every rejection is counted; at most one log line per reason per
//!     `rejection_log_interval_ms`, and none is lost from the counts the lines give.
//!
//! Not done here: payload validation (`wire::access_batch`) is left to the
//! sequencer, which must copy the payload to an aligned buffer anyway, and reports a
//! bad payload back with [`Command::Close`]. Fairness: a connection is read at most
//! `READS_PER_ROUND_MAX` times per round, then served again after the others
//! (readiness is edge-triggered, so the reactor keeps its own list of connections
//! that may still hold bytes). Shutdown closes connections without writing their
//! pending acks.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
// The `Signal` is shared through `crate::sync::Arc` (loom's under `cfg(loom)`, where
// `Signal::new` builds one); everything else here uses std's.
use crate::sync::Arc as SignalArc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use crate::ingest::park::Signal;
use crate::ingest::ring::{ring, Consumer, Producer};
use crate::sys::secure::{self, Channel, SecureConfig, SecureError, StreamReceiver, StreamSender};
use crate::wire::{self, FrameError, FrameKind};

/// The `FrameError::reason_code`s in variant order; `ReactorStats::errors_by_reason`
/// is indexed like this array.
pub const ERROR_REASONS: [&str; 8] =
    ["truncated", "oversized", "bad_magic", "bad_version", "bad_kind", "bad_checksum", "bad_padding", "bad_payload"];

/// Index of `error` in [`ERROR_REASONS`].
pub fn reason_index(error: &FrameError) -> usize {
    let index = match error {
        FrameError::Truncated { .. } => 0,
        FrameError::Oversized { .. } => 1,
        FrameError::BadMagic { .. } => 2,
        FrameError::BadVersion { .. } => 3,
        FrameError::BadKind { .. } => 4,
        FrameError::BadChecksum { .. } => 5,
        FrameError::BadPadding => 6,
        FrameError::BadPayload { .. } => 7,
    };
    debug_assert_eq!(ERROR_REASONS[index], error.reason_code());
    index
}

const WAKE_TOKEN: Token = Token(0);
const TCP_LISTENER_TOKEN: Token = Token(1);
const UNIX_LISTENER_TOKEN: Token = Token(2);
/// Connection ids start here; a connection's token is its id.
const FIRST_CONNECTION_ID: u64 = 16;
/// Bytes added to a read buffer at most per read call.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of read buffer a connection may hold without drawing on the shared
/// partial-frame budget (`partial_frame_bytes_max`): every capacity byte above this
/// is charged to the budget. An empty buffer above it is released, and one holding
/// at most half of it is shrunk back to it, so idle connections stay cheap and the
/// budget comes back.
pub const BUFFER_FLOOR_BYTES: usize = 64 << 10;
/// Bytes of an error frame's text at most.
const ERROR_TEXT_BYTES_MAX: usize = 1024;
/// Bytes of an error frame at most (header, text, padding).
const ERROR_FRAME_BYTES_MAX: usize = wire::frame_bytes(ERROR_TEXT_BYTES_MAX);
/// Bytes of an `Ack` frame.
const ACK_FRAME_BYTES: usize = wire::frame_bytes(wire::ACK_PAYLOAD_BYTES);
/// Bytes a connection's output buffer holds at most: the one frame being written,
/// an ack or the closing error frame. Acks never queue behind each other (they are
/// coalesced instead), so this bound is what a connection's write side costs.
const OUTPUT_BYTES_MAX: usize = 8 << 10;
const _: () = assert!(ACK_FRAME_BYTES + secure::FRAME_OVERHEAD_BYTES <= OUTPUT_BYTES_MAX);
const _: () = assert!(ERROR_FRAME_BYTES_MAX + secure::FRAME_OVERHEAD_BYTES <= OUTPUT_BYTES_MAX);
/// The responder's handshake output at most: its Noise message (an ephemeral key and
/// a tag) and its identity, should the socket take neither before both are queued.
const _: () = assert!(64 + secure::HANDSHAKE_FRAME_BYTES_MAX <= OUTPUT_BYTES_MAX);
/// Bytes a connection in its handshake reads at most: one handshake frame, and a
/// little of what a client sends right after it.
const HANDSHAKE_BUFFER_BYTES: usize = secure::HANDSHAKE_FRAME_BYTES_MAX + 4096;
const _: () = assert!(HANDSHAKE_BUFFER_BYTES <= BUFFER_FLOOR_BYTES);
const _: () = assert!(OUTPUT_BYTES_MAX <= BUFFER_FLOOR_BYTES);
// A first read into an empty buffer never needs the budget.
const _: () = assert!(READ_CHUNK_BYTES <= BUFFER_FLOOR_BYTES);
/// What a secure channel costs a connection at most beside its buffers: in its
/// handshake the channel's inbox (one handshake frame: they are fed one at a time),
/// its scratch (as large as that frame) and its outbox (an identity), plus the Noise
/// state; once established, the two stream directions (a few hundred bytes).
pub const SECURE_CHANNEL_BYTES_MAX: usize = 3 * secure::HANDSHAKE_FRAME_BYTES_MAX + 4096;
/// What one open connection costs at most apart from its ring and what it draws on
/// the partial-frame budget: its read buffer's floor, its output buffer and its
/// secure channel.
pub const CONNECTION_FIXED_BYTES_MAX: usize = BUFFER_FLOOR_BYTES + OUTPUT_BYTES_MAX + SECURE_CHANNEL_BYTES_MAX;
/// The timeouts are checked by a sweep over the connections at most this often
/// (a quarter of the shorter timeout, within these bounds): a connection is closed
/// between its timeout and its timeout plus one sweep interval.
const SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(1);
const SWEEP_INTERVAL_MIN: Duration = Duration::from_millis(5);
/// While a connection waits for `queue_bytes_total_max` or a closed connection's ring
/// drains, the rings are counted again this often (the consumer's pops are not
/// signalled to the reactor).
const QUEUE_RECOUNT_INTERVAL: Duration = Duration::from_millis(1);
/// Bytes read and discarded after an error, before closing (so an unread input does
/// not turn the close into a reset that could destroy the error frame).
const DRAIN_ON_CLOSE_BYTES_MAX: usize = 256 << 10;
const EVENTS_CAPACITY: usize = 256;
/// Wait before accepting again after an accept error (e.g. out of descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Reads of one connection per round at most, so one busy peer with a fast
/// consumer cannot hold the thread while others wait.
const READS_PER_ROUND_MAX: u32 = 16;

/// Where and how much the reactor accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactorConfig {
    pub listen_tcp: Option<SocketAddr>,
    pub listen_unix: Option<PathBuf>,
    /// TCP connections open at once at most.
    pub connections_max: u32,
    /// Unix-socket (local) connections open at once at most, apart from TCP's.
    pub local_connections_max: u32,
    /// TCP connections open at once from one remote IP address at most.
    pub connections_per_address_max: u32,
    /// The most bytes one connection's read buffer holds.
    pub connection_buffer_bytes: u32,
    /// Read-buffer bytes above `BUFFER_FLOOR_BYTES` per connection, summed over all
    /// connections, at most; a connection that needs more stops being read until
    /// the budget frees.
    pub partial_frame_bytes_max: u64,
    /// A connection that sends no byte for this long is closed.
    pub idle_timeout_ms: u32,
    /// A frame must arrive whole within this long of its first byte (while the
    /// connection is read), or the connection is closed.
    pub frame_timeout_ms: u32,
    /// At most one log line per rejection reason per this interval; the rest are
    /// counted and reported in the next line.
    pub rejection_log_interval_ms: u32,
    /// TCP connections in their secure handshake at once at most (they count
    /// against `connections_max` as well).
    pub handshake_connections_max: u32,
    /// TCP connections in their handshake at once from one IP address at most.
    pub handshake_per_address_max: u32,
    /// A TCP connection must complete its handshake within this long of its accept.
    pub handshake_timeout_ms: u32,
    /// Ring length per connection, rounded up to a power of two (at least 2).
    pub queue_frames: u32,
    /// Bytes of frames one connection's ring may hold; a frame that would pass it
    /// waits (reading pauses) unless the ring is empty.
    pub queue_bytes_max: u32,
    /// Bytes of frames all rings hold together at most (closed connections' rings
    /// until drained included); a frame that would pass it waits, its connection not
    /// read, until the consumer drained enough.
    pub queue_bytes_total_max: u64,
    pub frame_bytes_max: u32,
}

/// The kind of socket a [`Source`] came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Tcp,
    Unix,
}

/// A whole, checked frame as the reactor hands it on: its bytes (header included, as
/// received; kind `Events` or `EventsAckWanted`) and the sections of its payload whose
/// signatures the reactor verified (`fold::verified_sections` against the port's
/// cluster id, a pure function of the bytes; 0 on a port without a secure config),
/// so fold need not verify them again on its own thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    pub bytes: Vec<u8>,
    pub verified: crate::fold::VerifiedSections,
}

/// One accepted connection as the consumer (the sequencer) sees it: its id and the
/// ring of whole, checked frames ([`ClientFrame`]) it produces. The ring is abandoned
/// (`Consumer::is_abandoned`) once the connection is closed and every frame was
/// popped.
pub struct Source {
    pub id: u64,
    pub frames: Consumer<ClientFrame>,
    pub kind: SourceKind,
}

/// What the consumer asks of the reactor, through [`Resumer::send`] or
/// [`Reactor::send`]. A command for a source that is unknown or closed is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read a paused source again (what `resume` does).
    Resume { source: u64 },
    /// Every frame of `source` up to its frame `seq` is durable, the last at log
    /// `position` committed at `time_ms`. Cumulative: a newer ack supersedes an older
    /// one not yet written, and an ack not above one already pending or written is
    /// ignored.
    Ack { source: u64, seq: u64, position: u64, time_ms: u64 },
    /// The consumer found a frame of `source` bad (e.g. payload validation): send an
    /// error frame with `error`'s text, count it under `error.reason_code()` in
    /// `errors_by_reason`, close that connection.
    Close { source: u64, error: FrameError },
    /// The start of a clean shutdown: stop accepting (listeners closed) and stop
    /// reading every connection, but keep them open so the acks of what is already
    /// queued can still be written; `ReactorStats::quiesced` turns 1 once done.
    Quiesce,
}

/// Why connections were refused or closed by the reactor's limits, in the order of
/// [`ReactorStats::connection_refusals`].
pub const CONNECTION_REFUSALS: [&str; 11] = [
    "over_limit",
    "local_over_limit",
    "per_address",
    "idle_timeout",
    "frame_timeout",
    "memory_budget_wait",
    "handshakes_over_limit",
    "handshakes_per_address",
    "handshake_timeout",
    "authentication_failed",
    "bad_encryption",
];

/// Why secure handshakes failed, in the order of
/// [`ReactorStats::authentication_failures_by_reason`]: a handshake that did not
/// parse or decrypt, another cluster's peer, a node name not admitted, a node with
/// another key than its admitted one, a bad identity signature, an operator key that
/// is not in the keyring.
pub const AUTHENTICATION_FAILURES: [&str; 6] =
    ["bad_handshake", "wrong_cluster", "unknown_node", "key_mismatch", "bad_signature", "unknown_operator"];

/// Index of `error` in [`AUTHENTICATION_FAILURES`].
fn authentication_failure_index(error: &SecureError) -> usize {
    match error {
        SecureError::WrongCluster { .. } => 1,
        SecureError::UnknownNode { .. } => 2,
        SecureError::KeyMismatch { .. } => 3,
        SecureError::BadSignature { .. } => 4,
        SecureError::OperatorNotAccepted | SecureError::UnknownOperator { .. } => 5,
        _ => 0,
    }
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Connections accepted as sources.
    pub accepted: u64,
    /// Sources closed (by the peer, an error, the consumer or shutdown).
    pub closed: u64,
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Sources not being read right now because their ring is full.
    pub paused_now: u64,
    /// Times a source was paused.
    pub pauses: u64,
    /// Times a paused source was read again.
    pub resumes: u64,
    /// Times a connection spent its read budget of a round and was served again
    /// after the other ready connections.
    pub budget_spent: u64,
    /// TCP connections over `connections_max`, answered with an error frame and closed.
    pub rejected_connections: u64,
    /// Unix-socket connections over `local_connections_max`, answered and closed.
    pub rejected_local_connections: u64,
    /// TCP connections over `connections_per_address_max` from one IP address,
    /// answered and closed.
    pub rejected_per_address: u64,
    /// Connections closed after `idle_timeout_ms` without a byte.
    pub closed_idle: u64,
    /// Connections closed because a frame did not complete within `frame_timeout_ms`.
    pub closed_frame_timeout: u64,
    /// Times a connection stopped being read because its partial frame needed more
    /// of the partial-frame budget than was left.
    pub budget_waits: u64,
    /// Connections waiting for the partial-frame budget now.
    pub waiting_for_budget_now: u64,
    /// Read-buffer bytes charged to the partial-frame budget now, and the most ever.
    pub partial_frame_bytes: u64,
    pub partial_frame_bytes_peak: u64,
    /// Connections closed by the peer in the middle of a frame (partial frame discarded).
    pub disconnected_mid_frame: u64,
    /// Valid frames of a kind clients may not send (anything but `Events` and
    /// `EventsAckWanted`).
    pub unexpected_kind: u64,
    /// Frame errors, indexed like [`ERROR_REASONS`] (the consumer's `Close` commands
    /// included).
    pub errors_by_reason: [u64; ERROR_REASONS.len()],
    /// Ack frames fully written.
    pub acks_sent: u64,
    /// Acks superseded by a newer ack of the same connection before being written.
    pub acks_coalesced: u64,
    /// `Close` commands acted on (the source was still open).
    pub closed_by_consumer: u64,
    /// 1 once a `Quiesce` command took effect: nothing more is read or pushed.
    pub quiesced: u64,
    /// Accept calls that failed for another reason than "nothing to accept" (e.g. out
    /// of file descriptors); the listener is retried 100 ms later.
    pub accept_errors: u64,
    /// Times a write would block and the connection waited for WRITABLE (its peer
    /// reads slower than it is answered).
    pub writes_blocked: u64,
    /// TCP connections in their secure handshake now.
    pub handshakes_now: u64,
    /// Handshakes completed: the peer proved an admitted identity.
    pub handshakes_completed: u64,
    /// TCP connections refused at accept because `handshake_connections_max`, or
    /// `handshake_per_address_max` for their address, were in their handshake.
    pub rejected_handshakes: u64,
    pub rejected_handshakes_per_address: u64,
    /// Connections closed because their handshake passed `handshake_timeout_ms`.
    pub closed_handshake_timeout: u64,
    /// Handshakes that failed, by reason ([`AUTHENTICATION_FAILURES`]).
    pub authentication_failures_by_reason: [u64; AUTHENTICATION_FAILURES.len()],
    /// Secure connections closed because a frame did not decrypt (tampered,
    /// replayed or garbage ciphertext).
    pub bad_encryption: u64,
    /// Bytes of frames in all rings, as of the last count (an overestimate between
    /// counts: pops are seen late), and the most ever counted.
    pub queue_bytes_total: u64,
    pub queue_bytes_total_peak: u64,
    /// Times a connection stopped being read because its next frame would pass
    /// `queue_bytes_total_max`, and the connections waiting so now.
    pub queue_budget_waits: u64,
    pub waiting_for_queue_now: u64,
}

/// Why the reactor could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error("reactor configuration: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot bind TCP listener on {addr}: {source}")]
    BindTcp { addr: SocketAddr, source: io::Error },
    #[error("cannot bind Unix listener at {path}: {source}")]
    BindUnix { path: PathBuf, source: io::Error },
    #[error("cannot set up the poller: {0}")]
    Poll(#[source] io::Error),
    #[error("cannot start the reactor thread: {0}")]
    Thread(#[source] io::Error),
}

impl ReactorStats {
    /// Connections refused or closed by each limit, named as in [`CONNECTION_REFUSALS`]
    /// (`memory_budget_wait`: times reading stopped for want of budget; not a close).
    pub fn connection_refusals(&self) -> [(&'static str, u64); CONNECTION_REFUSALS.len()] {
        let counts = [
            self.rejected_connections,
            self.rejected_local_connections,
            self.rejected_per_address,
            self.closed_idle,
            self.closed_frame_timeout,
            self.budget_waits,
            self.rejected_handshakes,
            self.rejected_handshakes_per_address,
            self.closed_handshake_timeout,
            self.authentication_failures_by_reason.iter().sum(),
            self.bad_encryption,
        ];
        std::array::from_fn(|index| (CONNECTION_REFUSALS[index], counts[index]))
    }

    /// Handshakes that failed, per reason ([`AUTHENTICATION_FAILURES`]).
    pub fn authentication_failures(&self) -> [(&'static str, u64); AUTHENTICATION_FAILURES.len()] {
        std::array::from_fn(|index| (AUTHENTICATION_FAILURES[index], self.authentication_failures_by_reason[index]))
    }

    /// Frames refused, per reason: the [`ERROR_REASONS`] (the consumer's closes
    /// included), then `unexpected_kind`.
    pub fn frame_rejections(&self) -> [(&'static str, u64); ERROR_REASONS.len() + 1] {
        std::array::from_fn(|index| match ERROR_REASONS.get(index) {
            Some(name) => (*name, self.errors_by_reason[index]),
            None => ("unexpected_kind", self.unexpected_kind),
        })
    }
}

#[derive(Default)]
struct StatCells {
    accepted: AtomicU64,
    closed: AtomicU64,
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    paused_now: AtomicU64,
    pauses: AtomicU64,
    resumes: AtomicU64,
    budget_spent: AtomicU64,
    rejected_connections: AtomicU64,
    rejected_local_connections: AtomicU64,
    rejected_per_address: AtomicU64,
    closed_idle: AtomicU64,
    closed_frame_timeout: AtomicU64,
    budget_waits: AtomicU64,
    waiting_for_budget_now: AtomicU64,
    partial_frame_bytes: AtomicU64,
    partial_frame_bytes_peak: AtomicU64,
    disconnected_mid_frame: AtomicU64,
    unexpected_kind: AtomicU64,
    errors_by_reason: [AtomicU64; ERROR_REASONS.len()],
    acks_sent: AtomicU64,
    acks_coalesced: AtomicU64,
    closed_by_consumer: AtomicU64,
    quiesced: AtomicU64,
    accept_errors: AtomicU64,
    writes_blocked: AtomicU64,
    handshakes_now: AtomicU64,
    handshakes_completed: AtomicU64,
    rejected_handshakes: AtomicU64,
    rejected_handshakes_per_address: AtomicU64,
    closed_handshake_timeout: AtomicU64,
    authentication_failures_by_reason: [AtomicU64; AUTHENTICATION_FAILURES.len()],
    bad_encryption: AtomicU64,
    queue_bytes_total: AtomicU64,
    queue_bytes_total_peak: AtomicU64,
    queue_budget_waits: AtomicU64,
    waiting_for_queue_now: AtomicU64,
}

fn bump(cell: &AtomicU64, by: u64) {
    cell.fetch_add(by, Ordering::Relaxed);
}

impl StatCells {
    fn snapshot(&self) -> ReactorStats {
        let load = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        ReactorStats {
            accepted: load(&self.accepted),
            closed: load(&self.closed),
            frames_in: load(&self.frames_in),
            bytes_in: load(&self.bytes_in),
            paused_now: load(&self.paused_now),
            pauses: load(&self.pauses),
            resumes: load(&self.resumes),
            budget_spent: load(&self.budget_spent),
            rejected_connections: load(&self.rejected_connections),
            rejected_local_connections: load(&self.rejected_local_connections),
            rejected_per_address: load(&self.rejected_per_address),
            closed_idle: load(&self.closed_idle),
            closed_frame_timeout: load(&self.closed_frame_timeout),
            budget_waits: load(&self.budget_waits),
            waiting_for_budget_now: load(&self.waiting_for_budget_now),
            partial_frame_bytes: load(&self.partial_frame_bytes),
            partial_frame_bytes_peak: load(&self.partial_frame_bytes_peak),
            disconnected_mid_frame: load(&self.disconnected_mid_frame),
            unexpected_kind: load(&self.unexpected_kind),
            errors_by_reason: std::array::from_fn(|index| load(&self.errors_by_reason[index])),
            acks_sent: load(&self.acks_sent),
            acks_coalesced: load(&self.acks_coalesced),
            closed_by_consumer: load(&self.closed_by_consumer),
            quiesced: load(&self.quiesced),
            accept_errors: load(&self.accept_errors),
            writes_blocked: load(&self.writes_blocked),
            handshakes_now: load(&self.handshakes_now),
            handshakes_completed: load(&self.handshakes_completed),
            rejected_handshakes: load(&self.rejected_handshakes),
            rejected_handshakes_per_address: load(&self.rejected_handshakes_per_address),
            closed_handshake_timeout: load(&self.closed_handshake_timeout),
            authentication_failures_by_reason: std::array::from_fn(|index| {
                load(&self.authentication_failures_by_reason[index])
            }),
            bad_encryption: load(&self.bad_encryption),
            queue_bytes_total: load(&self.queue_bytes_total),
            queue_bytes_total_peak: load(&self.queue_bytes_total_peak),
            queue_budget_waits: load(&self.queue_budget_waits),
            waiting_for_queue_now: load(&self.waiting_for_queue_now),
        }
    }
}

/// State shared by the handle, resumers and the reactor thread.
struct Shared {
    waker: Waker,
    /// Commands sent and not yet taken by the reactor thread, in sending order.
    commands: Mutex<Vec<Command>>,
    stopping: AtomicBool,
    stats: StatCells,
}

impl Shared {
    /// Appends `commands` (drained) under one lock and wakes the reactor once.
    fn send(&self, commands: &mut Vec<Command>) {
        if commands.is_empty() {
            return;
        }
        self.commands.lock().unwrap_or_else(PoisonError::into_inner).append(commands);
        // A failed wake means the poller is gone, so the reactor is stopping anyway.
        let _ = self.waker.wake();
    }
}

/// A cloneable, `Send` handle that sends [`Command`]s to the reactor (for a consumer
/// thread that does not own the [`Reactor`]).
#[derive(Clone)]
pub struct Resumer {
    shared: Arc<Shared>,
}

impl Resumer {
    /// Queues `source_id` to be read again and wakes the reactor. Harmless when the
    /// source is not paused or is gone.
    pub fn resume(&self, source_id: u64) {
        self.shared.commands.lock().unwrap_or_else(PoisonError::into_inner).push(Command::Resume { source: source_id });
        let _ = self.shared.waker.wake();
    }

    /// Moves every command out of `commands` (left empty, its capacity kept) into the
    /// reactor's queue under one lock, and wakes the reactor once; nothing when
    /// `commands` is empty.
    pub fn send(&self, commands: &mut Vec<Command>) {
        self.shared.send(commands);
    }
}

/// Handle of the running reactor thread: commands, stats, shutdown.
pub struct Reactor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    local_tcp_addr: Option<SocketAddr>,
}

impl Reactor {
    /// Binds the listeners and starts the reactor thread. New connections' `Source`s
    /// are sent on the returned channel and `signal.notify()` wakes the consumer after
    /// each round of pushes, new source or closed connection. With `secure`, every TCP
    /// connection first completes the secure channel's handshake as the responder
    /// (stream mode) and is a source only once its peer proved an admitted identity;
    /// everything after is encrypted both ways. The Unix socket stays plain.
    pub fn start(
        config: ReactorConfig,
        secure: Option<Arc<SecureConfig>>,
        signal: SignalArc<Signal>,
    ) -> Result<(Reactor, mpsc::Receiver<Source>), ReactorError> {
        check_config(&config, secure.is_some())?;
        let poll = Poll::new().map_err(ReactorError::Poll)?;
        let waker = Waker::new(poll.registry(), WAKE_TOKEN).map_err(ReactorError::Poll)?;
        let mut tcp_listener = None;
        let mut local_tcp_addr = None;
        if let Some(addr) = config.listen_tcp {
            let mut listener = TcpListener::bind(addr).map_err(|source| ReactorError::BindTcp { addr, source })?;
            local_tcp_addr = Some(listener.local_addr().map_err(|source| ReactorError::BindTcp { addr, source })?);
            poll.registry()
                .register(&mut listener, TCP_LISTENER_TOKEN, Interest::READABLE)
                .map_err(ReactorError::Poll)?;
            tcp_listener = Some(listener);
        }
        let mut unix_listener = None;
        if let Some(path) = &config.listen_unix {
            remove_stale_socket(path);
            let bind_error = |source| ReactorError::BindUnix { path: path.clone(), source };
            let mut listener = UnixListener::bind(path).map_err(bind_error)?;
            // The socket's mode comes from the umask: make it the owner's alone. A
            // connection that reached it before the chmod is closed unserved (the
            // node has not announced itself yet, so nobody legitimate is waiting).
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
                while let Ok((early, _)) = listener.accept() {
                    drop(early);
                }
            }
            poll.registry()
                .register(&mut listener, UNIX_LISTENER_TOKEN, Interest::READABLE)
                .map_err(ReactorError::Poll)?;
            unix_listener = Some(listener);
        }
        let shared = Arc::new(Shared {
            waker,
            commands: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            stats: StatCells::default(),
        });
        let (sources_tx, sources_rx) = mpsc::channel();
        let ring_frames = (config.queue_frames as usize).next_power_of_two().max(2);
        let shorter_timeout_ms =
            config.idle_timeout_ms.min(config.frame_timeout_ms).min(config.handshake_timeout_ms) as u64;
        let sweep_interval =
            (Duration::from_millis(shorter_timeout_ms) / 4).clamp(SWEEP_INTERVAL_MIN, SWEEP_INTERVAL_MAX);
        let now = Instant::now();
        let secure_wanted = secure.is_some();
        let event_loop = EventLoop {
            now,
            next_sweep: now + sweep_interval,
            sweep_interval,
            budget: Budget { max: usize::try_from(config.partial_frame_bytes_max).unwrap_or(usize::MAX), used: 0 },
            starved: VecDeque::new(),
            tcp_open: 0,
            unix_open: 0,
            per_address: HashMap::new(),
            handshakes: Handshakes::default(),
            queued_total: 0,
            queue_waiters: VecDeque::new(),
            draining: Vec::new(),
            secure,
            scratch: if secure_wanted { vec![0u8; secure::FRAME_BYTES_MAX] } else { Vec::new() },
            rejection_log: RejectionLog::new(Duration::from_millis(config.rejection_log_interval_ms as u64)),
            poll,
            shared: Arc::clone(&shared),
            signal,
            sources_tx,
            tcp_listener,
            unix_listener,
            unix_path: config.listen_unix.clone(),
            connections: HashMap::new(),
            next_id: FIRST_CONNECTION_ID,
            ring_frames,
            config,
            pushed: false,
            read_again: Vec::new(),
            accept_retry: Vec::new(),
            commands: Vec::new(),
            flush_wanted: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("meshos-reactor".to_string())
            .spawn(move || event_loop.run())
            .map_err(ReactorError::Thread)?;
        Ok((Reactor { shared, thread: Some(thread), local_tcp_addr }, sources_rx))
    }

    /// The bound TCP address (the real port when the config asked for port 0).
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.local_tcp_addr
    }

    /// The consumer calls this when `take_unblocked()` said a paused source may be
    /// read again.
    pub fn resume(&self, source_id: u64) {
        self.resumer().resume(source_id);
    }

    /// As [`Resumer::send`]: moves every command out of `commands` into the
    /// reactor's queue under one lock and wakes the reactor once.
    pub fn send(&self, commands: &mut Vec<Command>) {
        self.shared.send(commands);
    }

    /// A handle for another thread to call `resume` and `send` with.
    pub fn resumer(&self) -> Resumer {
        Resumer { shared: Arc::clone(&self.shared) }
    }

    /// True once a `Quiesce` command took effect: nothing more will be pushed into
    /// any ring, and every earlier push is visible to the caller.
    pub fn is_quiesced(&self) -> bool {
        self.shared.stats.quiesced.load(Ordering::Acquire) == 1
    }

    /// Counters so far.
    pub fn stats(&self) -> ReactorStats {
        self.shared.stats.snapshot()
    }

    /// Stops accepting, closes listeners and connections, joins the thread.
    pub fn shutdown(mut self) -> ReactorStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shared.stopping.store(true, Ordering::Release);
            let _ = self.shared.waker.wake();
            // The thread only ends by returning; a panic in it is a bug, and it is
            // reported here rather than swallowed.
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop();
        }
    }
}

fn check_config(config: &ReactorConfig, secure: bool) -> Result<(), ReactorError> {
    let bad = |field, reason: String| Err(ReactorError::Config { field, reason });
    if config.listen_tcp.is_none() && config.listen_unix.is_none() {
        return bad("listen_tcp", "neither a TCP address nor a Unix socket to listen on".to_string());
    }
    for (field, value) in [
        ("connections_max", config.connections_max),
        ("local_connections_max", config.local_connections_max),
        ("connections_per_address_max", config.connections_per_address_max),
        ("idle_timeout_ms", config.idle_timeout_ms),
        ("frame_timeout_ms", config.frame_timeout_ms),
        ("rejection_log_interval_ms", config.rejection_log_interval_ms),
        ("handshake_connections_max", config.handshake_connections_max),
        ("handshake_per_address_max", config.handshake_per_address_max),
        ("handshake_timeout_ms", config.handshake_timeout_ms),
    ] {
        if value == 0 {
            return bad(field, "must be at least 1".to_string());
        }
    }
    if config.queue_frames == 0 || config.queue_frames > 1 << 20 {
        return bad("queue_frames", format!("{} is outside 1..=1048576", config.queue_frames));
    }
    if config.queue_bytes_max == 0 {
        return bad("queue_bytes_max", "must be at least 1".to_string());
    }
    if config.queue_bytes_total_max < config.frame_bytes_max as u64 {
        return bad(
            "queue_bytes_total_max",
            format!(
                "{} cannot hold one frame of frame_bytes_max ({})",
                config.queue_bytes_total_max, config.frame_bytes_max
            ),
        );
    }
    if (config.frame_bytes_max as usize) < wire::HEADER_BYTES {
        return bad("frame_bytes_max", format!("{} is below the header size", config.frame_bytes_max));
    }
    if config.connection_buffer_bytes < config.frame_bytes_max {
        return bad(
            "connection_buffer_bytes",
            format!(
                "{} cannot hold one frame of frame_bytes_max ({})",
                config.connection_buffer_bytes, config.frame_bytes_max
            ),
        );
    }
    // One connection alone must be able to fill its buffer, or a frame of
    // frame_bytes_max could never be read whole (on a secure connection, with one
    // encrypted frame beside it).
    let buffer_max = config.connection_buffer_bytes as u64 + if secure { secure::FRAME_BYTES_MAX as u64 } else { 0 };
    if config.partial_frame_bytes_max < buffer_max {
        return bad(
            "partial_frame_bytes_max",
            format!(
                "{} cannot hold one connection's buffer of {buffer_max} bytes (connection_buffer_bytes, plus \
                 one encrypted frame on a secure port)",
                config.partial_frame_bytes_max
            ),
        );
    }
    Ok(())
}

/// Removes a leftover Unix socket file at `path` (a previous run that did not clean
/// up and nobody accepts on); anything else is left alone and bind reports the
/// conflict.
pub(crate) fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        // A socket somebody still accepts on is live: leave it, bind fails.
        if metadata.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected socket of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn kind(&self) -> SourceKind {
        match self {
            Stream::Tcp(_) => SourceKind::Tcp,
            Stream::Unix(_) => SourceKind::Unix,
        }
    }

    /// Moves the registration from `current` to `wanted` (`None`: not registered).
    fn set_interest(
        &mut self,
        registry: &Registry,
        token: Token,
        current: Option<Interest>,
        wanted: Option<Interest>,
    ) -> io::Result<()> {
        match (self, current, wanted) {
            (_, None, None) => Ok(()),
            (Stream::Tcp(stream), Some(_), None) => registry.deregister(stream),
            (Stream::Unix(stream), Some(_), None) => registry.deregister(stream),
            (Stream::Tcp(stream), None, Some(interest)) => registry.register(stream, token, interest),
            (Stream::Unix(stream), None, Some(interest)) => registry.register(stream, token, interest),
            (Stream::Tcp(stream), Some(_), Some(interest)) => registry.reregister(stream, token, interest),
            (Stream::Unix(stream), Some(_), Some(interest)) => registry.reregister(stream, token, interest),
        }
    }

    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read(into),
            Stream::Unix(stream) => stream.read(into),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.write(bytes),
            Stream::Unix(stream) => stream.write(bytes),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(stream) => stream.shutdown(Shutdown::Write),
            Stream::Unix(stream) => stream.shutdown(Shutdown::Write),
        };
    }

    /// Writes an error frame carrying `text`, best effort: whatever the socket takes
    /// now without blocking; the rest is dropped, as the connection is closing. For a
    /// socket with nothing else to write (a connection refused at accept).
    fn write_error_frame(&mut self, text: &str) {
        let mut frame = Vec::new();
        encode_error_frame(&mut frame, text);
        let mut written = 0;
        while written < frame.len() {
            match self.write(&frame[written..]) {
                Ok(0) => break,
                Ok(count) => written += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.shutdown_and_drain();
    }

    /// Shuts the write side and reads and discards what the peer already sent, so
    /// closing does not reset the connection (a reset can destroy the last frame
    /// written before the peer reads it).
    fn shutdown_and_drain(&mut self) {
        self.shutdown_write();
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_ON_CLOSE_BYTES_MAX {
            match self.read(&mut sink) {
                Ok(0) => break,
                Ok(count) => drained += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// Appends an error frame carrying `text`, cut to [`ERROR_TEXT_BYTES_MAX`] bytes on
/// a character boundary.
fn encode_error_frame(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(ERROR_TEXT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let start = out.len();
    wire::encode_frame(out, FrameKind::Error, 0, 0, &text.as_bytes()[..end]);
    debug_assert!(out.len() - start <= ERROR_FRAME_BYTES_MAX);
}

/// An acknowledgement not yet encoded: the fields of [`Command::Ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingAck {
    seq: u64,
    position: u64,
    time_ms: u64,
}

/// How writing a connection's output ended.
enum Flush {
    /// Everything is written: the output is empty and no ack is pending.
    Done,
    /// The socket would block with bytes left in the output; wait for WRITABLE.
    Blocked,
    /// The socket failed or the peer is gone: close the connection.
    Failed,
}

/// One accepted connection, owned by the reactor thread.
struct Connection {
    stream: Stream,
    /// The ring to the consumer; None until a secure connection's handshake is done
    /// (a stranger costs no ring and no source).
    frames: Option<Producer<ClientFrame>>,
    /// The verified sections of the frame at the front of `buffer`, kept when the
    /// ring had no room for it, so a retry does not verify it again.
    front_verified: Option<crate::fold::VerifiedSections>,
    /// The secure channel, if the port has one.
    secure: Secure,
    /// On an established secure connection, the plaintext at the front of `buffer`:
    /// `buffer[..plain_end]` is decrypted, the rest ciphertext (at most one partial
    /// encrypted frame). Unused otherwise (see `plain_end()`).
    plain_end: usize,
    /// When the connection was accepted (its handshake deadline counts from here).
    accepted_at: Instant,
    /// Sizes of the frames in the ring, oldest first, as this end knows them.
    queued: QueuedBytes,
    /// Received bytes not yet pushed: whole frames waiting for ring room, then at
    /// most one partial frame. Never longer than `connection_buffer_bytes`.
    buffer: Vec<u8>,
    /// The buffer's capacity above `BUFFER_FLOOR_BYTES`, charged to the budget.
    charged: usize,
    /// True while READABLE is withheld because the ring is full.
    paused: bool,
    /// True while READABLE is withheld because the buffer must grow and the
    /// partial-frame budget has no room; the connection is in `EventLoop::starved`.
    starved: bool,
    /// True while READABLE is withheld because its next frame would pass
    /// `queue_bytes_total_max`; the connection is in `EventLoop::queue_waiters`.
    queue_waiting: bool,
    /// The TCP peer (None for a Unix socket), for the per-address count and the log.
    peer: Option<SocketAddr>,
    /// When the last byte arrived (or the connection was accepted or resumed).
    last_byte_at: Instant,
    /// When the partial frame in the buffer began (or reading it resumed); None
    /// while the buffer holds no partial frame.
    frame_started_at: Option<Instant>,
    /// False once the reactor quiesced: the socket is no longer read.
    reading: bool,
    /// What the socket is registered for; `None` while deregistered.
    interest: Option<Interest>,
    /// The one frame being written (bytes `output_written_bytes..` still to go), or
    /// empty. Never longer than `OUTPUT_BYTES_MAX`.
    output: Vec<u8>,
    output_written_bytes: usize,
    /// The frame in `output` is an ack (counted in `acks_sent` once written whole).
    output_holds_ack: bool,
    /// The newest ack not yet encoded; encoded only once `output` is empty.
    pending_ack: Option<PendingAck>,
    /// The highest seq acknowledged so far (pending, being written or written).
    ack_seq_highest: Option<u64>,
}

/// Where a connection stands with the secure channel.
enum Secure {
    /// No channel: the Unix socket, or a TCP port started without one.
    Plain,
    /// The handshake is under way; the connection is no source yet.
    Handshake(Box<Channel>),
    /// The peer proved its identity; everything is encrypted both ways.
    Established { sender: StreamSender, receiver: StreamReceiver },
}

impl Connection {
    fn new(
        stream: Stream,
        frames: Option<Producer<ClientFrame>>,
        secure: Secure,
        interest: Interest,
        peer: Option<SocketAddr>,
        now: Instant,
    ) -> Connection {
        debug_assert_eq!(frames.is_none(), matches!(secure, Secure::Handshake(_)));
        Connection {
            stream,
            frames,
            front_verified: None,
            secure,
            plain_end: 0,
            accepted_at: now,
            queued: QueuedBytes::default(),
            buffer: Vec::new(),
            charged: 0,
            paused: false,
            starved: false,
            queue_waiting: false,
            peer,
            last_byte_at: now,
            frame_started_at: None,
            reading: true,
            interest: Some(interest),
            output: Vec::new(),
            output_written_bytes: 0,
            output_holds_ack: false,
            pending_ack: None,
            ack_seq_highest: None,
        }
    }

    /// After a wait that was not its peer's doing (a pause, a wait for the queues'
    /// total): the idle and frame timers start again from `now`.
    fn restart_timers(&mut self, now: Instant) {
        self.last_byte_at = now;
        if self.frame_started_at.is_some() {
            self.frame_started_at = Some(now);
        }
    }

    /// The end of the bytes in `buffer` that are plaintext wire frames.
    fn plain_end(&self) -> usize {
        match self.secure {
            Secure::Plain => self.buffer.len(),
            Secure::Handshake(_) => 0,
            Secure::Established { .. } => self.plain_end,
        }
    }

    fn in_handshake(&self) -> bool {
        matches!(self.secure, Secure::Handshake(_))
    }

    /// The most bytes `buffer` may hold: a secure connection's may hold one encrypted
    /// frame beside the frames and the partial one of `connection_buffer_bytes`.
    fn buffer_max(&self, config: &ReactorConfig) -> usize {
        let plain = config.connection_buffer_bytes as usize;
        match self.secure {
            Secure::Plain => plain,
            Secure::Handshake(_) => HANDSHAKE_BUFFER_BYTES,
            Secure::Established { .. } => plain + secure::FRAME_BYTES_MAX,
        }
    }

    /// Appends the wire frame `frame` to the output, encrypted on a secure connection.
    /// False when it cannot be (a connection in its handshake has no keys yet; a
    /// sealing failure).
    fn queue_output(&mut self, frame: &[u8]) -> bool {
        match &mut self.secure {
            Secure::Plain => {
                self.output.extend_from_slice(frame);
                true
            }
            Secure::Handshake(_) => false,
            Secure::Established { sender, .. } => sender.seal(frame, &mut self.output).is_ok(),
        }
    }

    /// READABLE unless paused, WRITABLE while something is left to write.
    fn wanted_interest(&self) -> Option<Interest> {
        let readable =
            (!self.paused && !self.starved && !self.queue_waiting && self.reading).then_some(Interest::READABLE);
        let writable = (!self.output.is_empty() || self.pending_ack.is_some()).then_some(Interest::WRITABLE);
        match (readable, writable) {
            (Some(readable), Some(writable)) => Some(readable | writable),
            (readable, writable) => readable.or(writable),
        }
    }

    /// Records `ack` unless an ack at or above its seq was already accepted; a pending
    /// ack it replaces is counted as coalesced. True when the caller should flush
    /// (nothing was waiting to be written before; otherwise a flush is already due,
    /// either queued this round or on WRITABLE).
    fn queue_ack(&mut self, ack: PendingAck, stats: &StatCells) -> bool {
        if self.ack_seq_highest.is_some_and(|highest| ack.seq <= highest) {
            return false;
        }
        self.ack_seq_highest = Some(ack.seq);
        match self.pending_ack.replace(ack) {
            Some(_) => {
                bump(&stats.acks_coalesced, 1);
                false
            }
            None => self.output.is_empty(),
        }
    }

    /// Writes the output, then the pending ack, until both are done or the socket
    /// would block or fails.
    fn flush(&mut self, stats: &StatCells) -> Flush {
        loop {
            if self.output.is_empty() {
                let Some(ack) = self.pending_ack.take() else { return Flush::Done };
                if let Secure::Plain = self.secure {
                    wire::encode_ack(&mut self.output, ack.seq, ack.position, ack.time_ms);
                } else {
                    let mut frame = Vec::with_capacity(ACK_FRAME_BYTES);
                    wire::encode_ack(&mut frame, ack.seq, ack.position, ack.time_ms);
                    if !self.queue_output(&frame) {
                        return Flush::Failed;
                    }
                }
                self.output_holds_ack = true;
            }
            assert!(self.output.len() <= OUTPUT_BYTES_MAX, "output of {} bytes", self.output.len());
            assert!(self.output_written_bytes < self.output.len(), "output written past its end");
            match self.stream.write(&self.output[self.output_written_bytes..]) {
                Ok(0) => return Flush::Failed,
                Ok(count) => {
                    self.output_written_bytes += count;
                    if self.output_written_bytes == self.output.len() {
                        if self.output_holds_ack {
                            bump(&stats.acks_sent, 1);
                        }
                        self.output.clear();
                        self.output_written_bytes = 0;
                        self.output_holds_ack = false;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    bump(&stats.writes_blocked, 1);
                    return Flush::Blocked;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Flush::Failed,
            }
        }
    }

    /// The last words before closing: the output and the pending ack, then an error
    /// frame carrying `text` if everything before it was written (so it is never
    /// spliced into a half-written frame), all without blocking; then shut the write
    /// side and drain. The caller closes the connection.
    fn finish_with_error(&mut self, text: &str, stats: &StatCells) {
        if let Flush::Done = self.flush(stats) {
            let mut frame = Vec::with_capacity(ERROR_FRAME_BYTES_MAX);
            encode_error_frame(&mut frame, text);
            self.output_holds_ack = false;
            if self.queue_output(&frame) {
                let _ = self.flush(stats);
            }
        }
        self.stream.shutdown_and_drain();
    }
}

/// What reading a connection ended with.
enum Outcome {
    /// The socket would block; keep the connection.
    Idle,
    /// The read budget of this round is spent and the socket may hold more: read
    /// it again after the other ready connections (edge-triggered readiness will not
    /// report it again).
    Budget,
    /// The ring is full and blocked: pause the connection.
    Paused,
    /// The buffer is full to its capacity and the partial-frame budget cannot grow
    /// it: stop reading until the budget frees.
    Starved,
    /// Close the connection (the counters are already updated).
    Close,
    /// A secure connection's handshake just completed: make it a source.
    Established,
    /// The next frame would pass `queue_bytes_total_max`: stop reading until the
    /// consumer drained enough.
    QueueWait,
}

/// The partial-frame budget: read-buffer bytes above the floor, over all connections.
struct Budget {
    max: usize,
    used: usize,
}

impl Budget {
    fn available(&self) -> usize {
        self.max.saturating_sub(self.used)
    }

    /// Charges (or refunds) `connection` for its buffer's capacity now.
    fn settle(&mut self, connection: &mut Connection, stats: &StatCells) {
        let charge = connection.buffer.capacity().saturating_sub(BUFFER_FLOOR_BYTES);
        if charge == connection.charged {
            return;
        }
        self.used = self.used - connection.charged + charge;
        connection.charged = charge;
        stats.partial_frame_bytes.store(self.used as u64, Ordering::Relaxed);
        stats.partial_frame_bytes_peak.fetch_max(self.used as u64, Ordering::Relaxed);
    }

    /// Gives back everything `connection` holds (it is closing).
    fn release(&mut self, connection: &mut Connection, stats: &StatCells) {
        self.used -= connection.charged;
        connection.charged = 0;
        stats.partial_frame_bytes.store(self.used as u64, Ordering::Relaxed);
    }
}

/// Rejection reasons for the log: the frame errors ([`ERROR_REASONS`]), then a
/// frame of the wrong kind, then the [`CONNECTION_REFUSALS`].
const LOG_REASONS: usize = ERROR_REASONS.len() + 1 + CONNECTION_REFUSALS.len();
const LOG_UNEXPECTED_KIND: usize = ERROR_REASONS.len();
const LOG_CONNECTION: usize = ERROR_REASONS.len() + 1;

fn log_reason_name(reason: usize) -> &'static str {
    match reason {
        index if index < ERROR_REASONS.len() => ERROR_REASONS[index],
        LOG_UNEXPECTED_KIND => "unexpected_kind",
        index => CONNECTION_REFUSALS[index - LOG_CONNECTION],
    }
}

/// The rejection log: at most one line per reason per interval; what is suppressed
/// meanwhile is counted and reported by the next line of that reason, or by a
/// summary line at a sweep once the interval passed.
struct RejectionLog {
    interval: Duration,
    last_line: [Option<Instant>; LOG_REASONS],
    suppressed: [u64; LOG_REASONS],
}

impl RejectionLog {
    fn new(interval: Duration) -> RejectionLog {
        RejectionLog { interval, last_line: [None; LOG_REASONS], suppressed: [0; LOG_REASONS] }
    }

    fn note(&mut self, reason: usize, now: Instant, peer: Option<SocketAddr>, text: &str) {
        if self.last_line[reason].is_some_and(|last| now.saturating_duration_since(last) < self.interval) {
            self.suppressed[reason] += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed[reason]);
        self.last_line[reason] = Some(now);
        let peer = peer.map_or_else(|| "local socket".to_string(), |peer| peer.to_string());
        tracing::warn!(reason = log_reason_name(reason), peer, suppressed, "ingest rejected: {}", text.escape_debug());
    }

    /// Reports the reasons whose suppressed count waits and whose interval passed.
    fn flush(&mut self, now: Instant) {
        for reason in 0..LOG_REASONS {
            let due = self.last_line[reason].is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
            if self.suppressed[reason] > 0 && due {
                let suppressed = std::mem::take(&mut self.suppressed[reason]);
                self.last_line[reason] = Some(now);
                tracing::warn!(
                    reason = log_reason_name(reason),
                    suppressed,
                    "ingest rejected: {suppressed} more `{}` since the last line",
                    log_reason_name(reason)
                );
            }
        }
    }
}

/// The TCP connections in their handshake: how many, and from which addresses.
#[derive(Default)]
struct Handshakes {
    open: u32,
    per_address: HashMap<IpAddr, u32>,
}

impl Handshakes {
    fn from(&self, peer: Option<SocketAddr>) -> u32 {
        peer.and_then(|peer| self.per_address.get(&peer.ip())).copied().unwrap_or(0)
    }

    fn add(&mut self, peer: Option<SocketAddr>, stats: &StatCells) {
        self.open += 1;
        if let Some(peer) = peer {
            *self.per_address.entry(peer.ip()).or_insert(0) += 1;
        }
        bump(&stats.handshakes_now, 1);
    }

    fn remove(&mut self, peer: Option<SocketAddr>, stats: &StatCells) {
        assert!(self.open > 0, "a handshake ended that was never counted");
        self.open -= 1;
        if let Some(peer) = peer {
            if let Some(count) = self.per_address.get_mut(&peer.ip()) {
                *count -= 1;
                if *count == 0 {
                    self.per_address.remove(&peer.ip());
                }
            }
        }
        stats.handshakes_now.fetch_sub(1, Ordering::Relaxed);
    }
}

struct EventLoop {
    /// The time of this round (taken once after each poll).
    now: Instant,
    /// When the timeouts are next checked, and how often.
    next_sweep: Instant,
    sweep_interval: Duration,
    budget: Budget,
    /// Connections waiting for the partial-frame budget, oldest first (a closed or
    /// woken one may stay listed; its `starved` flag decides).
    starved: VecDeque<u64>,
    tcp_open: u32,
    unix_open: u32,
    /// Open TCP connections per remote IP address (no entry at zero).
    per_address: HashMap<IpAddr, u32>,
    /// TCP connections in their handshake.
    handshakes: Handshakes,
    /// Bytes of frames in all rings as this end knows them: every connection's
    /// `queued.bytes` plus the closed connections' rings in `draining`.
    queued_total: usize,
    /// Connections waiting for `queue_bytes_total_max`, oldest first (a closed or
    /// woken one may stay listed; its `queue_waiting` flag decides).
    queue_waiters: VecDeque<u64>,
    /// The rings of closed connections the consumer has not drained yet: their bytes
    /// still count; the producer is dropped (abandoning the ring) once drained.
    draining: Vec<(Producer<ClientFrame>, QueuedBytes)>,
    /// The secure channel every TCP connection completes first; None: plain TCP.
    secure: Option<Arc<SecureConfig>>,
    /// One encrypted frame's ciphertext while it is decrypted (empty without `secure`).
    scratch: Vec<u8>,
    rejection_log: RejectionLog,
    poll: Poll,
    shared: Arc<Shared>,
    signal: SignalArc<Signal>,
    sources_tx: mpsc::Sender<Source>,
    tcp_listener: Option<TcpListener>,
    unix_listener: Option<UnixListener>,
    unix_path: Option<PathBuf>,
    connections: HashMap<u64, Connection>,
    next_id: u64,
    ring_frames: usize,
    config: ReactorConfig,
    /// Something was pushed, accepted or closed since the last notify.
    pushed: bool,
    /// Connections that spent their read budget with the socket still readable.
    read_again: Vec<u64>,
    /// Listeners whose accept failed (not WouldBlock), retried after `ACCEPT_RETRY`.
    accept_retry: Vec<Token>,
    /// Commands taken from the shared queue (kept to reuse its allocation).
    commands: Vec<Command>,
    /// Connections given an ack this round with nothing waiting to be written before.
    flush_wanted: Vec<u64>,
}

impl EventLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        while !self.shared.stopping.load(Ordering::Acquire) {
            // Connections that used their read budget are served again at once.
            let until_sweep = self.next_sweep.saturating_duration_since(Instant::now());
            let timeout = if !self.read_again.is_empty() {
                Duration::ZERO
            } else if !self.queue_waiters.is_empty() || !self.draining.is_empty() {
                // Pops are not signalled to this thread: look again soon.
                QUEUE_RECOUNT_INTERVAL.min(until_sweep)
            } else if !self.accept_retry.is_empty() {
                ACCEPT_RETRY.min(until_sweep)
            } else {
                until_sweep
            };
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.now = Instant::now();
            if let Err(error) = polled {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The poller itself failed: nothing more can be read. Close down as
                // shutdown would; the consumer sees every source abandoned.
                break;
            }
            for event in events.iter() {
                match event.token() {
                    WAKE_TOKEN => {}
                    TCP_LISTENER_TOKEN | UNIX_LISTENER_TOKEN => self.accept_all(event.token()),
                    Token(token) => {
                        let id = token as u64;
                        let writable = event.is_writable() || event.is_write_closed();
                        if writable {
                            self.on_writable(id);
                        }
                        // Anything else (readable, read closed, an error) is found
                        // out by reading, as is a connection that is not paused.
                        if !writable || event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(id);
                        }
                    }
                }
            }
            self.run_commands();
            let mut retry = std::mem::take(&mut self.accept_retry);
            retry.dedup();
            for token in retry {
                self.accept_all(token);
            }
            for id in std::mem::take(&mut self.read_again) {
                self.on_readable(id);
            }
            self.wake_starved();
            if !self.queue_waiters.is_empty() || !self.draining.is_empty() {
                self.wake_queue_waiters();
            }
            if self.now >= self.next_sweep {
                self.sweep();
                self.next_sweep = self.now + self.sweep_interval;
            }
            if self.pushed {
                self.pushed = false;
                self.signal.notify();
            }
        }
        self.close_all();
    }

    fn stats(&self) -> &StatCells {
        &self.shared.stats
    }

    fn accept_all(&mut self, token: Token) {
        loop {
            let accepted = if token == TCP_LISTENER_TOKEN {
                match &self.tcp_listener {
                    Some(listener) => listener.accept().map(|(stream, peer)| (Stream::Tcp(stream), Some(peer))),
                    None => return,
                }
            } else {
                match &self.unix_listener {
                    Some(listener) => listener.accept().map(|(stream, _)| (Stream::Unix(stream), None)),
                    None => return,
                }
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                // Out of descriptors, a peer gone before accept: readiness is
                // edge-triggered, so the backlog would wait for the next connection;
                // retry after ACCEPT_RETRY instead.
                Err(_) => {
                    bump(&self.stats().accept_errors, 1);
                    self.accept_retry.push(token);
                    return;
                }
            }
        }
    }

    /// The limit `stream` would pass if admitted: its log reason, counter and the
    /// refusal's text; None when it may be admitted.
    fn refusal(&self, stream: &Stream, peer: Option<SocketAddr>) -> Option<(usize, String)> {
        match (stream.kind(), peer) {
            (SourceKind::Unix, _) => (self.unix_open >= self.config.local_connections_max).then(|| {
                let text = format!(
                    "connection refused: {} local connections open, the limit is {} (local_connections_max)",
                    self.unix_open, self.config.local_connections_max
                );
                (LOG_CONNECTION + 1, text)
            }),
            (SourceKind::Tcp, peer) => {
                let from_peer = peer.and_then(|peer| self.per_address.get(&peer.ip())).copied().unwrap_or(0);
                if from_peer >= self.config.connections_per_address_max {
                    let text = format!(
                        "connection refused: {from_peer} connections open from {}, the limit is {} \
                         (connections_per_address_max)",
                        peer.map_or_else(String::new, |peer| peer.ip().to_string()),
                        self.config.connections_per_address_max
                    );
                    return Some((LOG_CONNECTION + 2, text));
                }
                if self.tcp_open >= self.config.connections_max {
                    let text = format!(
                        "connection refused: {} connections open, the limit is {} (connections_max)",
                        self.tcp_open, self.config.connections_max
                    );
                    return Some((LOG_CONNECTION, text));
                }
                // Plain TCP (no secure channel) has no handshake to limit.
                self.secure.as_ref()?;
                let handshaking_from_peer = self.handshakes.from(peer);
                if handshaking_from_peer >= self.config.handshake_per_address_max {
                    let text = format!(
                        "connection refused: {handshaking_from_peer} connections from {} are in their handshake, the \
                         limit is {} (handshake_per_address_max)",
                        peer.map_or_else(String::new, |peer| peer.ip().to_string()),
                        self.config.handshake_per_address_max
                    );
                    return Some((LOG_CONNECTION + 7, text));
                }
                (self.handshakes.open >= self.config.handshake_connections_max).then(|| {
                    let text = format!(
                        "connection refused: {} connections are in their handshake, the limit is {} \
                         (handshake_connections_max)",
                        self.handshakes.open, self.config.handshake_connections_max
                    );
                    (LOG_CONNECTION + 6, text)
                })
            }
        }
    }

    fn admit(&mut self, mut stream: Stream, peer: Option<SocketAddr>) {
        if let Some((reason, text)) = self.refusal(&stream, peer) {
            let stats = &self.shared.stats;
            let counter = match reason - LOG_CONNECTION {
                0 => &stats.rejected_connections,
                1 => &stats.rejected_local_connections,
                2 => &stats.rejected_per_address,
                6 => &stats.rejected_handshakes,
                _ => &stats.rejected_handshakes_per_address,
            };
            bump(counter, 1);
            stream.write_error_frame(&text);
            self.rejection_log.note(reason, self.now, peer, &text);
            return;
        }
        // A TCP connection on a secure port is a stranger until its handshake is
        // done: no ring, no source, only a handshake slot.
        let secure = match (&self.secure, stream.kind()) {
            (Some(config), SourceKind::Tcp) => match Channel::responder(Arc::clone(config)) {
                Ok(channel) => Secure::Handshake(Box::new(channel.for_stream())),
                Err(error) => {
                    stream.write_error_frame(&format!("connection refused: {error}"));
                    return;
                }
            },
            _ => Secure::Plain,
        };
        let id = self.next_id;
        self.next_id += 1;
        let Ok(token) = usize::try_from(id) else { return };
        if stream.set_interest(self.poll.registry(), Token(token), None, Some(Interest::READABLE)).is_err() {
            return;
        }
        let kind = stream.kind();
        let frames = if let Secure::Handshake(_) = secure {
            self.handshakes.add(peer, &self.shared.stats);
            None
        } else {
            let (producer, consumer) = ring(self.ring_frames);
            if self.sources_tx.send(Source { id, frames: consumer, kind }).is_err() {
                // Nobody consumes: do not keep the connection.
                let _ = stream.set_interest(self.poll.registry(), Token(token), Some(Interest::READABLE), None);
                return;
            }
            bump(&self.stats().accepted, 1);
            self.pushed = true;
            Some(producer)
        };
        match kind {
            SourceKind::Tcp => {
                self.tcp_open += 1;
                if let Some(peer) = peer {
                    *self.per_address.entry(peer.ip()).or_insert(0) += 1;
                }
            }
            SourceKind::Unix => self.unix_open += 1,
        }
        self.connections.insert(id, Connection::new(stream, frames, secure, Interest::READABLE, peer, self.now));
        // Data may already be waiting; edge-triggered readiness reports it, but
        // reading now costs one failed read at most.
        self.on_readable(id);
    }

    fn on_readable(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        if connection.paused || connection.starved || connection.queue_waiting || !connection.reading {
            return;
        }
        let mut round = Round {
            config: &self.config,
            stats: &self.shared.stats,
            pushed: &mut self.pushed,
            budget: &mut self.budget,
            log: &mut self.rejection_log,
            scratch: &mut self.scratch,
            cluster_id: self.secure.as_ref().map(|secure| secure.cluster_id),
            queued_total: &mut self.queued_total,
            now: self.now,
        };
        let outcome = if connection.in_handshake() {
            read_handshake(connection, &mut round)
        } else {
            read_connection(connection, &mut round)
        };
        self.settle(id, outcome);
        // Handshake messages or an ack may wait for WRITABLE.
        self.update_interest(id);
    }

    /// A secure connection proved its identity: it becomes a source (its ring is
    /// made and handed to the consumer), leaves the handshake count, and is read on
    /// (what its peer sent after the handshake is already in the buffer).
    fn establish(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        let Secure::Handshake(channel) = std::mem::replace(&mut connection.secure, Secure::Plain) else {
            unreachable!("only a connection in its handshake is established")
        };
        self.handshakes.remove(connection.peer, &self.shared.stats);
        let parts = match channel.into_stream() {
            Ok(parts) => parts,
            Err(_) => {
                // Cannot happen for a channel that said it is established; closed all the same.
                connection.stream.shutdown_and_drain();
                self.close(id);
                return;
            }
        };
        debug_assert!(parts.received.is_empty(), "handshake frames are fed one at a time");
        connection.output.extend_from_slice(&parts.outgoing);
        assert!(connection.output.len() <= OUTPUT_BYTES_MAX, "handshake output of {} bytes", connection.output.len());
        connection.secure = Secure::Established { sender: parts.sender, receiver: parts.receiver };
        connection.plain_end = 0;
        connection.last_byte_at = self.now;
        let (producer, consumer) = ring(self.ring_frames);
        if self.sources_tx.send(Source { id, frames: consumer, kind: SourceKind::Tcp }).is_err() {
            self.close(id);
            return;
        }
        connection.frames = Some(producer);
        bump(&self.shared.stats.handshakes_completed, 1);
        bump(&self.shared.stats.accepted, 1);
        self.pushed = true;
        tracing::debug!(peer = ?connection.peer, identity = %parts.peer, "ingest connection authenticated");
        self.on_writable(id);
        self.on_readable(id);
    }

    /// Counts the bytes in every ring again (pops are seen only by looking: one
    /// atomic load per ring), drops the drained rings of closed connections, then
    /// reads the connections that wait for `queue_bytes_total_max`, oldest first,
    /// while there is room. O(connections), each round only while a connection waits
    /// or a closed ring drains.
    fn wake_queue_waiters(&mut self) {
        let mut total = 0;
        for connection in self.connections.values_mut() {
            if let Some(frames) = &connection.frames {
                connection.queued.settle(frames.len());
            }
            total += connection.queued.bytes;
        }
        let drained_before = self.draining.len();
        self.draining.retain_mut(|(frames, queued)| {
            queued.settle(frames.len());
            total += queued.bytes;
            queued.bytes > 0
        });
        if self.draining.len() < drained_before {
            // Dropped producers: the consumer sees those rings abandoned.
            self.pushed = true;
        }
        self.queued_total = total;
        self.shared.stats.queue_bytes_total.store(total as u64, Ordering::Relaxed);
        self.shared.stats.queue_bytes_total_peak.fetch_max(total as u64, Ordering::Relaxed);
        let total_max = usize::try_from(self.config.queue_bytes_total_max).unwrap_or(usize::MAX);
        for _ in 0..self.queue_waiters.len() {
            if self.queued_total >= total_max {
                return;
            }
            let Some(id) = self.queue_waiters.pop_front() else { return };
            let Some(connection) = self.connections.get_mut(&id) else { continue };
            if !connection.queue_waiting {
                continue;
            }
            connection.queue_waiting = false;
            // Not waiting on its peer meanwhile: its timers start again.
            connection.restart_timers(self.now);
            self.shared.stats.waiting_for_queue_now.fetch_sub(1, Ordering::Relaxed);
            self.update_interest(id);
            // Its buffered frame first; if it still does not fit, it waits again.
            self.on_readable(id);
        }
    }

    /// Reads the connections that wait for the budget, oldest first, while the
    /// budget has room for a read (each is looked at once per round at most).
    fn wake_starved(&mut self) {
        for _ in 0..self.starved.len() {
            // Woken with little room, a connection reads what fits and may wait
            // again; once nothing is left, the rest wait for the next round.
            if self.budget.available() == 0 {
                return;
            }
            let Some(id) = self.starved.pop_front() else { return };
            let Some(connection) = self.connections.get_mut(&id) else { continue };
            if !connection.starved {
                continue;
            }
            connection.starved = false;
            self.shared.stats.waiting_for_budget_now.fetch_sub(1, Ordering::Relaxed);
            self.update_interest(id);
            // Whatever the socket holds; if the budget is still short, it waits again.
            self.on_readable(id);
        }
    }

    /// Closes the connections whose idle or frame timeout passed (read ones only:
    /// a paused or quiesced connection is not waiting on its peer), and writes the
    /// rejection log's pending counts. O(connections), at most once per sweep
    /// interval (at most 1 s): for 4,096 connections a few microseconds.
    fn sweep(&mut self) {
        let now = self.now;
        let idle_timeout = Duration::from_millis(self.config.idle_timeout_ms as u64);
        let frame_timeout = Duration::from_millis(self.config.frame_timeout_ms as u64);
        let handshake_timeout = Duration::from_millis(self.config.handshake_timeout_ms as u64);
        let mut expired = Vec::new();
        for (&id, connection) in &self.connections {
            if connection.in_handshake() {
                // Not a source yet: only its handshake deadline runs.
                if now.saturating_duration_since(connection.accepted_at) >= handshake_timeout {
                    expired.push((id, Expiry::Handshake));
                }
                continue;
            }
            if connection.paused || connection.queue_waiting || !connection.reading {
                continue;
            }
            if let Some(started) = connection.frame_started_at {
                if now.saturating_duration_since(started) >= frame_timeout {
                    expired.push((id, Expiry::Frame));
                }
            } else if !connection.starved && now.saturating_duration_since(connection.last_byte_at) >= idle_timeout {
                expired.push((id, Expiry::Idle));
            }
        }
        for (id, expiry) in expired {
            let Some(connection) = self.connections.get_mut(&id) else { continue };
            if let Expiry::Handshake = expiry {
                let text = format!(
                    "connection closed: the secure handshake did not complete within {} ms (handshake_timeout_ms)",
                    self.config.handshake_timeout_ms
                );
                bump(&self.shared.stats.closed_handshake_timeout, 1);
                self.rejection_log.note(LOG_CONNECTION + 8, now, connection.peer, &text);
                connection.stream.shutdown_and_drain();
                self.close(id);
                continue;
            }
            let (reason, counter, text) = if let Expiry::Idle = expiry {
                let text = format!(
                    "connection closed: no byte received for {} ms (idle_timeout_ms)",
                    self.config.idle_timeout_ms
                );
                (LOG_CONNECTION + 3, &self.shared.stats.closed_idle, text)
            } else {
                let text = format!(
                    "connection closed: a frame was not complete within {} ms of its first byte ({} bytes of it \
                     received; frame_timeout_ms)",
                    self.config.frame_timeout_ms,
                    connection.buffer.len()
                );
                (LOG_CONNECTION + 4, &self.shared.stats.closed_frame_timeout, text)
            };
            bump(counter, 1);
            self.rejection_log.note(reason, now, connection.peer, &text);
            connection.finish_with_error(&text, &self.shared.stats);
            self.close(id);
        }
        self.rejection_log.flush(now);
    }

    /// Writes what the connection has to write, then asks for WRITABLE if the socket
    /// would block (or drops it when everything went out).
    fn on_writable(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        match connection.flush(&self.shared.stats) {
            Flush::Done | Flush::Blocked => self.update_interest(id),
            Flush::Failed => self.close(id),
        }
    }

    /// Registers the connection for what it wants now (see `wanted_interest`);
    /// closes it if the poller refuses.
    fn update_interest(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        let wanted = connection.wanted_interest();
        if wanted == connection.interest {
            return;
        }
        let Ok(token) = usize::try_from(id) else { return };
        match connection.stream.set_interest(self.poll.registry(), Token(token), connection.interest, wanted) {
            Ok(()) => connection.interest = wanted,
            Err(_) => self.close(id),
        }
    }

    fn settle(&mut self, id: u64, outcome: Outcome) {
        match outcome {
            Outcome::Idle => {}
            Outcome::Budget => {
                bump(&self.stats().budget_spent, 1);
                self.read_again.push(id);
            }
            Outcome::Paused => {
                let Some(connection) = self.connections.get_mut(&id) else { return };
                assert!(!connection.paused, "connection {id} paused twice");
                connection.paused = true;
                bump(&self.stats().paused_now, 1);
                bump(&self.stats().pauses, 1);
                self.update_interest(id);
            }
            Outcome::Starved => {
                let Some(connection) = self.connections.get_mut(&id) else { return };
                debug_assert!(!connection.starved && !connection.paused);
                connection.starved = true;
                bump(&self.shared.stats.waiting_for_budget_now, 1);
                bump(&self.shared.stats.budget_waits, 1);
                let text = format!(
                    "reading stopped: a partial frame of {} bytes needs more of the partial-frame budget \
                     ({} bytes, partial_frame_bytes_max) than is left",
                    connection.buffer.len(),
                    self.budget.max
                );
                self.rejection_log.note(LOG_CONNECTION + 5, self.now, connection.peer, &text);
                self.starved.push_back(id);
                self.update_interest(id);
            }
            Outcome::Close => self.close(id),
            Outcome::Established => self.establish(id),
            Outcome::QueueWait => {
                let Some(connection) = self.connections.get_mut(&id) else { return };
                debug_assert!(!connection.queue_waiting && !connection.paused && !connection.starved);
                connection.queue_waiting = true;
                bump(&self.shared.stats.waiting_for_queue_now, 1);
                bump(&self.shared.stats.queue_budget_waits, 1);
                self.queue_waiters.push_back(id);
                self.update_interest(id);
            }
        }
    }

    /// Takes every queued command and acts on it in order, then writes the acks.
    fn run_commands(&mut self) {
        {
            let mut queue = self.shared.commands.lock().unwrap_or_else(PoisonError::into_inner);
            debug_assert!(self.commands.is_empty());
            std::mem::swap(&mut *queue, &mut self.commands);
        }
        let mut commands = std::mem::take(&mut self.commands);
        for command in commands.drain(..) {
            match command {
                Command::Resume { source } => self.resume(source),
                Command::Ack { source, seq, position, time_ms } => {
                    let Some(connection) = self.connections.get_mut(&source) else { continue };
                    if connection.queue_ack(PendingAck { seq, position, time_ms }, &self.shared.stats) {
                        self.flush_wanted.push(source);
                    }
                }
                Command::Close { source, error } => self.close_by_consumer(source, &error),
                Command::Quiesce => self.quiesce(),
            }
        }
        self.commands = commands;
        let mut flush_wanted = std::mem::take(&mut self.flush_wanted);
        for id in flush_wanted.drain(..) {
            self.on_writable(id);
        }
        self.flush_wanted = flush_wanted;
    }

    fn resume(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        if !connection.paused {
            return; // a spurious resume (module docs of ingest::ring, step 3)
        }
        connection.paused = false;
        // The peer was not being read: its timers start again.
        connection.restart_timers(self.now);
        self.shared.stats.paused_now.fetch_sub(1, Ordering::Relaxed);
        bump(&self.shared.stats.resumes, 1);
        self.update_interest(id);
        // Buffered frames first, then whatever the socket holds (nothing if the
        // registration failed and the connection is gone).
        self.on_readable(id);
    }

    fn close_by_consumer(&mut self, id: u64, error: &FrameError) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        bump(&self.shared.stats.closed_by_consumer, 1);
        bump(&self.shared.stats.errors_by_reason[reason_index(error)], 1);
        let text = error.to_string();
        self.rejection_log.note(reason_index(error), self.now, connection.peer, &text);
        connection.finish_with_error(&text, &self.shared.stats);
        self.close(id);
    }

    fn close(&mut self, id: u64) {
        if let Some(mut connection) = self.connections.remove(&id) {
            if connection.in_handshake() {
                self.handshakes.remove(connection.peer, &self.shared.stats);
            }
            if connection.interest.is_some() {
                let token = Token(usize::try_from(id).unwrap_or(usize::MAX));
                let _ = connection.stream.set_interest(self.poll.registry(), token, connection.interest, None);
            }
            if connection.paused {
                self.shared.stats.paused_now.fetch_sub(1, Ordering::Relaxed);
            }
            if connection.starved {
                // Its entry in `starved` is skipped when reached.
                self.shared.stats.waiting_for_budget_now.fetch_sub(1, Ordering::Relaxed);
            }
            if connection.queue_waiting {
                // Its entry in `queue_waiters` is skipped when reached.
                self.shared.stats.waiting_for_queue_now.fetch_sub(1, Ordering::Relaxed);
            }
            let was_source = connection.frames.is_some();
            if let Some(frames) = connection.frames.take() {
                // Its frames still take memory until the consumer pops them: they stay
                // counted, and the ring alive, until then.
                let mut queued = std::mem::take(&mut connection.queued);
                let counted = queued.bytes;
                queued.settle(frames.len());
                self.queued_total -= counted - queued.bytes;
                if queued.bytes > 0 {
                    self.draining.push((frames, queued));
                }
            }
            self.budget.release(&mut connection, &self.shared.stats);
            match (connection.stream.kind(), connection.peer) {
                (SourceKind::Unix, _) => self.unix_open -= 1,
                (SourceKind::Tcp, peer) => {
                    self.tcp_open -= 1;
                    if let Some(peer) = peer {
                        if let Some(count) = self.per_address.get_mut(&peer.ip()) {
                            *count -= 1;
                            if *count == 0 {
                                self.per_address.remove(&peer.ip());
                            }
                        }
                    }
                }
            }
            if was_source {
                bump(&self.stats().closed, 1);
                // Dropping the producer abandons the ring once the consumer drains it.
                self.pushed = true;
            }
        }
    }

    /// Stops accepting and reading; connections stay open for their acks.
    fn quiesce(&mut self) {
        self.close_listeners();
        let ids: Vec<u64> = self.connections.keys().copied().collect();
        for id in ids {
            if let Some(connection) = self.connections.get_mut(&id) {
                connection.reading = false;
            }
            self.update_interest(id);
        }
        self.read_again.clear();
        // Release: every push before the quiesce is visible to a consumer that saw it
        // (`Reactor::is_quiesced` loads with Acquire).
        self.shared.stats.quiesced.store(1, Ordering::Release);
    }

    fn close_listeners(&mut self) {
        self.tcp_listener = None;
        self.unix_listener = None;
        if let Some(path) = self.unix_path.take() {
            let _ = std::fs::remove_file(path);
        }
    }

    fn close_all(&mut self) {
        self.close_listeners();
        // Commands sent before shutdown (the acks of the last commits) still count:
        // write them once, best effort without blocking, before closing.
        self.run_commands();
        let ids: Vec<u64> = self.connections.keys().copied().collect();
        for id in ids {
            if let Some(connection) = self.connections.get_mut(&id) {
                if let Flush::Done = connection.flush(&self.shared.stats) {
                    // FIN after the last ack, and unread input discarded (bounded), so
                    // closing does not turn into a reset that could destroy that ack.
                    connection.stream.shutdown_and_drain();
                }
            }
            self.close(id);
        }
        self.signal.notify();
    }
}

/// What reading one connection needs of the event loop, for one round.
struct Round<'a> {
    config: &'a ReactorConfig,
    stats: &'a StatCells,
    /// Set when something was pushed (the consumer is notified after the round).
    pushed: &'a mut bool,
    budget: &'a mut Budget,
    log: &'a mut RejectionLog,
    /// Holds one encrypted frame while it is decrypted.
    scratch: &'a mut [u8],
    /// The cluster whose signatures frames are verified against (the secure port's).
    cluster_id: Option<secure::ClusterId>,
    /// `EventLoop::queued_total`, kept up to date by each push.
    queued_total: &'a mut usize,
    now: Instant,
}

/// Which timeout closed a connection in a sweep.
enum Expiry {
    Idle,
    Frame,
    Handshake,
}

/// Pushes every whole frame in the buffer, then reads until the socket would block
/// (splitting frames after each read), the ring is full, the round's read budget is
/// spent, the partial-frame budget cannot grow the buffer, or the connection must
/// close.
fn read_connection(connection: &mut Connection, round: &mut Round) -> Outcome {
    let buffer_max = connection.buffer_max(round.config);
    let mut reads_left = READS_PER_ROUND_MAX;
    loop {
        if let Secure::Established { receiver, .. } = &mut connection.secure {
            match receiver.open_in_place(&mut connection.buffer, connection.plain_end, round.scratch) {
                Ok(plain_end) => connection.plain_end = plain_end,
                Err(error) => {
                    bump(&round.stats.bad_encryption, 1);
                    let text = format!("connection closed: {error}");
                    round.log.note(LOG_CONNECTION + 10, round.now, connection.peer, &text);
                    connection.finish_with_error(&text, round.stats);
                    return Outcome::Close;
                }
            }
        }
        match push_frames(connection, round) {
            Outcome::Idle => {}
            other => return other,
        }
        // Only a partial frame is left, shorter than frame_bytes_max <= buffer_max
        // (on a secure connection, and at most one partial encrypted frame).
        let held = connection.buffer.len();
        assert!(held < buffer_max, "partial frame of {held} bytes fills the buffer of {buffer_max}");
        if connection.buffer.capacity() > BUFFER_FLOOR_BYTES {
            if held == 0 {
                connection.buffer = Vec::new();
            } else if held <= BUFFER_FLOOR_BYTES / 2 {
                connection.buffer.shrink_to(BUFFER_FLOOR_BYTES);
            }
            round.budget.settle(connection, round.stats);
        }
        if reads_left == 0 {
            return Outcome::Budget;
        }
        reads_left -= 1;
        let room_wanted = (buffer_max - held).min(READ_CHUNK_BYTES);
        let capacity = connection.buffer.capacity();
        // The partial frame's end when its header is here: the buffer grows past the
        // floor only as far as that frame needs (the next frames wait for it to go).
        let plain_end = connection.plain_end();
        let frame_end = match wire::decode_header(&connection.buffer[..plain_end], round.config.frame_bytes_max) {
            // The frame's end, and on a secure connection the encrypted frame that
            // completes it.
            Ok(header) => (header.frame_bytes() + (buffer_max - round.config.connection_buffer_bytes as usize))
                .max(BUFFER_FLOOR_BYTES),
            Err(_) => buffer_max,
        };
        if capacity < held + room_wanted && capacity < frame_end {
            // Double, but not past the frame's end nor what the budget allows.
            let allowed = BUFFER_FLOOR_BYTES + connection.charged + round.budget.available();
            let target = (capacity * 2).clamp(held + room_wanted, buffer_max).min(frame_end).min(allowed);
            if target > capacity {
                connection.buffer.reserve_exact(target - held);
                round.budget.settle(connection, round.stats);
            }
        }
        let room = room_wanted.min(connection.buffer.capacity() - held);
        if room == 0 {
            return Outcome::Starved;
        }
        connection.buffer.resize(held + room, 0);
        let result = connection.stream.read(&mut connection.buffer[held..]);
        let count = match &result {
            Ok(count) => *count,
            Err(_) => 0,
        };
        connection.buffer.truncate(held + count);
        debug_assert!(connection.buffer.len() <= buffer_max, "read buffer over connection_buffer_bytes");
        match result {
            Ok(0) => {
                if held > 0 {
                    bump(&round.stats.disconnected_mid_frame, 1);
                }
                return Outcome::Close;
            }
            Ok(count) => {
                bump(&round.stats.bytes_in, count as u64);
                connection.last_byte_at = round.now;
                if held == 0 {
                    connection.frame_started_at = Some(round.now);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Outcome::Idle,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                if held > 0 {
                    bump(&round.stats.disconnected_mid_frame, 1);
                }
                return Outcome::Close;
            }
        }
    }
}

/// Pushes every whole, checked frame at the front of the buffer. `Idle`: what is
/// left is a partial frame (or nothing). `Paused`: the ring is full and blocked.
/// `Close`: a bad frame was answered with an error frame, or the consumer is gone.
fn push_frames(connection: &mut Connection, round: &mut Round) -> Outcome {
    let (config, stats) = (round.config, round.stats);
    let plain_end = connection.plain_end();
    let mut consumed = 0;
    let outcome = loop {
        let rest = &connection.buffer[consumed..plain_end];
        if rest.len() < wire::HEADER_BYTES {
            break Outcome::Idle;
        }
        let frame_bytes = match wire::decode_header(rest, config.frame_bytes_max) {
            Ok(header) => header.frame_bytes(),
            Err(error) => break reject_frame(connection, round, &error),
        };
        if rest.len() < frame_bytes {
            break Outcome::Idle;
        }
        let verified = match wire::decode_frame(&rest[..frame_bytes], config.frame_bytes_max) {
            Ok(frame) if matches!(frame.header.kind, FrameKind::Events | FrameKind::EventsAckWanted) => {
                // Verified off the fold thread, once (kept if the ring has no room).
                match (consumed, connection.front_verified.take(), &round.cluster_id) {
                    (0, Some(verified), _) => verified,
                    (_, _, Some(cluster_id)) => crate::fold::verified_sections(frame.payload, cluster_id),
                    (_, _, None) => 0,
                }
            }
            Ok(frame) => {
                bump(&stats.unexpected_kind, 1);
                let text = format!(
                    "frame kind {:?} is not accepted from clients: only Events and EventsAckWanted frames",
                    frame.header.kind
                );
                round.log.note(LOG_UNEXPECTED_KIND, round.now, connection.peer, &text);
                connection.finish_with_error(&text, stats);
                break Outcome::Close;
            }
            Err(error) => break reject_frame(connection, round, &error),
        };
        let budget = config.queue_bytes_max as usize;
        let Some(frames) = connection.frames.as_mut() else {
            unreachable!("a connection with plaintext frames is a source")
        };
        let frame = ClientFrame { bytes: rest[..frame_bytes].to_vec(), verified };
        let others = *round.queued_total - connection.queued.bytes;
        let total_max = usize::try_from(config.queue_bytes_total_max).unwrap_or(usize::MAX);
        let pushed = push_or_block(frames, &mut connection.queued, budget, others, total_max, frame);
        *round.queued_total = others + connection.queued.bytes;
        match pushed {
            Push::Pushed => {}
            Push::Blocked => {
                connection.front_verified = Some(verified);
                break Outcome::Paused;
            }
            Push::TotalFull => {
                connection.front_verified = Some(verified);
                break Outcome::QueueWait;
            }
            Push::ConsumerGone => break Outcome::Close,
        }
        consumed += frame_bytes;
        *round.pushed = true;
        bump(&stats.frames_in, 1);
    };
    connection.buffer.drain(..consumed);
    if let Secure::Established { .. } = connection.secure {
        connection.plain_end -= consumed;
    }
    if connection.buffer.is_empty() {
        connection.frame_started_at = None;
    } else if consumed > 0 {
        // The frame left over began in the bytes just read.
        connection.frame_started_at = Some(round.now);
    }
    outcome
}

/// Reads a connection in its secure handshake: feeds each whole handshake frame to
/// its channel, queues and writes what the channel answers, until the socket would
/// block, the handshake fails (counted by reason, the refusal written best effort,
/// `Close`) or completes (`Established`; bytes after it stay in the buffer). Never
/// more than `HANDSHAKE_BUFFER_BYTES` are buffered, none of them charged to the
/// partial-frame budget.
fn read_handshake(connection: &mut Connection, round: &mut Round) -> Outcome {
    let mut reads_left = READS_PER_ROUND_MAX;
    loop {
        if let Some(outcome) = advance_handshake(connection, round) {
            return outcome;
        }
        if reads_left == 0 {
            return Outcome::Budget;
        }
        reads_left -= 1;
        let held = connection.buffer.len();
        // A partial handshake frame is shorter than HANDSHAKE_FRAME_BYTES_MAX.
        assert!(held < secure::HANDSHAKE_FRAME_BYTES_MAX, "partial handshake frame of {held} bytes");
        connection.buffer.resize(HANDSHAKE_BUFFER_BYTES, 0);
        let result = connection.stream.read(&mut connection.buffer[held..]);
        let count = *result.as_ref().unwrap_or(&0);
        connection.buffer.truncate(held + count);
        match result {
            // The peer left during its handshake: nothing to count but the close.
            Ok(0) => return Outcome::Close,
            Ok(count) => {
                bump(&round.stats.bytes_in, count as u64);
                connection.last_byte_at = round.now;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Outcome::Idle,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Outcome::Close,
        }
    }
}

/// Feeds the whole handshake frames in the buffer to the channel, one at a time;
/// `None` while the handshake goes on.
fn advance_handshake(connection: &mut Connection, round: &mut Round) -> Option<Outcome> {
    let Secure::Handshake(channel) = &mut connection.secure else { unreachable!("a connection in its handshake") };
    let mut consumed = 0;
    let mut failure = None;
    while connection.buffer.len() - consumed >= 2 && !channel.is_established() {
        let length = u16::from_be_bytes([connection.buffer[consumed], connection.buffer[consumed + 1]]) as usize;
        if 2 + length > secure::HANDSHAKE_FRAME_BYTES_MAX {
            failure = Some(SecureError::BadHandshake(format!(
                "a handshake frame of {} bytes (at most {})",
                2 + length,
                secure::HANDSHAKE_FRAME_BYTES_MAX
            )));
            break;
        }
        let end = consumed + 2 + length;
        if end > connection.buffer.len() {
            break;
        }
        let received = channel.receive(&connection.buffer[consumed..end]);
        consumed = end;
        connection.output.extend_from_slice(&channel.take_outgoing());
        assert!(connection.output.len() <= OUTPUT_BYTES_MAX, "handshake output of {} bytes", connection.output.len());
        if let Err(error) = received {
            failure = Some(error);
            break;
        }
    }
    connection.buffer.drain(..consumed);
    let established = channel.is_established();
    if let Some(error) = failure {
        bump(&round.stats.authentication_failures_by_reason[authentication_failure_index(&error)], 1);
        let text = format!("secure handshake failed: {error}");
        round.log.note(LOG_CONNECTION + 9, round.now, connection.peer, &text);
        // The refusal (if the channel got as far as one) goes out best effort.
        let _ = connection.flush(round.stats);
        connection.stream.shutdown_and_drain();
        return Some(Outcome::Close);
    }
    if established {
        return Some(Outcome::Established);
    }
    match connection.flush(round.stats) {
        Flush::Failed => Some(Outcome::Close),
        Flush::Done | Flush::Blocked => None,
    }
}

enum Push {
    Pushed,
    /// The frame would pass `queue_bytes_total_max` (all rings together); it stays
    /// buffered and the connection waits for the consumer to drain some.
    TotalFull,
    /// The ring is full and `mark_blocked` said stop reading; the frame stays buffered.
    Blocked,
    ConsumerGone,
}

/// The bytes of the frames in one connection's ring, as its producer knows them: its
/// own pushes, minus the oldest ones once the ring's length says they were popped.
#[derive(Default)]
struct QueuedBytes {
    sizes: std::collections::VecDeque<usize>,
    bytes: usize,
}

impl QueuedBytes {
    /// Forgets the frames the consumer popped: the ring now holds `len` of them.
    fn settle(&mut self, len: usize) {
        debug_assert!(len <= self.sizes.len(), "the ring holds more than was pushed");
        while self.sizes.len() > len {
            self.bytes -= self.sizes.pop_front().expect("more sizes than len");
        }
    }

    /// Whether a frame of `size` may join the `len` frames in the ring: always into an
    /// empty ring (a frame larger than the budget still passes, alone), else within it.
    fn fits(&mut self, len: usize, size: usize, budget: usize) -> bool {
        self.settle(len);
        len == 0 || self.bytes + size <= budget
    }

    fn pushed(&mut self, size: usize) {
        self.sizes.push_back(size);
        self.bytes += size;
    }
}

/// `try_push` within the byte budget, and when the ring is full or over budget the
/// blocked handshake of `ingest::ring` (step 1) with the budget as the producer's
/// own condition: room that appeared meanwhile means push again.
/// `others`: the bytes of every other ring as this end knows them; `total_max`: what
/// all rings may hold together (`TotalFull` when this frame would pass it).
fn push_or_block(
    frames: &mut Producer<ClientFrame>,
    queued: &mut QueuedBytes,
    budget: usize,
    others: usize,
    total_max: usize,
    frame: ClientFrame,
) -> Push {
    let mut frame = frame;
    let size = frame.bytes.len();
    loop {
        // The known bytes only overestimate (pops not yet seen): load the ring's
        // length only when they say the budget is reached.
        let room = queued.bytes + size <= budget || queued.fits(frames.len(), size, budget);
        if room && others + queued.bytes + size > total_max {
            queued.settle(frames.len());
            if others + queued.bytes + size > total_max {
                return Push::TotalFull;
            }
        }
        if room {
            match frames.try_push(frame) {
                Ok(()) => {
                    queued.pushed(size);
                    return Push::Pushed;
                }
                Err(back) => frame = back,
            }
        }
        if frames.is_closed() {
            return Push::ConsumerGone;
        }
        let capacity = frames.capacity();
        if frames.mark_blocked_while(|len| len == capacity || !queued.fits(len, size, budget)) {
            return Push::Blocked;
        }
    }
}

fn reject_frame(connection: &mut Connection, round: &mut Round, error: &FrameError) -> Outcome {
    bump(&round.stats.errors_by_reason[reason_index(error)], 1);
    let text = error.to_string();
    round.log.note(reason_index(error), round.now, connection.peer, &text);
    connection.finish_with_error(&text, round.stats);
    Outcome::Close
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_index_follows_reason_code() {
        let errors = [
            FrameError::Truncated { needed: 1, available: 0 },
            FrameError::Oversized { frame_bytes: 2, frame_bytes_max: 1 },
            FrameError::BadMagic { found: [0; 4] },
            FrameError::BadVersion { found: 9 },
            FrameError::BadKind { found: 9 },
            FrameError::BadChecksum { expected: 1, actual: 2 },
            FrameError::BadPadding,
            FrameError::BadPayload { reason: String::new() },
        ];
        for (index, error) in errors.iter().enumerate() {
            assert_eq!(reason_index(error), index);
            assert_eq!(ERROR_REASONS[index], error.reason_code());
        }
    }

    #[test]
    fn acks_keep_only_the_newest_pending_and_never_go_back() {
        let (near, mut far) = UnixStream::pair().unwrap();
        let (producer, _consumer) = ring(2);
        let mut connection = Connection::new(
            Stream::Unix(near),
            Some(producer),
            Secure::Plain,
            Interest::READABLE,
            None,
            Instant::now(),
        );
        let stats = StatCells::default();
        let ack = |seq| PendingAck { seq, position: seq * 10, time_ms: seq * 100 };
        assert_eq!(connection.wanted_interest(), Some(Interest::READABLE));
        assert!(connection.queue_ack(ack(5), &stats), "the first ack asks for a flush");
        assert_eq!(connection.wanted_interest(), Some(Interest::READABLE | Interest::WRITABLE));
        assert!(!connection.queue_ack(ack(5), &stats), "an equal seq is ignored");
        assert!(!connection.queue_ack(ack(3), &stats), "a lower seq is ignored");
        assert!(!connection.queue_ack(ack(7), &stats), "a flush is already due");
        assert_eq!(connection.pending_ack, Some(ack(7)));
        assert_eq!(stats.acks_coalesced.load(Ordering::Relaxed), 1);
        assert!(matches!(connection.flush(&stats), Flush::Done));
        assert_eq!(stats.acks_sent.load(Ordering::Relaxed), 1);
        assert!(connection.output.is_empty() && connection.pending_ack.is_none());
        assert!(!connection.queue_ack(ack(6), &stats), "below the ack already written");
        connection.paused = true;
        assert_eq!(connection.wanted_interest(), None, "paused with nothing to write: deregistered");
        let mut written = [0u8; ACK_FRAME_BYTES];
        far.read_exact(&mut written).unwrap();
        let frame = wire::decode_frame(&written, ACK_FRAME_BYTES as u32).unwrap();
        assert_eq!((frame.header.kind, frame.header.seq, frame.header.time_ms), (FrameKind::Ack, 7, 700));
        assert_eq!(wire::ack_position(frame.payload), Some(70));
    }

    #[test]
    fn the_byte_budget_blocks_before_the_ring_is_full_and_a_pop_unblocks_it() {
        let (mut producer, mut consumer) = ring::<ClientFrame>(64);
        let mut queued = QueuedBytes::default();
        let budget = 250;
        let frame = || ClientFrame { bytes: vec![0u8; 100], verified: 0 };
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, 0, usize::MAX, frame()), Push::Pushed));
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, 0, usize::MAX, frame()), Push::Pushed));
        assert!(
            matches!(push_or_block(&mut producer, &mut queued, budget, 0, usize::MAX, frame()), Push::Blocked),
            "300 bytes would pass the budget of 250"
        );
        assert_eq!(producer.len(), 2);
        assert!(consumer.pop().is_some());
        assert!(consumer.take_unblocked(), "the consumer must resume the producer");
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, 0, usize::MAX, frame()), Push::Pushed));
        assert_eq!(queued.bytes, 200, "the popped frame is forgotten");
        // A frame larger than the whole budget passes alone into an empty ring.
        while consumer.pop().is_some() {}
        assert!(matches!(
            push_or_block(
                &mut producer,
                &mut queued,
                budget,
                0,
                usize::MAX,
                ClientFrame { bytes: vec![0u8; 1000], verified: 0 }
            ),
            Push::Pushed
        ));
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, 0, usize::MAX, frame()), Push::Blocked));
        // All rings together: another ring's 1,000 bytes leave no room for 100 more
        // under a total of 1,050; nothing is pushed, nothing is waited on in the ring.
        while consumer.pop().is_some() {}
        assert!(consumer.take_unblocked(), "the pops release the blocked producer");
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, 1000, 1050, frame()), Push::TotalFull));
        assert_eq!(queued.bytes, 0, "the pops were counted before refusing");
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, 900, 1000, frame()), Push::Pushed));
    }

    #[test]
    fn bad_configurations_name_their_field() {
        let good = ReactorConfig {
            listen_tcp: Some("127.0.0.1:0".parse().unwrap()),
            listen_unix: None,
            connections_max: 4,
            local_connections_max: 2,
            connections_per_address_max: 4,
            connection_buffer_bytes: 4096,
            partial_frame_bytes_max: 4096,
            idle_timeout_ms: 1000,
            frame_timeout_ms: 1000,
            rejection_log_interval_ms: 1000,
            handshake_connections_max: 2,
            handshake_per_address_max: 1,
            handshake_timeout_ms: 1000,
            queue_frames: 3,
            queue_bytes_max: 1 << 20,
            queue_bytes_total_max: 1 << 20,
            frame_bytes_max: 4096,
        };
        assert!(check_config(&good, false).is_ok());
        // A secure port's buffer holds one encrypted frame more.
        match check_config(&good, true) {
            Err(ReactorError::Config { field: "partial_frame_bytes_max", .. }) => {}
            other => panic!("expected partial_frame_bytes_max, got {other:?}"),
        }
        assert!(check_config(&ReactorConfig { partial_frame_bytes_max: 1 << 20, ..good.clone() }, true).is_ok());
        let field = |config: ReactorConfig| match check_config(&config, false) {
            Err(ReactorError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(field(ReactorConfig { listen_tcp: None, ..good.clone() }), "listen_tcp");
        assert_eq!(field(ReactorConfig { connections_max: 0, ..good.clone() }), "connections_max");
        assert_eq!(field(ReactorConfig { queue_frames: 0, ..good.clone() }), "queue_frames");
        assert_eq!(field(ReactorConfig { handshake_timeout_ms: 0, ..good.clone() }), "handshake_timeout_ms");
        assert_eq!(field(ReactorConfig { queue_bytes_total_max: 4095, ..good.clone() }), "queue_bytes_total_max");
        assert_eq!(field(ReactorConfig { queue_bytes_max: 0, ..good.clone() }), "queue_bytes_max");
        assert_eq!(field(ReactorConfig { frame_bytes_max: 16, ..good.clone() }), "frame_bytes_max");
        assert_eq!(field(ReactorConfig { local_connections_max: 0, ..good.clone() }), "local_connections_max");
        assert_eq!(
            field(ReactorConfig { connections_per_address_max: 0, ..good.clone() }),
            "connections_per_address_max"
        );
        assert_eq!(field(ReactorConfig { idle_timeout_ms: 0, ..good.clone() }), "idle_timeout_ms");
        assert_eq!(field(ReactorConfig { frame_timeout_ms: 0, ..good.clone() }), "frame_timeout_ms");
        assert_eq!(field(ReactorConfig { partial_frame_bytes_max: 4095, ..good.clone() }), "partial_frame_bytes_max");
        assert_eq!(field(ReactorConfig { connection_buffer_bytes: 4095, ..good }), "connection_buffer_bytes");
    }
}
