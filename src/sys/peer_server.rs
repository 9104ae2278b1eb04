//! The node's peer port: other nodes fetch blobs from it and measure round trips to
//! it. Blocking std TCP, one thread per connection, at most `connections_max` at once
//! (further ones are answered `NO busy` and closed).
//!
//! Protocol (lines end in `\n`; `HEX` is 64 lowercase hex digits, 32 bytes):
//! 1. On accept the server sends `MESHOS-PEER 1 <nonce HEX>`: a fresh random nonce for
//!    this connection (`sys::process::random_bytes`).
//! 2. Each request is one line `<VERB> <ARG> <MAC> <NAME>`: `BLOB <blob HEX>` or
//!    `PING <token HEX>` (the token: 32 random bytes of the client's), the client's
//!    node name last (it may hold spaces), and `MAC` either `-` (no credential) or
//!    the HEX of [`request_mac`]: blake3 keyed with the cluster key over a domain label,
//!    the server's nonce, the request's number on this connection (0, 1, ..), the
//!    name and `<VERB> <ARG>`, each length-prefixed. A recorded request is useless on
//!    another connection (another nonce) and on the same one (another number).
//! 3. The server checks the MAC (in constant time: `blake3::Hash` equality) before
//!    anything else. Refusals, each counted in `credential_rejections`, answer one
//!    `NO peer credential ...` line and close: `rejected` (a MAC that is not this
//!    cluster's), `missing` (this node has a key, the request none), `unexpected`
//!    (this node has no key, the request one: one side is misconfigured).
//! 4. `BLOB` answers `OK <size>` and exactly `size` bytes, or `NO <reason>`; `PING`
//!    answers `PONG <token HEX> <MAC>`, the MAC ([`pong_mac`], another label) over the
//!    connection's nonce and the client's token, so a process without the key cannot
//!    pass for a peer port and feed the prober round trips; `-` when keyless.
//!
//! With no key on either side (one machine, no `[cluster] credential_file`) every
//! request carries `-` and is served as before; a key on one side only is refused
//! both ways. Served blob bytes are not MACed: the fetching side hashes them and
//! keeps them only when they are the blob it asked for (`BlobStore::put`), so a peer
//! can withhold a blob but never substitute one.
//!
//! Served blob bytes pass a shared rate limit (`bytes_per_s`, 0 for none): a token
//! bucket all connections draw from, so a node never sends faster than its limit in
//! total.
//!
//! Invariants: nothing is served to a request whose credential does not check; a
//! request line longer than `LINE_BYTES_MAX`, or not one of the above, is answered
//! `NO` and the connection closed; a connection idle for `io_timeout_ms` is closed;
//! nothing here panics on what a peer sends; no other state is shared with the node
//! than the store's directory and the counters.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::event::BlobHash;
use crate::exec::blobstore;

/// Longest node name a request carries (the most `fold.name_bytes_max` allows).
pub const NAME_BYTES_MAX: usize = 4096;
/// Longest request line: verb, argument, MAC and the name.
const LINE_BYTES_MAX: usize = NAME_BYTES_MAX + 160;
/// Longest line a server sends (greeting, answers).
const ANSWER_BYTES_MAX: usize = 256;
/// The default for `io_timeout_ms`: how long a connection may stay idle.
pub const IO_TIMEOUT_MS_DEFAULT: u32 = 30_000;
const CHUNK_BYTES: usize = 64 * 1024;
/// The first line of every connection, before the nonce.
const GREETING: &str = "MESHOS-PEER 1 ";
/// Domain separation of the two MACs (a request MAC is never a valid answer MAC).
const REQUEST_LABEL: &[u8] = b"meshos-peer-request-v1\0";
const PONG_LABEL: &[u8] = b"meshos-peer-pong-v1\0";
/// The refusals, as the server words them (after `NO `) and the client recognises them.
pub const CREDENTIAL_REJECTED: &str = "peer credential rejected: the client does not hold this cluster's credential";
pub const CREDENTIAL_MISSING: &str =
    "peer credential missing: this node requires the cluster credential and the request carried none";
