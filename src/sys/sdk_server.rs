//! The node's SDK socket: a Unix listener (mode 0600: only the node's user may
//! connect) served by one mio thread that frames bytes into [`ToNode`] messages and
//! writes [`ToDaemon`] messages back. It decides nothing: every message goes, with
//! the peer's credentials read from the socket at accept, to the node's main loop
//! (the daemon executor), which answers through [`SdkHandle::send`].
//!
//! Invariants: connections are at most `connections_max` (further ones are answered
//! `Rejected` and closed); a connection's unsent output is at most
//! `OUTPUT_BYTES_MAX` (a daemon that never reads is closed, never waited on); a
//! malformed frame is reported and closes its connection; the inbound channel is
//! bounded, so a flood of messages stops reading rather than growing memory.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::ingest::park::Signal;
use crate::sdk::proto::{self, ToDaemon, ToNode};
use crate::sync::Arc;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONNECTION: usize = 2;
/// Unsent bytes one connection may hold before it is closed.
const OUTPUT_BYTES_MAX: usize = 256 * 1024;
/// Messages waiting for the main loop, over all connections.
const INBOUND_MAX: usize = 4096;

/// One connection, numbered in accept order (never reused within a run).
pub type ConnectionId = u64;

/// What the SDK thread hands to the main loop.
#[derive(Debug)]
pub enum Inbound {
    /// A daemon connected; `pid` and `uid` come from the socket (SO_PEERCRED).
    Connected {
        connection: ConnectionId,
        pid: u32,
        uid: u32,
    },
    Message {
        connection: ConnectionId,
        message: ToNode,
    },
    /// The connection sent bytes that are not the protocol; it is closed.
    Malformed {
        connection: ConnectionId,
        error: proto::ProtoError,
    },
    Closed {
        connection: ConnectionId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SdkServerError {
    #[error("SDK socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("SDK poll: {0}")]
    Poll(std::io::Error),
}

/// The main loop's side: messages in, answers and control events out.
pub struct SdkHandle {
    pub inbound: Receiver<Inbound>,
    outbound: SyncSender<(ConnectionId, Option<ToDaemon>)>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl SdkHandle {
    /// Queues a message for a connection (dropped if the connection is gone). `None`
    /// closes the connection after what was queued before.
    pub fn send(&self, connection: ConnectionId, message: Option<ToDaemon>) {
        // A full channel means the SDK thread is gone or far behind: the message waits.
        let _ = self.outbound.send((connection, message));
        let _ = self.waker.wake();
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SdkHandle {
    fn drop(&mut self) {
        // Closing the outbound channel tells the thread to stop.
        let (closed, _) = std::sync::mpsc::sync_channel(1);
        self.outbound = closed;
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is written.
    closing: bool,
    /// A message waits for room in the inbound channel: stop reading.
    held: Option<Inbound>,
}

/// Binds the socket and starts the SDK thread; `signal` wakes the main loop.
pub fn start(path: &Path, connections_max: u32, signal: Arc<Signal>) -> Result<SdkHandle, SdkServerError> {
    super::reactor::remove_stale_socket(path);
    let bind_error = |source| SdkServerError::Bind { path: path.to_path_buf(), source };
    let mut listener = UnixListener::bind(path).map_err(bind_error)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    let poll = Poll::new().map_err(SdkServerError::Poll)?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE).map_err(SdkServerError::Poll)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SdkServerError::Poll)?);
    let (inbound_tx, inbound) = std::sync::mpsc::sync_channel(INBOUND_MAX);
    let (outbound, outbound_rx) = std::sync::mpsc::sync_channel(INBOUND_MAX);
    let mut server = Server {
        poll,
        listener,
        connections: HashMap::new(),
        connections_max: connections_max as usize,
        next_connection: FIRST_CONNECTION as u64,
        inbound: inbound_tx,
        backlog: std::collections::VecDeque::new(),
        outbound: outbound_rx,
        signal,
    };
    let thread = std::thread::Builder::new()
        .name("meshos-sdk".to_string())
        .spawn(move || server.run())
        .map_err(SdkServerError::Poll)?;
    Ok(SdkHandle { inbound, outbound, waker, thread: Some(thread), path: path.to_path_buf() })
}

struct Server {
    poll: Poll,
    listener: UnixListener,
    connections: HashMap<u64, Connection>,
    connections_max: usize,
    next_connection: u64,
    inbound: SyncSender<Inbound>,
    /// Ends of connections (closed, malformed) that found the inbound channel full:
    /// delivered before anything else, in order, as soon as there is room.
    backlog: std::collections::VecDeque<Inbound>,
    outbound: Receiver<(ConnectionId, Option<ToDaemon>)>,
    signal: Arc<Signal>,
}

/// The peer's pid and uid (SO_PEERCRED).
fn peer_credentials(stream: &UnixStream) -> Option<(u32, u32)> {
    let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `credentials` is a valid, writable ucred and `length` holds its size, as
    // getsockopt(SO_PEERCRED) requires; the fd is open for the life of `stream`.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut length,
        )
    };
    (result == 0).then_some((credentials.pid as u32, credentials.uid))
}

impl Server {
    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(error) = self.poll.poll(&mut events, Some(std::time::Duration::from_millis(100))) {
                if error.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("SDK socket poll failed, SDK server stops: {error}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(token) => self.serve(token as u64),
                }
            }
            if !self.drain_outbound() {
                return;
            }
            self.flush_backlog();
            // Retry connections held back by a full inbound channel.
            let held: Vec<u64> = self
                .connections
                .iter()
                .filter(|(_, connection)| connection.held.is_some())
                .map(|(id, _)| *id)
                .collect();
            for id in held {
                self.serve(id);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return,
                Err(error) => {
                    tracing::warn!("SDK socket accept: {error}");
                    return;
                }
            };
            let id = self.next_connection;
            self.next_connection += 1;
            let mut connection =
                Connection { stream, input: Vec::new(), output: Vec::new(), closing: false, held: None };
            if self.connections.len() >= self.connections_max {
                let reason = format!("the node serves at most {} SDK connections", self.connections_max);
                let _ = proto::encode_to_daemon(&ToDaemon::Rejected { reason }, &mut connection.output);
                let _ = connection.stream.write(&connection.output);
                continue;
            }
            let Some((pid, uid)) = peer_credentials(&connection.stream) else {
                tracing::warn!("SDK socket: no peer credentials; connection closed");
                continue;
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(error) = self.poll.registry().register(&mut connection.stream, Token(id as usize), interest) {
                tracing::warn!("SDK socket register: {error}");
                continue;
            }
            self.connections.insert(id, connection);
            self.push(id, Inbound::Connected { connection: id, pid, uid });
        }
    }

