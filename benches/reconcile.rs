//! Reconcile per pass over converged and disturbed clusters, against a baseline that
//! makes the same decisions the obvious way (a HashMap of per-blob structs holding
//! Vecs) and against the floor (a plain sequential read of the columns a full pass
//! touches). One run gives both ratios. Results: perf/reconcile.md.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use meshos::config::Config;
use meshos::event::{AdminCommand, EventKind, NodeHealth, NodeStatus, ReplicaState};
use meshos::reconcile::{Reconciler, Scope};
use meshos::sim::fixtures::{converged_cluster, node_name, Feeder};
use meshos::state::State;

const NODES: u32 = 1_000;
const REPLICAS: u8 = 3;

fn cluster(replica_rows: u32) -> State {
    converged_cluster(&Config::for_tests(), NODES, replica_rows / REPLICAS as u32, REPLICAS)
}

/// Folds events into a copy of `state` through a feeder that continues its origin
/// sequence numbers.
fn disturbed(state: &State, build: impl FnOnce(&State, &mut dyn FnMut(u32, EventKind))) -> State {
    let mut feeder = Feeder::new(&Config::for_tests(), state.nodes.len() as u32);
    feeder.state = state.clone();
    let seqs: Vec<u64> = state.nodes.origin_seq_last.clone();
    let mut events = Vec::new();
    build(state, &mut |origin, kind| events.push((origin, kind)));
    feeder.time_ms = state.now_ms;
    feeder.set_seqs(seqs);
    for (origin, kind) in events {
        feeder.push(origin, kind);
    }
    feeder.flush();
    feeder.state
}

fn bench_steady(c: &mut Criterion) {
    let mut group = c.benchmark_group("reconcile/steady");
    group.sample_size(30);
    for rows in [10_000u32, 100_000, 1_000_000] {
        let mut state = cluster(rows);
        let mut reconciler = Reconciler::new();
        group.bench_function(rows.to_string(), |b| {
            b.iter(|| {
                let actions = reconciler.pass(&mut state, Scope::Full).len();
                assert_eq!(actions, 0);
            })
        });
    }
    group.finish();
}

