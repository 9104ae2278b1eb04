//! Operator sections and node identities in fold, data-driven: a section whose
//! signature, cluster, key or expiry is wrong, or that was applied before, is refused
//! and counted with nothing else changing; two commands signed at once with one key
//! both apply, in either order; rotation retires old keys; a blob's last healthy copy
//! cannot be dropped by name; the keyring's limits hold; node sections apply only
//! from the admitted key, only for the signer's own facts, and stop at removal. Also:
//! key files (mode 0600, no overwrite, a readable file refused), and the read-only
//! log reader and dry-run preview on a log a writer holds.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use meshos::admin::{self, preview, OperatorKey};
use meshos::config::{Config, FoldLimits};
use meshos::event::*;
use meshos::fold::fold_payload;
use meshos::state::State;
use meshos::trust::{test_key_of, Sealer};
use rkyv::util::AlignedVec;

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

fn cluster_id() -> [u8; 16] {
    Config::for_tests().genesis.cluster_id()
}

/// One operator section carrying `kinds`, signed by `signer` for the test cluster.
fn operator_section(signer: &OperatorKey, kinds: Vec<EventKind>, expires_ms: u64, nonce: u8) -> AlignedVec<16> {
    admin::seal_operator(signer, "ops", cluster_id(), kinds, expires_ms, &[nonce; 16])
}

/// One node section of `events`, signed by `name` with `signer`.
fn node_section(name: &str, signer: OperatorKey, events: Vec<Event>) -> AlignedVec<16> {
    Sealer::node(name, signer, cluster_id()).seal_batch(&EventBatch { events })
}

/// The setup every case starts from: nodes a and b (admitted by the test sealer), a
/// blob with a healthy copy on a and on b.
fn setup() -> Vec<Event> {
    vec![
        capability("a", 1, 1, 0, "z1"),
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

fn setup_state() -> State {
    let mut state = State::new(&Config::for_tests());
    fold_batches(&mut state, &[setup()]);
    assert_eq!(rejection_names(&state), Vec::<&str>::new());
    state
}

/// The log time the next record of `state` is folded at.
fn next_time(state: &State) -> u64 {
    1_000 + (state.position + 1) * 100
}

/// Folds `payload` as the next record; returns the reasons of the rejections it added.
fn fold_next(state: &mut State, payload: &[u8]) -> Vec<&'static str> {
    let before = state.rejections.total as usize;
    let position = state.position + 1;
    fold_payload(state, position, next_time(state), payload);
    let added = state.rejections.total as usize - before;
    let names = rejection_names(state);
    names[names.len() - added.min(names.len())..].to_vec()
}

/// Folds `payload`, which must be refused once with `reason` and change nothing but
/// the rejection bookkeeping (and the log position and time).
fn assert_refused_without_effect(state: &mut State, payload: &[u8], reason: &str) {
    let before = state.clone();
    assert_eq!(fold_next(state, payload), [reason], "{:?}", state.rejections.kept.back());
    let mut undone = state.clone();
    undone.rejections = before.rejections.clone();
    undone.position = before.position;
    undone.now_ms = before.now_ms;
    undone.keyring.prune_window(before.now_ms);
    assert_eq!(undone.state_hash(), before.state_hash(), "a refused section changed the state");
    assert_eq!(state.events_applied, before.events_applied);
}

fn cordoned(state: &State, node: &str) -> bool {
    state.nodes.cordoned[state.nodes.find(node).unwrap().index()]
}

fn cordon(node: &str) -> Vec<EventKind> {
    vec![admin::command_kind(AdminCommand::Cordon { node: node.into() })]
}

#[test]
fn a_tampered_or_foreign_operator_section_is_refused_and_changes_nothing() {
    let mut state = setup_state();
    let expires = next_time(&state) + 60_000;
    let good = operator_section(&admin::test_key(), cordon("b"), expires, 1);
    // Each byte range the signature covers, changed after signing: header fields (kind
    // of signer, expiry, nonce, name), the signature, the body.
    let tampers: [(usize, &str); 6] = [
        (16, "bad_signature"),     // expiry
        (30, "bad_signature"),     // nonce
        (73, "bad_signature"),     // the operator's name
        (150, "bad_signature"),    // the signature
        (230, "bad_signature"),    // the body (the archived command)
        (50, "unknown_admin_key"), // the key: another key is not in the keyring
    ];
    for (at, reason) in tampers {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        assert_refused_without_effect(&mut state, &bad, reason);
    }
    // Signed by a key outside the keyring; signed for another cluster.
    let stranger = operator_section(&key(3), cordon("b"), expires, 2);
    assert_refused_without_effect(&mut state, &stranger, "unknown_admin_key");
    let message = state.rejections.kept.back().unwrap().to_string();
    assert!(message.contains(&admin::hex(&key(3).public_key())[..16]), "names the key: {message}");
    let elsewhere = admin::seal_operator(&admin::test_key(), "ops", [0x99; 16], cordon("b"), expires, &[3; 16]);
    assert_refused_without_effect(&mut state, &elsewhere, "bad_signature");
    assert!(!cordoned(&state, "b"));
    // The untouched section applies.
    assert_eq!(fold_next(&mut state, &good), Vec::<&str>::new());
    assert!(cordoned(&state, "b"));
}

#[test]
fn a_replayed_or_expired_operator_section_is_refused() {
    let mut state = setup_state();
    let now = next_time(&state);
    let section = operator_section(&admin::test_key(), cordon("b"), now + 1_000, 1);
    assert_eq!(fold_next(&mut state, &section), Vec::<&str>::new());
    let uncordon = vec![admin::command_kind(AdminCommand::Uncordon { node: "b".into() })];
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), uncordon, now + 1_000, 2)),
        Vec::<&str>::new()
    );
    assert!(!cordoned(&state, "b"));
    // The same bytes again, while valid: a replay.
    assert_refused_without_effect(&mut state, &section, "operator_replayed");
    // Later than its expiry (records are 100 ms apart): refused by its expiry, and the
    // replay window forgot it.
    for _ in 0..12 {
        fold_batches(&mut state, &[vec![]]);
    }
    assert_refused_without_effect(&mut state, &section, "operator_expired");
    assert!(
        state.keyring.operator_window.iter().all(|(expires_ms, _)| *expires_ms >= state.now_ms),
        "expired entries are pruned"
    );
    assert!(!state.keyring.operator_window.contains(&(now + 1_000, [1; 16])));
    // A section claiming to stay valid past operator_validity_max_ms.
    let far = next_time(&state) + state.limits.operator_validity_max_ms + 1;
    assert_refused_without_effect(
        &mut state,
        &operator_section(&admin::test_key(), cordon("b"), far, 3),
        "operator_validity_too_long",
    );
    assert!(!cordoned(&state, "b"));
}

