//! Golden frames: the exact bytes of a few frames are pinned here, so the wire and
//! log format (frame header and archived events) cannot drift by accident. A change
//! that breaks this test must bump `wire::VERSION` and update the bytes on purpose.

use meshos::event::*;
use meshos::wire::{self, FrameKind};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn frame(kind: FrameKind, seq: u64, time_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_frame(&mut out, kind, seq, time_ms, payload);
    out
}

fn heartbeat_batch() -> EventBatch {
    EventBatch {
        events: vec![Event {
            origin: "node-1".into(),
            origin_seq: 7,
            kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 250 }),
        }],
    }
}

fn mixed_batch() -> EventBatch {
    EventBatch {
        events: vec![
            Event {
                origin: "n2".into(),
                origin_seq: 1,
                kind: EventKind::ReplicaUpdate { blob: [0xab; 32], state: ReplicaState::Healthy },
            },
            Event {
                origin: "n2".into(),
                origin_seq: 2,
                kind: EventKind::Admin(Box::new(meshos::admin::OperatorKey::from_seed([7; 32]).sign(
                    "ops",
                    1,
                    AdminCommand::DropReplicas { node: "n3".into(), blob: None },
                ))),
            },
        ],
    }
}

/// Prints the current bytes, for a deliberate format change (`--nocapture`).
fn show(name: &str, bytes: &[u8]) -> String {
    let text = hex(bytes);
    println!("{name}: {text}");
    text
}

#[test]
fn events_frame_bytes_are_pinned() {
    let payload = wire::encode_batch(&heartbeat_batch());
    let bytes = frame(FrameKind::Events, 1, 0, &payload);
    assert_eq!(show("events", &bytes), GOLDEN_EVENTS);
}

#[test]
fn record_frame_bytes_are_pinned() {
    let payload = wire::encode_batch(&mixed_batch());
    let bytes = frame(FrameKind::Record, 42, 1_767_225_600_000, &payload);
    assert_eq!(show("record", &bytes), GOLDEN_RECORD);
}

#[test]
fn error_frame_bytes_are_pinned() {
    let bytes = frame(FrameKind::Error, 3, 0, b"bad checksum");
    assert_eq!(show("error", &bytes), GOLDEN_ERROR);
}

#[test]
fn ack_frame_bytes_are_pinned() {
    let mut bytes = Vec::new();
    wire::encode_ack(&mut bytes, 9, 1234, 1_767_225_600_000);
    assert_eq!(show("ack", &bytes), GOLDEN_ACK);
    let frame = wire::decode_frame(&bytes, 1 << 20).unwrap();
    assert_eq!((frame.header.kind, frame.header.seq), (FrameKind::Ack, 9));
    assert_eq!(wire::ack_position(frame.payload), Some(1234));
}

#[test]
fn golden_frames_decode_back_to_their_events() {
    for (golden, batch) in [(GOLDEN_EVENTS, heartbeat_batch()), (GOLDEN_RECORD, mixed_batch())] {
        let bytes: Vec<u8> =
            (0..golden.len()).step_by(2).map(|at| u8::from_str_radix(&golden[at..at + 2], 16).unwrap()).collect();
        let frame = wire::decode_frame(&bytes, 1 << 20).unwrap();
        assert_eq!(wire::decode_batch(frame.payload).unwrap(), batch);
    }
}

const GOLDEN_EVENTS: &str = concat!(
    "4d5348460500010048000000ec38f831010000000000000000000000000000006e6f64652d31ffff0700000000000000",
    "030000000000fa0000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "c0ffffff010000000000000000000000",
);
const GOLDEN_RECORD: &str = concat!(
    "4d5348460500020028010000386333ac2a0000000000000000a8da769b0100006f7073ffffffffffea4a6c63e29c520a",
    "bef5507b132ec5f9954776aebebe7b92421eea691446d22c0100000000000000070000006e33ffffffffffff00000000",
    "0000000000000000000000000000000000000000000000000000000000000000cf1ae8a614a424b00e128368206ea7bf",
    "246fafe4a1844c1c834b40990181ff2be20b5b26f8d5cd7265357551f60f11e500801c5fe99860a57441e3893f8bea0b",
    "6e32ffffffffffff010000000000000000ababababababababababababababababababababababababababababababab",
    "ab0200000000000000000000000000006e32ffffffffffff0200000000000000040000000cffffff0000000000000000",
    "000000000000000000000000000000000000000000000000000000000000000080ffffff020000000000000000000000",
);
const GOLDEN_ERROR: &str =
    "4d534846050003000c000000db54ea420300000000000000000000000000000062616420636865636b73756d00000000";
const GOLDEN_ACK: &str =
    "4d53484605000500100000008fb00d80090000000000000000a8da769b010000d2040000000000000000000000000000";
