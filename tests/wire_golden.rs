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

/// The cluster id the pinned signatures are made for.
const CLUSTER_ID: [u8; 16] = [0x42; 16];

fn node_batch() -> EventBatch {
    EventBatch {
        events: vec![Event {
            origin: "n2".into(),
            origin_seq: 1,
            kind: EventKind::ReplicaUpdate { blob: [0xab; 32], state: ReplicaState::Healthy },
        }],
    }
}

fn operator_batch() -> EventBatch {
    EventBatch {
        events: vec![Event {
            origin: String::new(),
            origin_seq: 0,
            kind: EventKind::Admin(Box::new(AdminCommand::DropReplicas { node: "n3".into(), blob: None })),
        }],
    }
}

/// A node's section (heartbeat of node-1, signed with its test key).
fn heartbeat_payload() -> Vec<u8> {
    let sealer = meshos::trust::Sealer::node("node-1", meshos::trust::test_key_of("node-1"), CLUSTER_ID);
    sealer.seal_batch(&heartbeat_batch()).to_vec()
}

/// A record of two sections: n2's replica update, then an operator's command
/// (ed25519 signatures are deterministic, so the bytes are fixed).
fn record_payload() -> Vec<u8> {
    let mut out = rkyv::util::AlignedVec::<16>::new();
    let node = meshos::trust::Sealer::node("n2", meshos::trust::test_key_of("n2"), CLUSTER_ID);
    node.seal_into(&mut out, &wire::encode_batch(&node_batch()), 0, &[0; 16]);
    let operator = meshos::trust::Sealer::operator("ops", meshos::admin::OperatorKey::from_seed([7; 32]), CLUSTER_ID);
    operator.seal_into(&mut out, &wire::encode_batch(&operator_batch()), 1_767_225_660_000, &[9; 16]);
    out.to_vec()
}

/// Prints the current bytes, for a deliberate format change (`--nocapture`).
fn show(name: &str, bytes: &[u8]) -> String {
    let text = hex(bytes);
    println!("{name}: {text}");
    text
}

#[test]
fn events_frame_bytes_are_pinned() {
    let bytes = frame(FrameKind::Events, 1, 0, &heartbeat_payload());
    assert_eq!(show("events", &bytes), GOLDEN_EVENTS);
}

#[test]
fn record_frame_bytes_are_pinned() {
    let bytes = frame(FrameKind::Record, 42, 1_767_225_600_000, &record_payload());
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
    let cases = [(GOLDEN_EVENTS, vec![heartbeat_batch()]), (GOLDEN_RECORD, vec![node_batch(), operator_batch()])];
    for (golden, batches) in cases {
        let bytes: Vec<u8> =
            (0..golden.len()).step_by(2).map(|at| u8::from_str_radix(&golden[at..at + 2], 16).unwrap()).collect();
        let frame = wire::decode_frame(&bytes, 1 << 20).unwrap();
        assert_eq!(wire::decode_sections(frame.payload).unwrap(), batches);
        // Every section's signature verifies for the pinned cluster, and for no other.
        for section in meshos::trust::sections(frame.payload) {
            let section = section.unwrap();
            assert!(meshos::trust::record::verify(&section, &CLUSTER_ID));
            assert!(!meshos::trust::record::verify(&section, &[0x43; 16]));
        }
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
