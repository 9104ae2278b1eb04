//! Signed admin events and the cluster keyring, data-driven: bad signatures, unknown
//! keys, replays and stale rotations are rejected and counted with nothing else
//! changing; rotation retires old keys; a removed-then-re-added key cannot replay;
//! the genesis must be self-signed; a blob's last healthy copy cannot be dropped by
//! name; the keyring's limits hold. Also: the signed bytes and a signature are pinned
//! (golden), key files (mode 0600, no overwrite, a readable file refused), and the
//! read-only log reader and dry-run preview on a log a writer holds.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use meshos::admin::{self, preview, OperatorKey};
use meshos::config::{Config, FoldLimits};
use meshos::event::*;
use meshos::reconcile::{Reconciler, Scope};
use meshos::state::State;

const BLOB: BlobHash = [7; 32];
/// The curve's identity point: decodes, but is a weak (small-order) key.
const IDENTITY_POINT: [u8; 32] = {
    let mut bytes = [0u8; 32];
    bytes[0] = 1;
    bytes
};

fn key(seed: u8) -> OperatorKey {
    OperatorKey::from_seed([seed; 32])
}

/// The setup every case starts from: nodes a and b, the genesis (test key, admin_seq
/// 2), a blob with a healthy copy on a and on b.
fn setup() -> Vec<Event> {
    vec![
        capability("a", 1, 1, 0, "z1"),
        genesis("a", 2),
        capability("b", 1, 1, 0, "z2"),
        event("a", 3, EventKind::BlobAnnounce { blob: BLOB, size_bytes: 100 }),
        event(
            "a",
            4,
            EventKind::PlacementIntent(PlacementIntent { blob: BLOB, replicas: 2, zone_spread: false, pinned: vec![] }),
        ),
        event("a", 5, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Healthy }),
        event("b", 2, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Healthy }),
    ]
}

/// Folds `events` one record each on top of `state`; returns the rejection reasons.
fn fold_each(state: &mut State, events: &[Event]) -> Vec<&'static str> {
    let before = state.rejections.total as usize;
    for event in events {
        fold_batches(state, &[vec![event.clone()]]);
    }
    rejection_names(state).split_off(before.min(state.rejections.kept.len()))
}

fn setup_state() -> State {
    let mut state = State::new(&Config::default());
    fold_batches(&mut state, &[setup()]);
    assert_eq!(rejection_names(&state), Vec::<&str>::new());
    state
}

/// Folds one event that must be rejected with `reason`, and checks that nothing but
/// the rejection bookkeeping (and the log position and time) changed.
fn assert_rejected_without_effect(state: &mut State, event: Event, reason: &str) {
    let before = state.clone();
    fold_batches(state, &[vec![event]]);
    assert_eq!(state.rejections.total, before.rejections.total + 1, "counted");
    assert_eq!(state.rejections.kept.back().unwrap().reason.name(), reason, "{:?}", state.rejections.kept.back());
    assert_eq!(state.rejections.by_reason[state.rejections.kept.back().unwrap().reason.code()], {
        let code = state.rejections.kept.back().unwrap().reason.code();
        before.rejections.by_reason[code] + 1
    });
    let mut undone = state.clone();
    undone.rejections = before.rejections.clone();
    undone.position = before.position;
    undone.now_ms = before.now_ms;
    assert_eq!(undone.state_hash(), before.state_hash(), "a rejected admin event changed the state");
    assert_eq!(state.keyring, before.keyring);
    assert_eq!(state.events_applied, before.events_applied);
}

fn cordoned(state: &State, node: &str) -> bool {
    state.nodes.cordoned[state.nodes.find(node).unwrap().index()]
}