fn bench_disturbed(c: &mut Criterion) {
    let base = cluster(100_000);
    // 1 % of replicas change: every 100th copy is reported corrupt.
    let churned = disturbed(&base, |state, push| {
        for row in (0..state.replicas.len()).step_by(100) {
            let node = state.replicas.node[row].0;
            let blob = state.blobs.hash[state.replicas.blob[row].index()];
            push(node, EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt });
        }
    });
    // One node of 1,000 is reported down.
    let lost = disturbed(&base, |_, push| {
        push(1, EventKind::NodeHealth(NodeHealth::Status { node: node_name(7), status: NodeStatus::Down }));
    });
    let mut group = c.benchmark_group("reconcile");
    group.sample_size(30);
    for (name, state) in [("churn_1pct/100000", &churned), ("node_loss/100000", &lost)] {
        let mut reconciler = Reconciler::new();
        group.bench_function(name, |b| {
            b.iter_batched(
                || state.clone(),
                |mut state| reconciler.pass(&mut state, Scope::Full).len(),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// A third of the nodes (333 of 1,000) enter maintenance at once over 100k replicas:
/// the burst's first pass (plans invalidated, repairs emitted up to the budgets), then
/// the incremental pass while they drain (what every record pays: drain progress of
/// 333 nodes, nothing else to do).
fn bench_drain(c: &mut Criterion) {
    let base = cluster(100_000);
    let entered = disturbed(&base, |_, push| {
        // The 333 commands (the fixture's sealer signs them with the test operator key).
        for node in 0..333u32 {
            let command = AdminCommand::EnterMaintenance { node: node_name(node * 3 + node % 3) };
            push(0, EventKind::Admin(Box::new(command)));
        }
    });
    let mut group = c.benchmark_group("reconcile/drain_third");
    group.sample_size(10);
    let mut reconciler = Reconciler::new();
    group.bench_function("first_pass/100000", |b| {
        b.iter_batched(
            || entered.clone(),
            |mut state| reconciler.pass(&mut state, Scope::Incremental).len(),
            BatchSize::LargeInput,
        )
    });
    let mut draining = entered.clone();
    reconciler.pass(&mut draining, Scope::Incremental);
    group.bench_function("incremental/100000", |b| b.iter(|| reconciler.pass(&mut draining, Scope::Incremental).len()));
    group.finish();
}

/// The obvious way: per-blob structs with Vecs of replicas in a HashMap keyed by hash,
/// nodes in a HashMap keyed by name, the same decision per blob.
struct NaiveNode {
    live: bool,
    incarnation: u32,
}

struct NaiveReplica {
    node: String,
    state: ReplicaState,
    verified_incarnation: u32,
}

struct NaiveBlob {
    wanted: usize,
    plan: Vec<String>,
    replicas: Vec<NaiveReplica>,
}

struct Naive {
    nodes: HashMap<String, NaiveNode>,
    blobs: HashMap<[u8; 32], NaiveBlob>,
}

impl Naive {
    fn from_state(state: &State) -> Naive {
        let mut nodes = HashMap::new();
        for node in 0..state.nodes.len() {
            let entry = NaiveNode { live: state.nodes.live[node], incarnation: state.nodes.incarnation[node] };
            nodes.insert(state.nodes.name[node].to_string(), entry);
        }
        let mut blobs = HashMap::new();
        for blob in 0..state.blobs.len() {
            let plan = state.blobs.plan[blob].iter().map(|node| state.nodes.name[node.index()].to_string()).collect();
            let replicas = state.blobs.replica_rows[blob]
                .iter()
                .map(|row| NaiveReplica {
                    node: state.nodes.name[state.replicas.node[row.index()].index()].to_string(),
                    state: state.replicas.state[row.index()],
                    verified_incarnation: state.replicas.verified_incarnation[row.index()],
                })
                .collect();
            blobs.insert(
                state.blobs.hash[blob],
                NaiveBlob { wanted: state.blobs.replicas_wanted[blob] as usize, plan, replicas },
            );
        }
        Naive { nodes, blobs }
    }

    /// Returns the (blob, node) pairs that need a pull or a drop.
    fn pass(&self) -> Vec<([u8; 32], String)> {
        let mut actions = Vec::new();
        for (hash, blob) in &self.blobs {
            let counted: Vec<&NaiveReplica> = blob
                .replicas
                .iter()
                .filter(|replica| {
                    let node = &self.nodes[&replica.node];
                    replica.state == ReplicaState::Healthy
                        && node.live
                        && replica.verified_incarnation == node.incarnation
                })
                .collect();
            for planned in &blob.plan {
                if !counted.iter().any(|replica| &replica.node == planned) {
                    actions.push((*hash, planned.clone()));
                }
            }
            if counted.len() > blob.wanted {
                for replica in counted.iter().filter(|replica| !blob.plan.contains(&replica.node)) {
                    actions.push((*hash, replica.node.clone()));
                }
            }
        }
        actions
    }
}

fn bench_baseline_and_limit(c: &mut Criterion) {
    let state = cluster(100_000);
    let naive = Naive::from_state(&state);
    assert!(naive.pass().is_empty(), "the baseline must agree: converged");
    c.bench_function("baseline/steady/100000", |b| b.iter(|| naive.pass().len()));
    c.bench_function("limit/scan/100000", |b| {
        b.iter(|| {
            // Exactly the columns the full pass reads, read once, sequentially.
            let replicas = &state.replicas;
            let mut sum = 0u64;
            for row in 0..replicas.len() {
                sum = sum
                    .wrapping_add(replicas.blob[row].0 as u64)
                    .wrapping_add(replicas.node[row].0 as u64)
                    .wrapping_add(replicas.state[row] as u64)
                    .wrapping_add(replicas.verified_incarnation[row] as u64)
                    .wrapping_add(replicas.planned[row] as u64)
                    .wrapping_add(replicas.verify_requested[row] as u64)
                    .wrapping_add(replicas.drop_requested[row] as u64);
            }
            let blobs = &state.blobs;
            for blob in 0..blobs.len() {
                sum = sum
                    .wrapping_add(blobs.plan_valid[blob] as u64)
                    .wrapping_add(blobs.plan_len[blob] as u64)
                    .wrapping_add(blobs.waiting[blob] as u64)
                    .wrapping_add(blobs.replicas_wanted[blob] as u64);
            }
            std::hint::black_box(sum)
        })
    });
}

criterion_group!(benches, bench_steady, bench_disturbed, bench_drain, bench_baseline_and_limit);
criterion_main!(benches);
