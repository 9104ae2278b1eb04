//! Fold: determinism, every event kind applied, every contradiction rejected with its
//! reason (table-driven), and random or mutated input never panicking fold or decoder.

mod common;

use common::*;
use meshos::config::{Config, FoldLimits};
use meshos::event::*;
use meshos::fold::fold_payload;
use meshos::state::daemons::DaemonState;
use meshos::state::nodes::MaintenanceState;
use meshos::state::State;
use meshos::wire;
use proptest::prelude::*;

const BLOB: BlobHash = [7; 32];
const OTHER_BLOB: BlobHash = [9; 32];

fn spec(name: &str) -> DaemonSpec {
    DaemonSpec {
        working_dir: "/".into(),
        health_timeout_ms: 1000,
        stop_grace_ms: 100,
        ..DaemonSpec::new(name, "/bin/true")
    }
}

/// Two nodes, the keyring's genesis, one blob with intent, one daemon spec: the base
/// of most cases.
fn base() -> Vec<Event> {
    vec![
        capability("a", 1, 1, 0, "z1"),
        genesis("a", 2),
        heartbeat("b", 1),
        event("a", 3, EventKind::BlobAnnounce { blob: BLOB, size_bytes: 10 }),
        event(
            "a",
            4,
            EventKind::PlacementIntent(PlacementIntent {
                blob: BLOB,
                replicas: 2,
                zone_spread: true,
                pinned: vec!["b".into()],
            }),
        ),
        event("a", 5, EventKind::DaemonIntent { spec: Box::new(spec("web")), runs_on: DaemonPlacement::AllNodes }),
    ]
}

fn with(extra: Vec<Event>) -> Vec<Event> {
    let mut events = base();
    events.extend(extra);
    events
}

#[test]
fn base_applies_every_kind_without_rejection() {
    let state = fold_events(&with(vec![
        event("b", 2, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Healthy }),
        event("a", 6, EventKind::Rtt { peer: "b".into(), rtt_us: 800 }),
        event("a", 7, EventKind::Rtt { peer: "b".into(), rtt_us: 1600 }),
        event("b", 3, EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 42 } }),
        event("b", 4, EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Registered { pid: 42 } }),
        event("b", 5, EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Saturation { permille: 900 } }),
        event("b", 6, EventKind::InventoryDigest { blob_count: 1, digest: [1; 16] }),
        admin("a", 8, AdminCommand::EnterMaintenance { node: "b".into() }),
        admin("a", 9, AdminCommand::Drain { node: "b".into() }),
        admin("a", 10, AdminCommand::DropReplicas { node: "b".into(), blob: None }),
        admin("a", 11, AdminCommand::InvalidatePlacement { blob: None }),
        event("b", 7, EventKind::NodeHealth(NodeHealth::Status { node: "b".into(), status: NodeStatus::Down })),
        heartbeat("b", 8),
        capability("a", 13, 2, 1, "z2"),
    ]));
    assert_eq!(rejection_names(&state), Vec::<&str>::new(), "{:?}", state.rejections.kept);
    state.check_invariants();
    assert_eq!(state.nodes.len(), 2);
    assert_eq!(state.blobs.healthy_count[0], 1);
    assert_eq!(state.blobs.pinned[0].len(), 1);
    assert_eq!(state.replicas.live, 1);
    assert!(state.replicas.drop_requested[0]);
    assert_eq!(state.rtt.average_us[0], 800 + (1600 - 800) / 8);
    assert_eq!(state.daemons.state[0], DaemonState::Registered);
    assert_eq!(state.daemons.saturation_permille[0], 900);
    let b = state.nodes.find("b").unwrap().index();
    assert_eq!(state.nodes.maintenance[b], MaintenanceState::EnteringMaintenance);
    assert!(state.nodes.cordoned[b] && state.nodes.draining[b]);
    assert_eq!(state.nodes.incarnation[b], 1, "down then heartbeat is a new incarnation");
    assert_eq!(state.nodes.inventory_blob_count[b], 1);
    assert_eq!(state.nodes.capability_version[0], 2);
    assert_eq!(state.symbols.name(state.nodes.zone[0]), "z2");
    assert_eq!(state.placement_epoch, 1);
    // Every event, and the admissions of a and b the test sealer put in front.
    assert_eq!(state.keyring.identities(), 2);
    assert_eq!(state.events_applied, 20 + 2);
}

