//! The blocking client side of the ingest protocol: connect over TCP or a Unix
//! socket, send batches of events as frames (numbered 1, 2, ... per connection), ask
//! for an acknowledgement and wait for it.
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

use crate::event::EventBatch;
use crate::wire::{self, FrameKind};

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
    next_seq: u64,
    frame: Vec<u8>,
    /// Signs batches as a node (TCP clients); None: unsigned sections, which only the
    /// node's Unix socket takes (the node signs them as its own).
    sealer: Option<crate::trust::Sealer>,
}

/// The receiving half: acks and errors in.
pub struct Replies {
    stream: Stream,
    buffer: Vec<u8>,
    acked: Ack,
}

impl Client {
    /// Connects over TCP; returns the sending half and the reply half.
    pub fn connect_tcp(addr: SocketAddr) -> Result<(Client, Replies), ClientError> {
        let stream =
            TcpStream::connect(addr).map_err(|source| ClientError::Connect { target: addr.to_string(), source })?;
        stream.set_nodelay(true)?;
        Client::from_stream(Stream::Tcp(stream))
    }

    /// Connects over the node's Unix socket.
    pub fn connect_unix(path: &Path) -> Result<(Client, Replies), ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { target: path.display().to_string(), source })?;
        Client::from_stream(Stream::Unix(stream))
    }

    fn from_stream(stream: Stream) -> Result<(Client, Replies), ClientError> {
        let replies = Replies { stream: stream.try_clone()?, buffer: Vec::new(), acked: Ack::default() };
        Ok((Client { stream, next_seq: 1, frame: Vec::new(), sealer: None }, replies))
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
        self.stream.write_all(&self.frame)?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes bytes as they are (pre-built frames from a load generator, or garbage in
    /// tests); the caller keeps the frame numbers right.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
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
            if self.buffer.len() >= wire::HEADER_BYTES {
                let header = wire::decode_header(&self.buffer, REPLY_BYTES_MAX)?;
                let bytes = header.frame_bytes();
                if self.buffer.len() >= bytes {
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
                    return result;
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(count) => self.buffer.extend_from_slice(&chunk[..count]),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error.into()),
            }
        }
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
