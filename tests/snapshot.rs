//! The behaviour snapshot for Deck: a state built through fold and reconcile round
//! trips through the file with every section equal to the state's values; the reader
//! hands out references into the mapping (in place); bad files are refused with a clear
//! error; the writer's rate bound; a running node writes its snapshot and the CLI reads it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{admin, event, small_cluster_records};
use meshos::config::{Config, SnapshotLimits};
use meshos::engine::Engine;
use meshos::event::{AdminCommand, Event, EventKind, PlacementIntent};
use meshos::snapshot::{
    encode_into, write_atomically, write_file_atomically, MappedSnapshot, Snapshot, SnapshotError, SnapshotWriter,
    DRIFT_UNDER, FORMAT_VERSION, HEADER_BYTES, HOLDER_COUNTED, HOLDER_PLANNED, NONE,
};
use meshos::state::State;

/// Folds records through the engine (fold, then the incremental pass), 100 ms apart.
struct Cluster {
    engine: Engine,
    seqs: BTreeMap<String, u64>,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster { engine: Engine::new(&Config::for_tests()), seqs: BTreeMap::new() }
    }

    fn apply(&mut self, events: &[Event]) {
        for event in events {
            let seq = self.seqs.entry(event.origin.clone()).or_insert(0);
            *seq = (*seq).max(event.origin_seq);
        }
        let position = self.engine.state.position + 1;
        let time_ms = 1_000 + position * 100;
        let payload = meshos::trust::testing::seal_for(&self.engine.state, events, time_ms);
        self.engine.apply(position, time_ms, &payload);
    }

    fn next(&mut self, origin: &str) -> u64 {
        let seq = self.seqs.entry(origin.to_string()).or_insert(0);
        *seq += 1;
        *seq
    }

    fn state(&self) -> &State {
        &self.engine.state
    }
}

/// Four nodes with a daemon each and two blobs at their intent; then RTT samples, an
/// event from an unknown origin (rejected), a third blob nobody holds (under its
/// intent, held for want of a source), and node n2 entering maintenance (its copies
/// move elsewhere: actions in flight, drain blockers).
fn busy_cluster() -> Cluster {
    let mut cluster = Cluster::new();
    for events in small_cluster_records() {
        cluster.apply(&events);
    }
    let mut record = Vec::new();
    for (from, to, rtt_us) in [("n1", "n2", 500), ("n2", "n3", 800), ("n3", "n4", 300), ("n4", "n1", 400)] {
        let seq = cluster.next(from);
        record.push(event(from, seq, EventKind::Rtt { peer: to.to_string(), rtt_us }));
    }
    // Only a heartbeat or a capability introduces a node: this is refused.
    record.push(event("ghost", 1, EventKind::Rtt { peer: "n1".to_string(), rtt_us: 100 }));
    let blob = [0xb3; 32];
    let seq = cluster.next("n1");
    record.push(event("n1", seq, EventKind::BlobAnnounce { blob, size_bytes: 4096 }));
    let seq = cluster.next("n1");
    let intent = PlacementIntent { blob, replicas: 3, zone_spread: false, pinned: Vec::new() };
    record.push(event("n1", seq, EventKind::PlacementIntent(intent)));
    cluster.apply(&record);
    let seq = cluster.next("n1");
    cluster.apply(&[admin("n1", seq, AdminCommand::EnterMaintenance { node: "n2".to_string() })]);
    cluster.state().check_invariants();
    cluster
}

fn open_written(state: &State, dir: &Path) -> MappedSnapshot {
    let path = dir.join("snapshot.rkyv");
    let report = write_atomically(&path, state, "n1", &SnapshotLimits::default()).expect("write");
    assert_eq!(report.position, state.position);
    assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());
    MappedSnapshot::open(&path).expect("open what was just written")
}