/// Each case: extra events after `base()` and the rejection reasons they must produce.
#[test]
fn contradictions_are_rejected_with_their_reason() {
    let daemon = |seq, signal| event("b", seq, EventKind::Daemon { daemon: "web".into(), signal });
    let cases: Vec<(&str, Vec<Event>, Vec<&str>)> = vec![
        ("unknown origin", vec![event("z", 1, EventKind::Rtt { peer: "a".into(), rtt_us: 1 })], vec!["unknown_origin"]),
        ("duplicate origin seq", vec![heartbeat("b", 1)], vec!["stale_origin_seq"]),
        ("reordered origin seq", vec![heartbeat("a", 10), heartbeat("a", 9)], vec!["stale_origin_seq"]),
        (
            "replica of unknown blob",
            vec![event("b", 2, EventKind::ReplicaUpdate { blob: OTHER_BLOB, state: ReplicaState::Healthy })],
            vec!["unknown_blob"],
        ),
        (
            "delete of a replica never held",
            vec![event("b", 2, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Deleted })],
            vec!["unknown_replica"],
        ),
        (
            "blob size changes",
            vec![event("b", 2, EventKind::BlobAnnounce { blob: BLOB, size_bytes: 11 })],
            vec!["blob_size_mismatch"],
        ),
        (
            "rtt to unknown peer",
            vec![event("a", 6, EventKind::Rtt { peer: "q".into(), rtt_us: 1 })],
            vec!["unknown_node"],
        ),
        ("rtt to self", vec![event("a", 6, EventKind::Rtt { peer: "a".into(), rtt_us: 1 })], vec!["rtt_to_self"]),
        (
            "commitment beyond the log",
            vec![event("a", 6, EventKind::Commitment { position: 2, state_hash: [1; 16], needs_position: 0 })],
            vec!["bad_commitment"],
        ),
        (
            "commitment that does not move forward",
            vec![
                event("a", 6, EventKind::Commitment { position: 1, state_hash: [1; 16], needs_position: 0 }),
                event("a", 7, EventKind::Commitment { position: 1, state_hash: [2; 16], needs_position: 0 }),
            ],
            vec!["bad_commitment"],
        ),
        (
            "outcome of no action",
            vec![event(
                "a",
                6,
                EventKind::ActionOutcome { action: ActionId { position: 1, index: 0 }, outcome: Outcome::Success },
            )],
            vec!["unknown_action"],
        ),
        (
            "unknown daemon",
            vec![event("b", 2, EventKind::Daemon { daemon: "db".into(), signal: DaemonSignal::Started { pid: 1 } })],
            vec!["unknown_daemon"],
        ),
        (
            "health of a daemon never started",
            vec![daemon(2, DaemonSignal::Health { healthy: true })],
            vec!["daemon_not_running"],
        ),
        (
            "started twice",
            vec![daemon(2, DaemonSignal::Started { pid: 1 }), daemon(3, DaemonSignal::Started { pid: 2 })],
            vec!["daemon_already_running"],
        ),
        (
            "registered with another pid",
            vec![daemon(2, DaemonSignal::Started { pid: 1 }), daemon(3, DaemonSignal::Registered { pid: 2 })],
            vec!["pid_mismatch"],
        ),
        (
            "exit after crash",
            vec![
                daemon(2, DaemonSignal::Started { pid: 1 }),
                daemon(3, DaemonSignal::Crashed { signal: 9 }),
                daemon(4, DaemonSignal::Exited { code: 0 }),
            ],
            vec!["daemon_not_running"],
        ),
        (
            "capability fork from the wrong version",
            vec![capability("a", 6, 3, 2, "z1")],
            vec!["capability_fork_mismatch"],
        ),
        ("first capability must fork from 0", vec![capability("c", 1, 2, 1, "z1")], vec!["capability_fork_mismatch"]),
        // The same version with other contents is a fork of the wrong version; the very
        // same capability again (a resent publication) is not (`a_resent_capability...`).
        (
            "capability version reused with another zone",
            vec![capability("a", 6, 1, 0, "z9")],
            vec!["capability_fork_mismatch"],
        ),
        (
            "exit maintenance while active",
            vec![admin("a", 6, AdminCommand::ExitMaintenance { node: "b".into() })],
            vec!["not_in_maintenance"],
        ),
        ("admin on unknown node", vec![admin("a", 6, AdminCommand::Cordon { node: "q".into() })], vec!["unknown_node"]),
        (
            "status of unknown node",
            vec![event(
                "a",
                6,
                EventKind::NodeHealth(NodeHealth::Status { node: "q".into(), status: NodeStatus::Down }),
            )],
            vec!["unknown_node"],
        ),
        (
            "pinned more than replicas",
            vec![event(
                "a",
                6,
                EventKind::PlacementIntent(PlacementIntent {
                    blob: BLOB,
                    replicas: 1,
                    zone_spread: false,
                    pinned: vec!["a".into(), "b".into()],
                }),
            )],
            vec!["invalid_intent"],
        ),
        // A name outside the node name rule is never admitted, so nothing it signs folds.
        ("node name with a newline", vec![heartbeat("n\nx", 1)], vec!["node_not_admitted"]),
        (
            "a node reporting another node's status",
            vec![event(
                "a",
                6,
                EventKind::NodeHealth(NodeHealth::Status { node: "b".into(), status: NodeStatus::Down }),
            )],
            vec!["status_of_another_node"],
        ),
        ("an origin sequence far past the last", vec![heartbeat("b", 1 << 40)], vec!["origin_seq_jump"]),
        (
            "key rotation skipping a version",
            vec![admin("a", 6, AdminCommand::SetKeyring { version: 3, keys: vec![operator_key().public_key()] })],
            vec!["stale_keyring_version"],
        ),
        (
            "key rotation to an empty keyring",
            vec![admin("a", 6, AdminCommand::SetKeyring { version: 2, keys: vec![] })],
            vec!["invalid_keyring"],
        ),
        (
            "drop of a blob's only healthy copy",
            vec![
                event("b", 2, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Healthy }),
                admin("a", 6, AdminCommand::DropReplicas { node: "b".into(), blob: Some(BLOB) }),
            ],
            vec!["would_drop_last_copy"],
        ),
        (
            "empty daemon command",
            vec![event(
                "a",
                6,
                EventKind::DaemonIntent {
                    spec: Box::new(DaemonSpec { command: String::new(), ..spec("x") }),
                    runs_on: DaemonPlacement::AllNodes,
                },
            )],
            vec!["invalid_intent"],
        ),
    ];
    for (name, extra, expected) in cases {
        let state = fold_events(&with(extra));
        assert_eq!(rejection_names(&state), expected, "case `{name}`: {:?}", state.rejections.kept);
        assert_eq!(state.rejections.total, expected.len() as u64, "case `{name}`");
        let message = state.rejections.kept.back().unwrap().to_string();
        assert!(message.starts_with("record 1"), "case `{name}`: {message}");
    }
}

