//! The SDK protocol between a daemon and its node, over the node's SDK Unix socket.
//! Shared by the SDK (the daemon's side) and the node's SDK server, std only.
//!
//! A frame is a little-endian `u32` body length, then the body: one message-type
//! byte and its fields (strings as a `u16` length and UTF-8 bytes, lists as a `u16`
//! count). A daemon sends [`ToNode`] messages; the node answers every request with
//! exactly one `Welcome`, `Ok` or `Rejected`, in order, and may send `Control` frames
//! at any time in between.
//!
//! Invariants: decoding never panics on any byte string and never reads past a body;
//! a body is at most [`FRAME_BYTES_MAX`]; `decode(encode(m)) == m` for every message
//! whose strings fit their limits (the encoder truncates nothing: it refuses).

/// Largest frame body either side sends or accepts.
pub const FRAME_BYTES_MAX: usize = 16 * 1024;
/// Length prefix of a frame.
pub const FRAME_HEADER_BYTES: usize = 4;
/// Longest string field (names, labels, reasons, the token).
pub const STRING_BYTES_MAX: usize = 1024;
/// Most labels one `Capabilities` message carries.
pub const LABELS_MAX: usize = 64;

// The largest fixed message (a welcome with two full strings) always fits a frame.
const _: () = assert!(2 * (STRING_BYTES_MAX + 2) < FRAME_BYTES_MAX);

/// Environment variables the node sets for every daemon it starts.
pub const ENV_SOCKET: &str = "MESHOS_SDK_SOCKET";
pub const ENV_TOKEN: &str = "MESHOS_DAEMON_TOKEN";
pub const ENV_DAEMON: &str = "MESHOS_DAEMON_NAME";
pub const ENV_NODE: &str = "MESHOS_NODE_NAME";

/// A control event the node sends to a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop: finish or hand off work, call `graceful_shutdown`, exit. SIGTERM follows
    /// after half the spec's stop grace, SIGKILL after all of it.
    Shutdown,
    /// The node is about to restart this daemon (its health reports stopped).
    Restart,
    /// The daemon's spec changed in a way that needs no restart: read config again.
    ReloadConfig,
}

/// Daemon to node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToNode {
    /// First message on a connection: the one-time token from `MESHOS_DAEMON_TOKEN`.
    Hello {
        token: String,
    },
    Health {
        healthy: bool,
    },
    /// Load in thousandths of full (values above 1000 are taken as 1000).
    Saturation {
        permille: u16,
    },
    /// Labels this daemon adds to its node's capability set.
    Capabilities {
        labels: Vec<String>,
    },
    /// The daemon is exiting on purpose now (after a `Shutdown`, or on its own).
    ShuttingDown,
}

/// Node to daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToDaemon {
    /// The answer to a `Hello` the node accepted.
    Welcome {
        node: String,
        daemon: String,
    },
    Ok,
    Rejected {
        reason: String,
    },
    Control(Control),
}

/// Bytes that are not a valid frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {bytes} bytes is larger than the limit of {max}")]
    FrameTooLarge { bytes: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("message ends early: {0}")]
    Truncated(&'static str),
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
    #[error("a string field is not UTF-8")]
    NotUtf8,
    #[error("{what} is {got}, above the limit of {max}")]
    TooLong { what: &'static str, got: usize, max: usize },
    #[error("bad value {value} for {what}")]
    BadValue { what: &'static str, value: u8 },
}

const HELLO: u8 = 1;
const HEALTH: u8 = 2;
const SATURATION: u8 = 3;
const CAPABILITIES: u8 = 4;
const SHUTTING_DOWN: u8 = 5;
const WELCOME: u8 = 128;
const OK: u8 = 129;
const REJECTED: u8 = 130;
const CONTROL: u8 = 131;

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn string(&mut self, what: &'static str, text: &str) -> Result<(), ProtoError> {
        if text.len() > STRING_BYTES_MAX {
            return Err(ProtoError::TooLong { what, got: text.len(), max: STRING_BYTES_MAX });
        }
        self.out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        self.out.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

/// Appends one framed message to `out`.
fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Writer) -> Result<(), ProtoError>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let written = body(&mut Writer { out });
    let bytes = out.len() - start - FRAME_HEADER_BYTES;
    let result = written.and(if bytes > FRAME_BYTES_MAX {
        Err(ProtoError::FrameTooLarge { bytes, max: FRAME_BYTES_MAX })
    } else {
        Ok(())
    });
    match result {
        Ok(()) => {
            out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&(bytes as u32).to_le_bytes());
            Ok(())
        }
        Err(error) => {
            out.truncate(start);
            Err(error)
        }
    }
}

