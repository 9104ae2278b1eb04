//! The node's peer port: other nodes fetch blobs from it and measure round trips to
//! it. Blocking std TCP, one thread per connection, at most `connections_max` at once
//! (further ones are answered `BUSY` and closed).
//!
//! Protocol, one request per line:
//! - `BLOB <64 hex>\n` → `OK <size>\n` and exactly `size` bytes, or `NO <reason>\n`;
//! - `PING <token>\n` → `PONG <token>\n` (the token is echoed; a round trip).
//!
//! Served blob bytes pass a shared rate limit (`bytes_per_s`, 0 for none): a token
//! bucket all connections draw from, so a node never sends faster than its limit in
//! total. The fetching side checks the hash itself; this side only reads its store.
//!
//! Invariants: a request line longer than `LINE_BYTES_MAX` or not one of the above is
//! answered `NO` and the connection closed; nothing here panics on what a peer sends;
//! no other state is shared with the node than the store's directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::event::BlobHash;
use crate::exec::blobstore;

/// Longest request line.
const LINE_BYTES_MAX: usize = 128;
/// The default for `io_timeout_ms`: how long a connection may stay idle.
pub const IO_TIMEOUT_MS_DEFAULT: u32 = 30_000;
const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
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
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer port {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("peer {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("peer {addr} does not have blob {blob}: {reason}")]
    Refused { addr: String, blob: String, reason: String },
    #[error("peer {addr} answered `{answer}`, not the protocol")]
    Protocol { addr: String, answer: String },
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
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    pub fn start(config: PeerServerConfig) -> Result<PeerServer, PeerError> {
        let listener =
            TcpListener::bind(config.listen).map_err(|source| PeerError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| PeerError::Bind { addr: config.listen, source })?;
        listener.set_nonblocking(true).map_err(|source| PeerError::Bind { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("meshos-peer".to_string())
                .spawn(move || accept_loop(listener, config, stop))
                .map_err(|source| PeerError::Bind { addr, source })?
        };
        Ok(PeerServer { addr, stop, thread: Some(thread) })
    }

    /// The bound address (the port is chosen by the OS when the config says 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

fn accept_loop(listener: TcpListener, config: PeerServerConfig, stop: Arc<AtomicBool>) {
    let open = Arc::new(AtomicU32::new(0));
    let limit = Arc::new(RateLimit::new(config.bytes_per_s));
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
        let (open, limit, blobs_dir) = (Arc::clone(&open), Arc::clone(&limit), config.blobs_dir.clone());
        let io_timeout = Duration::from_millis(config.io_timeout_ms.max(1) as u64);
        let spawned = std::thread::Builder::new().name("meshos-peer-conn".to_string()).spawn(move || {
            if let Err(error) = serve(stream, &blobs_dir, &limit, io_timeout) {
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

fn serve(
    stream: TcpStream,
    blobs_dir: &std::path::Path,
    limit: &RateLimit,
    io_timeout: Duration,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(io_timeout))?;
    // A peer that stops reading gives its slot back instead of holding it for ever.
    stream.set_write_timeout(Some(io_timeout))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let read = (&mut reader).take(LINE_BYTES_MAX as u64).read_line(&mut line)?;
        if read == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            writer.write_all(b"NO request line too long or cut\n")?;
            return Ok(());
        }
        let request = line.trim_end();
        if let Some(token) = request.strip_prefix("PING ") {
            writer.write_all(format!("PONG {token}\n").as_bytes())?;
        } else if let Some(text) = request.strip_prefix("BLOB ") {
            let Some(hash) = blobstore::parse_hex(text) else {
                writer.write_all(b"NO not a blob hash\n")?;
                return Ok(());
            };
            send_blob(&mut writer, blobs_dir, &hash, limit)?;
        } else {
            writer.write_all(b"NO unknown request\n")?;
            return Ok(());
        }
    }
}

fn send_blob(
    writer: &mut TcpStream,
    blobs_dir: &std::path::Path,
    hash: &BlobHash,
    limit: &RateLimit,
) -> std::io::Result<()> {
    let name = blobstore::hex(hash);
    let path = blobs_dir.join(&name[..2]).join(&name);
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(_) => return writer.write_all(b"NO not stored here\n"),
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
    Ok(())
}

/// Connects to the peer port at `addr` (`host:port`), with `timeout` for the connect
/// and every read.
fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, PeerError> {
    let io = |source| PeerError::Io { addr: addr.to_string(), source };
    let target = addr
        .parse::<SocketAddr>()
        .map_err(|_| PeerError::Protocol { addr: addr.to_string(), answer: "not an address".into() })?;
    let stream = TcpStream::connect_timeout(&target, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    Ok(stream)
}

/// Opens a fetch of `hash` from the peer at `addr`: the blob's size and a reader of
/// exactly that many bytes. The caller checks the hash (the store does, on `put`).
pub fn fetch(addr: &str, hash: &BlobHash, timeout: Duration) -> Result<(u64, impl Read), PeerError> {
    let io = |source| PeerError::Io { addr: addr.to_string(), source };
    let stream = connect(addr, timeout)?;
    let mut writer = stream.try_clone().map_err(io)?;
    writer.write_all(format!("BLOB {}\n", blobstore::hex(hash)).as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    (&mut reader).take(LINE_BYTES_MAX as u64).read_line(&mut line).map_err(io)?;
    let answer = line.trim_end();
    if let Some(reason) = answer.strip_prefix("NO ") {
        return Err(PeerError::Refused { addr: addr.to_string(), blob: blobstore::hex(hash), reason: reason.into() });
    }
    let size = answer
        .strip_prefix("OK ")
        .and_then(|size| size.parse::<u64>().ok())
        .ok_or_else(|| PeerError::Protocol { addr: addr.to_string(), answer: answer.to_string() })?;
    Ok((size, reader.take(size)))
}

/// One round trip to the peer at `addr`, in microseconds.
pub fn ping(addr: &str, token: u64, timeout: Duration) -> Result<u32, PeerError> {
    let io = |source| PeerError::Io { addr: addr.to_string(), source };
    let stream = connect(addr, timeout)?;
    stream.set_nodelay(true).map_err(io)?;
    let mut writer = stream.try_clone().map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let started = Instant::now();
    writer.write_all(format!("PING {token}\n").as_bytes()).map_err(io)?;
    (&mut reader).take(LINE_BYTES_MAX as u64).read_line(&mut line).map_err(io)?;
    let elapsed_us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
    if line.trim_end() != format!("PONG {token}") {
        return Err(PeerError::Protocol { addr: addr.to_string(), answer: line.trim_end().to_string() });
    }
    Ok(elapsed_us.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::blobstore::BlobStore;

    fn server(dir: &std::path::Path, bytes_per_s: u64) -> PeerServer {
        PeerServer::start(PeerServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            blobs_dir: dir.to_path_buf(),
            connections_max: 4,
            bytes_per_s,
            io_timeout_ms: IO_TIMEOUT_MS_DEFAULT,
        })
        .unwrap()
    }

    #[test]
    fn a_blob_moves_between_stores_and_is_verified_on_arrival() {
        let (source_dir, target_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let source = BlobStore::open(source_dir.path()).unwrap();
        let bytes: Vec<u8> = (0..300_000u32).map(|index| (index % 251) as u8).collect();
        let (hash, _) = source.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
        let server = server(source_dir.path(), 0);
        let addr = server.addr().to_string();
        let target = BlobStore::open(target_dir.path()).unwrap();
        let (size, mut reader) = fetch(&addr, &hash, Duration::from_secs(5)).unwrap();
        assert_eq!(size, 300_000);
        target.put(&mut reader, Some(&hash), size, &mut |_| {}).unwrap();
        assert!(target.verify(&hash, &mut |_| {}).unwrap());
        // A blob the peer does not have is refused with the reason.
        let error = fetch(&addr, &[9; 32], Duration::from_secs(5)).err().expect("absent");
        assert!(error.to_string().contains("not stored here"), "{error}");
        // Corrupt on the source: the fetch arrives but fails its hash; nothing stored.
        let path = source.path_of(&hash);
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[7] ^= 0xff;
        std::fs::write(&path, on_disk).unwrap();
        target.delete(&hash).unwrap();
        let (size, mut reader) = fetch(&addr, &hash, Duration::from_secs(5)).unwrap();
        let error = target.put(&mut reader, Some(&hash), size, &mut |_| {}).unwrap_err();
        assert!(matches!(error, crate::exec::blobstore::BlobStoreError::HashMismatch { .. }));
        assert!(!target.contains(&hash));
        assert!(ping(&addr, 42, Duration::from_secs(5)).unwrap() > 0);
    }

    #[test]
    fn bad_requests_are_answered_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let server = server(dir.path(), 0);
        for request in ["HELLO\n".to_string(), "BLOB xyz\n".to_string(), format!("{}\n", "A".repeat(500))] {
            let mut stream = TcpStream::connect(server.addr()).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("NO "), "{request:?} gave {answer:?}");
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