/// A node's capability published twice (its publisher resends one that has not shown
/// in the log within 10 s, as across a NATS failover; `tests/cluster.rs` caught it):
/// the copy changes nothing and is not a rejection.
#[test]
fn a_resent_capability_is_applied_as_a_no_op() {
    let before = fold_events(&base());
    let state = fold_events(&with(vec![capability("a", 6, 1, 0, "z1")]));
    assert_eq!(rejection_names(&state), Vec::<&str>::new());
    let a = state.nodes.find("a").unwrap().index();
    assert_eq!(state.nodes.capability_version[a], 1);
    assert_eq!(state.nodes.zone[a], before.nodes.zone[a]);
    assert_eq!(state.nodes.labels[a], before.nodes.labels[a]);
}

#[test]
fn commitments_are_kept_per_node_and_hashed() {
    let mut state = State::new(&Config::for_tests());
    let commit = |seq, position, hash| {
        event("a", seq, EventKind::Commitment { position, state_hash: [hash; 16], needs_position: position })
    };
    fold_batches(&mut state, &[base(), vec![heartbeat("b", 2)], vec![commit(6, 2, 9)]]);
    assert_eq!(rejection_names(&state), Vec::<&str>::new());
    let a = state.nodes.find("a").unwrap().index();
    let b = state.nodes.find("b").unwrap().index();
    assert_eq!((state.nodes.commitment_position[a], state.nodes.commitment_hash[a]), (2, [9; 16]));
    assert_eq!((state.nodes.needs_position[a], state.nodes.commitment_position[b]), (2, 0));
    let mut other = State::new(&Config::for_tests());
    fold_batches(&mut other, &[base(), vec![heartbeat("b", 2)], vec![commit(6, 2, 8)]]);
    assert_ne!(state.state_hash(), other.state_hash(), "the committed hash is part of the state");
}