#[test]
fn a_bad_signature_is_rejected_counted_and_changes_nothing_else() {
    let mut state = setup_state();
    // The command was changed after signing (cordon b -> cordon a).
    let mut tampered = admin("a", 6, AdminCommand::Cordon { node: "b".into() });
    if let EventKind::Admin(signed) = &mut tampered.kind {
        signed.command = AdminCommand::Cordon { node: "a".into() };
    }
    assert_rejected_without_effect(&mut state, tampered, "bad_admin_signature");
    // A flipped signature bit, a flipped admin_seq, another operator name, a key that is
    // not a curve point: each fails the signature.
    let cases: [fn(&mut SignedAdmin); 5] = [
        |signed| signed.signature[10] ^= 0x01,
        |signed| signed.admin_seq += 1,
        |signed| signed.operator = "mallory".into(),
        |signed| signed.key = [0xff; 32],
        |signed| signed.key = key(9).public_key(),
    ];
    for (index, tamper) in cases.iter().enumerate() {
        let mut event = admin("a", 7 + index as u64, AdminCommand::Cordon { node: "b".into() });
        if let EventKind::Admin(signed) = &mut event.kind {
            tamper(signed);
        }
        assert_rejected_without_effect(&mut state, event, "bad_admin_signature");
    }
    assert!(!cordoned(&state, "a") && !cordoned(&state, "b"));
    let message = state.rejections.kept.back().unwrap().to_string();
    assert!(message.contains("signature does not verify"), "{message}");
}

#[test]
fn an_unknown_key_is_rejected_and_counted() {
    let mut state = setup_state();
    let stranger = signed_with(&key(3), "a", 6, 100, AdminCommand::Cordon { node: "b".into() });
    assert_rejected_without_effect(&mut state, stranger, "unknown_admin_key");
    let message = state.rejections.kept.back().unwrap().to_string();
    assert!(message.contains(&admin::hex(&key(3).public_key())[..16]), "names the key: {message}");
}

#[test]
fn re_applying_the_same_admin_event_is_a_no_op() {
    let mut state = setup_state();
    let cordon = admin("a", 6, AdminCommand::Cordon { node: "b".into() });
    assert_eq!(fold_each(&mut state, std::slice::from_ref(&cordon)), Vec::<&str>::new());
    assert!(cordoned(&state, "b"));
    fold_batches(&mut state, &[vec![admin("a", 7, AdminCommand::Uncordon { node: "b".into() })]]);
    assert!(!cordoned(&state, "b"));
    // The same event appended again: its origin sequence is stale.
    assert_rejected_without_effect(&mut state, cordon.clone(), "stale_origin_seq");
    // The same signed command in a new event (a node's Unix socket stamps a fresh
    // origin_seq): its admin_seq is not above the key's last.
    let again = Event { origin_seq: 8, ..cordon };
    assert_rejected_without_effect(&mut state, again, "admin_replayed");
    assert!(!cordoned(&state, "b"), "the replay did not cordon b again");
    let message = state.rejections.kept.back().unwrap().to_string();
    assert!(message.contains("admin sequence 6 is not above the last applied 7"), "{message}");
}

#[test]
fn a_replayed_key_rotation_is_rejected_and_counted() {
    let mut state = setup_state();
    let (old, new) = (operator_key(), key(2));
    let rotation = signed_with(
        &old,
        "a",
        6,
        10,
        AdminCommand::SetKeyring { version: 2, keys: vec![old.public_key(), new.public_key()] },
    );
    assert_eq!(fold_each(&mut state, std::slice::from_ref(&rotation)), Vec::<&str>::new());
    assert_eq!((state.keyring.version, state.keyring.keys.len()), (2, 2));
    // Replayed as is (new origin_seq): admin_replayed.
    assert_rejected_without_effect(&mut state, Event { origin_seq: 7, ..rotation }, "admin_replayed");
    // Signed afresh with the same version: stale_keyring_version.
    let stale = signed_with(&new, "a", 8, 11, AdminCommand::SetKeyring { version: 2, keys: vec![new.public_key()] });
    assert_rejected_without_effect(&mut state, stale, "stale_keyring_version");
    // And an old genesis replayed on a cluster that has a keyring.
    let genesis_again =
        signed_with(&old, "a", 9, 12, AdminCommand::SetKeyring { version: 1, keys: vec![old.public_key()] });
    assert_rejected_without_effect(&mut state, genesis_again, "stale_keyring_version");
    assert_eq!(state.keyring.keys, vec![old.public_key(), new.public_key()]);
}

