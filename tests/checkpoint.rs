//! Checkpoints, data-driven: logs from the generator (`meshos log gen`) and from the
//! cluster simulator (outcomes, crashes, maintenance, daemons) are folded with
//! `Engine::apply`; at several positions a checkpoint is written, loaded (as a
//! restarting node and, from a copied file, as a new node) and the restored engine
//! then runs beside the uninterrupted one to the end of the log with equal state
//! hashes and equal action lists after every record: anything of the state a
//! checkpoint left out would make them part. Damaged files, other settings and the
//! store's bookkeeping are checked after.

mod common;

use std::path::{Path, PathBuf};

use meshos::action::Action;
use meshos::admin::OperatorKey;
use meshos::config::Config;
use meshos::engine::Engine;
use meshos::event::{AdminCommand, DaemonPlacement, DaemonSpec, EventKind, NodeHealth};
use meshos::sim::cluster::{run_logged, sim_config, SimOptions};
use meshos::sim::gen::GenOptions;
use meshos::state::checkpoint::{self, CheckpointError, CheckpointStore, HEADER_BYTES};
use meshos::state::nodes::MaintenanceState;
use meshos::state::State;

use rkyv::util::AlignedVec;

type Records = Vec<(u64, AlignedVec<16>)>;

/// What the states at the checkpoint positions held, to show the runs covered it.
#[derive(Debug, Default)]
struct Coverage {
    inflight: usize,
    daemons: usize,
    maintenance: usize,
    keyring: bool,
    rejections: u64,
    rtt: usize,
}

impl Coverage {
    fn add(&mut self, state: &State) {
        self.inflight = self.inflight.max(state.inflight.len());
        self.daemons = self.daemons.max(state.daemons.len());
        let away = state.nodes.maintenance.iter().filter(|m| **m != MaintenanceState::Active).count();
        self.maintenance = self.maintenance.max(away);
        self.keyring |= state.keyring.version > 0;
        self.rejections = self.rejections.max(state.rejections.total);
        self.rtt = self.rtt.max(state.rtt.len());
    }
}

/// Folds `records` with one engine; after record `p` for each `p` in `at`, writes a
/// checkpoint, loads it back (the first from the store, the others from a copy in a
/// second directory, as a new node would) and starts a restored engine; every
/// restored engine then applies the rest of the log beside the original, and their
/// hashes and actions must agree after every record.
fn restore_and_compare(records: &Records, config: &Config, at: &[u64]) -> Coverage {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path().join("node-a"), 2);
    let copies = CheckpointStore::new(dir.path().join("node-b"), 8);
    std::fs::create_dir_all(&copies.dir).unwrap();
    let mut original = Engine::new(config);
    let mut restored: Vec<(u64, Engine)> = Vec::new();
    let mut coverage = Coverage::default();
    for (index, (time_ms, payload)) in records.iter().enumerate() {
        let position = index as u64 + 1;
        let actions: Vec<Action> = original.apply(position, *time_ms, payload).1.to_vec();
        let hash = original.state.state_hash();
        for (from, engine) in &mut restored {
            let (state, theirs) = engine.apply(position, *time_ms, payload);
            assert_eq!(theirs, &actions[..], "engine restored at {from}: actions differ after record {position}");
            assert_eq!(state.state_hash(), hash, "engine restored at {from}: state differs after record {position}");
        }
        if at.contains(&position) {
            coverage.add(&original.state);
            let path = store.write(&original.state).expect("write a checkpoint");
            assert_eq!(store.latest(), Some((position, path.clone())));
            let state = if restored.is_empty() {
                store.load(&path, config).expect("load the checkpoint")
            } else {
                let copy = copies.dir.join(path.file_name().unwrap());
                std::fs::copy(&path, &copy).unwrap();
                let (at, latest) = copies.latest().expect("the copied checkpoint");
                assert_eq!((at, &latest), (position, &copy));
                copies.load(&latest, config).expect("load the copied checkpoint")
            };
            assert_eq!(state.position, position);
            assert_eq!(state.state_hash(), hash, "loaded state differs from the written one at {position}");
            assert_eq!(state.summary(), original.state.summary());
            state.check_invariants();
            restored.push((position, Engine::from_state(state)));
        }
    }
    assert_eq!(restored.len(), at.len(), "every checkpoint position is within the log");
    assert_eq!(store.list().unwrap().len(), at.len().min(2), "the store keeps the newest two");
    original.state.check_invariants();
    for (_, engine) in &restored {
        engine.state.check_invariants();
    }
    coverage
}