#[test]
fn rejected_events_change_nothing_but_the_rejection_count() {
    let before = fold_events(&base());
    let after = fold_events(&with(vec![event(
        "b",
        2,
        EventKind::ReplicaUpdate { blob: OTHER_BLOB, state: ReplicaState::Healthy },
    )]));
    assert_eq!(after.replicas.len(), before.replicas.len());
    assert_eq!(after.nodes.origin_seq_last, before.nodes.origin_seq_last);
    assert_eq!(after.events_applied, before.events_applied);
}

#[test]
fn a_bad_payload_is_rejected_whole_and_counted() {
    let mut state = State::new(&Config::for_tests());
    let mut garbage = rkyv::util::AlignedVec::<16>::new();
    garbage.extend_from_slice(&[0xAB; 64]);
    fold_payload(&mut state, 1, 5, &garbage);
    assert_eq!(rejection_names(&state), vec!["bad_section"]);
    assert_eq!((state.position, state.now_ms), (1, 5));
    // A well-formed signed section whose body is not an archived batch: bad_payload.
    let sealer = meshos::trust::Sealer::node("a", meshos::trust::test_key_of("a"), state.keyring.cluster_id);
    let mut section = rkyv::util::AlignedVec::<16>::new();
    sealer.seal_into(&mut section, &[0xAB; 64], 0, &[0; 16]);
    fold_batches(&mut state, &[vec![heartbeat("a", 1)]]);
    fold_payload(&mut state, 3, 6, &section);
    assert_eq!(rejection_names(&state), vec!["bad_section", "bad_payload"]);
}

#[test]
fn rejections_ring_is_bounded_but_all_are_counted() {
    let config = Config { fold: FoldLimits { rejections_kept_max: 4, ..FoldLimits::default() }, ..Config::for_tests() };
    let mut state = State::new(&config);
    let events: Vec<Event> =
        (1..=10).map(|seq| event("ghost", seq, EventKind::Rtt { peer: "x".into(), rtt_us: 1 })).collect();
    fold_batches(&mut state, &[events]);
    assert_eq!(state.rejections.total, 10);
    assert_eq!(state.rejections.kept.len(), 4);
    assert_eq!(state.rejections.kept.front().unwrap().origin_seq, 7, "oldest dropped first");
}

#[test]
fn full_tables_reject_instead_of_growing() {
    let config = Config { fold: FoldLimits { nodes_max: 2, ..FoldLimits::default() }, ..Config::for_tests() };
    let mut state = State::new(&config);
    fold_batches(&mut state, &[vec![heartbeat("a", 1), heartbeat("b", 1), heartbeat("c", 1)]]);
    assert_eq!(state.nodes.len(), 2);
    // The identity table (bounded by nodes_max too) is full first: c is never admitted.
    assert_eq!(rejection_names(&state), vec!["table_full", "node_not_admitted"]);
}