/// The defect: two commands signed with one key at the same moment (two
/// terminals), or by a clock that stepped back, reach the log in either order; both
/// apply, since replay protection is a nonce and an expiry, not the signer's clock.
#[test]
fn commands_signed_at_once_with_one_key_apply_in_either_order() {
    let mut state = setup_state();
    let window = state.keyring.operator_window.len();
    let now = next_time(&state);
    let later_signed = operator_section(&admin::test_key(), cordon("a"), now + 60_000, 1);
    let earlier_signed = operator_section(&admin::test_key(), cordon("b"), now + 30_000, 2);
    let same_moment = operator_section(
        &admin::test_key(),
        vec![admin::command_kind(AdminCommand::ClearAvoid { node: None })],
        now + 60_000,
        3,
    );
    for section in [&later_signed, &earlier_signed, &same_moment] {
        assert_eq!(fold_next(&mut state, section), Vec::<&str>::new());
    }
    assert!(cordoned(&state, "a") && cordoned(&state, "b"));
    assert_eq!(state.keyring.operator_window.len(), window + 3);
}

#[test]
fn rotation_retires_the_old_key_and_keyring_limits_hold() {
    let mut state = setup_state();
    let now = next_time(&state);
    let me = admin::test_key().public_key();
    let set = |version: u64, keys: Vec<[u8; 32]>| vec![admin::command_kind(AdminCommand::SetKeyring { version, keys })];
    let cases: Vec<(Vec<EventKind>, &str)> = vec![
        (set(3, vec![me]), "stale_keyring_version"),
        (set(1, vec![me]), "stale_keyring_version"),
        (set(2, vec![]), "invalid_keyring"),
        (set(2, vec![me, me]), "invalid_keyring"),
        (set(2, vec![me, IDENTITY_POINT]), "invalid_keyring"),
    ];
    for (nonce, (kinds, reason)) in cases.into_iter().enumerate() {
        let section = operator_section(&admin::test_key(), kinds, now + 60_000, 10 + nonce as u8);
        // The section itself is admitted (its nonce is spent); its command is refused.
        let before = state.keyring.keys.clone();
        assert_eq!(fold_next(&mut state, &section), [reason]);
        assert_eq!(state.keyring.keys, before);
    }
    // Rotation to key(2) only: the test key is out, key(2) signs.
    let rotate = operator_section(&admin::test_key(), set(2, vec![key(2).public_key()]), now + 60_000, 1);
    assert_eq!(fold_next(&mut state, &rotate), Vec::<&str>::new());
    assert_eq!(state.keyring.version, 2);
    assert_refused_without_effect(
        &mut state,
        &operator_section(&admin::test_key(), cordon("b"), now + 60_000, 2),
        "unknown_admin_key",
    );
    assert_eq!(fold_next(&mut state, &operator_section(&key(2), cordon("b"), now + 60_000, 3)), Vec::<&str>::new());
    assert!(cordoned(&state, "b"));
    state.check_invariants();
    let limits = FoldLimits { keyring_keys_max: 1, ..FoldLimits::default() };
    let mut small = State::new(&Config { fold: limits, ..Config::for_tests() });
    fold_batches(&mut small, &[setup()]);
    let two =
        operator_section(&admin::test_key(), set(2, vec![me, key(2).public_key()]), next_time(&small) + 60_000, 4);
    assert_eq!(fold_next(&mut small, &two), ["invalid_keyring"]);
    let error = Config { fold: FoldLimits { keyring_keys_max: 0, ..FoldLimits::default() }, ..Config::for_tests() }
        .validate()
        .unwrap_err()
        .to_string();
    assert!(error.contains("fold.keyring_keys_max"), "{error}");
}