pub const CREDENTIAL_UNEXPECTED: &str = "peer credential unexpected: this node has no cluster credential and the \
                                         request carried one (give every node the same cluster.credential_file)";
const CREDENTIAL_PREFIX: &str = "peer credential ";

/// The MAC a request carries: blake3 keyed with the cluster key over the request
/// label, the server's nonce, the request's number on its connection, the client's
/// node name and the request (`BLOB <hex>` or `PING <hex>`), lengths as u64 LE.
pub fn request_mac(key: &[u8; 32], nonce: &[u8; 32], seq: u64, name: &str, request: &str) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(REQUEST_LABEL);
    hasher.update(nonce);
    hasher.update(&seq.to_le_bytes());
    hasher.update(&(name.len() as u64).to_le_bytes());
    hasher.update(name.as_bytes());
    hasher.update(&(request.len() as u64).to_le_bytes());
    hasher.update(request.as_bytes());
    hasher.finalize()
}

/// The MAC of a `PONG`: blake3 keyed with the cluster key over the answer label, the
/// connection's nonce and the client's token.
pub fn pong_mac(key: &[u8; 32], nonce: &[u8; 32], token: &[u8; 32]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(PONG_LABEL);
    hasher.update(nonce);
    hasher.update(token);
    hasher.finalize()
}

/// Whether `text` (HEX or `-`) is the MAC `expected` asks for under `key`: Ok, or the
/// refusal. The comparison is constant-time (`blake3::Hash` equality).
fn check_mac(
    key: Option<&[u8; 32]>,
    text: &str,
    expected: impl FnOnce(&[u8; 32]) -> blake3::Hash,
) -> Result<(), &'static str> {
    match (key, text) {
        (None, "-") => Ok(()),
        (None, _) => Err(CREDENTIAL_UNEXPECTED),
        (Some(_), "-") => Err(CREDENTIAL_MISSING),
        (Some(key), text) => match blobstore::parse_hex(text) {
            Some(mac) if blake3::Hash::from(mac) == expected(key) => Ok(()),
            _ => Err(CREDENTIAL_REJECTED),
        },
    }
}

#[derive(Clone)]
pub struct PeerServerConfig {
    pub listen: SocketAddr,
    /// The blob store's root (`DATA_DIR/blobs`).
    pub blobs_dir: PathBuf,
    pub connections_max: u32,
    /// Bytes per second served in total; 0: no limit.
    pub bytes_per_s: u64,
    /// A connection idle this long (not sending a request, or not reading an answer)
    /// is closed.
    pub io_timeout_ms: u32,
    /// The cluster credential requests must prove; None: keyless (one machine).
    pub key: Option<[u8; 32]>,
}

impl std::fmt::Debug for PeerServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServerConfig")
            .field("listen", &self.listen)
            .field("blobs_dir", &self.blobs_dir)
            .field("connections_max", &self.connections_max)
            .field("bytes_per_s", &self.bytes_per_s)
            .field("io_timeout_ms", &self.io_timeout_ms)
            .field("key", &key_shown(&self.key))
            .finish()
    }
}