#[test]
fn generated_cluster_folds_without_rejections() {
    let records = generate(small_options(1));
    let state = fold_generated(&records);
    state.check_invariants();
    assert_eq!(state.rejections.total, 0, "{:?}", state.rejections.kept.iter().take(5).collect::<Vec<_>>());
    assert_eq!(state.events_applied, 20_000 + 12, "every event and the 12 admissions");
    assert_eq!(state.nodes.len(), 12);
    assert_eq!(state.blobs.len(), 200);
    assert!(state.daemons.running > 0 && !state.rtt.is_empty());
}

#[test]
fn replay_is_deterministic_whole_or_in_pieces() {
    let records = generate(small_options(5));
    let whole = fold_generated(&records).state_hash();
    assert_eq!(whole, fold_generated(&records).state_hash(), "same log, same hash");
    assert_eq!(whole, fold_generated(&generate(small_options(5))).state_hash(), "same seed, same log");
    assert_ne!(whole, fold_generated(&generate(small_options(6))).state_hash(), "other seed, other state");
    for split in [1, records.len() / 3, records.len() - 1] {
        let mut state = State::new(&Config::for_tests());
        for (index, (time_ms, payload)) in records[..split].iter().enumerate() {
            fold_payload(&mut state, index as u64 + 1, *time_ms, payload);
        }
        let mut resumed = state.clone();
        for (index, (time_ms, payload)) in records.iter().enumerate().skip(split) {
            fold_payload(&mut resumed, index as u64 + 1, *time_ms, payload);
        }
        assert_eq!(resumed.state_hash(), whole, "split at record {split}");
    }
}

#[test]
fn state_hash_sees_every_table() {
    let base_hash = fold_events(&base()).state_hash();
    let one_more = fold_events(&with(vec![heartbeat("b", 2)])).state_hash();
    let one_rejected = fold_events(&with(vec![heartbeat("b", 1)])).state_hash();
    assert_ne!(base_hash, one_more);
    assert_ne!(base_hash, one_rejected);
    assert_ne!(one_more, one_rejected);
}

