//! The node's peer port: other nodes fetch blobs from it and measure round trips to
//! it, over the authenticated, encrypted channel of [`crate::sys::secure`] (Noise, each
//! side proving its node identity with its ed25519 key; see there). Blocking std TCP,
//! one thread per connection, bounded in two pools:
//!
//! 1. **Handshaking** (`handshake_connections_max`, at most `handshake_per_address_max`
//!    from one IP address): every accepted connection starts here and must finish the
//!    handshake within `handshake_timeout_ms`, else it is closed. A connection from an
//!    address already at its limit is closed at once. When the pool is full, the
//!    oldest handshaking connection is closed to make room (an idle stranger cannot
//!    hold the pool against a real peer, whose handshake takes a few round trips);
//!    if none leaves within `EVICTION_WAIT` the new one is closed.
//! 2. **Served** (`connections_max`): only an authenticated connection takes a slot,
//!    before it leaves the handshake pool; when none is free it is answered
//!    `NO busy` and closed. A served connection idle for `io_timeout_ms` is closed.
//!
//! So at most `handshake_connections_max + connections_max` connection threads exist,
//! whatever strangers send; no slot of `connections_max` is ever held by a peer that
//! has not proven it is an admitted node (or, where the secure config allows, an
//! operator). Every refusal is counted by reason ([`PeerRefusals`]) and logged (at
//! most one warning a second).
//!
//! Protocol inside the channel (each request and each answer one message): the client
//! sends `BLOB <hex>` or `PING <hex>` (64 hex digits: a blob hash, or 32 random token
//! bytes). `BLOB` is answered `OK <size>` and then the blob's bytes in data messages
//! of at most `secure::SINGLE_FRAME_MESSAGE_BYTES_MAX` bytes (one frame each), or
//! `NO <reason>`; `PING` is answered `PONG <hex>` (the token back). Anything else is
//! answered `NO ...` and the connection closed. Clients ([`fetch`], [`ping`]) name
//! the node they mean to reach, and the handshake refuses any other, so a sample or
//! a blob comes from the node the log names (and a blob's bytes are still hashed on
//! arrival: a peer can withhold a blob, never substitute one).
//!
//! Served blob bytes pass a shared rate limit (`bytes_per_s`, 0 for none): a token
//! bucket all connections draw from, so a node never sends faster than its limit in
//! total.
//!
//! Invariants: nothing is served before the client's identity checked; nothing here
//! panics on what a peer sends; threads and sockets are bounded as above; no other
//! state is shared with the node than the store's directory and the counters.

use std::io::Read;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::event::BlobHash;
use crate::exec::blobstore;
use crate::sys::secure::{self, SecureConfig, SecureError, SecureStream};

/// The default for `io_timeout_ms`: how long a served connection may stay idle.
pub const IO_TIMEOUT_MS_DEFAULT: u32 = 30_000;
/// The defaults of the handshake pool's limits.
pub const HANDSHAKE_CONNECTIONS_MAX_DEFAULT: u32 = 16;
pub const HANDSHAKE_PER_ADDRESS_MAX_DEFAULT: u32 = 4;
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u32 = 2_000;
/// Blob bytes per data message (one frame each).
const DATA_MESSAGE_BYTES: usize = secure::SINGLE_FRAME_MESSAGE_BYTES_MAX;
/// The largest message on the peer port (a data message); the `message_bytes_max`
/// its secure configs should have.
pub const MESSAGE_BYTES_MAX: u32 = DATA_MESSAGE_BYTES as u32;
/// Longest request: a verb, a space and 64 hex digits, with room to spare.
const REQUEST_BYTES_MAX: usize = 128;
/// Longest answer (not data) a client accepts.
const ANSWER_BYTES_MAX: usize = 256;
/// How long the accept loop waits for an evicted handshake to leave a full pool.
const EVICTION_WAIT: Duration = Duration::from_millis(200);
/// The reason of a `NO` answer when no connection slot is free.
pub const BUSY: &str = "busy";

#[derive(Clone)]
pub struct PeerServerConfig {
    pub listen: SocketAddr,
    /// The blob store's root (`DATA_DIR/blobs`).
    pub blobs_dir: PathBuf,
    /// Authenticated connections served at once.
    pub connections_max: u32,
    /// Bytes per second served in total; 0: no limit.
    pub bytes_per_s: u64,
    /// A served connection idle this long (not sending a request, or not reading an
    /// answer) is closed.
    pub io_timeout_ms: u32,
    /// Connections still in their handshake at once, and from one IP address.
    pub handshake_connections_max: u32,
    pub handshake_per_address_max: u32,
    /// A connection that has not finished its handshake this long after it was
    /// accepted is closed.
    pub handshake_timeout_ms: u32,
    /// This node's identity, its cluster and the admitted keys.
    pub secure: Arc<SecureConfig>,
}

