//! The client thread: one `mio::Poll`, one TCP connection at a time, every protocol
//! decision of the JetStream client (see the parent module for the contract).
//!
//! A connection goes through: blocking TCP connect and handshake (`INFO`, then
//! `CONNECT` + `PING` answered by `PONG`, within `request_timeout_ms`), then the
//! non-blocking session: `SUB <inbox>.*` (every publish ack and API reply comes back
//! under it, routed by the last token: `p<ticket>` or `r<request id>`), the stream
//! create (or update on `err_code` 10058), and once the stream is ready the publish
//! window, the ordered consumer and a stream info every few seconds. Deliveries come
//! on the consumer's own sid, whose deliver subject is outside the inbox wildcard.
//!
//! Publishing: `inflight` maps ticket -> record, each `Due` (to be sent at a time) or
//! `Sent` (at a time). Records enter it from the shared queue, in ticket order, only
//! while the window has room and no ambiguous case is being resolved (`resolving`).
//! A reply is matched by ticket; one for a ticket no longer in flight (an earlier
//! attempt's) is ignored, so each ticket resolves once. A 503, an API error of code
//! 503, an ack timeout or a lost connection makes the record `Due` again (same msg
//! id) and sets `resolving`, as does a definite failure; it clears when nothing is
//! left in flight. While resolving, records go out one at a time in ticket order
//! (stop and wait), so a record resent after a 503 cannot be stored after a later one
//! a new leader took first. A connection that finds the stream ending below what was
//! delivered (every server lost its tail) holds every record but pinned ones back
//! until the caller resumes (`held_for_repair`).
//!
//! Reading: `next_position` is the next stream sequence wanted; a delivery is
//! accepted only at exactly that position and the consumer sequence that follows the
//! last, else the consumer is recreated from `next_position` (or reading ends with
//! BeforeStart when a new consumer starts beyond it). Accepted records wait in `held`
//! until the shared queue has room; while anything is held, flow-control replies are
//! withheld (the server stops sending), and past `HELD_BYTES_MAX` bytes or
//! `HELD_RECORDS_PER_QUEUED * delivered_queue_max` records the socket is not read at
//! all (acks and heartbeats wait too; the heartbeat and ping clocks pause).

use super::proto::{self, Message, ServerInfo, ServerOp};
use super::{Inner, JetStreamConfig, JetStreamStats, Outgoing, OwnedRecord, PublishOutcome, Stored};
use crate::ingest::park::Signal;
use mio::{Events, Interest, Poll, Token};
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::ToSocketAddrs;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) const WAKER: Token = Token(0);
const SOCKET: Token = Token(1);
/// The sid of the inbox wildcard subscription.
const INBOX_SID: u64 = 1;
/// Bytes reserved for the headers of a publish when capping payloads.
const HEADER_BYTES_ALLOWANCE: u64 = 160;
/// The longest the thread sleeps without looking at its timers.
const TICK: Duration = Duration::from_millis(50);
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PINGS_OUTSTANDING_MAX: u32 = 3;
const STREAM_INFO_INTERVAL: Duration = Duration::from_secs(2);
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes read per loop round before the thread turns to its other work.
const READ_ROUND_BYTES_MAX: usize = 4 << 20;
/// Encoded but unwritten bytes beyond which no more publishes are encoded.
const WRITE_BUFFER_BYTES_MAX: usize = 8 << 20;
/// Held delivery bytes beyond which the socket is not read until the main thread drains.
const HELD_BYTES_MAX: usize = 128 << 20;
/// Held records, per `delivered_queue_max`, beyond which the socket is not read.
const HELD_RECORDS_PER_QUEUED: usize = 16;
/// Failed stream or consumer creations in a row before trying another server.
const API_FAILURES_MAX: u32 = 5;
/// A consumer nobody listens to is removed by the server after this long.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);

/// Why a session ended.
enum End {
    Stop,
    Lost(String),
}

#[derive(Debug, Clone, Copy)]
enum SendState {
    Due(Instant),
    Sent(Instant),
}

struct InFlight {
    record: Outgoing,
    state: SendState,
    attempts: u32,
}

#[derive(Debug, Clone, Copy)]
enum RequestKind {
    StreamCreate,
    StreamUpdate,
    /// `check_start`: decide BeforeStart from the reply's first sequence.
    StreamInfo {
        check_start: bool,
    },
    ConsumerCreate,
    ConsumerDelete,
    Purge(u64),
}

enum Consumer {
    None {
        retry_at: Instant,
    },
    Creating {
        request: u64,
        sid: u64,
        name: String,
    },
    /// `create_request`: the create reply is still to come (deliveries came first).
    Active {
        sid: u64,
        name: String,
        create_request: Option<u64>,
        last_seen: Instant,
        next_consumer_seq: u64,
        delivered_any: bool,
    },
}

struct Conn {
    stream: mio::net::TcpStream,
    server: String,
    rbuf: Vec<u8>,
    readable: bool,
    wbuf: Vec<u8>,
    wpos: usize,
    inbox: String,
    max_payload: u64,
    parse_limit: usize,
    next_sid: u64,
    next_request: u64,
    requests: BTreeMap<u64, (RequestKind, Instant)>,
    stream_ready: bool,
    stream_retry_at: Option<Instant>,
    api_failures: u32,
    api_backoff_ms: u64,
    consumer: Consumer,
    fc_deferred: Option<String>,
    info_due: Instant,
    ping_due: Instant,
    pings_outstanding: u32,
}

impl Conn {
    fn request(&mut self, subject: &str, body: &[u8], kind: RequestKind, timeout: Duration, now: Instant) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let reply = format!("{}.r{id}", self.inbox);
        proto::encode_pub(&mut self.wbuf, subject, Some(&reply), body);
        self.requests.insert(id, (kind, now + timeout));
        id
    }

    fn unwritten_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    fn flush(&mut self) -> Result<(), End> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(End::Lost("the socket takes no more bytes".into())),
                Ok(written) => self.wpos += written,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(End::Lost(format!("write failed: {error}"))),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(())
    }

    /// The next retry delay of stream and consumer creation, doubling to the cap.
    fn next_api_backoff(&mut self, cap_ms: u64) -> Duration {
        self.api_backoff_ms = (self.api_backoff_ms * 2).clamp(100, cap_ms.max(100));
        Duration::from_millis(self.api_backoff_ms)
    }
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {}, err_code {})", self.description, self.code, self.err_code)
    }
}