#[test]
fn the_last_healthy_copy_cannot_be_dropped_by_name() {
    let mut state = setup_state();
    let now = next_time(&state);
    let drop =
        |node: &str| vec![admin::command_kind(AdminCommand::DropReplicas { node: node.into(), blob: Some(BLOB) })];
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), drop("a"), now + 60_000, 1)),
        Vec::<&str>::new()
    );
    // b's copy is healthy and a's is marked: b's is not the last healthy one yet, but
    // once a's copy is gone it is.
    fold_batches(
        &mut state,
        &[vec![event("a", 6, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Deleted })]],
    );
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), drop("b"), now + 60_000, 2)),
        ["would_drop_last_copy"]
    );
}

#[test]
fn node_sections_apply_only_from_the_admitted_key_and_for_the_signer_alone() {
    let mut state = setup_state();
    let heartbeat =
        |origin: &str, seq: u64| event(origin, seq, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 1 }));
    // Not admitted (an invented node), admitted with another key, and a tampered one.
    assert_refused_without_effect(
        &mut state,
        &node_section("ghost", test_key_of("ghost"), vec![heartbeat("ghost", 1)]),
        "node_not_admitted",
    );
    assert_refused_without_effect(&mut state, &node_section("a", key(9), vec![heartbeat("a", 10)]), "wrong_node_key");
    let mut tampered = node_section("a", test_key_of("a"), vec![heartbeat("a", 10)]);
    let last = tampered.len() - 20;
    tampered[last] ^= 0x04;
    let reasons = fold_next(&mut state, &tampered);
    assert!(reasons == ["bad_signature"] || reasons == ["bad_section"], "{reasons:?}");
    // a signing b's fact; a sending an operator intent; an operator sending a fact.
    let as_b = node_section(
        "a",
        test_key_of("a"),
        vec![event("b", 9, EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Deleted })],
    );
    assert_eq!(fold_next(&mut state, &as_b), ["origin_not_signer"]);
    let intent = node_section(
        "a",
        test_key_of("a"),
        vec![event("a", 11, EventKind::Admin(Box::new(AdminCommand::Cordon { node: "b".into() })))],
    );
    assert_eq!(fold_next(&mut state, &intent), ["operator_only"]);
    let fact = operator_section(
        &admin::test_key(),
        vec![EventKind::ReplicaUpdate { blob: BLOB, state: ReplicaState::Deleted }],
        next_time(&state) + 60_000,
        1,
    );
    assert_eq!(fold_next(&mut state, &fact), ["node_only"]);
    assert!(!cordoned(&state, "b"));
    assert_eq!(state.blobs.healthy_count[0], 2, "nobody dropped a copy");
    // An unsigned section never folds; neither does garbage.
    assert_eq!(
        fold_next(&mut state, &meshos::trust::record::unsigned_batch(&EventBatch { events: vec![heartbeat("a", 12)] })),
        ["unsigned_section"]
    );
    let mut garbage = AlignedVec::<16>::new();
    garbage.extend_from_slice(&[0x5a; 64]);
    assert_eq!(fold_next(&mut state, &garbage), ["bad_section"]);
    state.check_invariants();
}

