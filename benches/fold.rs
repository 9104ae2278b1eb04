//! Fold throughput over a state of 100k replicas (100 nodes, 33,334 blobs x 3):
//! a replica-update stream and the generator's mixed cluster-life stream, both
//! signed records (one signer per record, as a node's or an operator's), validated
//! from archived bytes and folded, as replay does: with fold verifying every
//! signature itself, with the signatures already verified ahead of fold (what the
//! fold thread pays when a verifier runs beside it), and the verification alone.
//! Results: perf/fold.md.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshos::config::Config;
use meshos::event::{Event, EventBatch, EventKind, ReplicaState};
use meshos::fold::{fold_payload, fold_payload_verified, verified_sections, VerifiedSections};
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
    let mut sealer = meshos::trust::testing::MixedSealer::new(state.keyring.cluster_id);
    while let Some(time_ms) = generator.next_batch(&mut batch) {
        let payload = sealer.seal(&batch.events, time_ms);
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

/// Records of replica updates that flip existing replicas between Healthy and Pulling,
/// each record one node's (signed with its key): the node's copies, all over the table.
fn replica_updates(state: &State) -> Records {
    let mut origin_seq = state.nodes.origin_seq_last.clone();
    let mut records = Vec::new();
    let mut cursor = vec![0usize; state.nodes.len()];
    for record in 0..STREAM_RECORDS {
        let node = (record * 37) % state.nodes.len();
        let rows = &state.nodes.replica_rows[node];
        let name = state.nodes.name[node].to_string();
        let sealer = meshos::trust::Sealer::node(&name, meshos::trust::test_key_of(&name), state.keyring.cluster_id);
        let mut events = Vec::with_capacity(RECORD_EVENTS);
        for _ in 0..RECORD_EVENTS {
            let row = rows[cursor[node] % rows.len()].index();
            cursor[node] += 7919; // a prime stride: touch the node's copies all over
            origin_seq[node] += 1;
            let healthy = (cursor[node] / rows.len()) % 2 == 1;
            events.push(Event {
                origin: state.nodes.name[node].to_string(),
                origin_seq: origin_seq[node],
                kind: EventKind::ReplicaUpdate {
                    blob: state.blobs.hash[state.replicas.blob[row].index()],
                    state: if healthy { ReplicaState::Healthy } else { ReplicaState::Pulling },
                },
            });
        }
        records.push((state.now_ms + 100 * record as u64, sealer.seal_batch(&EventBatch { events })));
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

/// Folds with the sections a verifier already checked (`verified`, one per record).
fn fold_all_verified(mut state: State, records: &Records, verified: &[VerifiedSections]) -> State {
    for ((time_ms, payload), verified) in records.iter().zip(verified) {
        let position = state.position + 1;
        fold_payload_verified(&mut state, position, *time_ms, payload, *verified);
    }
    state
}

fn verify_all(records: &Records, cluster_id: &[u8; 16]) -> Vec<VerifiedSections> {
    records.iter().map(|(_, payload)| verified_sections(payload, cluster_id)).collect()
}

fn bench_fold(c: &mut Criterion) {
    let (base, mixed) = cluster((STREAM_RECORDS * RECORD_EVENTS) as u64);
    let updates = replica_updates(&base);
    let check = fold_all(base.clone(), &updates);
    assert_eq!(check.rejections.total, 0, "replica stream must be all valid");
    let check = fold_all(base.clone(), &mixed);
    assert_eq!(check.rejections.total, 0, "mixed stream must be all valid");

    let cluster_id = base.keyring.cluster_id;
    let (updates_verified, mixed_verified) = (verify_all(&updates, &cluster_id), verify_all(&mixed, &cluster_id));
    let check = fold_all_verified(base.clone(), &mixed, &mixed_verified);
    assert_eq!(check.state_hash(), fold_all(base.clone(), &mixed).state_hash(), "verified ahead or not: same state");
    let mixed_events: usize = mixed.iter().map(|(_, payload)| wire::validate_sections(payload).unwrap() as usize).sum();
    println!(
        "streams: replica_updates {} records of {RECORD_EVENTS}; mixed {} records, {mixed_events} events",
        updates.len(),
        mixed.len()
    );

    let mut group = c.benchmark_group("fold_100k_replicas");
    group.sample_size(20);
    for (name, records, verified, events) in [
        ("replica_updates", &updates, &updates_verified, STREAM_RECORDS * RECORD_EVENTS),
        ("mixed", &mixed, &mixed_verified, mixed_events),
    ] {
        group.throughput(Throughput::Elements(events as u64));
        group.bench_function(name, |b| {
            b.iter_batched(|| base.clone(), |state| fold_all(state, records), BatchSize::LargeInput)
        });
        group.bench_function(format!("{name}/verified_ahead"), |b| {
            b.iter_batched(|| base.clone(), |state| fold_all_verified(state, records, verified), BatchSize::LargeInput)
        });
        group.bench_function(format!("{name}/verify_only"), |b| {
            b.iter(|| std::hint::black_box(verify_all(records, &cluster_id)))
        });
    }
    group.throughput(Throughput::Elements((STREAM_RECORDS * RECORD_EVENTS) as u64));
    group.bench_function("validate_only", |b| {
        b.iter(|| {
            for (_, payload) in &updates {
                std::hint::black_box(wire::validate_sections(payload).unwrap());
            }
        })
    });
    group.finish();
    c.bench_function("state_hash_100k_replicas", |b| b.iter(|| std::hint::black_box(base.state_hash())));
}

criterion_group!(benches, bench_fold);
criterion_main!(benches);
