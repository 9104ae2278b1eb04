//! The NATS client protocol, as far as the JetStream client needs it: parsing what a
//! server sends (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`), reading
//! message headers and the `$JS.ACK` reply subject of a delivery, and encoding what
//! the client sends (`CONNECT`, `PUB`, `HPUB`, `SUB`, `UNSUB`, `PING`, `PONG`).
//!
//! The parser is incremental and allocation free: [`parse`] looks at the front of a
//! byte buffer and returns either one whole operation borrowing from it plus the
//! number of bytes it used, or `None` when more bytes are needed. It never reads past
//! what one operation needs, so feeding the same bytes split at any point gives the
//! same operations.
//!
//! Invariants: untrusted input never panics the parser; a control line is at most
//! [`CONTROL_LINE_BYTES_MAX`] bytes and a message body at most the caller's
//! `payload_bytes_max`, otherwise the input is refused with a [`ProtoError`] (the
//! caller drops the connection); numbers are checked for overflow; a message's header
//! length never exceeds its total length.

use std::io::Write;

/// The longest control line accepted, CRLF excluded. `INFO` is the longest one a
/// server sends (it lists the cluster's client URLs).
pub const CONTROL_LINE_BYTES_MAX: usize = 64 * 1024;

/// One operation sent by a server, borrowing from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// `INFO {json}`: the JSON text.
    Info(&'a [u8]),
    /// `MSG` or `HMSG`.
    Msg(Message<'a>),
    Ping,
    Pong,
    Ok,
    /// `-ERR 'text'`: the text after `-ERR`, trimmed.
    Err(&'a [u8]),
}

/// A delivered message. `headers` is empty for `MSG`, else the whole header block
/// (`NATS/1.0 ...\r\n` ... `\r\n\r\n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub subject: &'a [u8],
    pub sid: u64,
    pub reply: Option<&'a [u8]>,
    pub headers: &'a [u8],
    pub payload: &'a [u8],
}

/// Input the parser refuses; the connection cannot be trusted after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("control line longer than {CONTROL_LINE_BYTES_MAX} bytes")]
    LineTooLong,
    #[error("unknown operation {0:?}")]
    UnknownOp(String),
    #[error("malformed {op} line {line:?}")]
    Malformed { op: &'static str, line: String },
    #[error("message of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge { bytes: u64, limit: usize },
    #[error("message body not followed by CRLF")]
    MissingCrlf,
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// Parses one operation from the front of `buf`: `Ok(Some((op, bytes used)))`,
/// `Ok(None)` when `buf` holds only part of one, or the reason the input is refused.
pub fn parse(buf: &[u8], payload_bytes_max: usize) -> Result<Option<(ServerOp<'_>, usize)>, ProtoError> {
    let window = &buf[..buf.len().min(CONTROL_LINE_BYTES_MAX + 2)];
    let Some(line_end) = window.windows(2).position(|pair| pair == b"\r\n") else {
        if buf.len() >= CONTROL_LINE_BYTES_MAX + 2 {
            return Err(ProtoError::LineTooLong);
        }
        return Ok(None);
    };
    let line = &buf[..line_end];
    let after_line = line_end + 2;
    let verb_end = line.iter().position(|byte| byte.is_ascii_whitespace()).unwrap_or(line.len());
    let verb = &line[..verb_end];
    let rest = &line[verb_end..];
    let simple = |op| Ok(Some((op, after_line)));
    if verb.eq_ignore_ascii_case(b"PING") && rest.trim_ascii().is_empty() {
        return simple(ServerOp::Ping);
    }
    if verb.eq_ignore_ascii_case(b"PONG") && rest.trim_ascii().is_empty() {
        return simple(ServerOp::Pong);
    }
    if verb.eq_ignore_ascii_case(b"+OK") && rest.trim_ascii().is_empty() {
        return simple(ServerOp::Ok);
    }
    if verb.eq_ignore_ascii_case(b"-ERR") {
        return simple(ServerOp::Err(rest.trim_ascii()));
    }
    if verb.eq_ignore_ascii_case(b"INFO") {
        return simple(ServerOp::Info(rest.trim_ascii()));
    }
    let with_headers = verb.eq_ignore_ascii_case(b"HMSG");
    if !with_headers && !verb.eq_ignore_ascii_case(b"MSG") {
        return Err(ProtoError::UnknownOp(lossy(verb)));
    }
    let op = if with_headers { "HMSG" } else { "MSG" };
    let malformed = || ProtoError::Malformed { op, line: lossy(line) };
    let mut fields: [&[u8]; 5] = [&[]; 5];
    let mut count = 0;
    for field in rest.split(|byte| byte.is_ascii_whitespace()).filter(|field| !field.is_empty()) {
        if count == fields.len() {
            return Err(malformed());
        }
        fields[count] = field;
        count += 1;
    }
    // MSG subject sid [reply] total; HMSG subject sid [reply] header_len total.
    let numbers = if with_headers { 2 } else { 1 };
    if count < 2 + numbers || count > 3 + numbers {
        return Err(malformed());
    }
    let subject = fields[0];
    let sid = parse_u64(fields[1]).ok_or_else(malformed)?;
    let reply = (count == 3 + numbers).then_some(fields[2]);
    let total_bytes = parse_u64(fields[count - 1]).ok_or_else(malformed)?;
    let header_bytes = if with_headers { parse_u64(fields[count - 2]).ok_or_else(malformed)? } else { 0 };
    if header_bytes > total_bytes {
        return Err(malformed());
    }
    if total_bytes > payload_bytes_max as u64 {
        return Err(ProtoError::TooLarge { bytes: total_bytes, limit: payload_bytes_max });
    }
    // Both fit in usize: total_bytes <= payload_bytes_max.
    let (total_bytes, header_bytes) = (total_bytes as usize, header_bytes as usize);
    let needed = after_line + total_bytes + 2;
    if buf.len() < needed {
        return Ok(None);
    }
    let body = &buf[after_line..after_line + total_bytes];
    if &buf[after_line + total_bytes..needed] != b"\r\n" {
        return Err(ProtoError::MissingCrlf);
    }
    let message = Message { subject, sid, reply, headers: &body[..header_bytes], payload: &body[header_bytes..] };
    Ok(Some((ServerOp::Msg(message), needed)))
}

/// A decimal number of ASCII digits that fits in u64 (no sign, no spaces).
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 20 {
        return None;
    }
    let mut value: u64 = 0;
    for &byte in text {
        if !byte.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
    }
    Some(value)
}

/// The status line of a header block: `NATS/1.0 503` gives `(503, "")`,
/// `NATS/1.0 100 Idle Heartbeat` gives `(100, "Idle Heartbeat")`. `None` when the
/// block carries no status (a plain header block or none at all).
pub fn header_status(headers: &[u8]) -> Option<(u16, &[u8])> {
    let first = headers.split(|&byte| byte == b'\n').next()?;
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    let rest = first.strip_prefix(b"NATS/1.0")?.trim_ascii();
    if rest.is_empty() {
        return None;
    }
    let code_end = rest.iter().position(|byte| byte.is_ascii_whitespace()).unwrap_or(rest.len());
    let code = parse_u64(&rest[..code_end]).filter(|&code| code < 1000)?;
    Some((code as u16, rest[code_end..].trim_ascii()))
}

/// The value of header `name` (ASCII case-insensitive), trimmed; the first if repeated.
pub fn header_value<'a>(headers: &'a [u8], name: &str) -> Option<&'a [u8]> {
    headers.split(|&byte| byte == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&byte| byte == b':')?;
        let key = line[..colon].trim_ascii();
        key.eq_ignore_ascii_case(name.as_bytes()).then(|| line[colon + 1..].trim_ascii())
    })
}