#[test]
fn admission_removal_and_readmission_of_a_node() {
    let mut state = setup_state();
    let now = next_time(&state);
    let admit = |name: &str, public: [u8; 32]| {
        vec![admin::command_kind(AdminCommand::AdmitNode { name: name.into(), key: public })]
    };
    let heartbeat =
        |origin: &str, seq: u64| event(origin, seq, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 1 }));
    // c is admitted, joins, is removed: its key folds nothing more and it is left.
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), admit("c", key(5).public_key()), now + 60_000, 1)),
        Vec::<&str>::new()
    );
    assert_eq!(fold_next(&mut state, &node_section("c", key(5), vec![heartbeat("c", 1)])), Vec::<&str>::new());
    let remove = vec![admin::command_kind(AdminCommand::RemoveNode { name: "c".into() })];
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), remove, now + 60_000, 2)),
        Vec::<&str>::new()
    );
    let c = state.nodes.find("c").unwrap().index();
    assert_eq!(state.nodes.status[c], NodeStatus::Left);
    assert_refused_without_effect(&mut state, &node_section("c", key(5), vec![heartbeat("c", 2)]), "node_revoked");
    // Another node's key, a bad name: refused. Re-admitted with a new key: it folds again.
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), admit("d", key(5).public_key()), now + 60_000, 3)),
        ["invalid_keyring"]
    );
    assert_eq!(
        fold_next(
            &mut state,
            &operator_section(&admin::test_key(), admit("bad\nname", key(6).public_key()), now + 60_000, 4)
        ),
        ["bad_node_name"]
    );
    assert_eq!(
        fold_next(&mut state, &operator_section(&admin::test_key(), admit("c", key(6).public_key()), now + 60_000, 5)),
        Vec::<&str>::new()
    );
    assert_eq!(fold_next(&mut state, &node_section("c", key(5), vec![heartbeat("c", 3)])), ["wrong_node_key"]);
    assert_eq!(fold_next(&mut state, &node_section("c", key(6), vec![heartbeat("c", 3)])), Vec::<&str>::new());
    assert_eq!(state.nodes.status[c], NodeStatus::Up);
    state.check_invariants();
}

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
    let config = Config { fsync: meshos::config::FsyncPolicy::Manual, ..Config::for_tests() };
    let (mut log, _) = EmbeddedLog::open(dir.path(), &config).unwrap();
    let records = small_cluster_records();
    let mut sealer = meshos::trust::testing::MixedSealer::new(config.genesis.cluster_id());
    for (index, events) in records.iter().enumerate() {
        let time_ms = 1_000_000 + index as u64 * 1_000;
        let payload = sealer.seal(events, time_ms);
        log.append_at(&payload, time_ms).unwrap();
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
    let preview = preview::preview(dir.path(), &config, &admin::test_key(), "ops", &command).unwrap();
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
    let cordon = AdminCommand::Cordon { node: "n2".into() };
    let preview = preview::preview(dir.path(), &config, &key(4), "ops", &cordon).unwrap();
    assert!(!preview.applied && preview.actions.is_empty() && preview.nodes.is_empty());
    assert_eq!(preview.rejection.as_ref().unwrap().0, "unknown_admin_key");
    drop(log);
}
