//! The behaviour snapshot for Deck at 1,000 nodes and 100k replicas: writing it
//! (build from the state, archive, write, fsync, rename, directory fsync) and opening
//! it (map, checksum, validation, shape check). Targets: write < 50 ms, open < 20 ms.
//! The state hash, the build and the archive alone show where a write's time goes.
//! Results: perf/snapshot.md.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use meshos::config::{Config, SnapshotLimits};
use meshos::sim::fixtures::converged_cluster_with_rtt;
use meshos::snapshot::{encode_into, MappedSnapshot, Snapshot, SnapshotWriter};
use meshos::state::State;
use rkyv::util::AlignedVec;

const NODES: u32 = 1_000;
const BLOBS: u32 = 33_334;
const REPLICAS: u8 = 3;
/// RTT peers each node has measured (so the locality map is not empty).
const RTT_PEERS: u32 = 8;

/// The converged fixture (100,002 replicas) plus RTT samples from every node to
/// `RTT_PEERS` others, folded through a feeder that continues its sequence numbers.
fn cluster() -> State {
    converged_cluster_with_rtt(&Config::for_tests(), NODES, BLOBS, REPLICAS, RTT_PEERS)
}

fn bench_snapshot(c: &mut Criterion) {
    let state = cluster();
    let replicas = state.replicas.live;
    assert_eq!(replicas, BLOBS * REPLICAS as u32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.rkyv");
    let limits = SnapshotLimits::default();
    let mut writer = SnapshotWriter::new(path.clone(), "node-00000", 1000, limits);
    let report = writer.write_now(&state, Instant::now()).unwrap();
    eprintln!(
        "snapshot of {} nodes, {} blobs, {} replicas, {} RTT pairs: {} bytes",
        state.nodes.len(),
        state.blobs.len(),
        replicas,
        state.rtt.len(),
        report.file_bytes
    );

    let mut group = c.benchmark_group("snapshot");
    group.sample_size(30);
    // The parts of a write: the state hash (part of the build), the build, the archive.
    group.bench_function("state_hash/100000", |b| b.iter(|| state.state_hash()));
    let mut snapshot = Snapshot::default();
    group.bench_function("build/100000", |b| b.iter(|| snapshot.fill_from(&state, "node-00000", &limits)));
    let mut buffer = AlignedVec::new();
    group.bench_function("archive/100000", |b| {
        b.iter(|| {
            buffer = encode_into(&snapshot, std::mem::take(&mut buffer)).unwrap();
            buffer.len()
        })
    });
    group.bench_function("write/100000", |b| b.iter(|| writer.write_now(&state, Instant::now()).unwrap().file_bytes));
    group.bench_function("open/100000", |b| {
        b.iter(|| {
            let mapped = MappedSnapshot::open(&path).unwrap();
            mapped.get().position.to_native()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_snapshot);
criterion_main!(benches);