#[derive(serde::Deserialize)]
struct PubAck {
    #[serde(default)]
    stream: String,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct StreamState {
    #[serde(default)]
    first_seq: u64,
    #[serde(default)]
    last_seq: u64,
}

#[derive(serde::Deserialize)]
struct StreamReply {
    error: Option<ApiError>,
    state: Option<StreamState>,
}

/// A consumer create or purge reply (the fields each one uses).
#[derive(serde::Deserialize)]
struct ApiReply {
    error: Option<ApiError>,
    #[serde(default)]
    purged: u64,
    /// Consumer create: messages the new consumer has to deliver.
    num_pending: Option<u64>,
}

/// The thread's entry point.
pub(super) fn run(
    config: JetStreamConfig,
    next_position: u64,
    inner: Arc<Inner>,
    wake: crate::sync::Arc<Signal>,
    poll: Poll,
) {
    let mut boot = [0u8; 4];
    if crate::sys::process::random_bytes(&mut boot).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        boot = (nanos.subsec_nanos() ^ std::process::id()).to_le_bytes();
    }
    let consumer_prefix: String = config
        .client_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    let mut client = Client {
        heartbeat: Duration::from_millis(u64::from(config.heartbeat_ms)),
        ack_timeout: Duration::from_millis(u64::from(config.ack_timeout_ms)),
        request_timeout: Duration::from_millis(u64::from(config.request_timeout_ms)),
        config,
        inner,
        wake,
        poll,
        boot: crate::event::hex(&boot),
        consumer_prefix,
        server_index: 0,
        connections: 0,
        backoff_ms: 0,
        inflight: BTreeMap::new(),
        resolving: false,
        resolving_since: None,
        next_position,
        consumer_generation: 0,
        consumers_created: 0,
        held: VecDeque::new(),
        held_bytes: 0,
        before_start: None,
        caught_up_through: None,
        outcomes: Vec::new(),
        stats: JetStreamStats::default(),
        bounds: None,
        regressed: None,
        held_for_repair: false,
        purge_wanted: None,
        stop: false,
    };
    client.run();
}

struct Client {
    config: JetStreamConfig,
    heartbeat: Duration,
    ack_timeout: Duration,
    request_timeout: Duration,
    inner: Arc<Inner>,
    wake: crate::sync::Arc<Signal>,
    poll: Poll,
    boot: String,
    consumer_prefix: String,
    server_index: usize,
    connections: u64,
    backoff_ms: u64,
    inflight: BTreeMap<u64, InFlight>,
    resolving: bool,
    resolving_since: Option<Instant>,
    next_position: u64,
    consumer_generation: u64,
    /// Consumers that came to exist (the first is not a recreation).
    consumers_created: u64,
    held: VecDeque<OwnedRecord>,
    held_bytes: usize,
    before_start: Option<(u64, u64)>,
    caught_up_through: Option<u64>,
    outcomes: Vec<PublishOutcome>,
    stats: JetStreamStats,
    bounds: Option<(u64, u64)>,
    /// Set when a connection found the stream ending below what was delivered.
    regressed: Option<u64>,
    /// The stream lost its tail: only pinned records (the tail given back) go out until
    /// the caller resumes publishing.
    held_for_repair: bool,
    purge_wanted: Option<u64>,
    stop: bool,
}

impl Client {
    fn run(&mut self) {
        let mut events = Events::with_capacity(16);
        loop {
            self.sync_shared(None, Instant::now());
            if self.stop {
                return;
            }
            let server = self.config.servers[self.server_index % self.config.servers.len()].clone();
            self.server_index += 1;
            let end = match self.connect(&server) {
                Ok(conn) => self.session(conn, &mut events),
                Err(reason) => End::Lost(reason),
            };
            self.stats.connected = false;
            for entry in self.inflight.values_mut() {
                if let SendState::Sent(_) = entry.state {
                    entry.state = SendState::Due(Instant::now());
                }
            }
            if !self.inflight.is_empty() {
                self.start_resolving("connection lost");
            }
            match end {
                End::Stop => return,
                End::Lost(reason) => tracing::warn!(server, "JetStream connection lost: {reason}"),
            }
            // The first retry goes straight to the next server; then the backoff doubles to the cap.
            let delay = Duration::from_millis(self.backoff_ms);
            self.backoff_ms = (self.backoff_ms * 2).clamp(50, u64::from(self.config.reconnect_backoff_max_ms).max(50));
            let deadline = Instant::now() + delay;
            loop {
                self.sync_shared(None, Instant::now());
                let now = Instant::now();
                if self.stop || now >= deadline {
                    break;
                }
                if let Err(error) = self.poll.poll(&mut events, Some(deadline - now)) {
                    if error.kind() != ErrorKind::Interrupted {
                        tracing::error!(%error, "JetStream client poll failed");
                        std::thread::sleep(TICK);
                    }
                }
            }
        }
    }