fn arbitrary_kind() -> impl Strategy<Value = EventKind> {
    let name = prop::sample::select(vec!["a", "b", "c", "", "zzzzzzzz"]).prop_map(String::from);
    let blob = prop::sample::select(vec![[1u8; 32], [2u8; 32], [3u8; 32]]);
    let replica_state = prop::sample::select(vec![
        ReplicaState::Pulling,
        ReplicaState::Healthy,
        ReplicaState::Corrupt,
        ReplicaState::Deleted,
    ]);
    prop_oneof![
        (blob.clone(), replica_state).prop_map(|(blob, state)| EventKind::ReplicaUpdate { blob, state }),
        (name.clone(), any::<u32>()).prop_map(|(peer, rtt_us)| EventKind::Rtt { peer, rtt_us }),
        any::<u16>().prop_map(|load_permille| EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille })),
        (name.clone(), 0u8..5).prop_map(|(node, status)| EventKind::NodeHealth(NodeHealth::Status {
            node,
            status: [NodeStatus::Up, NodeStatus::Suspect, NodeStatus::Down, NodeStatus::Left][status as usize % 4]
        })),
        (blob.clone(), any::<u64>()).prop_map(|(blob, size_bytes)| EventKind::BlobAnnounce { blob, size_bytes }),
        (blob.clone(), any::<u8>(), prop::collection::vec(name.clone(), 0..3)).prop_map(|(blob, replicas, pinned)| {
            EventKind::PlacementIntent(PlacementIntent { blob, replicas, zone_spread: true, pinned })
        }),
        (name.clone(), 0u8..7, any::<u32>()).prop_map(|(daemon, which, value)| EventKind::Daemon {
            daemon,
            signal: match which {
                0 => DaemonSignal::Started { pid: value % 3 },
                1 => DaemonSignal::Registered { pid: value % 3 },
                2 => DaemonSignal::Exited { code: value as i32 },
                3 => DaemonSignal::Crashed { signal: 9 },
                4 => DaemonSignal::Stopped,
                5 => DaemonSignal::Health { healthy: value % 2 == 0 },
                _ => DaemonSignal::Saturation { permille: value as u16 },
            },
        }),
        (name.clone(), 0u8..3).prop_map(|(name, which)| EventKind::DaemonIntent {
            spec: Box::new(spec(if name.is_empty() { "d" } else { &name })),
            runs_on: [
                DaemonPlacement::AllNodes,
                DaemonPlacement::Nodes(vec![name.clone()]),
                DaemonPlacement::Label(name.clone())
            ][which as usize]
                .clone(),
        }),
        (0u64..4, 0u64..4, name.clone()).prop_map(|(version, fork_of, zone)| EventKind::Capability(Box::new(
            Capability { version, fork_of, zone, capacity_bytes: 1, labels: vec![], endpoint: String::new() }
        ))),
        (any::<u64>(), any::<u32>()).prop_map(|(position, index)| EventKind::ActionOutcome {
            action: ActionId { position, index },
            outcome: Outcome::Failure { reason: "x".into() }
        }),
        (name.clone(), 0u8..10, prop::option::of(blob)).prop_map(|(node, which, blob)| {
            let key = operator_key();
            let command = match which {
                0 => AdminCommand::EnterMaintenance { node },
                1 => AdminCommand::ExitMaintenance { node },
                2 => AdminCommand::Drain { node },
                3 => AdminCommand::Cordon { node },
                4 => AdminCommand::Uncordon { node },
                5 => AdminCommand::RestartAllDaemons { node: Some(node) },
                6 => AdminCommand::ClearAvoid { node: None },
                7 => AdminCommand::DropReplicas { node, blob },
                8 => AdminCommand::InvalidatePlacement { blob },
                _ => AdminCommand::SetKeyring { version: 2, keys: vec![key.public_key()] },
            };
            EventKind::Admin(Box::new(command))
        }),
        (any::<u32>(), any::<[u8; 16]>())
            .prop_map(|(blob_count, digest)| EventKind::InventoryDigest { blob_count, digest }),
    ]
}