#[test]
fn every_section_round_trips_with_the_states_values() {
    let cluster = busy_cluster();
    let state = cluster.state();
    let dir = tempfile::tempdir().unwrap();
    let mapped = open_written(state, dir.path());
    let snapshot = mapped.get();

    // The situation the sections must show is really there.
    let n2 = state.nodes.find("n2").unwrap().index();
    assert_eq!(state.nodes.maintenance[n2].name(), "entering_maintenance");
    assert!(state.nodes.drain_unsafe_copies[n2] > 0, "n2's copies block its drain");
    assert!(!state.inflight.is_empty(), "moves off n2 and daemon starts are in flight");
    assert!(state.rejections.total >= 1 && state.rtt.len() == 4);

    // Header fields.
    assert_eq!(snapshot.format_version, FORMAT_VERSION);
    assert_eq!(snapshot.writer_node.as_str(), "n1");
    assert!(snapshot.written_unix_ms > 1_700_000_000_000, "the writer stamps wall time");
    assert_eq!(snapshot.position, state.position);
    assert_eq!(snapshot.log_time_ms, state.now_ms);
    assert_eq!(snapshot.events_applied, state.events_applied);
    assert_eq!(snapshot.state_hash(), state.state_hash());

    // Nodes: health, heat, maintenance and drain progress, capability, locality.
    let nodes = &snapshot.nodes;
    assert_eq!(nodes.name.len(), state.nodes.len());
    for row in 0..state.nodes.len() {
        let from = &state.nodes;
        assert_eq!(nodes.name[row].as_str(), &*from.name[row]);
        assert_eq!(nodes.status[row], from.status[row] as u8);
        assert_eq!(nodes.live[row], from.live[row]);
        assert_eq!(nodes.eligible[row], from.eligible[row]);
        assert_eq!(nodes.load_permille[row], from.load_permille[row]);
        assert_eq!(nodes.avoid[row], from.avoid[row]);
        assert_eq!(nodes.cordoned[row], from.cordoned[row]);
        let maintenance =
            meshos::snapshot::ArchivedSnapshot::name_of(&snapshot.names.maintenance, nodes.maintenance[row]);
        assert_eq!(maintenance, from.maintenance[row].name());
        assert_eq!(nodes.maintenance_since_ms[row], from.maintenance_since_ms[row]);
        assert_eq!(nodes.drain_unsafe_copies[row], from.drain_unsafe_copies[row]);
        assert_eq!(nodes.drain_moving_copies[row], from.drain_moving_copies[row]);
        assert_eq!(nodes.drain_daemons_left[row], from.drain_daemons_left[row]);
        assert_eq!(nodes.drain_unsafe_bytes[row], from.drain_unsafe_bytes[row]);
        assert_eq!(nodes.drain_eta_ms[row], from.drain_eta_ms[row]);
        assert_eq!(nodes.drain_deadline_ms[row], from.drain_deadline_ms[row]);
        assert_eq!(nodes.capability_version[row], from.capability_version[row]);
        let zone = snapshot.symbols[nodes.zone[row].to_native() as usize].as_str();
        assert_eq!(zone, state.symbols.name(from.zone[row]));
        let labels: Vec<&str> =
            nodes.labels(row).map(|index| snapshot.symbols[nodes.label[index].to_native() as usize].as_str()).collect();
        let expected: Vec<&str> = from.labels[row].iter().map(|label| state.symbols.name(*label)).collect();
        assert_eq!(labels, expected);
        assert_eq!(nodes.healthy_copies[row], from.healthy_copies[row]);
        assert_eq!(nodes.moves_inflight[row], state.inflight.moves_by_node[row]);
        let coordinate = &from.coordinate[row];
        let locality = &snapshot.locality;
        assert_eq!(locality.coordinate_x_us[row], coordinate.x_us);
        assert_eq!(locality.coordinate_y_us[row], coordinate.y_us);
        assert_eq!(locality.coordinate_height_us[row], coordinate.height_us);
        assert_eq!(locality.coordinate_error[row], coordinate.error);
        assert_eq!(locality.rtt_average_us[row], from.rtt_average_us[row]);
    }

    // Blobs: intent, copies (holders with their flags), plan, gate, drift.
    let blobs = &snapshot.blobs;
    assert_eq!(blobs.hash.len(), state.blobs.len());
    for blob in 0..state.blobs.len() {
        let from = &state.blobs;
        assert_eq!(blobs.hash[blob], from.hash[blob]);
        assert_eq!(blobs.size_bytes[blob], from.size_bytes[blob]);
        assert_eq!(blobs.replicas_wanted[blob], from.replicas_wanted[blob]);
        assert_eq!(blobs.healthy_count[blob], from.healthy_count[blob]);
        assert_eq!(blobs.held_by[blob], from.held_by[blob]);
        assert_eq!(blobs.held_until_ms[blob], from.held_until_ms[blob]);
        let holders: Vec<(u32, u8)> = blobs
            .holders(blob)
            .map(|index| (blobs.holder_node[index].to_native(), blobs.holder_state[index]))
            .collect();
        let expected: Vec<(u32, u8)> = from.replica_rows[blob]
            .iter()
            .map(|row| row.index())
            .filter(|&row| state.replicas.state[row] != meshos::event::ReplicaState::Deleted)
            .map(|row| (state.replicas.node[row].0, state.replicas.state[row] as u8))
            .collect();
        assert_eq!(holders, expected, "holders of blob {blob}");
        for index in blobs.holders(blob) {
            let node = blobs.holder_node[index].to_native();
            let row = state.replicas.find(meshos::state::ids::BlobRow(blob as u32), meshos::state::ids::NodeRow(node));
            let planned = state.replicas.planned[row.unwrap().index()];
            assert_eq!(blobs.holder_flags[index] & HOLDER_PLANNED != 0, planned);
        }
        let plan: Vec<u32> = blobs.plan(blob).map(|index| blobs.plan_node[index].to_native()).collect();
        assert_eq!(plan, from.plan[blob].iter().map(|node| node.0).collect::<Vec<_>>());
        let counted = blobs.holders(blob).filter(|&index| blobs.holder_flags[index] & HOLDER_COUNTED != 0).count();
        assert_eq!(blobs.counted_copies[blob], counted as u32);
    }

    // Drift: the blob nobody holds is under its intent, and listed first.
    let b3 = state.blobs.find(&[0xb3; 32]).unwrap().index();
    assert_eq!(blobs.drift[b3], DRIFT_UNDER);
    assert_eq!(snapshot.drift.listed[0], b3 as u32);
    assert!(snapshot.drift.blobs_under >= 1 && snapshot.drift.copies_missing >= 3);

    // Pending: every held blob counted, by gate; the first ones listed with the gate.
    let held = (0..state.blobs.len()).filter(|&blob| state.blobs.held_by[blob] != 0).count();
    assert_eq!(snapshot.pending.blobs_held, held as u32);
    assert_eq!(snapshot.pending.listed.len(), held);
    let b3_pending = snapshot.pending.listed.iter().find(|pending| pending.blob == b3 as u32).expect("b3 is held");
    let gate = meshos::snapshot::ArchivedSnapshot::name_of(&snapshot.names.gate, b3_pending.gate);
    assert_eq!(gate, "no_source");

    // Specs and daemons.
    assert_eq!(snapshot.specs.len(), state.specs.len());
    assert_eq!(snapshot.specs[0].name.as_str(), "web");
    assert_eq!(snapshot.daemons.len(), state.daemons.len());
    for (row, daemon) in snapshot.daemons.iter().enumerate() {
        let from = &state.daemons;
        assert_eq!(daemon.spec, from.spec[row].0);
        assert_eq!(daemon.node, from.node[row].0);
        let name = meshos::snapshot::ArchivedSnapshot::name_of(&snapshot.names.daemon_state, daemon.state);
        assert_eq!(name, from.state[row].name());
        assert_eq!(daemon.pid, from.pid[row]);
        assert_eq!(daemon.healthy, from.healthy[row]);
        assert_eq!(daemon.crashes, from.crashes[row]);
        assert_eq!(daemon.start_after_ms, from.start_after_ms[row]);
        assert_eq!(daemon.gated, from.gated[row]);
    }

    // Actions in flight, in the table's order.
    assert_eq!(snapshot.actions.len(), state.inflight.len());
    for (action, entry) in snapshot.actions.iter().zip(state.inflight.entries.iter()) {
        assert_eq!(action.position, entry.action.id.position);
        assert_eq!(action.index, entry.action.id.index);
        assert_eq!(action.kind, entry.action.kind.code());
        assert_eq!(action.node, entry.action.node.0);
        assert_eq!(action.blob, entry.action.kind.blob().map_or(NONE, |blob| blob.0));
        assert_eq!(action.peer, entry.action.kind.peer().map_or(NONE, |node| node.0));
        assert_eq!(action.emitted_ms, entry.emitted_ms);
        assert_eq!(action.deadline_ms, entry.deadline_ms);
    }
    let kinds: Vec<&str> = snapshot
        .actions
        .iter()
        .map(|action| meshos::snapshot::ArchivedSnapshot::name_of(&snapshot.names.action_kind, action.kind))
        .collect();
    assert!(kinds.contains(&"migrate_blob") && kinds.contains(&"start_daemon"), "{kinds:?}");

    // Gates and budgets.
    let gates = &snapshot.gates;
    assert_eq!(gates.backpressure, state.gates.backpressure);
    assert_eq!(gates.brake, state.gates.brake);
    assert_eq!(gates.window_moves, state.gates.window_moves);
    assert_eq!(gates.moves_inflight, state.inflight.moves);
    assert_eq!(gates.pull_inflight_max, state.reconcile.pull_inflight_max);
    assert_eq!(gates.daemon_actions_inflight, state.inflight.daemon_actions);
    assert_eq!(gates.next_open_ms, state.gates.next_open_ms);
    assert_eq!(gates.transfer_bytes_per_s, state.gates.transfer_bytes_per_s);

    // Failures: counted by reason, the latest listed with their message.
    let failures = &snapshot.failures;
    assert_eq!(failures.rejected_total, state.rejections.total);
    assert_eq!(failures.rejected_by_reason.len(), state.rejections.by_reason.len());
    assert_eq!(failures.recent.len(), state.rejections.kept.len());
    let last = failures.recent.last().unwrap();
    let kept = state.rejections.kept.back().unwrap();
    assert_eq!(last.message.as_str(), kept.reason.to_string());
    assert_eq!(last.origin.as_str(), "ghost");
    assert_eq!(
        meshos::snapshot::ArchivedSnapshot::name_of(&snapshot.names.reject_reason, last.reason),
        "unknown_origin"
    );
    assert_eq!(failures.actions_failed, state.inflight.failed);

    // Placement stability and the locality map.
    assert_eq!(snapshot.placement.placement_epoch, state.placement_epoch);
    assert_eq!(snapshot.placement.moves_inflight, state.inflight.moves);
    let locality = &snapshot.locality;
    assert_eq!(locality.rtt_pairs_total, 4);
    for pair in 0..state.rtt.len() {
        assert_eq!(locality.rtt_from[pair], state.rtt.from[pair].0);
        assert_eq!(locality.rtt_to[pair], state.rtt.to[pair].0);
        assert_eq!(locality.rtt_pair_average_us[pair], state.rtt.average_us[pair]);
        assert_eq!(locality.rtt_samples[pair], state.rtt.samples[pair]);
    }

    // What blocks the drain: exactly the copies reconcile counts as unsafe.
    let blockers = &snapshot.drain_blockers;
    assert_eq!(blockers.total, state.nodes.drain_unsafe_copies[n2]);
    assert!(blockers
        .listed
        .iter()
        .all(|blocker| blocker.node == n2 as u32 && blocker.copies_elsewhere < blocker.copies_needed));

    // And the whole archive, deserialised, is exactly what `from_state` builds.
    let mut decoded: Snapshot = rkyv::deserialize::<Snapshot, rkyv::rancor::Error>(snapshot).unwrap();
    decoded.written_unix_ms = 0;
    assert_eq!(decoded, Snapshot::from_state(state, "n1", &SnapshotLimits::default()));

    // The summary agrees with the columns.
    let summary = snapshot.summary();
    assert_eq!(summary.position, state.position);
    assert_eq!(summary.nodes_away.len(), 1);
    assert_eq!(summary.nodes_away[0].node, "n2");
    assert_eq!(summary.actions_inflight as usize, state.inflight.len());
}

