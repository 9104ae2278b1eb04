//! Checkpoints of the folded state at 1,000 nodes and 100k replicas: writing one
//! (`CheckpointStore::write`: state hash, archive, write, fsync, rename, directory
//! fsync, pruning) and loading one (`CheckpointStore::load`: read, checksums,
//! bytecheck, deserialise, index rebuild, state hash, invariants), with the parts of
//! each apart. Results: perf/checkpoint.md.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use meshos::config::Config;
use meshos::sim::fixtures::converged_cluster_with_rtt;
use meshos::state::checkpoint::{self, CheckpointStore};
use meshos::state::State;
use rkyv::util::AlignedVec;

const NODES: u32 = 1_000;
const BLOBS: u32 = 33_334;
const REPLICAS: u8 = 3;
/// RTT peers each node has measured (as in benches/snapshot.rs).
const RTT_PEERS: u32 = 8;

/// The converged fixture (100,002 replicas) plus RTT samples from every node to
/// `RTT_PEERS` others (the state of benches/snapshot.rs).
fn cluster(config: &Config) -> State {
    converged_cluster_with_rtt(config, NODES, BLOBS, REPLICAS, RTT_PEERS)
}

fn bench_checkpoint(c: &mut Criterion) {
    let config = Config::for_tests();
    let state = cluster(&config);
    assert_eq!(state.replicas.live, BLOBS * REPLICAS as u32);
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::new(dir.path(), 2);
    let path = store.write(&state).unwrap();
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "checkpoint of {} nodes, {} blobs, {} replicas, {} RTT pairs: {file_bytes} bytes",
        state.nodes.len(),
        state.blobs.len(),
        state.replicas.live,
        state.rtt.len()
    );

    let mut group = c.benchmark_group("checkpoint");
    group.sample_size(20);
    group.bench_function("write/100000", |b| b.iter(|| store.write(&state).unwrap()));
    group.bench_function("load/100000", |b| b.iter(|| store.load(&path, &config).unwrap().position));
    // The parts of a write.
    group.bench_function("state_hash/100000", |b| b.iter(|| state.state_hash()));
    let mut buffer = AlignedVec::new();
    group.bench_function("encode/100000", |b| {
        b.iter(|| {
            buffer = checkpoint::encode_into(&state, std::mem::take(&mut buffer)).unwrap();
            buffer.len()
        })
    });
    // The parts of a load: decode from memory (no read), then its steps alone.
    group.bench_function("decode/100000", |b| {
        b.iter(|| checkpoint::decode(Path::new("bench"), &buffer, &config).unwrap().position)
    });
    let archive_start = buffer.len() - u64::from_le_bytes(buffer[64..72].try_into().unwrap()) as usize;
    group.bench_function("bytecheck/100000", |b| {
        b.iter(|| {
            rkyv::access::<meshos::state::ArchivedState, rkyv::rancor::Error>(&buffer[archive_start..])
                .unwrap()
                .position
                .to_native()
        })
    });
    group.bench_function("deserialize/100000", |b| {
        let archived =
            rkyv::access::<meshos::state::ArchivedState, rkyv::rancor::Error>(&buffer[archive_start..]).unwrap();
        b.iter(|| rkyv::deserialize::<State, rkyv::rancor::Error>(archived).unwrap().position)
    });
    let mut rebuilt = state.clone();
    group.bench_function("rebuild_indexes/100000", |b| b.iter(|| rebuilt.rebuild_indexes().unwrap()));
    group.bench_function("verify_invariants/100000", |b| b.iter(|| state.verify_invariants().unwrap()));
    group.finish();
}

criterion_group!(benches, bench_checkpoint);
criterion_main!(benches);
