//! Fold throughput over a state of 100k replicas (100 nodes, 33,334 blobs x 3):
//! a replica-update stream and the generator's mixed cluster-life stream, both
//! validated from archived bytes and folded, as replay does. Results: perf/fold.md.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshos::config::Config;
use meshos::event::{Event, EventBatch, EventKind, ReplicaState};
use meshos::fold::fold_payload;
use meshos::sim::gen::{GenOptions, Generator};
use meshos::state::State;
use meshos::wire;
use rkyv::util::AlignedVec;

const RECORD_EVENTS: usize = 512;
const STREAM_RECORDS: usize = 200;

type Records = Vec<(u64, AlignedVec<16>)>;

/// Generates setup plus `live_events` of cluster life; returns the base state (setup
/// folded) and the live records.
fn cluster(live_events: u64) -> (State, Records) {
    let options =
        GenOptions { seed: 42, nodes: 100, blobs: 33_334, replicas: 3, events: 0, record_events: RECORD_EVENTS as u32 };
    // setup: 2 per node, 2 daemon intents, 3 per daemon instance (150), 2 + 2 x replicas per blob
    let setup_events = 2 * 100 + 2 + 3 * 150 + 33_334 * 8;
    let limits = Config::for_tests().fold;
    let mut generator = Generator::new(GenOptions { events: setup_events + live_events, ..options }, &limits).unwrap();
    let mut state = State::new(&Config::for_tests());
    let mut batch = EventBatch::default();
    let mut live = Vec::new();
    let mut folded_events = 0;
    while let Some(time_ms) = generator.next_batch(&mut batch) {
        let payload = wire::encode_batch(&batch);
        if folded_events < setup_events {
            let position = state.position + 1;
            fold_payload(&mut state, position, time_ms, &payload);
            folded_events += batch.events.len() as u64;
        } else {
            live.push((time_ms, payload));
        }
    }
    assert_eq!(state.rejections.total, 0);
    assert!(state.replicas.len() >= 100_000, "{} replicas", state.replicas.len());
    (state, live)
}

/// Records of replica updates that flip existing replicas between Healthy and Pulling.
fn replica_updates(state: &State) -> Records {
    let mut origin_seq = state.nodes.origin_seq_last.clone();
    let mut records = Vec::new();
    let replicas = state.replicas.len();
    let mut cursor = 0usize;
    for record in 0..STREAM_RECORDS {
        let mut events = Vec::with_capacity(RECORD_EVENTS);
        for _ in 0..RECORD_EVENTS {
            let row = cursor % replicas;
            cursor += 7919; // a prime stride: touch replicas all over the table
            let node = state.replicas.node[row].index();
            origin_seq[node] += 1;
            let healthy = (cursor / replicas) % 2 == 1;
            events.push(Event {
                origin: state.nodes.name[node].to_string(),
                origin_seq: origin_seq[node],
                kind: EventKind::ReplicaUpdate {
                    blob: state.blobs.hash[state.replicas.blob[row].index()],
                    state: if healthy { ReplicaState::Healthy } else { ReplicaState::Pulling },
                },
            });
        }
        records.push((state.now_ms + 100 * record as u64, wire::encode_batch(&EventBatch { events })));
    }
    records
}

fn fold_all(mut state: State, records: &Records) -> State {
    for (time_ms, payload) in records {
        let position = state.position + 1;
        fold_payload(&mut state, position, *time_ms, payload);
    }
    state
}

fn bench_fold(c: &mut Criterion) {
    let (base, mixed) = cluster((STREAM_RECORDS * RECORD_EVENTS) as u64);
    let updates = replica_updates(&base);
    let check = fold_all(base.clone(), &updates);
    assert_eq!(check.rejections.total, 0, "replica stream must be all valid");
    let check = fold_all(base.clone(), &mixed);
    assert_eq!(check.rejections.total, 0, "mixed stream must be all valid");

    let mut group = c.benchmark_group("fold_100k_replicas");
    group.sample_size(20);
    group.throughput(Throughput::Elements((STREAM_RECORDS * RECORD_EVENTS) as u64));
    for (name, records) in [("replica_updates", &updates), ("mixed", &mixed)] {
        group.bench_function(name, |b| {
            b.iter_batched(|| base.clone(), |state| fold_all(state, records), BatchSize::LargeInput)
        });
    }
    group.bench_function("validate_only", |b| {
        b.iter(|| {
            for (_, payload) in &updates {
                std::hint::black_box(wire::access_batch(payload).unwrap());
            }
        })
    });
    group.finish();
    c.bench_function("state_hash_100k_replicas", |b| b.iter(|| std::hint::black_box(base.state_hash())));
}

criterion_group!(benches, bench_fold);
criterion_main!(benches);