#[test]
fn listed_sections_stop_at_their_limits_and_count_the_rest() {
    let cluster = busy_cluster();
    let state = cluster.state();
    let limits = SnapshotLimits {
        failures_listed_max: 0,
        drift_listed_max: 1,
        pending_listed_max: 0,
        rtt_pairs_listed_max: 2,
        drain_blockers_listed_max: 1,
    };
    let snapshot = Snapshot::from_state(state, "n1", &limits);
    assert!(snapshot.failures.recent.is_empty() && snapshot.failures.rejected_total >= 1);
    assert_eq!(snapshot.drift.listed.len(), 1);
    assert!(snapshot.pending.listed.is_empty() && snapshot.pending.blobs_held >= 1);
    assert_eq!(snapshot.locality.rtt_from.len(), 2);
    assert_eq!(snapshot.locality.rtt_pairs_total, 4);
    assert_eq!(snapshot.drain_blockers.listed.len(), 1);
    assert!(snapshot.drain_blockers.total >= 1);
    // All four samples came in one record: ties go to the later rows, listed by row.
    assert_eq!(snapshot.locality.rtt_from, vec![state.rtt.from[2].0, state.rtt.from[3].0]);
}

#[test]
fn the_reader_hands_out_references_into_the_mapping() {
    let cluster = busy_cluster();
    let dir = tempfile::tempdir().unwrap();
    let mapped = open_written(cluster.state(), dir.path());
    let mapping = mapped.bytes().as_ptr_range();
    let inside = |address: *const u8| mapping.contains(&address);
    let snapshot = mapped.get();
    // The root, a string's bytes, a column's elements, a row struct: all in the mapping.
    assert!(inside((snapshot as *const meshos::snapshot::ArchivedSnapshot).cast()));
    assert!(inside(snapshot.nodes.name[0].as_str().as_ptr()));
    assert!(inside(snapshot.blobs.hash[0].as_ptr()));
    assert!(inside((&snapshot.blobs.holder_node[0] as *const rkyv::rend::u32_le).cast()));
    assert!(inside((&snapshot.actions[0] as *const meshos::snapshot::ArchivedActionView).cast()));
    // The mapping is the file (mmap is page-aligned; the heap would not give this).
    assert_eq!(mapped.bytes().as_ptr() as usize % 4096, 0, "mapped pages, not a heap copy");
    assert_eq!(mapped.bytes(), std::fs::read(dir.path().join("snapshot.rkyv")).unwrap().as_slice());
    // A snapshot replaced while mapped stays readable and unchanged (rename, not rewrite).
    let position = snapshot.position.to_native();
    let mut later = cluster;
    let seq = later.next("n3");
    later.apply(&[common::heartbeat("n3", seq)]);
    write_atomically(&dir.path().join("snapshot.rkyv"), later.state(), "n1", &SnapshotLimits::default()).unwrap();
    assert_eq!(mapped.get().position.to_native(), position);
    let reopened = MappedSnapshot::open(&dir.path().join("snapshot.rkyv")).unwrap();
    assert_eq!(reopened.get().position.to_native(), position + 1);
    // And it can be read from another thread (Send + Sync).
    let summary = std::thread::spawn(move || reopened.get().summary()).join().unwrap();
    assert_eq!(summary.position, position + 1);
}

