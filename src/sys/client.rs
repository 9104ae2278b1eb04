//! The blocking client side of the ingest protocol: connect over TCP or a Unix
//! socket, send batches of events as frames (numbered 1, 2, ... per connection), ask
//! for an acknowledgement and wait for it.
//!
//! Over TCP the client first completes the secure channel's handshake
//! (`sys::secure`, stream mode) as a node or an operator identity, and checks that
//! the other end is the node it meant to reach; every byte after it is encrypted
//! both ways. A node that refuses the connection before the handshake (a connection
//! limit) answers with a plain error frame, which the client reports as
//! `ClientError::Rejected` with its text. The Unix socket stays plain: it is the
//! node's own (mode 0600).
//!
//! Invariants: frame numbers strictly increase per connection; an `Ack` for frame n
//! means every frame of this connection up to n is durable in the node's log; an
//! `Error` frame from the node ends the connection and is returned as
//! `ClientError::Rejected` with its text; every call returns a typed error, never panics.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::event::EventBatch;
use crate::sys::secure::{Channel, SecureConfig, SecureError, StreamReceiver, StreamSender};
use crate::wire::{self, FrameKind};

/// The handshake of a TCP connection must finish within this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest reply frame the client accepts (acks and error texts are small).
const REPLY_BYTES_MAX: u32 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("connection to the node failed: {0}")]
    Io(#[from] io::Error),
    #[error("the node rejected the connection: {0}")]
    Rejected(String),
    #[error("the node closed the connection")]
    Closed,
    #[error("the node sent a bad frame: {0}")]
    Frame(#[from] wire::FrameError),
    #[error("no acknowledgement for frame {seq} within {waited_ms} ms")]
    TimedOut { seq: u64, waited_ms: u64 },
    #[error("secure channel to the node: {0}")]
    Secure(#[from] SecureError),
}

/// An acknowledgement: frames up to `seq` are durable, the last at log `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    pub seq: u64,
    pub position: u64,
    pub time_ms: u64,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_read_timeout(timeout),
            Stream::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(stream) => Stream::Tcp(stream.try_clone()?),
            Stream::Unix(stream) => Stream::Unix(stream.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.read(into),
            Stream::Unix(stream) => stream.read(into),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(stream) => stream.write(bytes),
            Stream::Unix(stream) => stream.write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The sending half: frames out.
pub struct Client {
    stream: Stream,
    /// Encrypts what is written (TCP); None on the Unix socket.
    cipher: Option<StreamSender>,
    /// The encrypted bytes of one write.
    sealed: Vec<u8>,
    next_seq: u64,
    frame: Vec<u8>,
    /// Signs batches as a node (TCP clients); None: unsigned sections, which only the
    /// node's Unix socket takes (the node signs them as its own).
    sealer: Option<crate::trust::Sealer>,
}

/// The receiving half: acks and errors in.
pub struct Replies {
    stream: Stream,
    /// Plaintext reply bytes (`..plain_end`), then ciphertext not yet decrypted.
    buffer: Vec<u8>,
    plain_end: usize,
    /// Decrypts what is read (TCP), with the scratch it needs; None on the Unix socket.
    cipher: Option<(StreamReceiver, Vec<u8>)>,
    acked: Ack,
}

impl Client {
    /// Connects over TCP and completes the secure channel as `secure.local`,
    /// requiring the other end to be the node `expect_node` (any admitted node when
    /// None); returns the sending half and the reply half.
    pub fn connect_tcp(
        addr: SocketAddr,
        secure: Arc<SecureConfig>,
        expect_node: Option<&str>,
    ) -> Result<(Client, Replies), ClientError> {
        let connect_error = |source| ClientError::Connect { target: addr.to_string(), source };
        let mut stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(connect_error)?;
        stream.set_nodelay(true)?;
        let parts = handshake(&mut stream, secure, expect_node)?;
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        let (mut client, mut replies) = Client::from_stream(Stream::Tcp(stream))?;
        client.cipher = Some(parts.sender);
        replies.buffer = parts.received;
        replies.cipher = Some((parts.receiver, vec![0u8; 64 << 10]));
        replies.open()?;
        Ok((client, replies))
    }

    /// Connects over the node's Unix socket.
    pub fn connect_unix(path: &Path) -> Result<(Client, Replies), ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { target: path.display().to_string(), source })?;
        Client::from_stream(Stream::Unix(stream))
    }

    fn from_stream(stream: Stream) -> Result<(Client, Replies), ClientError> {
        let replies = Replies {
            stream: stream.try_clone()?,
            buffer: Vec::new(),
            plain_end: 0,
            cipher: None,
            acked: Ack::default(),
        };
        let client = Client { stream, cipher: None, sealed: Vec::new(), next_seq: 1, frame: Vec::new(), sealer: None };
        Ok((client, replies))
    }

    /// Writes `bytes` whole, encrypted on a secure connection.
    fn write_out(
        stream: &mut Stream,
        cipher: &mut Option<StreamSender>,
        sealed: &mut Vec<u8>,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        match cipher {
            Some(cipher) => {
                sealed.clear();
                cipher.seal(bytes, sealed)?;
                stream.write_all(sealed)?;
            }
            None => stream.write_all(bytes)?,
        }
        Ok(())
    }

    /// Signs every batch `send` sends with `sealer` (a node's key: what a TCP port
    /// requires).
    pub fn set_sealer(&mut self, sealer: crate::trust::Sealer) {
        self.sealer = Some(sealer);
    }

    /// Sends `batch` as the next frame (signed with the sealer, or as an unsigned
    /// section without one); with `ack`, the node acknowledges it once durable.
    /// Returns the frame's number.
    pub fn send(&mut self, batch: &EventBatch, ack: bool) -> Result<u64, ClientError> {
        let payload = match &self.sealer {
            Some(sealer) => sealer.seal_batch(batch),
            None => crate::trust::record::unsigned_batch(batch),
        };
        self.send_payload(&payload, ack)
    }

    /// Sends a payload (signed sections) as the next frame.
    pub fn send_payload(&mut self, payload: &[u8], ack: bool) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        let kind = if ack { FrameKind::EventsAckWanted } else { FrameKind::Events };
        self.frame.clear();
        wire::encode_frame(&mut self.frame, kind, seq, 0, payload);
        Client::write_out(&mut self.stream, &mut self.cipher, &mut self.sealed, &self.frame)?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes bytes as they are (pre-built frames from a load generator, or garbage in
    /// tests); the caller keeps the frame numbers right.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        Client::write_out(&mut self.stream, &mut self.cipher, &mut self.sealed, bytes)
    }

    /// The number the next frame sent with `send` gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

impl Replies {
    /// The highest acknowledgement received so far.
    pub fn acked(&self) -> Ack {
        self.acked
    }

    /// Reads the next reply frame: `Ok(ack)` for an acknowledgement, an error for an
    /// error frame or a closed connection. Blocks up to `timeout` (`None`: forever).
    pub fn next_ack(&mut self, timeout: Option<Duration>) -> Result<Ack, ClientError> {
        self.stream.set_read_timeout(timeout)?;
        loop {
            if self.plain_end >= wire::HEADER_BYTES {
                let header = wire::decode_header(&self.buffer[..self.plain_end], REPLY_BYTES_MAX)?;
                let bytes = header.frame_bytes();
                if self.plain_end >= bytes {
                    let frame = wire::decode_frame(&self.buffer[..bytes], REPLY_BYTES_MAX)?;
                    let result = match frame.header.kind {
                        FrameKind::Ack => {
                            let position = wire::ack_position(frame.payload).unwrap_or(0);
                            let ack = Ack { seq: frame.header.seq, position, time_ms: frame.header.time_ms };
                            self.acked = ack.max_by_seq(self.acked);
                            Ok(ack)
                        }
                        FrameKind::Error => Err(ClientError::Rejected(String::from_utf8_lossy(frame.payload).into())),
                        other => Err(ClientError::Rejected(format!("unexpected {other:?} frame from the node"))),
                    };
                    self.buffer.drain(..bytes);
                    self.plain_end -= bytes;
                    return result;
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(count) => {
                    self.buffer.extend_from_slice(&chunk[..count]);
                    self.open()?;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Decrypts what whole frames were read (all of it is plaintext on a plain socket).
    fn open(&mut self) -> Result<(), ClientError> {
        self.plain_end = match &mut self.cipher {
            Some((receiver, scratch)) => receiver.open_in_place(&mut self.buffer, self.plain_end, scratch)?,
            None => self.buffer.len(),
        };
        Ok(())
    }

    /// Waits until frame `seq` (and so every earlier one) is acknowledged.
    pub fn wait_acked(&mut self, seq: u64, timeout: Duration) -> Result<Ack, ClientError> {
        let started = Instant::now();
        while self.acked.seq < seq {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(ClientError::TimedOut { seq, waited_ms: timeout.as_millis() as u64 });
            }
            match self.next_ack(Some(left)) {
                Ok(_) => {}
                Err(ClientError::Io(error))
                    if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(self.acked)
    }
}

impl Ack {
    fn max_by_seq(self, other: Ack) -> Ack {
        if self.seq >= other.seq {
            self
        } else {
            other
        }
    }
}

/// Completes the secure channel's handshake (stream mode) on `stream` as the
/// initiator within [`HANDSHAKE_TIMEOUT`]. A plain error frame in place of the node's
/// first handshake message is its refusal before the handshake (a connection limit):
/// `ClientError::Rejected` with its text.
fn handshake(
    stream: &mut TcpStream,
    secure: Arc<SecureConfig>,
    expect_node: Option<&str>,
) -> Result<crate::sys::secure::StreamParts, ClientError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut channel = Channel::initiator(secure, expect_node)?.for_stream();
    // The first bytes from the node, kept until they tell a handshake message from a
    // plain error frame (whose magic no handshake message starts with).
    let mut first_bytes: Option<Vec<u8>> = Some(Vec::new());
    let mut chunk = [0u8; 4096];
    loop {
        let outgoing = channel.take_outgoing();
        if !outgoing.is_empty() {
            stream.set_write_timeout(Some(
                deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
            ))?;
            stream.write_all(&outgoing)?;
        }
        if channel.is_established() {
            return Ok(channel.into_stream()?);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SecureError::Deadline { deadline_ms: HANDSHAKE_TIMEOUT.as_millis() as u64 }.into());
        }
        stream.set_read_timeout(Some(left))?;
        let count = match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(match first_bytes.as_deref() {
                    Some(bytes) if bytes.starts_with(&wire::MAGIC) => {
                        ClientError::Rejected("the node closed in the middle of its refusal".to_string())
                    }
                    _ => SecureError::BadHandshake("the node closed the connection during the handshake".into()).into(),
                })
            }
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(SecureError::Deadline { deadline_ms: HANDSHAKE_TIMEOUT.as_millis() as u64 }.into())
            }
            Err(error) => return Err(error.into()),
        };
        let Some(mut bytes) = first_bytes.take() else {
            channel.receive(&chunk[..count])?;
            continue;
        };
        bytes.extend_from_slice(&chunk[..count]);
        if bytes.len() < wire::MAGIC.len() {
            first_bytes = Some(bytes);
        } else if bytes.starts_with(&wire::MAGIC) {
            match wire::decode_frame(&bytes, REPLY_BYTES_MAX) {
                Ok(frame) if frame.header.kind == FrameKind::Error => {
                    return Err(ClientError::Rejected(String::from_utf8_lossy(frame.payload).into()))
                }
                Ok(frame) => {
                    return Err(ClientError::Rejected(format!(
                        "unexpected {:?} frame before the handshake",
                        frame.header.kind
                    )))
                }
                Err(wire::FrameError::Truncated { .. }) if bytes.len() < REPLY_BYTES_MAX as usize => {
                    first_bytes = Some(bytes)
                }
                Err(error) => return Err(error.into()),
            }
        } else {
            channel.receive(&bytes)?;
        }
    }
}
