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
    "4d5348460600010020010000ef68e4a7010000000000000000000000000000004d534947010106004800000000000000",
    "0000000000000000000000000000000000000000000000002a3cf1872ac5b0a534303058669c1d4492d9dfcbbfe02e76",
    "5defa3893b77535a6e6f64652d3100000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000000000000000da62d62f055093016c82f3aaa6c651d676ecb9d967da4dbf",
    "be6cdadc08d72b4ec606d8a203e8a9fc5150b1e41e3d08c32f4435d709667337637af3052a079a0b0000000000000000",
    "6e6f64652d31ffff0700000000000000030000000000fa00000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000c0ffffff010000000000000000000000",
);
const GOLDEN_RECORD: &str = concat!(
    "4d53484606000200700200005657e1572a0000000000000000a8da769b0100004d534947010102004800000000000000",
    "0000000000000000000000000000000000000000000000005c26db4ba165bfa604c2d39b52f924a10861ab82e0ce699a",
    "ad8601c81d8f6e4f6e320000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000000000000000000000000000000000000000252d440fc999c8e3545ecfbc437c8ee1dccacf208dcc50f1",
    "bc202b1c1ff07069f0e56547cd3863fa9e99005c3690e24bf5128960d4edb6d5a02f78c2dc3dd70a0000000000000000",
    "6e32ffffffffffff010000000000000000ababababababababababababababababababababababababababababababab",
    "ab020000000000000000000000000000c0ffffff0100000000000000000000004d534947010203007800000000000000",
    "6092db769b01000009090909090909090909090909090909ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92",
    "421eea691446d22c6f707300000000000000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000002249eb2000687cb08d02fc1f75e0808c06b417d5e559475a",
    "66fc36981f835ab6f20a379c47dad7246e24acaa3d2df936a35473a5d1200621b06022fa1a40e60a0000000000000000",
    "070000006e33ffffffffffff000000000000000000000000000000000000000000000000000000000000000000000000",
    "ffffffffffffffff000000000000000004000000bcffffff000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000c0ffffff010000000000000000000000",
);
const GOLDEN_ERROR: &str =
    "4d534846060003000c0000001f98bf160300000000000000000000000000000062616420636865636b73756d00000000";
const GOLDEN_ACK: &str =
    "4d534846060005001000000003f9a1e3090000000000000000a8da769b010000d2040000000000000000000000000000";