/// Writes `bytes` as a file and opens it.
fn open_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<MappedSnapshot, SnapshotError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    MappedSnapshot::open(&path)
}

#[test]
fn bad_files_are_refused_with_a_clear_error() {
    let cluster = busy_cluster();
    let dir = tempfile::tempdir().unwrap();
    let snapshot = Snapshot::from_state(cluster.state(), "n1", &SnapshotLimits::default());
    let good = encode_into(&snapshot, Default::default()).unwrap().to_vec();
    assert!(open_bytes(dir.path(), "good", &good).is_ok());

    let error = MappedSnapshot::open(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(error, SnapshotError::Io { .. }), "{error}");
    assert!(error.to_string().contains("missing"), "{error}");

    for (name, bytes) in [("empty", &good[..0]), ("header-only", &good[..HEADER_BYTES])] {
        let error = open_bytes(dir.path(), name, bytes).unwrap_err();
        assert!(matches!(error, SnapshotError::TooShort { .. }), "{name}: {error}");
        assert!(error.to_string().contains("too short") && error.to_string().contains(name), "{error}");
    }

    let garbage: Vec<u8> = (0..4096u32).map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let error = open_bytes(dir.path(), "garbage", &garbage).unwrap_err();
    assert!(matches!(error, SnapshotError::NotASnapshot { .. }), "{error}");
    assert!(error.to_string().contains("not a MeshOS snapshot"), "{error}");

    let mut wrong_version = good.clone();
    wrong_version[8..12].copy_from_slice(&99u32.to_le_bytes());
    let error = open_bytes(dir.path(), "version", &wrong_version).unwrap_err();
    assert!(matches!(error, SnapshotError::UnsupportedVersion { found: 99, .. }), "{error}");
    assert!(error.to_string().contains("version 99"), "{error}");

    for cut in [1, 100, good.len() / 2] {
        let error = open_bytes(dir.path(), "truncated", &good[..good.len() - cut]).unwrap_err();
        assert!(matches!(error, SnapshotError::Checksum { .. }), "cut {cut}: {error}");
        assert!(error.to_string().contains("damaged or truncated"), "{error}");
    }

    let mut flipped = good.clone();
    let middle = HEADER_BYTES + (good.len() - HEADER_BYTES) / 2;
    flipped[middle] ^= 0x40;
    let error = open_bytes(dir.path(), "flipped", &flipped).unwrap_err();
    assert!(matches!(error, SnapshotError::Checksum { .. }), "{error}");

    // Garbage behind a correct header and checksum: rkyv's validation refuses it.
    let mut forged = good[..HEADER_BYTES].to_vec();
    forged.extend_from_slice(&garbage);
    let checksum = crc32c::crc32c(&forged[HEADER_BYTES..]);
    forged[12..16].copy_from_slice(&checksum.to_le_bytes());
    let error = open_bytes(dir.path(), "forged", &forged).unwrap_err();
    assert!(matches!(error, SnapshotError::Invalid { .. }), "{error}");
    assert!(error.to_string().contains("fails validation"), "{error}");

    // A valid archive of a snapshot out of shape: a column shorter than its table.
    let mut out_of_shape = snapshot.clone();
    out_of_shape.nodes.status.pop();
    let bytes = encode_into(&out_of_shape, Default::default()).unwrap();
    let error = open_bytes(dir.path(), "shape", &bytes).unwrap_err();
    assert!(matches!(error, SnapshotError::Invalid { .. }), "{error}");
    assert!(error.to_string().contains("nodes.status"), "{error}");

    // A row reference past its table.
    let mut dangling = snapshot.clone();
    dangling.blobs.holder_node[0] = 9_999;
    let bytes = encode_into(&dangling, Default::default()).unwrap();
    let error = open_bytes(dir.path(), "dangling", &bytes).unwrap_err();
    assert!(error.to_string().contains("blobs.holder_node refers to row 9999"), "{error}");

    // A header and an archive that disagree on the version.
    let other_version = Snapshot { format_version: FORMAT_VERSION + 1, ..snapshot.clone() };
    let bytes = encode_into(&other_version, Default::default()).unwrap();
    let error = open_bytes(dir.path(), "inner-version", &bytes).unwrap_err();
    assert!(matches!(error, SnapshotError::Invalid { .. }), "{error}");
    assert!(error.to_string().contains("format version"), "{error}");
}