/// Records that fold refuses (each kept in the rejection ring with a message), and a
/// new node that joins for them: an event from an admitted origin that never joined,
/// a stale origin sequence, an invalid daemon intent, an admin command signed by a key
/// outside the keyring, a payload that is not signed sections.
fn rejected_records(time_ms: u64) -> Vec<AlignedVec<16>> {
    use common::event;
    let origin = "ckpt-extra";
    let heartbeat = EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 5 });
    let bad_spec = DaemonSpec::new("ckpt-bad", "");
    let mut sealer = meshos::trust::testing::MixedSealer::new(Config::for_tests().genesis.cluster_id());
    sealer.set_nonce_base(1 << 40);
    let mut records = vec![
        sealer.seal(&[event(origin, 1, heartbeat.clone())], time_ms),
        sealer.seal(
            &[
                event("ckpt-ghost", 1, EventKind::BlobAnnounce { blob: [0xcc; 32], size_bytes: 10 }),
                event(origin, 1, heartbeat),
                event(
                    origin,
                    2,
                    EventKind::DaemonIntent { spec: Box::new(bad_spec), runs_on: DaemonPlacement::AllNodes },
                ),
            ],
            time_ms,
        ),
    ];
    let mut stranger = meshos::trust::testing::MixedSealer::new(Config::for_tests().genesis.cluster_id());
    stranger.set_operator(OperatorKey::from_seed([7; 32]));
    records.push(
        stranger
            .seal(&[event(origin, 3, EventKind::Admin(Box::new(AdminCommand::ClearAvoid { node: None })))], time_ms),
    );
    let mut garbage = AlignedVec::<16>::new();
    garbage.extend_from_slice(&[0xa5; 48]);
    records.push(garbage);
    records
}

/// A generated log of a few thousand records (daemons, maintenance, cordons, the
/// keyring and signed admin commands, RTT samples) with `rejected_records` spliced in
/// after record `splice`.
fn generated_log(seed: u64, splice: usize) -> Records {
    let options = GenOptions { seed, nodes: 24, blobs: 300, replicas: 3, events: 40_000, record_events: 16 };
    let mut records = common::generate(options);
    let time_ms = records[splice - 1].0;
    let extra: Records = rejected_records(time_ms).into_iter().map(|payload| (time_ms, payload)).collect();
    records.splice(splice..splice, extra);
    records
}

#[test]
fn a_restored_engine_follows_a_generated_log_exactly() {
    let config = Config::for_tests();
    let records = generated_log(11, 700);
    let last = records.len() as u64;
    assert!(last > 2_000, "{last} records");
    let coverage = restore_and_compare(&records, &config, &[1, 703, 705, last / 2, last - 50, last]);
    println!("{} records; {coverage:?}", records.len());
    assert!(coverage.rejections >= 5, "{coverage:?}");
    assert!(coverage.keyring && coverage.daemons > 0 && coverage.rtt > 0, "{coverage:?}");
    assert!(coverage.maintenance > 0, "{coverage:?}");
}

#[test]
fn a_restored_engine_follows_a_simulated_cluster_exactly() {
    let config = sim_config(&Config::for_tests());
    let options = SimOptions { seed: 5, nodes: 12, blobs: 150, replicas: 3, steps: 1_200 };
    let (report, records) = run_logged(&options, &Config::for_tests());
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    let last = records.len() as u64;
    let at: Vec<u64> = [0.1, 0.25, 0.4, 0.55, 0.7, 0.9].iter().map(|share| (last as f64 * share) as u64).collect();
    let coverage = restore_and_compare(&records, &config, &at);
    println!("{} records; {coverage:?}", records.len());
    assert!(coverage.inflight > 0, "a checkpoint with actions in flight: {coverage:?}");
    assert!(coverage.daemons > 0 && coverage.keyring, "{coverage:?}");
}

