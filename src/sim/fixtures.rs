//! Ready-made states for benchmarks and tests: a converged cluster of a given size,
//! built only through fold and reconcile (as a node would build it from its log).
//!
//! Invariant: the state returned is converged: a full pass over it emits nothing.

use crate::config::Config;
use crate::event::{BlobHash, Capability, Event, EventKind, NodeHealth, PlacementIntent, ReplicaState};
use crate::fold::fold_payload;
use crate::reconcile::{Reconciler, Scope};
use crate::state::State;

/// Log time of the fixture's records (2026-01-01T00:00:00Z plus a little).
pub const FIXTURE_EPOCH_MS: u64 = 1_767_225_600_000;
/// Events per record when building a fixture.
const RECORD_EVENTS: usize = 4096;

/// The content hash of fixture blob `index`.
pub fn blob_hash(index: u64) -> BlobHash {
    *blake3::hash(&index.to_le_bytes()).as_bytes()
}

/// The name of fixture node `index`.
pub fn node_name(index: u32) -> String {
    format!("node-{index:05}")
}

/// Appends events to a state one record at a time, with per-origin sequence numbers.
pub struct Feeder {
    pub state: State,
    seqs: Vec<u64>,
    pending: Vec<Event>,
    pub time_ms: u64,
    sealer: crate::trust::testing::MixedSealer,
}

impl Feeder {
    pub fn new(config: &Config, nodes: u32) -> Feeder {
        Feeder {
            state: State::new(config),
            seqs: vec![0; nodes as usize],
            pending: Vec::new(),
            time_ms: FIXTURE_EPOCH_MS,
            sealer: crate::trust::testing::MixedSealer::new(config.genesis.cluster_id()),
        }
    }

    /// Continues from these per-node origin sequence numbers (for a cloned state).
    pub fn set_seqs(&mut self, seqs: Vec<u64>) {
        assert_eq!(seqs.len(), self.seqs.len());
        self.seqs = seqs;
    }

    /// Queues an event from fixture node `origin`.
    pub fn push(&mut self, origin: u32, kind: EventKind) {
        self.seqs[origin as usize] += 1;
        self.pending.push(Event { origin: node_name(origin), origin_seq: self.seqs[origin as usize], kind });
        if self.pending.len() >= RECORD_EVENTS {
            self.flush();
        }
    }

    /// Folds the queued events as one record (time advances 1 ms per record).
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        self.time_ms += 1;
        let payload = self.sealer.seal(&std::mem::take(&mut self.pending), self.time_ms);
        let position = self.state.position + 1;
        fold_payload(&mut self.state, position, self.time_ms, &payload);
    }
}

/// `converged_cluster` plus RTT samples from every node to `rtt_peers` others: the
/// state the snapshot and checkpoint benches write and read.
pub fn converged_cluster_with_rtt(config: &Config, nodes: u32, blobs: u32, replicas: u8, rtt_peers: u32) -> State {
    let base = converged_cluster(config, nodes, blobs, replicas);
    let mut feeder = Feeder::new(config, nodes);
    feeder.state = base.clone();
    feeder.time_ms = base.now_ms;
    feeder.set_seqs(base.nodes.origin_seq_last.clone());
    for node in 0..nodes {
        for step in 1..=rtt_peers {
            let peer = (node + step * 97) % nodes;
            let rtt_us = 200 + (node * 31 + peer * 17) % 5_000;
            feeder.push(node, crate::event::EventKind::Rtt { peer: node_name(peer), rtt_us });
        }
    }
    feeder.flush();
    feeder.state
}

/// A converged cluster: `nodes` nodes in 3 zones, `blobs` blobs with `replicas`
/// copies each, every copy healthy on its planned node. Built through fold, with one
/// full reconcile pass to compute the plans.
pub fn converged_cluster(config: &Config, nodes: u32, blobs: u32, replicas: u8) -> State {
    assert!(nodes >= replicas as u32 && replicas > 0, "fixture needs at least `replicas` nodes");
    let mut feeder = Feeder::new(config, nodes);
    for node in 0..nodes {
        let capability = Capability {
            version: 1,
            fork_of: 0,
            zone: format!("zone-{}", node % 3),
            capacity_bytes: 1 << 40,
            labels: vec!["storage".to_string()],
            endpoint: String::new(),
        };
        feeder.push(node, EventKind::Capability(Box::new(capability)));
        feeder.push(node, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 }));
    }
    for blob in 0..blobs as u64 {
        let hash = blob_hash(blob);
        let origin = (blob % nodes as u64) as u32;
        feeder.push(origin, EventKind::BlobAnnounce { blob: hash, size_bytes: 1 << 20 });
        let intent = PlacementIntent { blob: hash, replicas, zone_spread: true, pinned: Vec::new() };
        feeder.push(origin, EventKind::PlacementIntent(intent));
    }
    feeder.flush();
    // Plans come from a pass (no copy exists yet: every blob waits for a source).
    let mut reconciler = Reconciler::new();
    let _ = reconciler.pass(&mut feeder.state, Scope::Full);
    for blob in 0..blobs as usize {
        let plan = feeder.state.blobs.plan[blob].clone();
        let hash = feeder.state.blobs.hash[blob];
        for node in plan {
            feeder.push(node.0, EventKind::ReplicaUpdate { blob: hash, state: ReplicaState::Healthy });
        }
    }
    feeder.flush();
    // Past the stabilisation period, with fresh heartbeats.
    feeder.time_ms += config.reconcile.stabilisation_ms;
    for node in 0..nodes {
        feeder.push(node, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 }));
    }
    feeder.flush();
    let actions = reconciler.pass(&mut feeder.state, Scope::Full).len();
    assert_eq!(actions, 0, "the fixture cluster must be converged");
    feeder.state
}

/// Gives a node `name` whose data directory is `dir` a known identity before its
/// first start (tests, benches, the load tool): its key file holds
/// `trust::test_key_of(name)` and `dir/genesis.toml` is `Genesis::for_tests` admitting
/// `name` and `others` (load clients, other nodes) with their test keys, under the
/// test operator key. Existing files are kept. Returns the genesis.
pub fn trust_test_node_dir(dir: &std::path::Path, name: &str, others: &[String]) -> crate::trust::Genesis {
    std::fs::create_dir_all(dir).expect("a test directory");
    let key_path = dir.join("node.key");
    if !key_path.exists() {
        crate::trust::test_key_of(name).write_new(&key_path).expect("a test key file");
    }
    let mut names = vec![name.to_string()];
    names.extend(others.iter().cloned());
    let genesis = crate::trust::Genesis::for_tests(&names);
    let genesis_path = dir.join("genesis.toml");
    if !genesis_path.exists() {
        genesis.write_new(&genesis_path).expect("a test genesis file");
    }
    genesis
}