fn arbitrary_event() -> impl Strategy<Value = Event> {
    (prop::sample::select(vec!["a", "b", "c"]), 0u64..40, arbitrary_kind())
        .prop_map(|(origin, origin_seq, kind)| Event { origin: origin.into(), origin_seq, kind })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random event streams never panic fold; every event is applied or rejected.
    #[test]
    fn random_streams_never_panic_fold(batches in prop::collection::vec(prop::collection::vec(arbitrary_event(), 0..40), 1..6)) {
        let mut state = State::new(&Config::for_tests());
        fold_batches(&mut state, &batches);
        let total: usize = batches.iter().map(Vec::len).sum();
        // The test sealer's admissions are applied events too.
        let admitted = state.keyring.identities() as u64;
        prop_assert_eq!(state.events_applied + state.rejections.total, total as u64 + admitted);
        state.check_invariants();
    }

    /// A rejected event has no effect at all: the state equals the state before it,
    /// rejection bookkeeping and log position aside.
    #[test]
    fn rejected_events_have_no_partial_effect(events in prop::collection::vec(arbitrary_event(), 1..60)) {
        let mut state = State::new(&Config::for_tests());
        for event in events {
            let before = state.clone();
            fold_batches(&mut state, &[vec![event]]);
            if state.rejections.total > before.rejections.total {
                let mut undone = state.clone();
                undone.rejections = before.rejections.clone();
                undone.position = before.position;
                undone.now_ms = before.now_ms;
                // The test sealer's admission of a new origin is a section of its own,
                // applied whatever becomes of the event.
                undone.keyring = before.keyring.clone();
                undone.events_applied = before.events_applied;
                prop_assert_eq!(undone.state_hash(), before.state_hash(), "{:?}", state.rejections.kept.back());
            }
        }
    }

    /// Mutated frames never panic the decoder or fold; anything decoded is folded safely.
    #[test]
    fn mutated_frames_never_panic(events in prop::collection::vec(arbitrary_event(), 1..20),
                                  flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
                                  cut in any::<prop::sample::Index>()) {
        let payload = meshos::trust::testing::seal_for(&State::new(&Config::for_tests()), &events, 1);
        let mut frame = Vec::new();
        wire::encode_frame(&mut frame, wire::FrameKind::Record, 1, 1, &payload);
        for (index, value) in &flips {
            let at = index.index(frame.len());
            frame[at] ^= value;
        }
        let end = if flips.is_empty() { frame.len() } else { cut.index(frame.len() + 1) };
        let mut aligned = rkyv::util::AlignedVec::<16>::new();
        aligned.extend_from_slice(&frame[..end]);
        let _ = wire::decode_header(&aligned, 1 << 20);
        if let Ok(decoded) = wire::decode_frame(&aligned, 1 << 20) {
            let mut state = State::new(&Config::for_tests());
            fold_payload(&mut state, 1, 1, decoded.payload);
        }
        // Skip the frame checksum: mutate the payload itself and fold it directly.
        let mut raw = payload.clone();
        for (index, value) in &flips {
            let at = index.index(raw.len());
            raw[at] ^= value;
        }
        let mut state = State::new(&Config::for_tests());
        fold_payload(&mut state, 1, 1, &raw);
        // A flipped byte breaks a section's shape, its body or its signature: whatever
        // it hit is rejected, and nothing a flip touched is applied as if signed.
        if raw[..] != payload[..] {
            prop_assert!(state.rejections.total >= 1, "a changed byte of a signed payload must be refused");
        }
        state.check_invariants();
    }
}

#[test]
#[should_panic(expected = "healthy counts drifted")]
fn invariant_check_catches_a_drifted_count() {
    let mut state =
        fold_events(&with(vec![event("b", 2, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Healthy })]));
    state.check_invariants();
    state.blobs.healthy_count[0] += 1;
    state.check_invariants();
}

#[test]
fn a_rejected_first_capability_does_not_intern_the_node() {
    let long_zone = "z".repeat(300);
    let state = fold_events(&[capability("fresh", 1, 1, 0, &long_zone)]);
    assert_eq!(rejection_names(&state), vec!["bad_name"]);
    assert!(state.nodes.find("fresh").is_none(), "no partial effect");
    assert!(state.symbols.names.is_empty());
}

#[test]
fn a_bad_payload_hashes_the_same_wherever_it_sits_in_memory() {
    let mut bytes = meshos::trust::testing::seal_for(&State::new(&Config::for_tests()), &base(), 5).to_vec();
    bytes.push(0); // valid sections plus one trailing byte: checksums would pass, the walk fails there
    let fold_at = |shift: usize| {
        let mut buffer = rkyv::util::AlignedVec::<16>::new();
        buffer.extend_from_slice(&vec![0u8; shift]);
        buffer.extend_from_slice(&bytes);
        let mut state = State::new(&Config::for_tests());
        fold_payload(&mut state, 1, 5, &buffer[shift..]);
        assert_eq!(rejection_names(&state), vec!["bad_section"]);
        state.state_hash()
    };
    assert_eq!(fold_at(0), fold_at(16));
    assert_eq!(fold_at(0), fold_at(3), "an unaligned copy is realigned, not judged by its address");
}

#[test]
fn an_unaligned_good_payload_is_folded_not_rejected() {
    let payload = meshos::trust::testing::seal_for(&State::new(&Config::for_tests()), &base(), 1_100);
    let mut buffer = rkyv::util::AlignedVec::<16>::new();
    buffer.extend_from_slice(&[0u8; 5]);
    buffer.extend_from_slice(&payload);
    let mut state = State::new(&Config::for_tests());
    fold_payload(&mut state, 1, 1_100, &buffer[5..]);
    assert_eq!(state.state_hash(), fold_events(&base()).state_hash());
}