/// A checkpoint of a busy state: the generated log folded to `position` (with the
/// rejected records in it), written at `dir`.
fn busy_checkpoint(dir: &Path) -> (PathBuf, State) {
    let config = Config::for_tests();
    let records = generated_log(3, 100);
    let mut engine = Engine::new(&config);
    for (index, (time_ms, payload)) in records.iter().take(400).enumerate() {
        engine.apply(index as u64 + 1, *time_ms, payload);
    }
    let store = CheckpointStore::new(dir, 1);
    let path = store.write(&engine.state).unwrap();
    (path, engine.state)
}

/// Rewrites both checksums of an image after a deliberate change, so the change
/// reaches the validation and the checks behind them.
fn reseal(bytes: &mut [u8]) {
    let body = crc32c::crc32c(&bytes[HEADER_BYTES..]);
    bytes[72..76].copy_from_slice(&body.to_le_bytes());
    let header = crc32c::crc32c(&bytes[..76]);
    bytes[76..80].copy_from_slice(&header.to_le_bytes());
}

fn load_bytes(bytes: &[u8], config: &Config) -> Result<State, CheckpointError> {
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    checkpoint::decode(Path::new("test.rkyv"), &aligned, config)
}

#[test]
fn flipped_bytes_and_truncation_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (path, state) = busy_checkpoint(dir.path());
    let config = Config::for_tests();
    let bytes = std::fs::read(&path).unwrap();
    let store = CheckpointStore::new(dir.path(), 1);
    assert_eq!(store.load(&path, &config).unwrap().state_hash(), state.state_hash());

    // Any flipped byte is caught by a checksum (or the magic).
    let step = (bytes.len() / 97).max(1);
    for offset in (0..bytes.len()).step_by(step).chain([0, 9, 20, 40, 76, bytes.len() - 1]) {
        let mut damaged = bytes.clone();
        damaged[offset] ^= 0x5a;
        let error = load_bytes(&damaged, &config).expect_err("a flipped byte must be refused");
        assert!(
            matches!(error, CheckpointError::Damaged { .. } | CheckpointError::BadMagic { .. }),
            "offset {offset}: {error}"
        );
    }
    // Cut anywhere, or extended: refused.
    for len in [0, 5, 8, 40, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 100, bytes.len() / 2, bytes.len() - 1] {
        let error = load_bytes(&bytes[..len], &config).expect_err("a cut file must be refused");
        assert!(matches!(error, CheckpointError::Damaged { .. }), "length {len}: {error}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(load_bytes(&longer, &config), Err(CheckpointError::Damaged { .. })));
    // The same through the file: the error names it.
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let error = store.load(&path, &config).unwrap_err();
    assert!(error.to_string().starts_with(&path.display().to_string()), "{error}");
    assert!(error.to_string().contains("damaged"), "{error}");
}

#[test]
fn changes_behind_valid_checksums_are_errors_or_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (path, state) = busy_checkpoint(dir.path());
    let config = Config::for_tests();
    let bytes = std::fs::read(&path).unwrap();
    let archive_start = bytes.len() - u64::from_le_bytes(bytes[64..72].try_into().unwrap()) as usize;
    let (mut refused, mut same) = (0, 0);
    // Bytes of the archive flipped with the checksums rewritten: bytecheck, the
    // column and invariant checks or the state hash must refuse every one that
    // changes the state; the rest (padding) give the very same state.
    let step = ((bytes.len() - archive_start) / 400).max(1);
    for offset in (archive_start..bytes.len()).step_by(step) {
        let mut changed = bytes.clone();
        changed[offset] ^= 0x01;
        reseal(&mut changed);
        match load_bytes(&changed, &config) {
            Ok(loaded) => {
                assert_eq!(loaded.state_hash(), state.state_hash(), "offset {offset}");
                same += 1;
            }
            Err(
                CheckpointError::Damaged { .. }
                | CheckpointError::HashMismatch { .. }
                | CheckpointError::Invariant { .. },
            ) => refused += 1,
            Err(error) => panic!("offset {offset}: unexpected {error}"),
        }
    }
    println!("{refused} refused, {same} harmless");
    assert!(refused > same, "{refused} refused, {same} harmless");

    // A header that claims an enormous archive or settings text.
    for (at, value) in [(64, u64::MAX), (12, u32::MAX as u64)] {
        let mut claiming = bytes.clone();
        let width = if at == 64 { 8 } else { 4 };
        claiming[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        reseal(&mut claiming);
        assert!(matches!(load_bytes(&claiming, &config), Err(CheckpointError::Damaged { .. })), "field at {at}");
        std::fs::write(&path, &claiming).unwrap();
        let error = checkpoint::read_file(&path, &config).unwrap_err();
        assert!(matches!(error, CheckpointError::Damaged { .. }), "field at {at}: {error}");
    }
    // A header that lies about the hash.
    let mut lying = bytes.clone();
    lying[32] ^= 1;
    reseal(&mut lying);
    assert!(matches!(load_bytes(&lying, &config), Err(CheckpointError::HashMismatch { .. })));
    // Another format version.
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&(checkpoint::FORMAT_VERSION + 1).to_le_bytes());
    reseal(&mut newer);
    let error = load_bytes(&newer, &config).unwrap_err();
    assert!(matches!(error, CheckpointError::Version { found, .. } if found == checkpoint::FORMAT_VERSION + 1));
    // Not a checkpoint at all (a snapshot file's magic).
    let mut other = bytes.clone();
    other[..8].copy_from_slice(b"MSHSNAP\0");
    assert!(matches!(load_bytes(&other, &config), Err(CheckpointError::BadMagic { .. })));
}