    /// Delivers held connection ends while the channel has room; true when none is left.
    fn flush_backlog(&mut self) -> bool {
        while let Some(message) = self.backlog.pop_front() {
            match self.inbound.try_send(message) {
                Ok(()) => self.signal.notify(),
                Err(TrySendError::Full(message)) => {
                    self.backlog.push_front(message);
                    self.signal.notify();
                    return false;
                }
                Err(TrySendError::Disconnected(_)) => return true,
            }
        }
        true
    }

    /// Hands the end of a connection to the main loop, after every earlier end.
    fn push_end(&mut self, message: Inbound) {
        self.backlog.push_back(message);
        self.flush_backlog();
    }

    /// Hands a message to the main loop, or holds it (and stops reading) when full.
    fn push(&mut self, id: u64, message: Inbound) -> bool {
        if !self.flush_backlog() {
            if let Some(connection) = self.connections.get_mut(&id) {
                connection.held = Some(message);
            }
            return false;
        }
        match self.inbound.try_send(message) {
            Ok(()) => {
                self.signal.notify();
                true
            }
            Err(TrySendError::Full(message)) => {
                if let Some(connection) = self.connections.get_mut(&id) {
                    connection.held = Some(message);
                }
                self.signal.notify();
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn serve(&mut self, id: u64) {
        let Some(connection) = self.connections.get_mut(&id) else { return };
        if let Some(message) = connection.held.take() {
            if !self.push(id, message) {
                return;
            }
        }
        let mut closed = false;
        let mut chunk = [0u8; 4096];
        loop {
            let Some(connection) = self.connections.get_mut(&id) else { return };
            // Parse what is buffered first: a full channel stops reading.
            match proto::split_frame(&connection.input) {
                Ok(Some((body, consumed))) => {
                    let parsed = proto::decode_to_node(body);
                    connection.input.drain(..consumed);
                    match parsed {
                        Ok(message) => {
                            if !self.push(id, Inbound::Message { connection: id, message }) {
                                return;
                            }
                        }
                        Err(error) => {
                            self.push_end(Inbound::Malformed { connection: id, error });
                            closed = true;
                            break;
                        }
                    }
                    continue;
                }
                Ok(None) => {}
                Err(error) => {
                    self.push_end(Inbound::Malformed { connection: id, error });
                    closed = true;
                    break;
                }
            }
            if closed || connection.closing {
                break;
            }
            match connection.stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(read) => connection.input.extend_from_slice(&chunk[..read]),
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed || !self.flush(id) {
            self.close(id);
        }
    }

    /// Writes what a connection has queued; false when it must close.
    fn flush(&mut self, id: u64) -> bool {
        let Some(connection) = self.connections.get_mut(&id) else { return true };
        while !connection.output.is_empty() {
            match connection.stream.write(&connection.output) {
                Ok(0) => return false,
                Ok(written) => {
                    connection.output.drain(..written);
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        !(connection.closing && connection.output.is_empty())
    }

    fn close(&mut self, id: u64) {
        if let Some(mut connection) = self.connections.remove(&id) {
            let _ = self.poll.registry().deregister(&mut connection.stream);
            // A message held back for room goes first, then the end.
            if let Some(held) = connection.held.take() {
                self.backlog.push_back(held);
            }
            self.push_end(Inbound::Closed { connection: id });
        }
    }

    /// Queues the main loop's messages on their connections; false once the main loop is gone.
    fn drain_outbound(&mut self) -> bool {
        let mut touched = Vec::new();
        loop {
            match self.outbound.try_recv() {
                Ok((id, message)) => {
                    let Some(connection) = self.connections.get_mut(&id) else { continue };
                    match message {
                        Some(message) => {
                            if proto::encode_to_daemon(&message, &mut connection.output).is_err() {
                                tracing::warn!("SDK message too large for the protocol, not sent: {message:?}");
                            }
                        }
                        None => connection.closing = true,
                    }
                    if connection.output.len() > OUTPUT_BYTES_MAX {
                        tracing::warn!(connection = id, "SDK connection does not read its messages; closed");
                        connection.output.clear();
                        connection.closing = true;
                    }
                    touched.push(id);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let ids: Vec<u64> = self.connections.keys().copied().collect();
                    for id in ids {
                        self.flush(id);
                    }
                    return false;
                }
            }
        }
        for id in touched {
            if !self.flush(id) {
                self.close(id);
            }
        }
        true
    }
}