#[test]
fn the_writer_writes_at_most_once_per_interval_and_only_when_the_log_moved() {
    let mut cluster = busy_cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.rkyv");
    let mut writer = SnapshotWriter::new(path.clone(), "n1", 1000, SnapshotLimits::default());
    let start = Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);

    let first = writer.maybe_write(cluster.state(), at(0)).unwrap().expect("the first call writes");
    assert_eq!(first.position, cluster.state().position);
    let seq = cluster.next("n3");
    cluster.apply(&[common::heartbeat("n3", seq)]);
    assert_eq!(writer.maybe_write(cluster.state(), at(999)).unwrap(), None, "within the interval");
    assert_eq!(MappedSnapshot::open(&path).unwrap().get().position.to_native(), first.position);
    let second = writer.maybe_write(cluster.state(), at(1000)).unwrap().expect("the interval passed");
    assert_eq!(second.position, first.position + 1);
    assert_eq!(writer.maybe_write(cluster.state(), at(5000)).unwrap(), None, "the log has not moved");
    assert_eq!(writer.stats.written, 2);
    assert!(!meshos::snapshot::temporary_path(&path).exists(), "the temporary file was renamed");

    // At stop the last state is written whatever the interval, once.
    let seq = cluster.next("n3");
    cluster.apply(&[common::heartbeat("n3", seq)]);
    writer.finish(cluster.state());
    writer.finish(cluster.state());
    assert_eq!(writer.stats.written, 3);
    assert_eq!(MappedSnapshot::open(&path).unwrap().get().position.to_native(), second.position + 1);

    // Interval 0: snapshots are off.
    let off_path = dir.path().join("off.rkyv");
    let mut off = SnapshotWriter::new(off_path.clone(), "n1", 0, SnapshotLimits::default());
    assert_eq!(off.maybe_write(cluster.state(), at(0)).unwrap(), None);
    off.finish(cluster.state());
    assert!(!off_path.exists());

    // A write that fails is reported and retried after the interval, not before.
    let mut failing = SnapshotWriter::new(dir.path().join("no/such/dir/s.rkyv"), "n1", 1000, SnapshotLimits::default());
    assert!(matches!(failing.maybe_write(cluster.state(), at(0)), Err(SnapshotError::Io { .. })));
    assert_eq!(failing.maybe_write(cluster.state(), at(10)).unwrap(), None);
    assert!(failing.maybe_write(cluster.state(), at(1000)).is_err());
    assert_eq!(failing.stats.failed, 2);
}