#[test]
fn rotating_to_a_new_key_retires_the_old_one() {
    let mut state = setup_state();
    let (old, new) = (operator_key(), key(2));
    let rotation = signed_with(&old, "a", 6, 10, AdminCommand::SetKeyring { version: 2, keys: vec![new.public_key()] });
    assert_eq!(fold_each(&mut state, &[rotation]), Vec::<&str>::new());
    assert_rejected_without_effect(
        &mut state,
        signed_with(&old, "a", 7, 11, AdminCommand::Cordon { node: "b".into() }),
        "unknown_admin_key",
    );
    let by_new = signed_with(&new, "a", 8, 1, AdminCommand::Cordon { node: "b".into() });
    assert_eq!(fold_each(&mut state, &[by_new]), Vec::<&str>::new());
    assert!(cordoned(&state, "b"), "the new key's command applied");
    assert_eq!(state.keyring.last_admin_seq(&new.public_key()), 1);
    assert_eq!(state.keyring.last_admin_seq(&old.public_key()), 10, "the old key's last sequence is kept");
}

#[test]
fn a_removed_then_re_added_key_cannot_replay_its_old_events() {
    let mut state = setup_state();
    let (first, second) = (operator_key(), key(2));
    let captured = signed_with(&first, "a", 6, 10, AdminCommand::Cordon { node: "b".into() });
    let events = vec![
        captured.clone(),
        signed_with(&first, "a", 7, 11, AdminCommand::Uncordon { node: "b".into() }),
        signed_with(&first, "a", 8, 12, AdminCommand::SetKeyring { version: 2, keys: vec![second.public_key()] }),
        signed_with(
            &second,
            "a",
            9,
            1,
            AdminCommand::SetKeyring { version: 3, keys: vec![second.public_key(), first.public_key()] },
        ),
    ];
    assert_eq!(fold_each(&mut state, &events), Vec::<&str>::new());
    assert!(state.keyring.contains(&first.public_key()) && !cordoned(&state, "b"));
    assert_rejected_without_effect(&mut state, Event { origin_seq: 10, ..captured }, "admin_replayed");
    assert!(!cordoned(&state, "b"));
    let fresh = signed_with(&first, "a", 11, 13, AdminCommand::Cordon { node: "b".into() });
    assert_eq!(fold_each(&mut state, &[fresh]), Vec::<&str>::new());
    assert!(cordoned(&state, "b"));
}

#[test]
fn the_genesis_must_be_self_signed_and_admin_before_it_is_rejected() {
    let join = vec![capability("a", 1, 1, 0, "z1"), capability("b", 1, 1, 0, "z2")];
    let mut state = State::new(&Config::default());
    fold_batches(&mut state, &[join]);
    let (signer, other) = (operator_key(), key(2));
    let cases = vec![
        ("admin before any keyring", admin("a", 2, AdminCommand::Cordon { node: "b".into() })),
        (
            "genesis installing only another key",
            signed_with(&signer, "a", 3, 3, AdminCommand::SetKeyring { version: 1, keys: vec![other.public_key()] }),
        ),
        (
            "genesis at version 2",
            signed_with(&signer, "a", 4, 4, AdminCommand::SetKeyring { version: 2, keys: vec![signer.public_key()] }),
        ),
    ];
    for (name, event) in cases {
        let before = state.rejections.total;
        assert_rejected_without_effect(&mut state, event, "admin_without_keyring");
        assert_eq!(state.rejections.total, before + 1, "{name}");
    }
    assert_eq!(state.keyring.version, 0);
    // A genesis that lists two keys, signed by one of them, applies; the other key
    // can sign from then on.
    let genesis = signed_with(
        &signer,
        "a",
        5,
        5,
        AdminCommand::SetKeyring { version: 1, keys: vec![other.public_key(), signer.public_key()] },
    );
    let by_other = signed_with(&other, "a", 6, 1, AdminCommand::Cordon { node: "b".into() });
    assert_eq!(fold_each(&mut state, &[genesis, by_other]), Vec::<&str>::new());
    assert_eq!(state.keyring.version, 1);
    assert!(cordoned(&state, "b"));
    state.check_invariants();
}