/// What the `$JS.ACK` reply subject of a delivered message says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckMeta {
    /// Times the message was delivered (1 for an ordered consumer).
    pub delivered: u64,
    pub stream_seq: u64,
    pub consumer_seq: u64,
    /// The stream leader's wall clock when it stored the message, ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// Messages left in the stream for this consumer after this one.
    pub pending: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (v1,
/// 9 tokens) or `$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.
/// <sseq>.<cseq>.<ts>.<pending>[.<more>]` (v2, 11 or more tokens).
pub fn parse_ack_subject(subject: &[u8]) -> Option<AckMeta> {
    let mut tokens: [&[u8]; 12] = [&[]; 12];
    let mut count = 0;
    for token in subject.split(|&byte| byte == b'.') {
        if count < tokens.len() {
            tokens[count] = token;
        }
        count += 1;
    }
    if count < 2 || tokens[0] != b"$JS" || tokens[1] != b"ACK" {
        return None;
    }
    let first = match count {
        9 => 4,
        11.. => 6,
        _ => return None,
    };
    Some(AckMeta {
        delivered: parse_u64(tokens[first])?,
        stream_seq: parse_u64(tokens[first + 1])?,
        consumer_seq: parse_u64(tokens[first + 2])?,
        timestamp_ns: parse_u64(tokens[first + 3])?,
        pending: parse_u64(tokens[first + 4])?,
    })
}

/// What a server's `INFO` says that the client uses.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ServerInfo {
    #[serde(default)]
    pub server_id: String,
    #[serde(default)]
    pub server_name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub max_payload: u64,
    #[serde(default)]
    pub headers: bool,
    #[serde(default)]
    pub jetstream: bool,
}