#[test]
fn write_file_atomically_replaces_the_file_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file");
    write_file_atomically(&path, b"first").unwrap();
    write_file_atomically(&path, b"second, longer").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("file")], "no temporary file left");
}

#[test]
fn a_running_node_writes_its_snapshot_and_the_last_one_at_stop() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "name = \"node-s\"\ndata_dir = \"{}\"\nheartbeat_ms = 50\n\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\n\n\
         [snapshot]\ninterval_ms = 100\n",
        dir.path().display()
    );
    let config = meshos::node::config::NodeConfig::parse(&text).unwrap();
    let path = config.snapshot_path();
    let node = meshos::node::run::spawn(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Heartbeats move the log; the snapshot follows at most every 100 ms.
    loop {
        if let Ok(mapped) = MappedSnapshot::open(&path) {
            if mapped.get().position.to_native() >= 3 {
                assert_eq!(mapped.get().writer_node.as_str(), "node-s");
                assert_eq!(mapped.get().nodes.name[0].as_str(), "node-s");
                break;
            }
        }
        assert!(Instant::now() < deadline, "no snapshot at position 3 within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = node.stop().unwrap();
    let mapped = MappedSnapshot::open(&path).unwrap();
    assert_eq!(mapped.get().position.to_native(), report.position, "the last state is written at stop");
    assert_eq!(mapped.get().state_hash(), report.state_hash);

    // `meshos snapshot show` reads it, as text and as JSON.
    let binary = env!("CARGO_BIN_EXE_meshos");
    let output = std::process::Command::new(binary).args(["snapshot", "show", "--file"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains(&format!("position={} state_hash={:032x}", report.position, report.state_hash)), "{text}");
    assert!(text.contains("maintenance: active=1"), "{text}");
    let output = std::process::Command::new(binary)
        .args(["snapshot", "show", "-o", "json", "--file"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let json = String::from_utf8(output.stdout).unwrap();
    assert!(json.starts_with('{') && json.trim_end().ends_with('}'), "{json}");
    assert!(json.contains(&format!("\"position\":{}", report.position)), "{json}");
    assert!(json.contains("\"nodes_by_maintenance\":{\"active\":1}"), "{json}");

    // A file that is not a snapshot: exit 1 with the reason.
    let bad = dir.path().join("bad.rkyv");
    std::fs::write(&bad, b"definitely not a snapshot file").unwrap();
    let output = std::process::Command::new(binary).args(["snapshot", "show", "--file"]).arg(&bad).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a MeshOS snapshot"));
}