    /// Blocking connect and handshake; the connection comes back non-blocking and registered.
    fn connect(&mut self, server: &str) -> Result<Conn, String> {
        let timeout = self.request_timeout;
        let address =
            server.to_socket_addrs().map_err(|error| format!("cannot resolve: {error}"))?.next().ok_or("no address")?;
        let mut socket = std::net::TcpStream::connect_timeout(&address, timeout).map_err(|e| e.to_string())?;
        socket.set_nodelay(true).map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let mut rbuf = Vec::new();
        let mut info = None;
        let mut sent_connect = false;
        let deadline = Instant::now() + timeout;
        loop {
            if Instant::now() >= deadline {
                return Err("handshake timed out".into());
            }
            let mut used_total = 0;
            let mut done = false;
            loop {
                match proto::parse(&rbuf[used_total..], proto::CONTROL_LINE_BYTES_MAX) {
                    Ok(Some((op, used))) => {
                        used_total += used;
                        match op {
                            ServerOp::Info(json) if info.is_none() => {
                                let parsed: ServerInfo = serde_json::from_slice(json).map_err(|error| {
                                    self.stats.protocol_errors += 1;
                                    format!("bad INFO: {error}")
                                })?;
                                if !parsed.headers || !parsed.jetstream {
                                    return Err(format!(
                                        "server {} lacks headers ({}) or JetStream ({})",
                                        parsed.server_name, parsed.headers, parsed.jetstream
                                    ));
                                }
                                info = Some(parsed);
                            }
                            ServerOp::Info(_) | ServerOp::Ok => {}
                            ServerOp::Ping => socket.write_all(b"PONG\r\n").map_err(|e| e.to_string())?,
                            ServerOp::Pong if sent_connect => done = true,
                            ServerOp::Err(text) => {
                                return Err(format!("server refused: {}", String::from_utf8_lossy(text)))
                            }
                            ServerOp::Pong | ServerOp::Msg(_) => {
                                self.stats.protocol_errors += 1;
                                return Err("unexpected operation during the handshake".into());
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        self.stats.protocol_errors += 1;
                        return Err(format!("protocol error: {error}"));
                    }
                }
                if done {
                    break;
                }
                if info.is_some() && !sent_connect {
                    let mut out = Vec::new();
                    proto::encode_connect(&mut out, &self.config.client_name, self.config.token.as_deref());
                    socket.write_all(&out).map_err(|e| e.to_string())?;
                    sent_connect = true;
                }
            }
            rbuf.drain(..used_total);
            if done {
                break;
            }
            let len = rbuf.len();
            rbuf.resize(len + READ_CHUNK_BYTES, 0);
            match socket.read(&mut rbuf[len..]) {
                Ok(0) => return Err("closed during the handshake".into()),
                Ok(read) => rbuf.truncate(len + read),
                Err(error) if error.kind() == ErrorKind::Interrupted => rbuf.truncate(len),
                Err(error) => return Err(format!("handshake: {error}")),
            }
        }
        let info = info.expect("PONG is accepted only after INFO");
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut stream = mio::net::TcpStream::from_std(socket);
        self.poll
            .registry()
            .register(&mut stream, SOCKET, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
        let max_payload = if info.max_payload == 0 { 1 << 20 } else { info.max_payload };
        let cap = u64::from(self.config.record_bytes_max).min(max_payload.saturating_sub(HEADER_BYTES_ALLOWANCE));
        self.inner.payload_bytes_max.store(cap, Ordering::Relaxed);
        self.connections += 1;
        self.stats.connects += 1;
        self.stats.connected = true;
        self.stats.server = server.to_string();
        tracing::info!(server, name = info.server_name, version = info.version, max_payload, "JetStream connected");
        let now = Instant::now();
        Ok(Conn {
            stream,
            server: server.to_string(),
            rbuf,
            readable: true,
            wbuf: Vec::new(),
            wpos: 0,
            inbox: format!("_INBOX.{}_{}", self.boot, self.connections),
            max_payload,
            parse_limit: usize::try_from(max_payload).unwrap_or(usize::MAX).saturating_add(64 * 1024),
            next_sid: INBOX_SID + 1,
            next_request: 1,
            requests: BTreeMap::new(),
            stream_ready: false,
            stream_retry_at: Some(now),
            api_failures: 0,
            api_backoff_ms: 0,
            consumer: Consumer::None { retry_at: now },
            fc_deferred: None,
            info_due: now + STREAM_INFO_INTERVAL,
            ping_due: now + PING_INTERVAL,
            pings_outstanding: 0,
        })
    }

    fn session(&mut self, mut conn: Conn, events: &mut Events) -> End {
        let subject = format!("{}.*", conn.inbox);
        proto::encode_sub(&mut conn.wbuf, &subject, INBOX_SID);
        let end = loop {
            if let Err(end) = self.round(&mut conn, events) {
                break end;
            }
        };
        if matches!(end, End::Stop) {
            // Best effort: remove our consumer now rather than after its inactivity threshold.
            self.drop_consumer(&mut conn, Instant::now());
            let _ = conn.flush();
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        end
    }

    /// Too much held for the main thread: the socket is not read until it drains
    /// (normally withheld flow control stops the server long before).
    fn reading_blocked(&self) -> bool {
        self.held_bytes > HELD_BYTES_MAX
            || self.held.len() > (self.config.delivered_queue_max as usize).saturating_mul(HELD_RECORDS_PER_QUEUED)
    }

    /// One loop round: wait, read, timers, hand over, send, write.
    fn round(&mut self, conn: &mut Conn, events: &mut Events) -> Result<(), End> {
        let busy = conn.readable && !self.reading_blocked();
        let timeout = if busy { Duration::ZERO } else { TICK };
        if let Err(error) = self.poll.poll(events, Some(timeout)) {
            if error.kind() != ErrorKind::Interrupted {
                return Err(End::Lost(format!("poll failed: {error}")));
            }
        }
        for event in events.iter() {
            if event.token() == SOCKET && (event.is_readable() || event.is_read_closed() || event.is_error()) {
                conn.readable = true;
            }
        }
        let now = Instant::now();
        self.read(conn, now)?;
        self.timers(conn, now)?;
        self.sync_shared(Some(conn), now);
        if self.stop {
            return Err(End::Stop);
        }
        self.send_due(conn, now);
        conn.flush()
    }

    fn read(&mut self, conn: &mut Conn, now: Instant) -> Result<(), End> {
        let mut round_bytes = 0;
        while conn.readable && !self.reading_blocked() && round_bytes < READ_ROUND_BYTES_MAX {
            let len = conn.rbuf.len();
            conn.rbuf.resize(len + READ_CHUNK_BYTES, 0);
            let result = conn.stream.read(&mut conn.rbuf[len..]);
            let read = *result.as_ref().unwrap_or(&0);
            conn.rbuf.truncate(len + read);
            match result {
                Ok(0) => return Err(End::Lost("the server closed the connection".into())),
                Ok(read) => {
                    round_bytes += read;
                    self.process(conn, now)?;
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Err(End::Lost(format!("read failed: {error}"))),
            }
        }
        Ok(())
    }

    /// Handles every whole operation in the read buffer.
    fn process(&mut self, conn: &mut Conn, now: Instant) -> Result<(), End> {
        let buf = std::mem::take(&mut conn.rbuf);
        let mut used_total = 0;
        let result = loop {
            match proto::parse(&buf[used_total..], conn.parse_limit) {
                Ok(Some((op, used))) => {
                    used_total += used;
                    if let Err(end) = self.handle(conn, op, now) {
                        break Err(end);
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(self.protocol_error(format!("{error}"))),
            }
        };
        conn.rbuf = buf;
        conn.rbuf.drain(..used_total);
        result
    }

    fn protocol_error(&mut self, reason: String) -> End {
        self.stats.protocol_errors += 1;
        End::Lost(format!("protocol error: {reason}"))
    }

    fn handle(&mut self, conn: &mut Conn, op: ServerOp<'_>, now: Instant) -> Result<(), End> {
        match op {
            ServerOp::Ping => conn.wbuf.extend_from_slice(b"PONG\r\n"),
            ServerOp::Pong => conn.pings_outstanding = 0,
            ServerOp::Ok | ServerOp::Info(_) => {}
            ServerOp::Err(text) => {
                return Err(End::Lost(format!("server error: {}", String::from_utf8_lossy(text))));
            }
            ServerOp::Msg(message) if message.sid == INBOX_SID => {
                let token = message.subject.rsplit(|&byte| byte == b'.').next().unwrap_or_default();
                match (token.first(), token.get(1..).and_then(proto::parse_u64)) {
                    (Some(b'p'), Some(ticket)) => self.on_pub_reply(ticket, &message, now)?,
                    (Some(b'r'), Some(id)) => {
                        if let Some((kind, _)) = conn.requests.remove(&id) {
                            self.on_api_reply(conn, id, kind, Some(&message), now)?;
                        }
                    }
                    _ => return Err(self.protocol_error("a reply on the inbox with an unknown token".into())),
                }
            }
            ServerOp::Msg(message) => {
                let current = match conn.consumer {
                    Consumer::Active { sid, .. } => sid == message.sid,
                    Consumer::Creating { request, sid, ref name } if sid == message.sid => {
                        // The consumer delivers before its create reply arrived: it exists.
                        conn.consumer = Consumer::Active {
                            sid,
                            name: name.clone(),
                            create_request: Some(request),
                            last_seen: now,
                            next_consumer_seq: 1,
                            delivered_any: false,
                        };
                        self.stats.consumer_recreated += u64::from(self.consumers_created > 0);
                        self.consumers_created += 1;
                        true
                    }
                    _ => false,
                };
                if current {
                    self.on_delivery(conn, &message, now)?;
                }
                // Otherwise: a late delivery of a consumer already replaced.
            }
        }
        Ok(())
    }

    fn on_pub_reply(&mut self, ticket: u64, message: &Message<'_>, now: Instant) -> Result<(), End> {
        let Some(entry) = self.inflight.get_mut(&ticket) else {
            return Ok(()); // an earlier attempt's reply: the ticket is resolved already
        };
        let mut ambiguous = false;
        let mut result = None;
        if let Some((status, description)) = proto::header_status(message.headers) {
            // 503: no stream leader took it (nothing stored); anything else is unexpected but not definite.
            if status != 503 {
                tracing::debug!(ticket, status, "publish status {}", String::from_utf8_lossy(description));
            }
            ambiguous = true;
        } else {
            let ack: PubAck = match serde_json::from_slice(message.payload) {
                Ok(ack) => ack,
                Err(error) => return Err(self.protocol_error(format!("bad publish ack: {error}"))),
            };
            match ack.error {
                Some(error) if error.code == 503 => ambiguous = true,
                Some(error) => result = Some(Err(error.to_string())),
                None if ack.seq == 0 || ack.stream != self.config.stream => {
                    return Err(self.protocol_error(format!("publish ack for stream {:?} seq {}", ack.stream, ack.seq)));
                }
                None => result = Some(Ok(Stored { position: ack.seq, duplicate: ack.duplicate })),
            }
        }
        if ambiguous {
            // Short: a new leader is usually elected within seconds and should not wait long.
            let delay_ms = (50u64 << entry.attempts.min(3)).min(u64::from(self.config.reconnect_backoff_max_ms));
            entry.state = SendState::Due(now + Duration::from_millis(delay_ms));
            self.start_resolving("no responders or an unclear reply");
            return Ok(());
        }
        let result = result.expect("an unambiguous reply has a result");
        if result.is_err() {
            // A definite failure also pauses new records until the window drains.
            self.start_resolving("a publish failed");
        }
        self.resolve(ticket, result);
        Ok(())
    }

    /// Stops taking new records until everything in flight resolved (module docs).
    fn start_resolving(&mut self, why: &str) {
        if !self.resolving {
            tracing::info!(in_flight = self.inflight.len(), "resolving publishes in flight before new ones: {why}");
            self.resolving = true;
            self.resolving_since = Some(Instant::now());
        }
    }

    fn resolve(&mut self, ticket: u64, result: Result<Stored, String>) {
        let removed = self.inflight.remove(&ticket);
        assert!(removed.is_some(), "ticket {ticket} resolved twice");
        match &result {
            Ok(stored) => {
                self.stats.stored += 1;
                self.stats.duplicates += u64::from(stored.duplicate);
            }
            Err(reason) => {
                self.stats.failed += 1;
                tracing::warn!(ticket, "publish failed: {reason}");
            }
        }
        self.outcomes.push(PublishOutcome { ticket, result });
        if self.inflight.is_empty() && self.resolving {
            self.resolving = false;
            let since = self.resolving_since.take().map(|since| since.elapsed());
            tracing::info!(?since, "every ambiguous publish resolved; sending new records again");
        }
    }

    fn on_api_reply(
        &mut self,
        conn: &mut Conn,
        id: u64,
        kind: RequestKind,
        message: Option<&Message<'_>>,
        now: Instant,
    ) -> Result<(), End> {
        // None: timed out; a status (503: no responders) counts the same.
        let payload = message.filter(|message| proto::header_status(message.headers).is_none()).map(|m| m.payload);
        let backoff_cap = u64::from(self.config.reconnect_backoff_max_ms);
        match kind {
            RequestKind::StreamCreate | RequestKind::StreamUpdate => {
                let reply = match payload.map(serde_json::from_slice::<StreamReply>) {
                    Some(Ok(reply)) => Some(reply),
                    Some(Err(error)) => return Err(self.protocol_error(format!("bad stream reply: {error}"))),
                    None => None,
                };
                match reply {
                    Some(StreamReply { error: None, state }) => {
                        conn.stream_ready = true;
                        conn.api_failures = 0;
                        conn.api_backoff_ms = 0;
                        self.backoff_ms = 0;
                        if let Some(state) = state {
                            self.bounds = Some((state.first_seq, state.last_seq));
                            // Before this connection publishes anything: a stream that ends
                            // below what was delivered lost its tail (every server crashed).
                            if state.last_seq + 1 < self.next_position {
                                tracing::warn!(
                                    stream_last = state.last_seq,
                                    delivered = self.next_position - 1,
                                    "the stream ends below what was delivered from it: it lost its tail"
                                );
                                self.regressed =
                                    Some(self.regressed.map_or(state.last_seq, |at| at.min(state.last_seq)));
                                self.held_for_repair = true;
                            }
                        }
                        tracing::info!(stream = self.config.stream, bounds = ?self.bounds, "JetStream stream ready");
                    }
                    Some(StreamReply { error: Some(error), .. })
                        if error.err_code == 10058 && matches!(kind, RequestKind::StreamCreate) =>
                    {
                        self.send_stream_request(conn, true, now);
                    }
                    other => {
                        let why = other.and_then(|reply| reply.error).map_or("no reply".into(), |e| e.to_string());
                        tracing::warn!(server = conn.server, "cannot create or update the stream: {why}");
                        conn.api_failures += 1;
                        if conn.api_failures >= API_FAILURES_MAX {
                            return Err(End::Lost("the stream cannot be created through this server".into()));
                        }
                        conn.stream_retry_at = Some(now + conn.next_api_backoff(backoff_cap));
                    }
                }
            }
            RequestKind::StreamInfo { check_start } => match payload.map(serde_json::from_slice::<StreamReply>) {
                Some(Ok(StreamReply { error: None, state: Some(state) })) => {
                    self.bounds = Some((state.first_seq, state.last_seq));
                    if check_start && self.before_start.is_none() {
                        if state.first_seq > self.next_position {
                            self.end_reading(conn, state.first_seq, now);
                        } else {
                            self.recreate_consumer(conn, "the consumer skipped ahead", now);
                        }
                    }
                }
                Some(Err(error)) => return Err(self.protocol_error(format!("bad stream info: {error}"))),
                _ if check_start => self.recreate_consumer(conn, "no stream info to check the start", now),
                _ => tracing::debug!("stream info without an answer"),
            },
            RequestKind::ConsumerCreate => {
                let reply = match payload.map(serde_json::from_slice::<ApiReply>) {
                    Some(Ok(reply)) => Some(reply),
                    Some(Err(error)) => return Err(self.protocol_error(format!("bad consumer reply: {error}"))),
                    None => None,
                };
                let (sid, name) = match conn.consumer {
                    Consumer::Creating { request, sid, ref name } if request == id => (sid, name.clone()),
                    Consumer::Active { create_request: Some(request), .. } if request == id => {
                        // Deliveries came before this reply and activated the consumer.
                        if let Consumer::Active { ref mut create_request, .. } = conn.consumer {
                            *create_request = None;
                        }
                        if let Some(error) = reply.and_then(|reply| reply.error) {
                            self.recreate_consumer(conn, &format!("consumer creation failed: {error}"), now);
                        }
                        return Ok(());
                    }
                    _ => return Ok(()), // a reply for a consumer already replaced
                };
                match reply {
                    Some(ApiReply { error: None, num_pending, .. }) => {
                        if num_pending == Some(0) {
                            // Nothing to deliver: caught up now, not only at the first heartbeat.
                            self.note_caught_up(self.next_position - 1);
                        }
                        self.stats.consumer_recreated += u64::from(self.consumers_created > 0);
                        self.consumers_created += 1;
                        tracing::info!(consumer = name, from = self.next_position, "JetStream consumer created");
                        conn.api_failures = 0;
                        conn.api_backoff_ms = 0;
                        conn.consumer = Consumer::Active {
                            sid,
                            name,
                            create_request: None,
                            last_seen: now,
                            next_consumer_seq: 1,
                            delivered_any: false,
                        };
                    }
                    other => {
                        let why = other.and_then(|reply| reply.error).map_or("no reply".into(), |e| e.to_string());
                        tracing::warn!(server = conn.server, "cannot create the consumer: {why}");
                        conn.api_failures += 1;
                        if conn.api_failures >= API_FAILURES_MAX {
                            return Err(End::Lost("the consumer cannot be created through this server".into()));
                        }
                        let retry_at = now + conn.next_api_backoff(backoff_cap);
                        self.drop_consumer(conn, now);
                        conn.consumer = Consumer::None { retry_at };
                    }
                }
            }
            RequestKind::ConsumerDelete => {}
            RequestKind::Purge(position) => match payload.map(serde_json::from_slice::<ApiReply>) {
                Some(Ok(ApiReply { error: None, purged, .. })) => {
                    self.stats.purges += 1;
                    tracing::info!(below = position, purged, "JetStream stream purged");
                }
                Some(Ok(ApiReply { error: Some(error), .. })) => {
                    tracing::warn!(below = position, "JetStream purge refused: {error}");
                }
                Some(Err(error)) => return Err(self.protocol_error(format!("bad purge reply: {error}"))),
                None => {
                    tracing::warn!(below = position, "JetStream purge unanswered; asking again");
                    self.purge_wanted = Some(self.purge_wanted.map_or(position, |wanted| wanted.max(position)));
                }
            },
        }
        Ok(())
    }

    fn on_delivery(&mut self, conn: &mut Conn, message: &Message<'_>, now: Instant) -> Result<(), End> {
        let Consumer::Active { ref mut last_seen, next_consumer_seq, delivered_any, .. } = conn.consumer else {
            return Ok(());
        };
        *last_seen = now;
        if let Some((status, description)) = proto::header_status(message.headers) {
            if status != 100 {
                let why = format!("consumer status {status} {}", String::from_utf8_lossy(description));
                self.recreate_consumer(conn, &why, now);
                return Ok(());
            }
            if let Some(reply) = message.reply {
                self.answer_flow_control(conn, reply)?;
            }
            if let Some(stalled) = proto::header_value(message.headers, "Nats-Consumer-Stalled") {
                self.answer_flow_control(conn, stalled)?;
            }
            let last_consumer = proto::header_value(message.headers, "Nats-Last-Consumer").and_then(proto::parse_u64);
            let last_stream = proto::header_value(message.headers, "Nats-Last-Stream").and_then(proto::parse_u64);
            if let (Some(last_consumer), Some(last_stream)) = (last_consumer, last_stream) {
                let have = self.next_position - 1;
                if last_consumer != next_consumer_seq - 1 {
                    self.recreate_consumer(conn, "the heartbeat reports deliveries we never got", now);
                } else if last_stream == have {
                    self.note_caught_up(have);
                } else if last_stream > have && !delivered_any {
                    // Started beyond the wanted position with nothing to deliver: purged past
                    // it? The stream's first sequence decides (the reply ends reading or
                    // recreates the consumer).
                    self.drop_consumer(conn, now);
                    conn.consumer = Consumer::None { retry_at: now + Duration::from_secs(3600) };
                    let subject = format!("$JS.API.STREAM.INFO.{}", self.config.stream);
                    let kind = RequestKind::StreamInfo { check_start: true };
                    conn.request(&subject, b"", kind, self.request_timeout, now);
                }
            }
            return Ok(());
        }
        let Some(meta) = message.reply.and_then(proto::parse_ack_subject) else {
            return Err(self.protocol_error("a delivery without a $JS.ACK reply subject".into()));
        };
        if meta.consumer_seq != next_consumer_seq {
            let why = format!("consumer sequence {} where {next_consumer_seq} was next", meta.consumer_seq);
            self.recreate_consumer(conn, &why, now);
            return Ok(());
        }
        if meta.stream_seq != self.next_position {
            if !delivered_any && meta.stream_seq > self.next_position {
                self.end_reading(conn, meta.stream_seq, now);
            } else {
                let why = format!("stream sequence {} where {} was next", meta.stream_seq, self.next_position);
                self.recreate_consumer(conn, &why, now);
            }
            return Ok(());
        }
        if let Consumer::Active { ref mut next_consumer_seq, ref mut delivered_any, .. } = conn.consumer {
            *next_consumer_seq += 1;
            *delivered_any = true;
        }
        self.next_position += 1;
        self.stats.delivered += 1;
        let msg_id = proto::header_value(message.headers, "Nats-Msg-Id").and_then(decode_msg_id);
        let stamped_ms = proto::header_value(message.headers, "Meshos-Time-Ms").and_then(proto::parse_u64);
        self.held_bytes += message.payload.len();
        // Signatures are checked here, on this thread, ahead of the node's fold.
        let verified =
            self.config.verify_cluster_id.map_or(0, |id| crate::fold::verified_sections(message.payload, &id));
        self.held.push_back(OwnedRecord {
            position: meta.stream_seq,
            timestamp_ns: meta.timestamp_ns,
            msg_id,
            stamped_ms,
            payload: message.payload.to_vec(),
            verified,
        });
        if meta.pending == 0 {
            self.note_caught_up(meta.stream_seq);
        }
        Ok(())
    }

    /// The consumer reported nothing pending beyond `position`.
    fn note_caught_up(&mut self, position: u64) {
        self.caught_up_through = Some(self.caught_up_through.map_or(position, |through| through.max(position)));
    }

    /// Answers a flow-control request now, or once the main thread has drained what is held.
    fn answer_flow_control(&mut self, conn: &mut Conn, reply: &[u8]) -> Result<(), End> {
        let Ok(reply) = std::str::from_utf8(reply) else {
            return Err(self.protocol_error("a flow-control subject that is not UTF-8".into()));
        };
        if !proto::is_subject(reply) {
            return Err(self.protocol_error(format!("flow-control subject {reply:?}")));
        }
        if self.held.is_empty() {
            proto::encode_pub(&mut conn.wbuf, reply, None, b"");
        } else {
            conn.fc_deferred = Some(reply.to_string());
        }
        Ok(())
    }

    /// Ends reading for good: the stream starts at `first`, beyond the position wanted.
    fn end_reading(&mut self, conn: &mut Conn, first: u64, now: Instant) {
        tracing::warn!(wanted = self.next_position, first, "the stream was purged past the position wanted");
        self.before_start = Some((self.next_position, first));
        self.drop_consumer(conn, now);
        conn.consumer = Consumer::None { retry_at: now };
    }

    fn recreate_consumer(&mut self, conn: &mut Conn, why: &str, now: Instant) {
        tracing::warn!(from = self.next_position, "recreating the JetStream consumer: {why}");
        self.drop_consumer(conn, now);
        conn.consumer = Consumer::None { retry_at: now };
    }

    /// Unsubscribes and deletes the current consumer (its delete reply is ignored).
    fn drop_consumer(&mut self, conn: &mut Conn, now: Instant) {
        let old = std::mem::replace(&mut conn.consumer, Consumer::None { retry_at: now });
        conn.fc_deferred = None;
        conn.requests.retain(|_, (kind, _)| !matches!(kind, RequestKind::ConsumerCreate));
        if let Consumer::Creating { sid, name, .. } | Consumer::Active { sid, name, .. } = old {
            proto::encode_unsub(&mut conn.wbuf, sid);
            let subject = format!("$JS.API.CONSUMER.DELETE.{}.{name}", self.config.stream);
            conn.request(&subject, b"", RequestKind::ConsumerDelete, self.request_timeout, now);
        }
    }

    fn create_consumer(&mut self, conn: &mut Conn, now: Instant) {
        self.drop_consumer(conn, now);
        self.consumer_generation += 1;
        let name = format!("{}-{}-{}", self.consumer_prefix, self.boot, self.consumer_generation);
        let deliver = format!("{}_d{}", conn.inbox, self.consumer_generation);
        let sid = conn.next_sid;
        conn.next_sid += 1;
        proto::encode_sub(&mut conn.wbuf, &deliver, sid);
        let nanos = |duration: Duration| u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let body = serde_json::json!({
            "stream_name": self.config.stream,
            "config": {
                "name": name,
                "deliver_subject": deliver,
                "deliver_policy": "by_start_sequence",
                "opt_start_seq": self.next_position,
                "ack_policy": "none",
                "max_deliver": 1,
                "replay_policy": "instant",
                "flow_control": true,
                "idle_heartbeat": nanos(self.heartbeat),
                "inactive_threshold": nanos(INACTIVE_THRESHOLD.max(self.heartbeat * 10)),
                "num_replicas": 1,
                "mem_storage": true,
            }
        });
        let subject = format!("$JS.API.CONSUMER.CREATE.{}.{name}", self.config.stream);
        let request =
            conn.request(&subject, body.to_string().as_bytes(), RequestKind::ConsumerCreate, self.request_timeout, now);
        conn.consumer = Consumer::Creating { request, sid, name };
    }

    fn send_stream_request(&mut self, conn: &mut Conn, update: bool, now: Instant) {
        let body = serde_json::json!({
            "name": self.config.stream,
            "subjects": [self.config.subject],
            "retention": "limits",
            "storage": "file",
            "num_replicas": self.config.stream_replicas,
            "duplicate_window": self.config.duplicate_window_ms.saturating_mul(1_000_000),
            "discard": "old",
            "max_msgs": -1,
            "max_bytes": -1,
            "max_age": 0,
            "max_msg_size": -1,
            "deny_delete": true,
            "deny_purge": false,
        });
        let (verb, kind) =
            if update { ("UPDATE", RequestKind::StreamUpdate) } else { ("CREATE", RequestKind::StreamCreate) };
        let subject = format!("$JS.API.STREAM.{verb}.{}", self.config.stream);
        conn.request(&subject, body.to_string().as_bytes(), kind, self.request_timeout, now);
    }

    fn timers(&mut self, conn: &mut Conn, now: Instant) -> Result<(), End> {
        // API requests without an answer.
        while let Some((&id, &(kind, deadline))) = conn.requests.iter().find(|(_, (_, deadline))| *deadline <= now) {
            let _ = deadline;
            conn.requests.remove(&id);
            self.on_api_reply(conn, id, kind, None, now)?;
        }
        if let Some(at) = conn.stream_retry_at.filter(|&at| at <= now) {
            let _ = at;
            conn.stream_retry_at = None;
            self.send_stream_request(conn, false, now);
        }
        if !conn.stream_ready {
            return Ok(());
        }
        // Publishes without an answer become due again, same msg id.
        let mut timed_out = false;
        for entry in self.inflight.values_mut() {
            if let SendState::Sent(at) = entry.state {
                if now.saturating_duration_since(at) >= self.ack_timeout {
                    entry.state = SendState::Due(now);
                    timed_out = true;
                }
            }
        }
        if timed_out {
            self.start_resolving("publish ack timeout");
        }
        let blocked = self.reading_blocked();
        match conn.consumer {
            Consumer::None { retry_at } if retry_at <= now && self.before_start.is_none() => {
                self.create_consumer(conn, now);
            }
            Consumer::Active { ref mut last_seen, .. } if blocked => *last_seen = now,
            Consumer::Active { last_seen, .. } if now.saturating_duration_since(last_seen) > self.heartbeat * 3 => {
                self.recreate_consumer(conn, "3 heartbeats missed", now);
            }
            _ => {}
        }
        if let Some(position) = self.purge_wanted.take() {
            let subject = format!("$JS.API.STREAM.PURGE.{}", self.config.stream);
            let body = serde_json::json!({ "seq": position }).to_string();
            conn.request(&subject, body.as_bytes(), RequestKind::Purge(position), self.request_timeout, now);
        }
        if now >= conn.info_due {
            conn.info_due = now + STREAM_INFO_INTERVAL;
            let subject = format!("$JS.API.STREAM.INFO.{}", self.config.stream);
            conn.request(&subject, b"", RequestKind::StreamInfo { check_start: false }, self.request_timeout, now);
        }
        if now >= conn.ping_due && !blocked {
            if conn.pings_outstanding >= PINGS_OUTSTANDING_MAX {
                return Err(End::Lost(format!("{PINGS_OUTSTANDING_MAX} pings unanswered")));
            }
            conn.ping_due = now + PING_INTERVAL;
            conn.pings_outstanding += 1;
            conn.wbuf.extend_from_slice(b"PING\r\n");
        }
        Ok(())
    }

    /// Exchanges with the main thread: outcomes and records out; stop, purges and new
    /// publishes (only with a ready connection and no ambiguity pending) in.
    fn sync_shared(&mut self, conn: Option<&mut Conn>, now: Instant) {
        let take_room = match &conn {
            Some(conn) if conn.stream_ready && !self.resolving => {
                (self.config.publish_window_max as usize).saturating_sub(self.inflight.len())
            }
            _ => 0,
        };
        let mut notify = !self.outcomes.is_empty();
        {
            let mut shared = self.inner.lock();
            self.stop = shared.stop;
            shared.outcomes.extend(self.outcomes.drain(..));
            let room = (self.config.delivered_queue_max as usize).saturating_sub(shared.records.len());
            for _ in 0..room.min(self.held.len()) {
                let record = self.held.pop_front().expect("counted");
                self.held_bytes -= record.payload.len();
                shared.records.push_back(record);
                notify = true;
            }
            shared.records_blocked = !self.held.is_empty();
            if self.held.is_empty() && shared.before_start.is_none() && self.before_start.is_some() {
                shared.before_start = self.before_start;
                notify = true;
            }
            if shared.caught_up_through != self.caught_up_through {
                shared.caught_up_through = self.caught_up_through;
                notify = true;
            }
            if let Some(position) = shared.purge_wanted.take() {
                self.purge_wanted = Some(self.purge_wanted.map_or(position, |wanted| wanted.max(position)));
            }
            if std::mem::take(&mut shared.resume_publishing) {
                self.held_for_repair = false;
            }
            if self.held_for_repair {
                // The tail given back goes out now, whatever waits before it.
                let mut index = 0;
                while index < shared.queue.len() {
                    if shared.queue[index].expected_last.is_none() {
                        index += 1;
                        continue;
                    }
                    let record = shared.queue.remove(index).expect("in range");
                    let ticket = record.ticket;
                    let previous =
                        self.inflight.insert(ticket, InFlight { record, state: SendState::Due(now), attempts: 0 });
                    assert!(previous.is_none(), "ticket {ticket} queued twice");
                }
            }
            for _ in 0..take_room.min(shared.queue.len()) {
                let record = shared.queue.pop_front().expect("counted");
                let ticket = record.ticket;
                let previous =
                    self.inflight.insert(ticket, InFlight { record, state: SendState::Due(now), attempts: 0 });
                assert!(previous.is_none(), "ticket {ticket} queued twice");
            }
            shared.bounds = self.bounds;
            if let Some(at) = self.regressed.take() {
                shared.regressed = Some(shared.regressed.map_or(at, |seen| seen.min(at)));
                notify = true;
            }
            if shared.stats != self.stats {
                shared.stats.clone_from(&self.stats);
            }
        }
        if notify {
            self.wake.notify();
        }
        if let Some(conn) = conn {
            if self.held.is_empty() {
                if let Some(reply) = conn.fc_deferred.take() {
                    proto::encode_pub(&mut conn.wbuf, &reply, None, b"");
                }
            }
        }
    }

    /// Sends every due record in ticket order, as far as the write buffer allows.
    fn send_due(&mut self, conn: &mut Conn, now: Instant) {
        if !conn.stream_ready {
            return;
        }
        let mut too_large = Vec::new();
        // While resolving, one record at a time in ticket order (stop and wait): a
        // record resent after a 503 must not be stored after a later one that a new
        // leader took first (fold would refuse the earlier as stale).
        let held_for_repair = self.held_for_repair;
        let first = self
            .inflight
            .iter()
            .find(|(_, entry)| !held_for_repair || entry.record.expected_last.is_some())
            .map(|(&ticket, _)| ticket);
        for (&ticket, entry) in self.inflight.iter_mut() {
            if self.resolving && Some(ticket) != first && first.is_some_and(|first| ticket > first) {
                break;
            }
            let SendState::Due(at) = entry.state else { continue };
            if at > now || (self.held_for_repair && entry.record.expected_last.is_none()) {
                continue;
            }
            if conn.unwritten_bytes() > WRITE_BUFFER_BYTES_MAX {
                break;
            }
            let record = &entry.record;
            if record.payload.len() as u64 + HEADER_BYTES_ALLOWANCE > conn.max_payload {
                too_large.push(ticket);
                continue;
            }
            let reply = format!("{}.p{ticket}", conn.inbox);
            let msg_id = crate::event::hex(&record.msg_id);
            let (expected, stamped);
            let mut headers = [("Nats-Msg-Id", msg_id.as_str()), ("", ""), ("", "")];
            let mut count = 1;
            if let Some(last) = record.expected_last {
                expected = last.to_string();
                headers[count] = ("Nats-Expected-Last-Sequence", expected.as_str());
                count += 1;
            }
            if let Some(time_ms) = record.stamped_ms {
                stamped = time_ms.to_string();
                headers[count] = ("Meshos-Time-Ms", stamped.as_str());
                count += 1;
            }
            proto::encode_hpub(&mut conn.wbuf, &self.config.subject, &reply, &headers[..count], &record.payload);
            if entry.attempts == 0 {
                self.stats.published += 1;
            } else {
                self.stats.resent += 1;
            }
            entry.attempts += 1;
            entry.state = SendState::Sent(now);
        }
        for ticket in too_large {
            let reason = format!("record exceeds the server's max_payload {} minus headers", conn.max_payload);
            self.resolve(ticket, Err(reason));
        }
    }
}

/// 32 hex digits to 16 bytes.
fn decode_msg_id(text: &[u8]) -> Option<[u8; 16]> {
    if text.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (byte, pair) in id.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::decode_msg_id;

    #[test]
    fn msg_ids_round_trip_through_hex() {
        let id: [u8; 16] = std::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(decode_msg_id(crate::event::hex(&id).as_bytes()), Some(id));
        assert_eq!(decode_msg_id(b"zz"), None);
        assert_eq!(decode_msg_id(&[b'g'; 32]), None);
    }
}