/// Appends `message` as one frame; on error `out` is unchanged.
pub fn encode_to_node(message: &ToNode, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    frame(out, |writer| {
        match message {
            ToNode::Hello { token } => {
                writer.out.push(HELLO);
                writer.string("token", token)?;
            }
            ToNode::Health { healthy } => writer.out.extend_from_slice(&[HEALTH, *healthy as u8]),
            ToNode::Saturation { permille } => {
                writer.out.push(SATURATION);
                writer.out.extend_from_slice(&permille.to_le_bytes());
            }
            ToNode::Capabilities { labels } => {
                if labels.len() > LABELS_MAX {
                    return Err(ProtoError::TooLong { what: "labels", got: labels.len(), max: LABELS_MAX });
                }
                writer.out.push(CAPABILITIES);
                writer.out.extend_from_slice(&(labels.len() as u16).to_le_bytes());
                for label in labels {
                    writer.string("label", label)?;
                }
            }
            ToNode::ShuttingDown => writer.out.push(SHUTTING_DOWN),
        }
        Ok(())
    })
}

/// Appends `message` as one frame; on error `out` is unchanged.
pub fn encode_to_daemon(message: &ToDaemon, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    frame(out, |writer| {
        match message {
            ToDaemon::Welcome { node, daemon } => {
                writer.out.push(WELCOME);
                writer.string("node", node)?;
                writer.string("daemon", daemon)?;
            }
            ToDaemon::Ok => writer.out.push(OK),
            ToDaemon::Rejected { reason } => {
                writer.out.push(REJECTED);
                writer.string("reason", reason)?;
            }
            ToDaemon::Control(control) => {
                let code = match control {
                    Control::Shutdown => 1,
                    Control::Restart => 2,
                    Control::ReloadConfig => 3,
                };
                writer.out.extend_from_slice(&[CONTROL, code]);
            }
        }
        Ok(())
    })
}

/// Finds the first complete frame in `buffer`: `Ok(Some((body, consumed)))`, or
/// `Ok(None)` when more bytes are needed.
pub fn split_frame(buffer: &[u8]) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let Some(header) = buffer.get(..FRAME_HEADER_BYTES) else { return Ok(None) };
    let bytes = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
    if bytes > FRAME_BYTES_MAX {
        return Err(ProtoError::FrameTooLarge { bytes, max: FRAME_BYTES_MAX });
    }
    let end = FRAME_HEADER_BYTES + bytes;
    Ok(buffer.get(FRAME_HEADER_BYTES..end).map(|body| (body, end)))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, count: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < count {
            return Err(ProtoError::Truncated(what));
        }
        let (head, tail) = self.rest.split_at(count);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.bytes(2, what)?.try_into().expect("2 bytes")))
    }

    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let bytes = self.u16(what)? as usize;
        if bytes > STRING_BYTES_MAX {
            return Err(ProtoError::TooLong { what, got: bytes, max: STRING_BYTES_MAX });
        }
        let text = std::str::from_utf8(self.bytes(bytes, what)?).map_err(|_| ProtoError::NotUtf8)?;
        Ok(text.to_string())
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, ProtoError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ProtoError::BadValue { what, value }),
        }
    }

    fn finish<T>(self, message: T) -> Result<T, ProtoError> {
        if !self.rest.is_empty() {
            return Err(ProtoError::TrailingBytes(self.rest.len()));
        }
        Ok(message)
    }
}

/// Decodes one frame body sent by a daemon.
pub fn decode_to_node(body: &[u8]) -> Result<ToNode, ProtoError> {
    let (&kind, rest) = body.split_first().ok_or(ProtoError::Empty)?;
    let mut reader = Reader { rest };
    let message = match kind {
        HELLO => ToNode::Hello { token: reader.string("token")? },
        HEALTH => ToNode::Health { healthy: reader.bool("healthy")? },
        SATURATION => ToNode::Saturation { permille: reader.u16("permille")? },
        CAPABILITIES => {
            let count = reader.u16("label count")? as usize;
            if count > LABELS_MAX {
                return Err(ProtoError::TooLong { what: "labels", got: count, max: LABELS_MAX });
            }
            let mut labels = Vec::with_capacity(count);
            for _ in 0..count {
                labels.push(reader.string("label")?);
            }
            ToNode::Capabilities { labels }
        }
        SHUTTING_DOWN => ToNode::ShuttingDown,
        other => return Err(ProtoError::UnknownType(other)),
    };
    reader.finish(message)
}

