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
//! READABLE again and pushes the buffered frames first.
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
//! Registration: a connection wants READABLE unless paused, plus WRITABLE while it
//! has anything to write; wanting neither means deregistered (mio has no empty
//! interest set). `interest` records what is registered; changes go through
//! register / reregister / deregister, and a failure closes the connection.
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
//! 5. At most `connections_max` connections are open; one more is accepted, sent an
//!    error frame saying so, closed and counted (`rejected_connections`).
//! 6. A connection's read buffer starts empty (an idle connection costs nothing but
//!    its struct) and never holds more than `connection_buffer_bytes`; start refuses a
//!    configuration where one frame of `frame_bytes_max` would not fit. Its output
//!    buffer starts empty and never holds more than `OUTPUT_BYTES_MAX`; its pending
//!    ack is one fixed-size value.
//! 7. `paused` means READABLE is withheld, whatever the output needs; `paused_now`
//!    counts the paused connections that are open.
//! 8. Nothing here panics on input; socket errors (reading or writing) close the one
//!    connection. A peer that closes while acks are pending is simply closed.
//!
//! Not done here: payload validation (`wire::access_batch`) is left to the
//! sequencer, which must copy the payload to an aligned buffer anyway, and reports a
//! bad payload back with [`Command::Close`]. Fairness: a connection is read at most
//! `READS_PER_ROUND_MAX` times per round, then served again after the others
//! (readiness is edge-triggered, so the reactor keeps its own list of connections
//! that may still hold bytes). Shutdown closes connections without writing their
//! pending acks.

use crate::sync::{AtomicBool, AtomicU64, Ordering};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
// The `Signal` is shared through `crate::sync::Arc` (loom's under `cfg(loom)`, where
// `Signal::new` builds one); everything else here uses std's.
use crate::sync::Arc as SignalArc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

use crate::ingest::park::Signal;
use crate::ingest::ring::{ring, Consumer, Producer};
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
/// An empty read buffer larger than this is released (idle connections stay cheap).
const IDLE_BUFFER_KEEP_BYTES: usize = 64 << 10;
/// Bytes of an error frame's text at most.
const ERROR_TEXT_BYTES_MAX: usize = 1024;
/// Bytes of an error frame at most (header, text, padding).
const ERROR_FRAME_BYTES_MAX: usize = wire::frame_bytes(ERROR_TEXT_BYTES_MAX);
/// Bytes of an `Ack` frame.
const ACK_FRAME_BYTES: usize = wire::frame_bytes(wire::ACK_PAYLOAD_BYTES);
/// Bytes a connection's output buffer holds at most: the one frame being written,
/// an ack or the closing error frame. Acks never queue behind each other (they are
/// coalesced instead), so this bound is what a connection's write side costs.
const OUTPUT_BYTES_MAX: usize = 4 << 10;
const _: () = assert!(ACK_FRAME_BYTES <= OUTPUT_BYTES_MAX);
const _: () = assert!(ERROR_FRAME_BYTES_MAX <= OUTPUT_BYTES_MAX);
const _: () = assert!(OUTPUT_BYTES_MAX <= IDLE_BUFFER_KEEP_BYTES);
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
    pub connections_max: u32,
    pub connection_buffer_bytes: u32,
    /// Ring length per connection, rounded up to a power of two (at least 2).
    pub queue_frames: u32,
    /// Bytes of frames one connection's ring may hold; a frame that would pass it
    /// waits (reading pauses) unless the ring is empty.
    pub queue_bytes_max: u32,
    pub frame_bytes_max: u32,
}

/// The kind of socket a [`Source`] came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Tcp,
    Unix,
}