#[test]
fn other_fold_or_reconcile_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = busy_checkpoint(dir.path());
    let store = CheckpointStore::new(dir.path(), 1);
    let mut config = Config::for_tests();
    config.fold.blobs_max = 1_000;
    let error = store.load(&path, &config).unwrap_err();
    let CheckpointError::ConfigMismatch { section, field, .. } = &error else { panic!("{error}") };
    assert_eq!((*section, field.split(' ').next().unwrap()), ("fold", "blobs_max"));
    assert!(error.to_string().contains("checkpoint was made with different [fold] settings: blobs_max"), "{error}");
    let mut config = Config::for_tests();
    config.reconcile.action_timeout_ms = 1;
    let error = store.load(&path, &config).unwrap_err();
    assert!(error.to_string().contains("different [reconcile] settings: action_timeout_ms"), "{error}");
    // Node-local settings do not matter.
    let config = Config { frame_bytes_max: Config::for_tests().frame_bytes_max * 2, ..Config::for_tests() };
    store.load(&path, &config).expect("a node-local setting is not part of the state");
}

#[test]
fn the_store_keeps_the_newest_and_finds_by_position() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path().join("checkpoints"), 3);
    assert_eq!(store.latest(), None, "no directory yet");
    let config = Config::for_tests();
    let records = common::generate(common::small_options(4));
    let mut engine = Engine::new(&config);
    let mut written = Vec::new();
    for (index, (time_ms, payload)) in records.iter().take(50).enumerate() {
        let position = index as u64 + 1;
        engine.apply(position, *time_ms, payload);
        if position.is_multiple_of(10) {
            written.push((position, store.write(&engine.state).unwrap()));
        }
    }
    std::fs::write(store.dir.join("checkpoint-00000000000000000099.rkyv.tmp"), b"partial").unwrap();
    std::fs::write(store.dir.join("notes.txt"), b"not a checkpoint").unwrap();
    let kept: Vec<u64> = store.list().unwrap().iter().map(|(position, _)| *position).collect();
    assert_eq!(kept, [30, 40, 50]);
    assert_eq!(store.latest(), Some(written[4].clone()));
    assert_eq!(store.latest_at_or_below(49), Some(written[3].clone()));
    assert_eq!(store.latest_at_or_below(30), Some(written[2].clone()));
    assert_eq!(store.latest_at_or_below(29), None);
    assert_eq!(written[4].1.file_name().unwrap().to_str().unwrap(), "checkpoint-00000000000000000050.rkyv");
    let state = store.load(&written[4].1, &config).unwrap();
    assert_eq!(state.state_hash(), engine.state.state_hash());
}