/// Decodes one frame body sent by the node.
pub fn decode_to_daemon(body: &[u8]) -> Result<ToDaemon, ProtoError> {
    let (&kind, rest) = body.split_first().ok_or(ProtoError::Empty)?;
    let mut reader = Reader { rest };
    let message = match kind {
        WELCOME => ToDaemon::Welcome { node: reader.string("node")?, daemon: reader.string("daemon")? },
        OK => ToDaemon::Ok,
        REJECTED => ToDaemon::Rejected { reason: reader.string("reason")? },
        CONTROL => ToDaemon::Control(match reader.u8("control")? {
            1 => Control::Shutdown,
            2 => Control::Restart,
            3 => Control::ReloadConfig,
            value => return Err(ProtoError::BadValue { what: "control", value }),
        }),
        other => return Err(ProtoError::UnknownType(other)),
    };
    reader.finish(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_to_node(message: ToNode) {
        let mut out = Vec::new();
        encode_to_node(&message, &mut out).expect("encodes");
        let (body, consumed) = split_frame(&out).expect("valid").expect("complete");
        assert_eq!(consumed, out.len());
        assert_eq!(decode_to_node(body), Ok(message));
    }

    #[test]
    fn every_message_round_trips() {
        round_trip_to_node(ToNode::Hello { token: "00ff".into() });
        round_trip_to_node(ToNode::Health { healthy: true });
        round_trip_to_node(ToNode::Saturation { permille: 750 });
        round_trip_to_node(ToNode::Capabilities { labels: vec!["gpu".into(), "ssd".into()] });
        round_trip_to_node(ToNode::ShuttingDown);
        for message in [
            ToDaemon::Welcome { node: "n".into(), daemon: "d".into() },
            ToDaemon::Ok,
            ToDaemon::Rejected { reason: "no".into() },
            ToDaemon::Control(Control::Shutdown),
            ToDaemon::Control(Control::Restart),
            ToDaemon::Control(Control::ReloadConfig),
        ] {
            let mut out = Vec::new();
            encode_to_daemon(&message, &mut out).expect("encodes");
            let (body, _) = split_frame(&out).expect("valid").expect("complete");
            assert_eq!(decode_to_daemon(body), Ok(message));
        }
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert_eq!(decode_to_node(&[]), Err(ProtoError::Empty));
        assert_eq!(decode_to_node(&[99]), Err(ProtoError::UnknownType(99)));
        assert_eq!(decode_to_node(&[HEALTH, 2]), Err(ProtoError::BadValue { what: "healthy", value: 2 }));
        assert_eq!(decode_to_node(&[HEALTH, 1, 0]), Err(ProtoError::TrailingBytes(1)));
        assert_eq!(decode_to_node(&[HELLO, 5, 0, b'a']), Err(ProtoError::Truncated("token")));
        assert_eq!(decode_to_node(&[HELLO, 1, 0, 0xff]), Err(ProtoError::NotUtf8));
        assert_eq!(decode_to_daemon(&[CONTROL, 9]), Err(ProtoError::BadValue { what: "control", value: 9 }));
        let huge = (FRAME_BYTES_MAX as u32 + 1).to_le_bytes();
        assert!(matches!(split_frame(&huge), Err(ProtoError::FrameTooLarge { .. })));
        assert_eq!(split_frame(&[3, 0, 0, 0, 1]), Ok(None));
        // Every prefix and every single-byte corruption of a valid frame decodes or errs.
        let mut out = Vec::new();
        encode_to_node(&ToNode::Capabilities { labels: vec!["a".into(), "bc".into()] }, &mut out).expect("encodes");
        for cut in 0..out.len() {
            let _ = split_frame(&out[..cut]).map(|frame| frame.map(|(body, _)| decode_to_node(body)));
        }
        for index in FRAME_HEADER_BYTES..out.len() {
            for value in [0u8, 1, 0x7f, 0xff] {
                let mut bad = out.clone();
                bad[index] = value;
                let _ = decode_to_node(&bad[FRAME_HEADER_BYTES..]);
            }
        }
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let mut out = vec![7];
        let long = "x".repeat(STRING_BYTES_MAX + 1);
        assert!(encode_to_node(&ToNode::Hello { token: long }, &mut out).is_err());
        let many = vec!["l".to_string(); LABELS_MAX + 1];
        assert!(encode_to_node(&ToNode::Capabilities { labels: many }, &mut out).is_err());
        assert_eq!(out, vec![7], "a refused message leaves the buffer as it was");
    }
}