impl std::fmt::Debug for PeerServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServerConfig")
            .field("listen", &self.listen)
            .field("blobs_dir", &self.blobs_dir)
            .field("connections_max", &self.connections_max)
            .field("bytes_per_s", &self.bytes_per_s)
            .field("io_timeout_ms", &self.io_timeout_ms)
            .field("handshake_connections_max", &self.handshake_connections_max)
            .field("handshake_per_address_max", &self.handshake_per_address_max)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("secure", &self.secure)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer port {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("peer {addr} does not have blob {blob}: {reason}")]
    Refused { addr: String, blob: String, reason: String },
    #[error("peer {addr} refused: {reason}")]
    Declined { addr: String, reason: String },
    #[error("peer {addr} answered `{answer}`, not the protocol")]
    Protocol { addr: String, answer: String },
    /// The secure channel failed: the handshake (an identity did not check, on either
    /// side), the deadline, or the connection.
    #[error("peer {addr}: {source}")]
    Secure { addr: String, source: SecureError },
}

impl PeerError {
    /// A credential failure: the peer is not the admitted node it must be, or refused
    /// this node's identity.
    pub fn is_credential(&self) -> bool {
        matches!(self, PeerError::Secure { source, .. } if source.is_authentication())
    }
}

/// Why the server closed a connection without serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    WrongCluster,
    UnknownNode,
    KeyMismatch,
    BadSignature,
    Operator,
    BadHandshake,
    HandshakeDeadline,
    HandshakePoolFull,
    HandshakeEvicted,
    AddressLimit,
    Busy,
}

const REFUSAL_KINDS: usize = 11;

impl Refusal {
    fn of(error: &SecureError) -> Refusal {
        match error {
            SecureError::WrongCluster { .. } => Refusal::WrongCluster,
            SecureError::UnknownNode { .. } => Refusal::UnknownNode,
            SecureError::KeyMismatch { .. } => Refusal::KeyMismatch,
            SecureError::BadSignature { .. } => Refusal::BadSignature,
            SecureError::OperatorNotAccepted | SecureError::UnknownOperator { .. } => Refusal::Operator,
            SecureError::Deadline { .. } => Refusal::HandshakeDeadline,
            _ => Refusal::BadHandshake,
        }
    }

    fn is_credential(self) -> bool {
        matches!(
            self,
            Refusal::WrongCluster
                | Refusal::UnknownNode
                | Refusal::KeyMismatch
                | Refusal::BadSignature
                | Refusal::Operator
        )
    }
}

/// Connections closed without being served, by reason, since the server started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerRefusals {
    /// Identities that did not check: another cluster, a name not admitted, a key
    /// that is not the name's, a signature not made for the session, an operator.
    pub wrong_cluster: u64,
    pub unknown_node: u64,
    pub key_mismatch: u64,
    pub bad_signature: u64,
    pub operator: u64,
    /// Handshakes that broke off or did not parse.
    pub bad_handshake: u64,
    /// Handshakes not finished by `handshake_timeout_ms`.
    pub handshake_deadline: u64,
    /// New connections closed because the handshake pool stayed full.
    pub handshake_pool_full: u64,
    /// Handshaking connections closed (the oldest) to make room for a new one.
    pub handshake_evicted: u64,
    /// New connections closed because their address had `handshake_per_address_max`
    /// handshakes under way.
    pub address_limit: u64,
    /// Authenticated connections answered `NO busy` (no free slot).
    pub busy: u64,
}

impl PeerRefusals {
    /// The refusals of identities (the first five).
    pub fn credential(&self) -> u64 {
        self.wrong_cluster + self.unknown_node + self.key_mismatch + self.bad_signature + self.operator
    }
}

/// What the server did, counted since it started, and what it holds now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerServerStats {
    pub blobs_served: u64,
    pub pings: u64,
    /// Connections refused because an identity did not check (`refusals.credential()`).
    pub credential_rejections: u64,
    pub refusals: PeerRefusals,
    /// Connections in their handshake, and served, now.
    pub handshaking: u32,
    pub connections: u32,
}