/// One accepted connection as the consumer (the sequencer) sees it: its id and the
/// ring of whole, checked frames (`Vec<u8>`, header included, as received; kind
/// `Events` or `EventsAckWanted`) it produces. The ring is abandoned
/// (`Consumer::is_abandoned`) once the connection is closed and every frame was
/// popped.
pub struct Source {
    pub id: u64,
    pub frames: Consumer<Vec<u8>>,
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
    /// Connections over `connections_max`, answered with an error frame and closed.
    pub rejected_connections: u64,
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
    disconnected_mid_frame: AtomicU64,
    unexpected_kind: AtomicU64,
    errors_by_reason: [AtomicU64; ERROR_REASONS.len()],
    acks_sent: AtomicU64,
    acks_coalesced: AtomicU64,
    closed_by_consumer: AtomicU64,
    quiesced: AtomicU64,
    accept_errors: AtomicU64,
    writes_blocked: AtomicU64,
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
            disconnected_mid_frame: load(&self.disconnected_mid_frame),
            unexpected_kind: load(&self.unexpected_kind),
            errors_by_reason: std::array::from_fn(|index| load(&self.errors_by_reason[index])),
            acks_sent: load(&self.acks_sent),
            acks_coalesced: load(&self.acks_coalesced),
            closed_by_consumer: load(&self.closed_by_consumer),
            quiesced: load(&self.quiesced),
            accept_errors: load(&self.accept_errors),
            writes_blocked: load(&self.writes_blocked),
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
    /// each round of pushes, new source or closed connection.
    pub fn start(
        config: ReactorConfig,
        signal: SignalArc<Signal>,
    ) -> Result<(Reactor, mpsc::Receiver<Source>), ReactorError> {
        check_config(&config)?;
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
        let event_loop = EventLoop {
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

fn check_config(config: &ReactorConfig) -> Result<(), ReactorError> {
    let bad = |field, reason: String| Err(ReactorError::Config { field, reason });
    if config.listen_tcp.is_none() && config.listen_unix.is_none() {
        return bad("listen_tcp", "neither a TCP address nor a Unix socket to listen on".to_string());
    }
    if config.connections_max == 0 {
        return bad("connections_max", "must be at least 1".to_string());
    }
    if config.queue_frames == 0 || config.queue_frames > 1 << 20 {
        return bad("queue_frames", format!("{} is outside 1..=1048576", config.queue_frames));
    }
    if config.queue_bytes_max == 0 {
        return bad("queue_bytes_max", "must be at least 1".to_string());
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
    frames: Producer<Vec<u8>>,
    /// Sizes of the frames in the ring, oldest first, as this end knows them.
    queued: QueuedBytes,
    /// Received bytes not yet pushed: whole frames waiting for ring room, then at
    /// most one partial frame. Never longer than `connection_buffer_bytes`.
    buffer: Vec<u8>,
    /// True while READABLE is withheld because the ring is full.
    paused: bool,
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

impl Connection {
    fn new(stream: Stream, frames: Producer<Vec<u8>>, interest: Interest) -> Connection {
        Connection {
            stream,
            frames,
            queued: QueuedBytes::default(),
            buffer: Vec::new(),
            paused: false,
            reading: true,
            interest: Some(interest),
            output: Vec::new(),
            output_written_bytes: 0,
            output_holds_ack: false,
            pending_ack: None,
            ack_seq_highest: None,
        }
    }

    /// READABLE unless paused, WRITABLE while something is left to write.
    fn wanted_interest(&self) -> Option<Interest> {
        let readable = (!self.paused && self.reading).then_some(Interest::READABLE);
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
                wire::encode_ack(&mut self.output, ack.seq, ack.position, ack.time_ms);
                self.output_holds_ack = true;
                debug_assert_eq!(self.output.len(), ACK_FRAME_BYTES);
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
            encode_error_frame(&mut self.output, text);
            self.output_holds_ack = false;
            let _ = self.flush(stats);
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
    /// Close the connection (the counters are already updated).
    Close,
}

struct EventLoop {
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
            let timeout = if !self.read_again.is_empty() {
                Some(Duration::ZERO)
            } else if !self.accept_retry.is_empty() {
                Some(ACCEPT_RETRY)
            } else {
                None
            };
            if let Err(error) = self.poll.poll(&mut events, timeout) {
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
                    Some(listener) => listener.accept().map(|(stream, _)| Stream::Tcp(stream)),
                    None => return,
                }
            } else {
                match &self.unix_listener {
                    Some(listener) => listener.accept().map(|(stream, _)| Stream::Unix(stream)),
                    None => return,
                }
            };
            match accepted {
                Ok(stream) => self.admit(stream),
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

    fn admit(&mut self, mut stream: Stream) {
        if self.connections.len() >= self.config.connections_max as usize {
            bump(&self.stats().rejected_connections, 1);
            stream.write_error_frame(&format!(
                "connection refused: {} connections open, the limit is {} (connections_max)",
                self.connections.len(),
                self.config.connections_max
            ));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let Ok(token) = usize::try_from(id) else { return };
        if stream.set_interest(self.poll.registry(), Token(token), None, Some(Interest::READABLE)).is_err() {
            return;
        }
        let (producer, consumer) = ring(self.ring_frames);
        let kind = stream.kind();
        if self.sources_tx.send(Source { id, frames: consumer, kind }).is_err() {
            // Nobody consumes: do not keep the connection.
            let _ = stream.set_interest(self.poll.registry(), Token(token), Some(Interest::READABLE), None);
            return;
        }
        bump(&self.stats().accepted, 1);
        self.connections.insert(id, Connection::new(stream, producer, Interest::READABLE));
        self.pushed = true;
        // Data may already be waiting; edge-triggered readiness reports it, but
        // reading now costs one failed read at most.
        self.on_readable(id);
    }

    fn on_readable(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        if connection.paused || !connection.reading {
            return;
        }
        let outcome = read_connection(connection, &self.config, &self.shared.stats, &mut self.pushed);
        self.settle(id, outcome);
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
            Outcome::Close => self.close(id),
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
        connection.finish_with_error(&error.to_string(), &self.shared.stats);
        self.close(id);
    }

    fn close(&mut self, id: u64) {
        if let Some(mut connection) = self.connections.remove(&id) {
            if connection.interest.is_some() {
                let token = Token(usize::try_from(id).unwrap_or(usize::MAX));
                let _ = connection.stream.set_interest(self.poll.registry(), token, connection.interest, None);
            }
            if connection.paused {
                self.shared.stats.paused_now.fetch_sub(1, Ordering::Relaxed);
            }
            bump(&self.stats().closed, 1);
            // Dropping the producer abandons the ring once the consumer drains it.
            self.pushed = true;
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

/// Pushes every whole frame in the buffer, then reads until the socket would block
/// (splitting frames after each read), the ring is full, the round's read budget is
/// spent or the connection must close.
fn read_connection(
    connection: &mut Connection,
    config: &ReactorConfig,
    stats: &StatCells,
    pushed: &mut bool,
) -> Outcome {
    let buffer_max = config.connection_buffer_bytes as usize;
    let mut reads_left = READS_PER_ROUND_MAX;
    loop {
        match push_frames(connection, config, stats, pushed) {
            Outcome::Idle => {}
            other => return other,
        }
        // Only a partial frame is left, shorter than frame_bytes_max <= buffer_max.
        let held = connection.buffer.len();
        assert!(held < buffer_max, "partial frame of {held} bytes fills the buffer of {buffer_max}");
        if held == 0 && connection.buffer.capacity() > IDLE_BUFFER_KEEP_BYTES {
            connection.buffer = Vec::new();
        }
        if reads_left == 0 {
            return Outcome::Budget;
        }
        reads_left -= 1;
        let room = (buffer_max - held).min(READ_CHUNK_BYTES);
        if connection.buffer.capacity() < held + room {
            let target = (connection.buffer.capacity() * 2).clamp(held + room, buffer_max);
            connection.buffer.reserve_exact(target - held);
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
                    bump(&stats.disconnected_mid_frame, 1);
                }
                return Outcome::Close;
            }
            Ok(count) => bump(&stats.bytes_in, count as u64),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Outcome::Idle,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                if held > 0 {
                    bump(&stats.disconnected_mid_frame, 1);
                }
                return Outcome::Close;
            }
        }
    }
}

/// Pushes every whole, checked frame at the front of the buffer. `Idle`: what is
/// left is a partial frame (or nothing). `Paused`: the ring is full and blocked.
/// `Close`: a bad frame was answered with an error frame, or the consumer is gone.
fn push_frames(connection: &mut Connection, config: &ReactorConfig, stats: &StatCells, pushed: &mut bool) -> Outcome {
    let mut consumed = 0;
    let outcome = loop {
        let rest = &connection.buffer[consumed..];
        if rest.len() < wire::HEADER_BYTES {
            break Outcome::Idle;
        }
        let frame_bytes = match wire::decode_header(rest, config.frame_bytes_max) {
            Ok(header) => header.frame_bytes(),
            Err(error) => break reject_frame(connection, stats, &error),
        };
        if rest.len() < frame_bytes {
            break Outcome::Idle;
        }
        match wire::decode_frame(&rest[..frame_bytes], config.frame_bytes_max) {
            Ok(frame) if matches!(frame.header.kind, FrameKind::Events | FrameKind::EventsAckWanted) => {}
            Ok(frame) => {
                bump(&stats.unexpected_kind, 1);
                let text = format!(
                    "frame kind {:?} is not accepted from clients: only Events and EventsAckWanted frames",
                    frame.header.kind
                );
                connection.finish_with_error(&text, stats);
                break Outcome::Close;
            }
            Err(error) => break reject_frame(connection, stats, &error),
        }
        let budget = config.queue_bytes_max as usize;
        match push_or_block(&mut connection.frames, &mut connection.queued, budget, rest[..frame_bytes].to_vec()) {
            Push::Pushed => {}
            Push::Blocked => break Outcome::Paused,
            Push::ConsumerGone => break Outcome::Close,
        }
        consumed += frame_bytes;
        *pushed = true;
        bump(&stats.frames_in, 1);
    };
    connection.buffer.drain(..consumed);
    outcome
}

enum Push {
    Pushed,
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
fn push_or_block(frames: &mut Producer<Vec<u8>>, queued: &mut QueuedBytes, budget: usize, frame: Vec<u8>) -> Push {
    let mut frame = frame;
    let size = frame.len();
    loop {
        // The known bytes only overestimate (pops not yet seen): load the ring's
        // length only when they say the budget is reached.
        let room = queued.bytes + size <= budget || queued.fits(frames.len(), size, budget);
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

fn reject_frame(connection: &mut Connection, stats: &StatCells, error: &FrameError) -> Outcome {
    bump(&stats.errors_by_reason[reason_index(error)], 1);
    connection.finish_with_error(&error.to_string(), stats);
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
        let mut connection = Connection::new(Stream::Unix(near), producer, Interest::READABLE);
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
        let (mut producer, mut consumer) = ring::<Vec<u8>>(64);
        let mut queued = QueuedBytes::default();
        let budget = 250;
        let frame = || vec![0u8; 100];
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, frame()), Push::Pushed));
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, frame()), Push::Pushed));
        assert!(
            matches!(push_or_block(&mut producer, &mut queued, budget, frame()), Push::Blocked),
            "300 bytes would pass the budget of 250"
        );
        assert_eq!(producer.len(), 2);
        assert!(consumer.pop().is_some());
        assert!(consumer.take_unblocked(), "the consumer must resume the producer");
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, frame()), Push::Pushed));
        assert_eq!(queued.bytes, 200, "the popped frame is forgotten");
        // A frame larger than the whole budget passes alone into an empty ring.
        while consumer.pop().is_some() {}
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, vec![0u8; 1000]), Push::Pushed));
        assert!(matches!(push_or_block(&mut producer, &mut queued, budget, frame()), Push::Blocked));
    }

    #[test]
    fn bad_configurations_name_their_field() {
        let good = ReactorConfig {
            listen_tcp: Some("127.0.0.1:0".parse().unwrap()),
            listen_unix: None,
            connections_max: 4,
            connection_buffer_bytes: 4096,
            queue_frames: 3,
            queue_bytes_max: 1 << 20,
            frame_bytes_max: 4096,
        };
        assert!(check_config(&good).is_ok());
        let field = |config: ReactorConfig| match check_config(&config) {
            Err(ReactorError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(field(ReactorConfig { listen_tcp: None, ..good.clone() }), "listen_tcp");
        assert_eq!(field(ReactorConfig { connections_max: 0, ..good.clone() }), "connections_max");
        assert_eq!(field(ReactorConfig { queue_frames: 0, ..good.clone() }), "queue_frames");
        assert_eq!(field(ReactorConfig { queue_bytes_max: 0, ..good.clone() }), "queue_bytes_max");
        assert_eq!(field(ReactorConfig { frame_bytes_max: 16, ..good.clone() }), "frame_bytes_max");
        assert_eq!(field(ReactorConfig { connection_buffer_bytes: 4095, ..good }), "connection_buffer_bytes");
    }
}