/// How a key appears in debug output: never its bytes.
pub fn key_shown(key: &Option<[u8; 32]>) -> &'static str {
    if key.is_some() {
        "<set>"
    } else {
        "<none>"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer port {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("peer {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("peer {addr} does not have blob {blob}: {reason}")]
    Refused { addr: String, blob: String, reason: String },
    #[error("peer {addr} refused: {reason}")]
    Declined { addr: String, reason: String },
    #[error("peer {addr} answered `{answer}`, not the protocol")]
    Protocol { addr: String, answer: String },
    /// The credential did not check, on either side.
    #[error("peer {addr}: {reason}")]
    Credential { addr: String, reason: String },
    #[error("node name {name:?} cannot go to a peer (empty, a line break, or over {NAME_BYTES_MAX} bytes)")]
    Name { name: String },
}

impl PeerError {
    /// A credential failure (this node's or the peer's key is wrong or missing, or
    /// the peer is not a node of this cluster).
    pub fn is_credential(&self) -> bool {
        matches!(self, PeerError::Credential { .. })
    }
}

/// What the server did, counted since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerServerStats {
    pub blobs_served: u64,
    pub pings: u64,
    /// Requests refused because their credential did not check (or one side had none).
    pub credential_rejections: u64,
}

#[derive(Default)]
struct Counters {
    blobs_served: AtomicU64,
    pings: AtomicU64,
    credential_rejections: AtomicU64,
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
    counters: Arc<Counters>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    pub fn start(config: PeerServerConfig) -> Result<PeerServer, PeerError> {
        let listener =
            TcpListener::bind(config.listen).map_err(|source| PeerError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| PeerError::Bind { addr: config.listen, source })?;
        listener.set_nonblocking(true).map_err(|source| PeerError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let thread = {
            let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
            std::thread::Builder::new()
                .name("meshos-peer".to_string())
                .spawn(move || accept_loop(listener, config, stop, counters))
                .map_err(|source| PeerError::Bind { addr, source })?
        };
        Ok(PeerServer { addr, stop, counters, thread: Some(thread) })
    }

    /// The bound address (the port is chosen by the OS when the config says 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server did so far.
    pub fn stats(&self) -> PeerServerStats {
        PeerServerStats {
            blobs_served: self.counters.blobs_served.load(Ordering::Relaxed),
            pings: self.counters.pings.load(Ordering::Relaxed),
            credential_rejections: self.counters.credential_rejections.load(Ordering::Relaxed),
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

/// What every connection thread shares.
struct Shared {
    blobs_dir: PathBuf,
    key: Option<[u8; 32]>,
    limit: RateLimit,
    io_timeout: Duration,
    counters: Arc<Counters>,
    /// When a refusal was last logged, and refusals not logged since (at most one
    /// warning a second: a stranger reconnecting in a loop cannot flood the log).
    warned: Mutex<(Option<Instant>, u64)>,
}

impl Shared {
    fn refused(&self, peer: SocketAddr, claimed_name: &str, refusal: &str) {
        self.counters.credential_rejections.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut warned = self.warned.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if warned.0.is_some_and(|last| now.saturating_duration_since(last) < Duration::from_secs(1)) {
            warned.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        drop(warned);
        let claimed: String = claimed_name.chars().take(64).collect();
        tracing::warn!(%peer, claimed_name = claimed, suppressed, "peer request refused: {refusal}");
    }
}

fn accept_loop(listener: TcpListener, config: PeerServerConfig, stop: Arc<AtomicBool>, counters: Arc<Counters>) {
    let open = Arc::new(AtomicU32::new(0));
    let shared = Arc::new(Shared {
        blobs_dir: config.blobs_dir.clone(),
        key: config.key,
        limit: RateLimit::new(config.bytes_per_s),
        io_timeout: Duration::from_millis(config.io_timeout_ms.max(1) as u64),
        counters,
        warned: Mutex::new((None, 0)),
    });
    while !stop.load(Ordering::SeqCst) {
        let (mut stream, peer) = match listener.accept() {
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
        if open.load(Ordering::SeqCst) >= config.connections_max {
            let _ = stream.write_all(b"NO busy\n");
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let open_slots = Arc::clone(&open);
        let (open, shared) = (Arc::clone(&open), Arc::clone(&shared));
        let spawned = std::thread::Builder::new().name("meshos-peer-conn".to_string()).spawn(move || {
            if let Err(error) = serve(stream, peer, &shared) {
                tracing::debug!(%peer, "peer connection: {error}");
            }
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            tracing::warn!("peer port: cannot start a connection thread");
            open_slots.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A request line split into its parts: `<VERB> <ARG> <MAC> <NAME>`.
struct Request<'a> {
    verb: &'a str,
    arg: &'a str,
    mac: &'a str,
    name: &'a str,
}

fn parse_request(line: &str) -> Option<Request<'_>> {
    let mut parts = line.splitn(4, ' ');
    let (verb, arg, mac, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some(Request { verb, arg, mac, name })
}

fn serve(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(shared.io_timeout))?;
    // A peer that stops reading gives its slot back instead of holding it for ever.
    stream.set_write_timeout(Some(shared.io_timeout))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut nonce = [0u8; 32];
    crate::sys::process::random_bytes(&mut nonce)?;
    writer.write_all(format!("{GREETING}{}\n", crate::event::hex(&nonce)).as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    for seq in 0u64.. {
        line.clear();
        let read = (&mut reader).take(LINE_BYTES_MAX as u64).read_line(&mut line)?;
        if read == 0 {
            return Ok(());
        }
        let Some(text) = line.strip_suffix('\n') else {
            writer.write_all(b"NO request line too long or cut\n")?;
            return Ok(());
        };
        let request = match parse_request(text) {
            Some(request) if request.verb == "BLOB" || request.verb == "PING" => request,
            _ => {
                writer.write_all(b"NO unknown request\n")?;
                return Ok(());
            }
        };
        let signed = &text[..request.verb.len() + 1 + request.arg.len()];
        let checked =
            check_mac(shared.key.as_ref(), request.mac, |key| request_mac(key, &nonce, seq, request.name, signed));
        if let Err(refusal) = checked {
            shared.refused(peer, request.name, refusal);
            writer.write_all(format!("NO {refusal}\n").as_bytes())?;
            return Ok(());
        }
        if request.verb == "PING" {
            let Some(token) = blobstore::parse_hex(request.arg) else {
                writer.write_all(b"NO not a ping token\n")?;
                return Ok(());
            };
            let mac = match &shared.key {
                Some(key) => pong_mac(key, &nonce, &token).to_hex().to_string(),
                None => "-".to_string(),
            };
            shared.counters.pings.fetch_add(1, Ordering::Relaxed);
            writer.write_all(format!("PONG {} {mac}\n", request.arg).as_bytes())?;
        } else {
            let Some(hash) = blobstore::parse_hex(request.arg) else {
                writer.write_all(b"NO not a blob hash\n")?;
                return Ok(());
            };
            if send_blob(&mut writer, &shared.blobs_dir, &hash, &shared.limit)? {
                shared.counters.blobs_served.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Sends the blob, or `NO` when it is not here; true when it was sent.
fn send_blob(
    writer: &mut TcpStream,
    blobs_dir: &std::path::Path,
    hash: &BlobHash,
    limit: &RateLimit,
) -> std::io::Result<bool> {
    let name = blobstore::hex(hash);
    let path = blobs_dir.join(&name[..2]).join(&name);
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(_) => return writer.write_all(b"NO not stored here\n").map(|()| false),
    };
    let size = file.metadata()?.len();
    writer.write_all(format!("OK {size}\n").as_bytes())?;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut left = size;
    while left > 0 {
        let want = (left as usize).min(CHUNK_BYTES);
        file.read_exact(&mut chunk[..want])?;
        limit.take(want);
        writer.write_all(&chunk[..want])?;
        left -= want as u64;
    }
    Ok(true)
}

/// Who asks: this node's name and the cluster credential (None: keyless).
#[derive(Clone, Copy)]
pub struct Client<'a> {
    pub name: &'a str,
    pub key: Option<&'a [u8; 32]>,
}

impl std::fmt::Debug for Client<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).field("key", &key_shown(&self.key.copied())).finish()
    }
}

/// An open connection after the greeting: the writer, the reader and the nonce.
struct Connection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    nonce: [u8; 32],
}

/// Reads one answer line (at most `ANSWER_BYTES_MAX` bytes) without its line end.
fn read_answer(addr: &str, reader: &mut BufReader<TcpStream>) -> Result<String, PeerError> {
    let mut line = String::new();
    reader
        .take(ANSWER_BYTES_MAX as u64)
        .read_line(&mut line)
        .map_err(|source| PeerError::Io { addr: addr.to_string(), source })?;
    Ok(line.trim_end().to_string())
}

/// A `NO <reason>` answer as an error: a credential refusal, or `other`.
fn refusal(addr: &str, reason: &str, other: impl FnOnce(String) -> PeerError) -> PeerError {
    if reason.starts_with(CREDENTIAL_PREFIX) {
        PeerError::Credential { addr: addr.to_string(), reason: reason.to_string() }
    } else {
        other(reason.to_string())
    }
}

/// Connects to the peer port at `addr` (`host:port`), with `timeout` for the connect
/// and every read and write, and reads the greeting.
fn connect(addr: &str, timeout: Duration) -> Result<Connection, PeerError> {
    let io = |source| PeerError::Io { addr: addr.to_string(), source };
    let target = addr
        .parse::<SocketAddr>()
        .map_err(|_| PeerError::Protocol { addr: addr.to_string(), answer: "not an address".into() })?;
    let stream = TcpStream::connect_timeout(&target, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let writer = stream.try_clone().map_err(io)?;
    let mut reader = BufReader::new(stream);
    let greeting = read_answer(addr, &mut reader)?;
    if let Some(reason) = greeting.strip_prefix("NO ") {
        return Err(PeerError::Declined { addr: addr.to_string(), reason: reason.to_string() });
    }
    let nonce = greeting
        .strip_prefix(GREETING)
        .and_then(blobstore::parse_hex)
        .ok_or_else(|| PeerError::Protocol { addr: addr.to_string(), answer: greeting.clone() })?;
    Ok(Connection { writer, reader, nonce })
}

/// The request line for `request` (`VERB ARG`), the first on its connection.
fn request_line(client: &Client<'_>, nonce: &[u8; 32], request: &str) -> Result<String, PeerError> {
    let name = client.name;
    if name.is_empty() || name.len() > NAME_BYTES_MAX || name.contains(['\n', '\r']) {
        return Err(PeerError::Name { name: name.chars().take(64).collect() });
    }
    let mac = match client.key {
        Some(key) => request_mac(key, nonce, 0, name, request).to_hex().to_string(),
        None => "-".to_string(),
    };
    Ok(format!("{request} {mac} {name}\n"))
}

/// Opens a fetch of `hash` from the peer at `addr`: the blob's size and a reader of
/// exactly that many bytes. The caller checks the hash (the store does, on `put`):
/// bytes that are not the blob are never kept.
pub fn fetch(
    addr: &str,
    hash: &BlobHash,
    client: &Client<'_>,
    timeout: Duration,
) -> Result<(u64, impl Read), PeerError> {
    let io = |source| PeerError::Io { addr: addr.to_string(), source };
    let Connection { mut writer, mut reader, nonce } = connect(addr, timeout)?;
    let line = request_line(client, &nonce, &format!("BLOB {}", blobstore::hex(hash)))?;
    writer.write_all(line.as_bytes()).map_err(io)?;
    let answer = read_answer(addr, &mut reader)?;
    if let Some(reason) = answer.strip_prefix("NO ") {
        return Err(refusal(addr, reason, |reason| PeerError::Refused {
            addr: addr.to_string(),
            blob: blobstore::hex(hash),
            reason,
        }));
    }
    let size = answer
        .strip_prefix("OK ")
        .and_then(|size| size.parse::<u64>().ok())
        .ok_or_else(|| PeerError::Protocol { addr: addr.to_string(), answer: answer.to_string() })?;
    Ok((size, reader.take(size)))
}

/// One round trip to the peer at `addr`, in microseconds (at least 1). With a key the
/// answer must prove it (a `PONG` MAC over this connection's nonce and a fresh random
/// token), so only a node of this cluster can give a sample.
pub fn ping(addr: &str, client: &Client<'_>, timeout: Duration) -> Result<u32, PeerError> {
    let io = |source| PeerError::Io { addr: addr.to_string(), source };
    let Connection { mut writer, mut reader, nonce } = connect(addr, timeout)?;
    let mut token = [0u8; 32];
    crate::sys::process::random_bytes(&mut token).map_err(io)?;
    let token_hex = crate::event::hex(&token);
    let line = request_line(client, &nonce, &format!("PING {token_hex}"))?;
    let started = Instant::now();
    writer.write_all(line.as_bytes()).map_err(io)?;
    let answer = read_answer(addr, &mut reader)?;
    let elapsed_us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
    if let Some(reason) = answer.strip_prefix("NO ") {
        return Err(refusal(addr, reason, |reason| PeerError::Declined { addr: addr.to_string(), reason }));
    }
    let protocol = || PeerError::Protocol { addr: addr.to_string(), answer: answer.clone() };
    let rest = answer.strip_prefix("PONG ").ok_or_else(protocol)?;
    let (echoed, mac) = rest.split_once(' ').ok_or_else(protocol)?;
    if echoed != token_hex {
        return Err(protocol());
    }
    // The answer's MAC, checked the way the server checks requests (same refusals, as
    // seen from this side).
    let verdict = match (client.key, mac) {
        (None, "-") => Ok(()),
        (None, _) => Err("peer credential unexpected: the peer holds a cluster credential and this node has none"),
        (Some(_), "-") => Err("peer credential missing: the answer carries no cluster credential (the peer has \
                               none, or is not a node of this cluster)"),
        (Some(key), mac) => check_mac(Some(key), mac, |key| pong_mac(key, &nonce, &token)).map_err(|_| {
            "peer credential rejected: the answer does not prove this cluster's credential (not a node of this \
             cluster)"
        }),
    };
    verdict.map_err(|reason| PeerError::Credential { addr: addr.to_string(), reason: reason.to_string() })?;
    Ok(elapsed_us.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::blobstore::BlobStore;

    fn server(dir: &std::path::Path, bytes_per_s: u64, key: Option<[u8; 32]>) -> PeerServer {
        PeerServer::start(PeerServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            blobs_dir: dir.to_path_buf(),
            connections_max: 4,
            bytes_per_s,
            io_timeout_ms: IO_TIMEOUT_MS_DEFAULT,
            key,
        })
        .unwrap()
    }

    const KEYLESS: Client<'static> = Client { name: "node-t", key: None };

    #[test]
    fn a_blob_moves_between_stores_and_is_verified_on_arrival() {
        let (source_dir, target_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = BlobStore::open(source_dir.path()).unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|index| (index % 251) as u8).collect();
        let (hash, _) = source.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
        let server = server(source_dir.path(), 0, None);
        let addr = server.addr().to_string();
        let target = BlobStore::open(target_dir.path()).unwrap();
        let (size, mut reader) = fetch(&addr, &hash, &KEYLESS, Duration::from_secs(5)).unwrap();
        assert_eq!(size, 300_000);
        target.put(&mut reader, Some(&hash), size, &mut |_| {}).unwrap();
        assert!(target.verify(&hash, &mut |_| {}).unwrap());
        // A blob the peer does not have is refused with the reason.
        let error = fetch(&addr, &[9; 32], &KEYLESS, Duration::from_secs(5)).err().expect("absent");
        assert!(error.to_string().contains("not stored here"), "{error}");
        // Corrupt on the source: the fetch arrives but fails its hash; nothing stored.
        let path = source.path_of(&hash);
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[7] ^= 0xff;
        std::fs::write(&path, on_disk).unwrap();
        target.delete(&hash).unwrap();
        let (size, mut reader) = fetch(&addr, &hash, &KEYLESS, Duration::from_secs(5)).unwrap();
        let error = target.put(&mut reader, Some(&hash), size, &mut |_| {}).unwrap_err();
        assert!(matches!(error, crate::exec::blobstore::BlobStoreError::HashMismatch { .. }));
        assert!(!target.contains(&hash));
        assert!(ping(&addr, &KEYLESS, Duration::from_secs(5)).unwrap() > 0);
        assert_eq!(server.stats(), PeerServerStats { blobs_served: 2, pings: 1, credential_rejections: 0 });
    }

    #[test]
    fn bad_requests_are_answered_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 0, None);
        let long = format!("{}\n", "A".repeat(LINE_BYTES_MAX + 10));
        for request in ["HELLO\n", "BLOB xyz - n\n", "PING 42\n", "PING 42 - n\n", long.as_str()] {
            let mut stream = TcpStream::connect(server.addr()).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            let answer = answer.split_once('\n').expect("a greeting first").1;
            assert!(answer.starts_with("NO "), "{request:?} gave {answer:?}");
        }
    }

    /// The MAC binds each input (a change in any one changes it), is blake3 keyed over
    /// the documented bytes, and a request MAC is never a PONG MAC.
    #[test]
    fn the_macs_bind_key_nonce_number_name_and_request() {
        let (key, nonce) = ([1u8; 32], [2u8; 32]);
        let mac = request_mac(&key, &nonce, 0, "node-1", "PING ab");
        let mut bytes = b"meshos-peer-request-v1\0".to_vec();
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&6u64.to_le_bytes());
        bytes.extend_from_slice(b"node-1");
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(b"PING ab");
        assert_eq!(mac, blake3::keyed_hash(&key, &bytes));
        for other in [
            request_mac(&[3; 32], &nonce, 0, "node-1", "PING ab"),
            request_mac(&key, &[3; 32], 0, "node-1", "PING ab"),
            request_mac(&key, &nonce, 1, "node-1", "PING ab"),
            request_mac(&key, &nonce, 0, "node-2", "PING ab"),
            request_mac(&key, &nonce, 0, "node-1", "PING ac"),
            // Lengths are framed: moving a byte from the name to the request differs.
            request_mac(&key, &nonce, 0, "node-1P", "ING ab"),
        ] {
            assert_ne!(mac, other);
        }
        let token = [4u8; 32];
        let pong = pong_mac(&key, &nonce, &token);
        let mut bytes = b"meshos-peer-pong-v1\0".to_vec();
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&token);
        assert_eq!(pong, blake3::keyed_hash(&key, &bytes));
        assert_ne!(pong, pong_mac(&[3; 32], &nonce, &token));
        // The check: right MAC, wrong MAC, garbage, and a key on one side only.
        let hex = mac.to_hex().to_string();
        let expected = |key: &[u8; 32]| request_mac(key, &nonce, 0, "node-1", "PING ab");
        assert_eq!(check_mac(Some(&key), &hex, expected), Ok(()));
        assert_eq!(check_mac(Some(&[3; 32]), &hex, expected), Err(CREDENTIAL_REJECTED));
        assert_eq!(check_mac(Some(&key), "zz", expected), Err(CREDENTIAL_REJECTED));
        assert_eq!(check_mac(Some(&key), "-", expected), Err(CREDENTIAL_MISSING));
        assert_eq!(check_mac(None, &hex, expected), Err(CREDENTIAL_UNEXPECTED));
        assert_eq!(check_mac(None, "-", expected), Ok(()));
    }

    #[test]
    fn keys_are_checked_both_ways_and_refusals_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (key, other) = ([7u8; 32], [8u8; 32]);
        let keyed = server(dir.path(), 0, Some(key));
        let addr = keyed.addr().to_string();
        let timeout = Duration::from_secs(5);
        assert!(ping(&addr, &Client { name: "n", key: Some(&key) }, timeout).is_ok());
        for (client, expected) in [
            (Client { name: "n", key: Some(&other) }, CREDENTIAL_REJECTED),
            (Client { name: "n", key: None }, CREDENTIAL_MISSING),
        ] {
            let error = ping(&addr, &client, timeout).unwrap_err();
            assert!(error.is_credential() && error.to_string().contains(expected), "{error}");
            let error = fetch(&addr, &[1; 32], &client, timeout).err().unwrap();
            assert!(error.is_credential() && error.to_string().contains(expected), "{error}");
        }
        assert_eq!(keyed.stats().credential_rejections, 4);
        assert_eq!(keyed.stats().pings, 1);
        let keyless = server(dir.path(), 0, None);
        let error = ping(&keyless.addr().to_string(), &Client { name: "n", key: Some(&key) }, timeout).unwrap_err();
        assert!(error.to_string().contains(CREDENTIAL_UNEXPECTED), "{error}");
        assert_eq!(keyless.stats().credential_rejections, 1);
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