#[test]
fn dropping_a_blob_s_last_healthy_copy_by_name_is_refused() {
    let mut state = setup_state();
    let drop_on = |seq, node: &str| admin("a", seq, AdminCommand::DropReplicas { node: node.into(), blob: Some(BLOB) });
    // Two healthy copies: dropping a's is accepted (it is marked).
    assert_eq!(fold_each(&mut state, &[drop_on(6, "a")]), Vec::<&str>::new());
    let row = |state: &State, node: &str| {
        let blob = state.blobs.find(&BLOB).unwrap();
        state.replicas.find(blob, state.nodes.find(node).unwrap()).unwrap().index()
    };
    assert!(state.replicas.drop_requested[row(&state, "a")]);
    // b's copy is deleted: a's is now the blob's only healthy copy, and a drop of it
    // by name is refused.
    let events =
        [event("b", 3, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Deleted }), drop_on(7, "a")];
    assert_eq!(fold_each(&mut state, &events[..1]), Vec::<&str>::new());
    assert_rejected_without_effect(&mut state, events[1].clone(), "would_drop_last_copy");
    // The node-wide form only marks; reconcile keeps the last healthy copy.
    let node_wide = admin("a", 8, AdminCommand::DropReplicas { node: "a".into(), blob: None });
    assert_eq!(fold_each(&mut state, &[node_wide]), Vec::<&str>::new());
    let mut reconciler = Reconciler::new();
    for _ in 0..3 {
        let actions = reconciler.pass(&mut state, Scope::Full);
        assert!(
            actions.iter().all(|action| action.kind.name() != "drop_replica"),
            "the last healthy copy must never be dropped"
        );
    }
}