/// Appends `CONNECT {json}\r\nPING\r\n`: no echo of verbose `+OK`, headers and
/// no-responders on (a publish nobody takes is answered at once with status 503).
pub fn encode_connect(out: &mut Vec<u8>, name: &str, token: Option<&str>) {
    let mut options = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "headers": true,
        "no_responders": true,
        "protocol": 1,
        "name": name,
        "lang": "rust-meshos",
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(token) = token {
        options["auth_token"] = serde_json::Value::String(token.to_string());
    }
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(options.to_string().as_bytes());
    out.extend_from_slice(b"\r\nPING\r\n");
}

/// Appends `PUB subject [reply] len\r\npayload\r\n`.
pub fn encode_pub(out: &mut Vec<u8>, subject: &str, reply: Option<&str>, payload: &[u8]) {
    debug_assert!(is_subject(subject) && reply.is_none_or(is_subject));
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    if let Some(reply) = reply {
        out.push(b' ');
        out.extend_from_slice(reply.as_bytes());
    }
    let _ = write!(out, " {}\r\n", payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Appends `HPUB subject reply header_len total_len\r\nNATS/1.0\r\nK: V\r\n...\r\n\r\npayload\r\n`.
pub fn encode_hpub(out: &mut Vec<u8>, subject: &str, reply: &str, headers: &[(&str, &str)], payload: &[u8]) {
    debug_assert!(is_subject(subject) && is_subject(reply));
    let header_bytes =
        b"NATS/1.0\r\n".len() + headers.iter().map(|(key, value)| key.len() + 2 + value.len() + 2).sum::<usize>() + 2;
    let _ = write!(out, "HPUB {subject} {reply} {header_bytes} {}\r\nNATS/1.0\r\n", header_bytes + payload.len());
    for (key, value) in headers {
        debug_assert!(!key.contains([':', '\r', '\n']) && !value.contains(['\r', '\n']));
        let _ = write!(out, "{key}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Appends `SUB subject sid\r\n`.
pub fn encode_sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
    debug_assert!(is_subject(subject));
    let _ = write!(out, "SUB {subject} {sid}\r\n");
}

/// Appends `UNSUB sid\r\n`.
pub fn encode_unsub(out: &mut Vec<u8>, sid: u64) {
    let _ = write!(out, "UNSUB {sid}\r\n");
}

/// True for a non-empty subject of printable ASCII without spaces whose tokens are
/// not empty (wildcards allowed).
pub fn is_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.bytes().all(|byte| byte.is_ascii_graphic())
        && subject.split('.').all(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 1 << 20;

    fn parse_all(mut buf: &[u8]) -> Vec<String> {
        let mut ops = Vec::new();
        while let Some((op, used)) = parse(buf, LIMIT).expect("valid input") {
            ops.push(format!("{op:?}"));
            buf = &buf[used..];
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        ops
    }

    #[test]
    fn parses_every_server_operation() {
        let input = b"INFO {\"max_payload\":1048576}\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'Authorization Violation'\r\n\
MSG a.b 7 5\r\nhello\r\nMSG a.b 7 reply.x 0\r\n\r\nHMSG meshos.log 2 $JS.ACK.S.C.1.5.1.17.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        let mut buf = &input[..];
        let mut ops = Vec::new();
        while let Some((op, used)) = parse(buf, LIMIT).unwrap() {
            ops.push(op);
            buf = &buf[used..];
        }
        assert_eq!(ops.len(), 8);
        assert_eq!(ops[0], ServerOp::Info(b"{\"max_payload\":1048576}"));
        assert_eq!(ops[1..4], [ServerOp::Ping, ServerOp::Pong, ServerOp::Ok]);
        assert_eq!(ops[4], ServerOp::Err(b"'Authorization Violation'"));
        assert_eq!(
            ops[5],
            ServerOp::Msg(Message { subject: b"a.b", sid: 7, reply: None, headers: b"", payload: b"hello" })
        );
        assert_eq!(
            ops[6],
            ServerOp::Msg(Message { subject: b"a.b", sid: 7, reply: Some(b"reply.x"), headers: b"", payload: b"" })
        );
        let ServerOp::Msg(message) = ops[7] else { panic!("not a message") };
        assert_eq!(message.headers, b"NATS/1.0\r\n\r\n");
        assert_eq!(message.payload, b"hi");
        assert_eq!(message.reply, Some(&b"$JS.ACK.S.C.1.5.1.17.0"[..]));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(parse(b"HELLO\r\n", LIMIT), Err(ProtoError::UnknownOp(_))));
        assert!(matches!(parse(b"MSG a\r\n", LIMIT), Err(ProtoError::Malformed { .. })));
        assert!(matches!(parse(b"MSG a 1 x\r\n", LIMIT), Err(ProtoError::Malformed { .. })));
        assert!(matches!(parse(b"HMSG a 1 5 3\r\n", LIMIT), Err(ProtoError::Malformed { .. })));
        assert!(matches!(parse(b"MSG a 1 99999999999999999999999\r\n", LIMIT), Err(ProtoError::Malformed { .. })));
        assert!(matches!(parse(b"MSG a 1 2000000\r\n", LIMIT), Err(ProtoError::TooLarge { .. })));
        assert!(matches!(parse(b"MSG a 1 2\r\nabcd", LIMIT), Err(ProtoError::MissingCrlf)));
        assert_eq!(parse(b"MSG a 1 2\r\nab\r", LIMIT), Ok(None));
        assert_eq!(parse(b"PIN", LIMIT), Ok(None));
        let long = vec![b'x'; CONTROL_LINE_BYTES_MAX + 2];
        assert_eq!(parse(&long, LIMIT), Err(ProtoError::LineTooLong));
        assert_eq!(parse(&long[..CONTROL_LINE_BYTES_MAX + 1], LIMIT), Ok(None));
    }

    #[test]
    fn reads_headers_and_status() {
        let heartbeat = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 12\r\nNats-Last-Stream: 40\r\n\r\n";
        assert_eq!(header_status(heartbeat), Some((100, &b"Idle Heartbeat"[..])));
        assert_eq!(header_value(heartbeat, "nats-last-stream"), Some(&b"40"[..]));
        assert_eq!(header_value(heartbeat, "Nats-Consumer-Stalled"), None);
        assert_eq!(header_status(b"NATS/1.0 503\r\n\r\n"), Some((503, &b""[..])));
        assert_eq!(header_status(b"NATS/1.0\r\nNats-Msg-Id: ab\r\n\r\n"), None);
        assert_eq!(header_value(b"NATS/1.0\r\nNats-Msg-Id: ab\r\n\r\n", "Nats-Msg-Id"), Some(&b"ab"[..]));
        assert_eq!(header_status(b""), None);
    }

    #[test]
    fn reads_both_ack_subject_layouts() {
        let v1 = parse_ack_subject(b"$JS.ACK.MESHOS.hLJAB3lY.1.5.1.1795959605767331319.61996").unwrap();
        assert_eq!(
            v1,
            AckMeta {
                delivered: 1,
                stream_seq: 5,
                consumer_seq: 1,
                timestamp_ns: 1_795_959_605_767_331_319,
                pending: 61_996
            }
        );
        let v2 = parse_ack_subject(b"$JS.ACK._.ACCHASH.MESHOS.cons.2.9.3.1795959605767331319.0.rand").unwrap();
        assert_eq!((v2.delivered, v2.stream_seq, v2.consumer_seq, v2.pending), (2, 9, 3, 0));
        let v2 = parse_ack_subject(b"$JS.ACK.dom.ACCHASH.MESHOS.cons.1.9.3.17.4").unwrap();
        assert_eq!((v2.stream_seq, v2.timestamp_ns, v2.pending), (9, 17, 4));
        assert_eq!(parse_ack_subject(b"$JS.ACK.MESHOS.c.1.5.1.17"), None);
        assert_eq!(parse_ack_subject(b"$JS.ACK.MESHOS.c.1.5.1.-17.0"), None);
        assert_eq!(parse_ack_subject(b"$JS.NAK.MESHOS.c.1.5.1.17.0"), None);
        assert_eq!(parse_ack_subject(b""), None);
    }

    #[test]
    fn encodes_what_the_parser_reads() {
        let mut out = Vec::new();
        encode_hpub(&mut out, "meshos.log", "_INBOX.x.p1", &[("Nats-Msg-Id", "00ff")], b"payload");
        assert_eq!(
            out,
            b"HPUB meshos.log _INBOX.x.p1 31 38\r\nNATS/1.0\r\nNats-Msg-Id: 00ff\r\n\r\npayload\r\n".to_vec()
        );
        // The same bytes, as a server would deliver them.
        let delivered = [&b"HMSG meshos.log 3 _INBOX.x.p1"[..], &out[b"HPUB meshos.log _INBOX.x.p1".len()..]].concat();
        let (ServerOp::Msg(message), used) = parse(&delivered, LIMIT).unwrap().unwrap() else { panic!() };
        assert_eq!(used, delivered.len());
        assert_eq!(header_value(message.headers, "Nats-Msg-Id"), Some(&b"00ff"[..]));
        assert_eq!(message.payload, b"payload");
        out.clear();
        encode_pub(&mut out, "$JS.FC.S.c.1", None, b"");
        encode_sub(&mut out, "_INBOX.x.*", 1);
        encode_unsub(&mut out, 1);
        assert_eq!(out, b"PUB $JS.FC.S.c.1 0\r\n\r\nSUB _INBOX.x.* 1\r\nUNSUB 1\r\n".to_vec());
        out.clear();
        encode_connect(&mut out, "node \"1\"", Some("secret"));
        let text = String::from_utf8(out).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text["CONNECT ".len()..text.len() - 8]).unwrap();
        assert_eq!(json["name"], "node \"1\"");
        assert_eq!(json["auth_token"], "secret");
        assert_eq!(json["headers"], true);
        assert_eq!(json["no_responders"], true);
        assert!(text.ends_with("\r\nPING\r\n"));
        assert!(is_subject("_INBOX.a.*") && !is_subject("a..b") && !is_subject("a b") && !is_subject(""));
    }

    fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
        let op = prop_oneof![
            Just(b"PING\r\n".to_vec()),
            Just(b"PONG\r\n".to_vec()),
            Just(b"+OK\r\n".to_vec()),
            Just(b"INFO {\"a\":1}\r\n".to_vec()),
            Just(b"-ERR 'x'\r\n".to_vec()),
            (proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()).prop_map(|(payload, reply)| {
                let mut out = Vec::new();
                encode_pub(&mut out, "a.b", reply.then_some("r.1"), &payload);
                [&b"MSG a.b 9"[..], &out[b"PUB a.b".len()..]].concat()
            }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|payload| {
                let mut out = Vec::new();
                encode_hpub(&mut out, "a.b", "$JS.ACK.S.C.1.2.3.4.5", &[("K", "v")], &payload);
                [&b"HMSG a.b 4"[..], &out[b"HPUB a.b".len()..]].concat()
            }),
        ];
        proptest::collection::vec(op, 0..12).prop_map(|ops| ops.concat())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), limit in 0usize..64) {
            let mut buf = &bytes[..];
            while let Ok(Some((op, used))) = parse(buf, limit) {
                prop_assert!(used > 0 && used <= buf.len());
                if let ServerOp::Msg(message) = op {
                    let _ = header_status(message.headers);
                    let _ = header_value(message.headers, "Nats-Msg-Id");
                    let _ = message.reply.map(parse_ack_subject);
                }
                buf = &buf[used..];
            }
            let _ = parse_ack_subject(&bytes);
            let _ = header_status(&bytes);
            let _ = header_value(&bytes, "k");
        }

        #[test]
        fn split_input_parses_the_same(stream in valid_stream(), split in any::<prop::sample::Index>()) {
            let whole = parse_all(&stream);
            let at = split.index(stream.len() + 1);
            // Feed the first part, take what parses, then append the rest and go on.
            let mut ops = Vec::new();
            let mut buf = stream[..at].to_vec();
            let mut start = 0;
            while let Some((op, used)) = parse(&buf[start..], LIMIT).unwrap() {
                ops.push(format!("{op:?}"));
                start += used;
            }
            buf.extend_from_slice(&stream[at..]);
            ops.extend(parse_all(&buf[start..]));
            prop_assert_eq!(ops, whole);
        }
    }
}