/// A token bucket shared by every connection: `take(n)` sleeps until `n` bytes may go.
pub struct RateLimit {
    bytes_per_s: u64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64) -> RateLimit {
        RateLimit { bytes_per_s, state: Mutex::new((0.0, Instant::now())) }
    }

    /// Waits until `bytes` may be sent (at most one second's worth of burst).
    pub fn take(&self, bytes: usize) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Takes `bytes` from the bucket at `now` and returns how long the caller must
    /// wait before sending them (zero when the bucket held them).
    pub fn reserve(&self, bytes: usize, now: Instant) -> Duration {
        if self.bytes_per_s == 0 {
            return Duration::ZERO;
        }
        let rate = self.bytes_per_s as f64;
        let mut guard = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (tokens, since) = &mut *guard;
        *tokens = (*tokens + now.saturating_duration_since(*since).as_secs_f64() * rate).min(rate);
        *since = (*since).max(now);
        *tokens -= bytes as f64;
        if *tokens < 0.0 {
            Duration::from_secs_f64(-*tokens / rate)
        } else {
            Duration::ZERO
        }
    }
}

/// The running server; dropping it stops accepting (open transfers finish).
pub struct PeerServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    pub fn start(config: PeerServerConfig) -> Result<PeerServer, PeerError> {
        let listener =
            TcpListener::bind(config.listen).map_err(|source| PeerError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| PeerError::Bind { addr: config.listen, source })?;
        listener.set_nonblocking(true).map_err(|source| PeerError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            blobs_dir: config.blobs_dir.clone(),
            secure: Arc::clone(&config.secure),
            limit: RateLimit::new(config.bytes_per_s),
            io_timeout: Duration::from_millis(config.io_timeout_ms.max(1) as u64),
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms.max(1) as u64),
            connections_max: config.connections_max,
            handshake_connections_max: config.handshake_connections_max.max(1) as usize,
            handshake_per_address_max: config.handshake_per_address_max.max(1) as usize,
            blobs_served: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            refusals: Default::default(),
            open: AtomicU32::new(0),
            pool: Mutex::new(Pool::default()),
            warned: Mutex::new((None, 0)),
        });
        let thread = {
            let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("meshos-peer".to_string())
                .spawn(move || accept_loop(listener, shared, stop))
                .map_err(|source| PeerError::Bind { addr, source })?
        };
        Ok(PeerServer { addr, stop, shared, thread: Some(thread) })
    }

    /// The bound address (the port is chosen by the OS when the config says 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server did so far.
    pub fn stats(&self) -> PeerServerStats {
        let count = |refusal: Refusal| self.shared.refusals[refusal as usize].load(Ordering::Relaxed);
        let refusals = PeerRefusals {
            wrong_cluster: count(Refusal::WrongCluster),
            unknown_node: count(Refusal::UnknownNode),
            key_mismatch: count(Refusal::KeyMismatch),
            bad_signature: count(Refusal::BadSignature),
            operator: count(Refusal::Operator),
            bad_handshake: count(Refusal::BadHandshake),
            handshake_deadline: count(Refusal::HandshakeDeadline),
            handshake_pool_full: count(Refusal::HandshakePoolFull),
            handshake_evicted: count(Refusal::HandshakeEvicted),
            address_limit: count(Refusal::AddressLimit),
            busy: count(Refusal::Busy),
        };
        PeerServerStats {
            blobs_served: self.shared.blobs_served.load(Ordering::Relaxed),
            pings: self.shared.pings.load(Ordering::Relaxed),
            credential_rejections: refusals.credential(),
            refusals,
            handshaking: self.shared.pool().entries.len() as u32,
            connections: self.shared.open.load(Ordering::SeqCst),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connection in its handshake: a handle to close it early (eviction).
struct Handshaking {
    id: u64,
    ip: IpAddr,
    stream: TcpStream,
    evicted: bool,
}

#[derive(Default)]
struct Pool {
    /// Oldest first.
    entries: Vec<Handshaking>,
    next_id: u64,
}

/// What the accept loop and every connection thread share.
struct Shared {
    blobs_dir: PathBuf,
    secure: Arc<SecureConfig>,
    limit: RateLimit,
    io_timeout: Duration,
    handshake_timeout: Duration,
    connections_max: u32,
    handshake_connections_max: usize,
    handshake_per_address_max: usize,
    blobs_served: AtomicU64,
    pings: AtomicU64,
    refusals: [AtomicU64; REFUSAL_KINDS],
    /// Authenticated connections being served.
    open: AtomicU32,
    pool: Mutex<Pool>,
    /// When a refusal was last logged, and refusals not logged since (at most one
    /// warning a second: a stranger reconnecting in a loop cannot flood the log).
    warned: Mutex<(Option<Instant>, u64)>,
}

impl Shared {
    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn refused(&self, peer: SocketAddr, refusal: Refusal, detail: &dyn std::fmt::Display) {
        self.refusals[refusal as usize].fetch_add(1, Ordering::Relaxed);
        if !refusal.is_credential() {
            tracing::debug!(%peer, ?refusal, "peer connection closed unserved: {detail}");
            // Pressure on the pools is worth a (rate-limited) warning too.
            if !matches!(refusal, Refusal::AddressLimit | Refusal::HandshakePoolFull | Refusal::Busy) {
                return;
            }
        }
        let now = Instant::now();
        let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if warned.0.is_some_and(|last| now.saturating_duration_since(last) < Duration::from_secs(1)) {
            warned.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        drop(warned);
        tracing::warn!(%peer, ?refusal, suppressed, "peer connection refused: {detail}");
    }

    /// Enters a new connection from `ip` into the handshake pool (its id), evicting
    /// the oldest handshake when the pool is full; or why not.
    fn admit(&self, stream: &TcpStream, ip: IpAddr) -> Result<u64, Refusal> {
        let give_up = Instant::now() + EVICTION_WAIT;
        let mut evicted = false;
        loop {
            {
                let mut pool = self.pool();
                if pool.entries.iter().filter(|entry| entry.ip == ip).count() >= self.handshake_per_address_max {
                    return Err(Refusal::AddressLimit);
                }
                if pool.entries.len() < self.handshake_connections_max {
                    let handle = stream.try_clone().map_err(|_| Refusal::BadHandshake)?;
                    let id = pool.next_id;
                    pool.next_id += 1;
                    pool.entries.push(Handshaking { id, ip, stream: handle, evicted: false });
                    return Ok(id);
                }
                if !evicted {
                    evicted = true;
                    if let Some(oldest) = pool.entries.iter_mut().find(|entry| !entry.evicted) {
                        oldest.evicted = true;
                        // Its thread's read returns at once; it leaves the pool.
                        let _ = oldest.stream.shutdown(Shutdown::Both);
                        self.refusals[Refusal::HandshakeEvicted as usize].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if Instant::now() >= give_up {
                return Err(Refusal::HandshakePoolFull);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Takes the connection `id` out of the handshake pool; whether it was evicted.
    fn leave_pool(&self, id: u64) -> bool {
        let mut pool = self.pool();
        match pool.entries.iter().position(|entry| entry.id == id) {
            Some(index) => pool.entries.remove(index).evicted,
            None => false,
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(error) => {
                tracing::warn!("peer port accept: {error}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let accepted = Instant::now();
        let id = match shared.admit(&stream, peer.ip()) {
            Ok(id) => id,
            Err(refusal) => {
                shared.refused(peer, refusal, &"the handshake pool has no room for it");
                continue;
            }
        };
        let shared_here = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("meshos-peer-conn".to_string())
            .spawn(move || connection(stream, peer, id, accepted, &shared_here));
        if spawned.is_err() {
            tracing::warn!("peer port: cannot start a connection thread");
            shared.leave_pool(id);
        }
    }
}

/// One connection's thread: the handshake (in the pool), then a slot, then service.
fn connection(stream: TcpStream, peer: SocketAddr, id: u64, accepted: Instant, shared: &Shared) {
    let deadline = accepted + shared.handshake_timeout;
    let handshake = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .map_err(SecureError::from)
        .and_then(|()| SecureStream::accept(stream, Arc::clone(&shared.secure), deadline));
    let mut secure = match handshake {
        Ok(secure) => secure,
        Err(error) => {
            if !shared.leave_pool(id) {
                shared.refused(peer, Refusal::of(&error), &error);
            }
            return;
        }
    };
    // A slot is taken before the connection leaves the handshake pool, so the
    // threads stay within the two pools' limits.
    let slot = shared
        .open
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| (open < shared.connections_max).then_some(open + 1))
        .is_ok();
    if !slot {
        let _ = secure.set_io_timeout(shared.handshake_timeout);
        let _ = secure.send(format!("NO {BUSY}").as_bytes());
        shared.leave_pool(id);
        shared.refused(peer, Refusal::Busy, secure.peer());
        return;
    }
    let evicted = shared.leave_pool(id);
    if !evicted {
        tracing::debug!(%peer, client = %secure.peer(), "peer connection authenticated");
        let served = secure
            .set_io_timeout(shared.io_timeout)
            .map_err(SecureError::from)
            .and_then(|()| serve(&mut secure, shared));
        if let Err(error) = served {
            tracing::debug!(%peer, client = %secure.peer(), "peer connection: {error}");
        }
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

/// Answers requests until the client closes, idles out, or breaks the protocol.
fn serve(secure: &mut SecureStream, shared: &Shared) -> Result<(), SecureError> {
    while let Some(request) = secure.receive()? {
        let text = std::str::from_utf8(&request).ok().filter(|_| request.len() <= REQUEST_BYTES_MAX);
        let Some((verb, arg)) = text.and_then(|text| text.split_once(' ')) else {
            return secure.send(b"NO unknown request");
        };
        match verb {
            "PING" => {
                if blobstore::parse_hex(arg).is_none() {
                    return secure.send(b"NO not a ping token");
                }
                shared.pings.fetch_add(1, Ordering::Relaxed);
                secure.send(format!("PONG {arg}").as_bytes())?;
            }
            "BLOB" => {
                let Some(hash) = blobstore::parse_hex(arg) else {
                    return secure.send(b"NO not a blob hash");
                };
                if send_blob(secure, &shared.blobs_dir, &hash, &shared.limit)? {
                    shared.blobs_served.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => return secure.send(b"NO unknown request"),
        }
    }
    Ok(())
}

/// Sends the blob, or `NO` when it is not here; true when it was sent.
fn send_blob(
    secure: &mut SecureStream,
    blobs_dir: &std::path::Path,
    hash: &BlobHash,
    limit: &RateLimit,
) -> Result<bool, SecureError> {
    let name = blobstore::hex(hash);
    let path = blobs_dir.join(&name[..2]).join(&name);
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(_) => return secure.send(b"NO not stored here").map(|()| false),
    };
    let size = file.metadata()?.len();
    secure.send(format!("OK {size}").as_bytes())?;
    let mut chunk = vec![0u8; DATA_MESSAGE_BYTES];
    let mut left = size;
    while left > 0 {
        let want = (left as usize).min(DATA_MESSAGE_BYTES);
        file.read_exact(&mut chunk[..want])?;
        limit.take(want);
        secure.send(&chunk[..want])?;
        left -= want as u64;
    }
    Ok(true)
}

/// Connects to the peer port at `addr` (`host:port`) and completes the handshake,
/// refusing any peer but the node `expect_peer` (any admitted node when None);
/// `timeout` for the whole handshake and then every read and write.
fn connect(
    addr: &str,
    secure: &Arc<SecureConfig>,
    expect_peer: Option<&str>,
    timeout: Duration,
) -> Result<SecureStream, PeerError> {
    let target = addr
        .parse::<SocketAddr>()
        .map_err(|_| PeerError::Protocol { addr: addr.to_string(), answer: "not an address".into() })?;
    SecureStream::connect(target, Arc::clone(secure), expect_peer, timeout)
        .map_err(|source| PeerError::Secure { addr: addr.to_string(), source })
}

/// Reads one answer (not data): text of at most `ANSWER_BYTES_MAX` bytes.
fn read_answer(addr: &str, stream: &mut SecureStream) -> Result<String, PeerError> {
    let protocol = |answer: &str| PeerError::Protocol { addr: addr.to_string(), answer: answer.to_string() };
    match stream.receive() {
        Ok(Some(message)) if message.len() <= ANSWER_BYTES_MAX => {
            String::from_utf8(message).map_err(|_| protocol("<not text>"))
        }
        Ok(Some(message)) => Err(protocol(&format!("<{} bytes>", message.len()))),
        Ok(None) => Err(protocol("<closed without an answer>")),
        Err(source) => Err(PeerError::Secure { addr: addr.to_string(), source }),
    }
}

/// Exactly a blob's announced bytes, read from the data messages that follow `OK`.
pub struct BlobReader {
    stream: SecureStream,
    left: u64,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for BlobReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        while self.at == self.chunk.len() {
            if self.left == 0 {
                return Ok(0);
            }
            let message = match self.stream.receive() {
                Ok(Some(message)) => message,
                Ok(None) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Err(SecureError::Io(error)) => return Err(error),
                Err(other) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string())),
            };
            if message.is_empty() || message.len() as u64 > self.left {
                let reason = format!("a data message of {} bytes with {} left", message.len(), self.left);
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, reason));
            }
            self.left -= message.len() as u64;
            self.chunk = message;
            self.at = 0;
        }
        let count = buffer.len().min(self.chunk.len() - self.at);
        buffer[..count].copy_from_slice(&self.chunk[self.at..self.at + count]);
        self.at += count;
        Ok(count)
    }
}

/// Opens a fetch of `hash` from the node `expect_peer` at `addr`: the blob's size and
/// a reader of exactly that many bytes. The caller checks the hash (the store does,
/// on `put`): bytes that are not the blob are never kept.
pub fn fetch(
    addr: &str,
    hash: &BlobHash,
    secure: &Arc<SecureConfig>,
    expect_peer: Option<&str>,
    timeout: Duration,
) -> Result<(u64, BlobReader), PeerError> {
    let mut stream = connect(addr, secure, expect_peer, timeout)?;
    stream
        .send(format!("BLOB {}", blobstore::hex(hash)).as_bytes())
        .map_err(|source| PeerError::Secure { addr: addr.to_string(), source })?;
    let answer = read_answer(addr, &mut stream)?;
    if let Some(reason) = answer.strip_prefix("NO ") {
        if reason == BUSY {
            return Err(PeerError::Declined { addr: addr.to_string(), reason: reason.to_string() });
        }
        return Err(PeerError::Refused {
            addr: addr.to_string(),
            blob: blobstore::hex(hash),
            reason: reason.to_string(),
        });
    }
    let size = answer
        .strip_prefix("OK ")
        .and_then(|size| size.parse::<u64>().ok())
        .ok_or_else(|| PeerError::Protocol { addr: addr.to_string(), answer: answer.clone() })?;
    Ok((size, BlobReader { stream, left: size, chunk: Vec::new(), at: 0 }))
}

/// One round trip to the node `expect_peer` at `addr`, in microseconds (at least 1),
/// measured on the established channel (the handshake is not in it). Only a peer
/// that proved it is that node gives a sample.
pub fn ping(
    addr: &str,
    secure: &Arc<SecureConfig>,
    expect_peer: Option<&str>,
    timeout: Duration,
) -> Result<u32, PeerError> {
    let secure_error = |source| PeerError::Secure { addr: addr.to_string(), source };
    let mut stream = connect(addr, secure, expect_peer, timeout)?;
    let mut token = [0u8; 32];
    crate::sys::process::random_bytes(&mut token).map_err(|error| secure_error(SecureError::Io(error)))?;
    let token_hex = crate::event::hex(&token);
    let started = Instant::now();
    stream.send(format!("PING {token_hex}").as_bytes()).map_err(secure_error)?;
    let answer = read_answer(addr, &mut stream)?;
    let elapsed_us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
    if let Some(reason) = answer.strip_prefix("NO ") {
        return Err(PeerError::Declined { addr: addr.to_string(), reason: reason.to_string() });
    }
    if answer.strip_prefix("PONG ") != Some(token_hex.as_str()) {
        return Err(PeerError::Protocol { addr: addr.to_string(), answer });
    }
    Ok(elapsed_us.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::blobstore::BlobStore;
    use crate::sys::secure::{LocalIdentity, StaticPeerKeys};

    fn signing(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    /// Node `name` with key seed `seed`, in a cluster where "s" (seed 1) and "t"
    /// (seed 2) are admitted.
    fn identity(name: &str, seed: u8) -> Arc<SecureConfig> {
        let keys = StaticPeerKeys::of_nodes([
            ("s", signing(1).verifying_key().to_bytes()),
            ("t", signing(2).verifying_key().to_bytes()),
        ]);
        Arc::new(SecureConfig {
            cluster_id: [5; 16],
            local: LocalIdentity::Node { name: name.to_string(), key: signing(seed) },
            keys: Arc::new(keys),
            accept_operators: false,
            message_bytes_max: DATA_MESSAGE_BYTES as u32,
        })
    }

    fn server(dir: &std::path::Path, connections_max: u32) -> PeerServer {
        PeerServer::start(PeerServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            blobs_dir: dir.to_path_buf(),
            connections_max,
            bytes_per_s: 0,
            io_timeout_ms: IO_TIMEOUT_MS_DEFAULT,
            handshake_connections_max: HANDSHAKE_CONNECTIONS_MAX_DEFAULT,
            handshake_per_address_max: HANDSHAKE_PER_ADDRESS_MAX_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            secure: identity("s", 1),
        })
        .unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn a_blob_moves_between_stores_and_is_verified_on_arrival() {
        let (source_dir, target_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = BlobStore::open(source_dir.path()).unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|index| (index % 251) as u8).collect();
        let (hash, _) = source.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
        let server = server(source_dir.path(), 4);
        let addr = server.addr().to_string();
        let target = BlobStore::open(target_dir.path()).unwrap();
        let client = identity("t", 2);
        let (size, mut reader) = fetch(&addr, &hash, &client, Some("s"), TIMEOUT).unwrap();
        assert_eq!(size, 300_000);
        target.put(&mut reader, Some(&hash), size, &mut |_| {}).unwrap();
        assert!(target.verify(&hash, &mut |_| {}).unwrap());
        // A blob the peer does not have is refused with the reason.
        let error = fetch(&addr, &[9; 32], &client, Some("s"), TIMEOUT).err().expect("absent");
        assert!(error.to_string().contains("not stored here"), "{error}");
        // Corrupt on the source: the fetch arrives but fails its hash; nothing stored.
        let path = source.path_of(&hash);
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[7] ^= 0xff;
        std::fs::write(&path, on_disk).unwrap();
        target.delete(&hash).unwrap();
        let (size, mut reader) = fetch(&addr, &hash, &client, Some("s"), TIMEOUT).unwrap();
        let error = target.put(&mut reader, Some(&hash), size, &mut |_| {}).unwrap_err();
        assert!(matches!(error, crate::exec::blobstore::BlobStoreError::HashMismatch { .. }));
        assert!(!target.contains(&hash));
        assert!(ping(&addr, &client, Some("s"), TIMEOUT).unwrap() > 0);
        // The port is node "s": a client that expects another node refuses it.
        let error = ping(&addr, &client, Some("t"), TIMEOUT).unwrap_err();
        assert!(error.is_credential(), "{error}");
        let stats = server.stats();
        assert_eq!((stats.blobs_served, stats.pings, stats.credential_rejections), (2, 1, 0));
    }

    #[test]
    fn bad_requests_are_answered_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 4);
        for request in [&b"HELLO"[..], b"BLOB xyz", b"PING 42", &[b'A'; 300]] {
            let mut stream = SecureStream::connect(server.addr(), identity("t", 2), Some("s"), TIMEOUT).unwrap();
            stream.send(request).unwrap();
            let answer = stream.receive().unwrap().unwrap();
            assert!(answer.starts_with(b"NO "), "{request:?} gave {answer:?}");
            assert!(stream.receive().unwrap().is_none(), "closed after");
        }
    }

    #[test]
    fn an_authenticated_peer_beyond_connections_max_is_answered_busy() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 1);
        let held = SecureStream::connect(server.addr(), identity("t", 2), Some("s"), TIMEOUT).unwrap();
        let error = ping(&server.addr().to_string(), &identity("t", 2), Some("s"), TIMEOUT).unwrap_err();
        assert!(matches!(&error, PeerError::Declined { reason, .. } if reason == BUSY), "{error}");
        assert_eq!(server.stats().refusals.busy, 1);
        drop(held);
        let started = Instant::now();
        while ping(&server.addr().to_string(), &identity("t", 2), Some("s"), TIMEOUT).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "the slot came back");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_rate_limit_holds_the_total() {
        let limit = RateLimit { bytes_per_s: 1_000_000, state: Mutex::new((0.0, Instant::now())) };
        let start = limit.state.lock().unwrap().1;
        // 1 MB at once from an empty bucket: wait a second for it.
        assert_eq!(limit.reserve(1_000_000, start), Duration::from_secs(1));
        // Two seconds later the debt is paid and one second of burst is back, no more.
        let later = start + Duration::from_secs(3);
        assert_eq!(limit.reserve(1_000_000, later), Duration::ZERO);
        assert_eq!(limit.reserve(500_000, later), Duration::from_millis(500));
        assert_eq!(RateLimit::new(0).reserve(usize::MAX, later), Duration::ZERO, "0: no limit");
    }
}