#[test]
fn names_labels_and_specs_are_bounded() {
    let limits =
        FoldLimits { symbols_max: 3, labels_per_node_max: 2, daemon_spec_bytes_max: 256, ..FoldLimits::default() };
    let mut state = State::new(&Config { fold: limits, ..Config::for_tests() });
    let labelled = |seq, version, labels: &[&str]| {
        let capability = Capability {
            version,
            fork_of: version - 1,
            zone: "z".into(),
            capacity_bytes: 1,
            labels: labels.iter().map(|label| label.to_string()).collect(),
            endpoint: String::new(),
        };
        event("a", seq, EventKind::Capability(Box::new(capability)))
    };
    let big_spec = DaemonSpec { args: vec!["x".repeat(300)], ..spec("big") };
    fold_batches(
        &mut state,
        &[vec![
            labelled(1, 1, &["l1", "l2"]),
            labelled(2, 2, &["l1", "l2", "l3"]),
            labelled(3, 2, &["l3"]),
            event("a", 4, EventKind::DaemonIntent { spec: Box::new(big_spec), runs_on: DaemonPlacement::AllNodes }),
        ]],
    );
    assert_eq!(rejection_names(&state), vec!["invalid_intent", "table_full", "invalid_intent"]);
    assert_eq!(state.symbols.names.len(), 3);
    state.check_invariants();
}

#[test]
fn the_generator_refuses_options_the_fold_limits_would_reject() {
    use meshos::sim::gen::Generator;
    let limits = FoldLimits { blobs_max: 10, ..FoldLimits::default() };
    let error = Generator::new(options_with_blobs(11), &limits).err().expect("too many blobs").to_string();
    assert!(error.contains("--blobs") && error.contains("blobs_max"), "{error}");
    let limits = FoldLimits { replicas_max: 20, ..FoldLimits::default() };
    let error = Generator::new(options_with_blobs(10), &limits).err().expect("too many replicas").to_string();
    assert!(error.contains("replicas_max"), "{error}");
}

/// Generator options with a given blob count and 3 replicas.
fn options_with_blobs(blobs: u32) -> meshos::sim::gen::GenOptions {
    meshos::sim::gen::GenOptions { seed: 1, nodes: 5, blobs, replicas: 3, events: 1_000, record_events: 64 }
}

#[test]
fn generated_rtt_pairs_stay_within_a_bounded_peer_set() {
    let options = meshos::sim::gen::GenOptions {
        seed: 2,
        nodes: 100,
        blobs: 10,
        replicas: 2,
        events: 200_000,
        record_events: 256,
    };
    let state = fold_generated(&generate(options));
    assert_eq!(state.rejections.total, 0);
    assert!(state.rtt.len() <= 100 * 32, "{} pairs", state.rtt.len());
    assert!(state.rtt.len() > 1_000, "{} pairs: samples should cover most of the peer sets", state.rtt.len());
}

/// An empty record (a hole `meshos log salvage` writes, or an empty message anyone can
/// publish on the stream) is one rejected record: fold does not recurse on it (an
/// empty buffer's pointer need not be aligned), and every replica folds it alike.
#[test]
fn an_empty_record_is_one_rejection_and_never_a_crash() {
    let mut state = State::new(&Config::for_tests());
    let empty: Vec<u8> = Vec::new();
    fold_payload(&mut state, 1, 10, &empty);
    fold_payload(&mut state, 2, 20, &[]);
    assert_eq!(state.position, 2);
    assert_eq!(state.rejections.total, 2);
    assert!(rejection_names(&state).iter().all(|name| *name == "bad_section"), "{:?}", rejection_names(&state));
    let mut again = State::new(&Config::for_tests());
    fold_payload(&mut again, 1, 10, &[]);
    fold_payload(&mut again, 2, 20, &[]);
    assert_eq!(again.state_hash(), state.state_hash());
}