#[test]
fn keyring_limits_and_malformed_key_lists_are_rejected() {
    let limits = FoldLimits { keyring_keys_max: 2, admin_keys_seen_max: 3, ..FoldLimits::default() };
    let mut state = State::new(&Config { fold: limits, ..Config::default() });
    let signer = operator_key();
    let genesis =
        signed_with(&signer, "a", 2, 1, AdminCommand::SetKeyring { version: 1, keys: vec![signer.public_key()] });
    fold_batches(&mut state, &[vec![capability("a", 1, 1, 0, "z1"), genesis]]);
    assert_eq!(state.keyring.version, 1);
    let set = |seq: u64, keys: Vec<[u8; 32]>| {
        signed_with(&signer, "a", seq, seq, AdminCommand::SetKeyring { version: 2, keys })
    };
    let me = signer.public_key();
    let cases = vec![
        (set(3, vec![]), "invalid_keyring"),
        (set(4, vec![me, key(2).public_key(), key(3).public_key()]), "invalid_keyring"),
        (set(5, vec![me, me]), "invalid_keyring"),
        (set(6, vec![me, IDENTITY_POINT]), "invalid_keyring"),
    ];
    for (event, reason) in cases {
        assert_rejected_without_effect(&mut state, event, reason);
    }
    // Seen keys: me + 2 + 3 fill the 3 slots; a fourth distinct key is refused.
    let rotate = |seq: u64, version: u64, keys: Vec<[u8; 32]>| {
        signed_with(&signer, "a", seq, seq, AdminCommand::SetKeyring { version, keys })
    };
    let events = vec![rotate(7, 2, vec![me, key(2).public_key()]), rotate(8, 3, vec![me, key(3).public_key()])];
    assert_eq!(fold_each(&mut state, &events), Vec::<&str>::new());
    assert_eq!(state.keyring.seen.len(), 3);
    assert_rejected_without_effect(&mut state, rotate(9, 4, vec![me, key(4).public_key()]), "table_full");
    // Re-installing a seen key needs no new slot.
    assert_eq!(fold_each(&mut state, &[rotate(10, 4, vec![key(2).public_key(), me])]), Vec::<&str>::new());
    state.check_invariants();
    let error = Config {
        fold: FoldLimits { keyring_keys_max: 4, admin_keys_seen_max: 3, ..FoldLimits::default() },
        ..Config::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(error.contains("fold.keyring_keys_max"), "{error}");
}

/// The signed bytes and a signature, pinned: a change to the canonical encoding (or
/// to how keys sign) breaks this test and must change the domain string on purpose.
#[test]
fn signed_bytes_and_signature_are_pinned() {
    const DOMAIN: &str = "6d6573686f732d61646d696e2d763100"; // b"meshos-admin-v1\0"
    let command = AdminCommand::DropReplicas { node: "n3".into(), blob: Some([0xab; 32]) };
    let expected = [
        DOMAIN,
        "03000000",         // operator: length 3
        "6f7073",           // "ops"
        "2a00000000000000", // admin_seq 42
        "07",               // drop_replicas
        "02000000",         // node: length 2
        "6e33",             // "n3"
        "01",               // Some(blob)
        &"ab".repeat(32),
    ]
    .concat();
    assert_eq!(admin::hex(&admin::signed_bytes("ops", 42, &command)), expected);
    let keyring = AdminCommand::SetKeyring { version: 2, keys: vec![[1; 32], [2; 32]] };
    let expected = [
        DOMAIN,
        "00000000",         // operator: empty
        "0100000000000000", // admin_seq 1
        "09",               // set_keyring
        "0200000000000000", // version 2
        "02000000",         // 2 keys
        &"01".repeat(32),
        &"02".repeat(32),
    ]
    .concat();
    assert_eq!(admin::hex(&admin::signed_bytes("", 1, &keyring)), expected);
    let restart = AdminCommand::RestartAllDaemons { node: None };
    assert_eq!(
        admin::hex(&admin::signed_bytes("o", 0, &restart)),
        [DOMAIN, "010000006f", "0000000000000000", "05", "00"].concat()
    );
    let signer = key(1);
    assert_eq!(admin::hex(&signer.public_key()), GOLDEN_PUBLIC_KEY);
    let signed = signer.sign("ops", 42, command);
    assert_eq!(admin::hex(&signed.signature), GOLDEN_SIGNATURE);
    assert!(admin::verify(&signed));
}

const GOLDEN_PUBLIC_KEY: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
const GOLDEN_SIGNATURE: &str = concat!(
    "4aee7317e210fc1cdb0e597c425d0b217063224d68e743d01332e336b448131b",
    "d7fded6e552492e4ea5c61b011a0453e700e9878c64b0c73d55f84deb72beb07",
);

#[test]
fn key_files_are_owner_only_never_overwritten_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ops.key");
    let key = OperatorKey::generate(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.len() == 65 && text.ends_with('\n'), "64 hex characters and a newline");
    assert_eq!(OperatorKey::load(&path).unwrap().public_key(), key.public_key());
    let error = OperatorKey::generate(&path).unwrap_err().to_string();
    assert!(error.contains("already exists") && error.contains("refusing to overwrite"), "{error}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "untouched");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = OperatorKey::load(&path).unwrap_err().to_string();
    assert!(error.contains("mode 0644") && error.contains("chmod 600"), "{error}");

    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let error = OperatorKey::load(&bad).unwrap_err().to_string();
    assert!(error.contains("not a key file"), "{error}");
    assert_ne!(OperatorKey::generate(&dir.path().join("other.key")).unwrap().public_key(), key.public_key());
}

/// The dry-run reader works on a log a writer holds locked and whose last record is
/// torn; the preview appends nothing and says what the command would do.
#[test]
fn a_dry_run_reads_a_locked_log_with_a_torn_tail_and_appends_nothing() {
    use meshos::redex::embedded::{read_unlocked, EmbeddedLog};
    use meshos::redex::Redex;
    let dir = tempfile::tempdir().unwrap();
    let config = Config { fsync: meshos::config::FsyncPolicy::Manual, ..Config::default() };
    let (mut log, _) = EmbeddedLog::open(dir.path(), &config).unwrap();
    let records = small_cluster_records();
    for (index, events) in records.iter().enumerate() {
        let payload = meshos::wire::encode_batch(&EventBatch { events: events.clone() });
        log.append_at(&payload, 1_000_000 + index as u64 * 1_000).unwrap();
    }
    log.sync().unwrap();
    let segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|extension| extension == "seg"))
        .unwrap();
    // A record being written: its first bytes only.
    let mut torn = Vec::new();
    meshos::wire::encode_frame(&mut torn, meshos::wire::FrameKind::Record, records.len() as u64 + 1, 1, &[0; 64]);
    let mut file = std::fs::OpenOptions::new().append(true).open(&segment).unwrap();
    std::io::Write::write_all(&mut file, &torn[..40]).unwrap();
    let bytes_before = std::fs::read(&segment).unwrap();

    let mut visited = 0;
    let read = read_unlocked(dir.path(), &config, &mut |_| {
        visited += 1;
        true
    })
    .unwrap();
    assert_eq!((read.records, read.last_position, visited), (4, 4, 4));
    assert!(read.stopped_at.as_ref().unwrap().reason.contains("truncated"), "{:?}", read.stopped_at);

    let command = AdminCommand::EnterMaintenance { node: "n2".into() };
    let signed = admin::test_key().sign("ops", 1_000, command);
    let preview = preview::preview(dir.path(), &config, "n1", &signed).unwrap();
    assert!(preview.applied, "{:?}", preview.rejection);
    assert_eq!(preview.log_position, 4);
    assert!(preview.log_tail.is_some());
    let impact = &preview.nodes[0];
    assert_eq!(
        (impact.node.as_str(), impact.maintenance_before, impact.maintenance_after),
        ("n2", "active", "entering_maintenance")
    );
    assert_eq!(impact.healthy_copies, 2);
    let mut moving: Vec<&str> = impact.copies_to_move.iter().map(|copy| &copy.blob[..4]).collect();
    moving.sort();
    assert_eq!(moving, ["b1b1", "b2b2"], "both copies on n2 leave their blob one short: {preview:?}");
    assert_eq!(impact.bytes_to_move, 2 << 20);
    assert_eq!(impact.time_to_safe_ms, None, "no move finished yet: no rate");
    assert_eq!(impact.daemons_to_stop, ["web"]);
    // The copies on n2 start to move at once (the web stop waits for the start this
    // log never settled: the daemon budget allows one action per daemon and node).
    assert_eq!(preview.actions, ["n3: migrate_blob b1b1b1b1 from n2", "n1: migrate_blob b2b2b2b2 from n2"]);
    assert_eq!(std::fs::read(&segment).unwrap(), bytes_before, "nothing appended");
    assert_eq!(log.last_position(), 4);

    // A key outside the keyring: the preview says it would be rejected and why.
    let stranger = key(4).sign("ops", 1, AdminCommand::Cordon { node: "n2".into() });
    let preview = preview::preview(dir.path(), &config, "n1", &stranger).unwrap();
    assert!(!preview.applied && preview.actions.is_empty() && preview.nodes.is_empty());
    assert_eq!(preview.rejection.as_ref().unwrap().0, "unknown_admin_key");
    drop(log);
}
