//! The synthetic cluster-life generator behind `meshos log gen`.
//!
//! It models a cluster just enough to emit only events fold accepts: nodes join
//! (capability, heartbeat), daemon intents are declared and their instances start
//! and register, blobs are announced with placement intents and replicated, and
//! then the cluster lives: heartbeats, replica churn (corruption, deletion, repair),
//! RTT samples from a synthetic latency map, daemon health, saturation and crashes,
//! inventory digests, nodes going down and coming back, capability forks, and admin
//! commands (sealed by `trust::testing::MixedSealer` with the test operator key). Each
//! record has one sender, as in a real log (a node's own facts, or an operator's
//! commands), and carries up to `record_events` events; log time advances by a
//! pseudo-random 50..150 ms per record from a fixed epoch.
//!
//! Invariants: the event sequence is a pure function of `GenOptions` (same options,
//! same bytes); origin sequence numbers strictly increase per node; exactly
//! `options.events` events are produced.

use crate::config::FoldLimits;
use crate::event::{
    AdminCommand, BlobHash, Capability, DaemonPlacement, DaemonSignal, DaemonSpec, EnvVar, Event, EventBatch,
    EventKind, NodeHealth, NodeStatus, PlacementIntent, ReplicaState,
};
use crate::sim::rng::Rng;

/// 2026-01-01T00:00:00Z, the generator's first log time.
pub const GEN_EPOCH_MS: u64 = 1_767_225_600_000;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenOptions {
    pub seed: u64,
    pub nodes: u32,
    pub blobs: u32,
    pub replicas: u8,
    /// Total events, setup included.
    pub events: u64,
    /// Events per log record.
    pub record_events: u32,
}

/// Options that cannot make a cluster, naming the flag and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DaemonModel {
    Running,
    Started,
    Crashed,
}

const DAEMONS: [&str; 2] = ["indexer", "scrubber"];
const ADMIN_ORIGIN: usize = 0;
/// Each node samples RTT to at most this many fixed peers (its next nodes by index),
/// as a node probes a bounded set of peers rather than all of them.
const RTT_PEERS_MAX: usize = 32;
/// A generous upper bound of one generated event's archived size, in bytes (the
/// largest is a signed admin event: 64 bytes of event, 160 of `SignedAdmin`, its names).
pub const EVENT_BYTES_BOUND: u64 = 256;

/// The generator: call `next_batch` until it returns `None`.
pub struct Generator {
    options: GenOptions,
    rng: Rng,
    produced: u64,
    setup: std::vec::IntoIter<Event>,
    time_ms: u64,
    names: Vec<String>,
    seq: Vec<u64>,
    up: Vec<bool>,
    down_count: u32,
    capability_version: Vec<u64>,
    cordoned: Vec<bool>,
    in_maintenance: Vec<bool>,
    position: Vec<(i64, i64, i64)>,
    hashes: Vec<BlobHash>,
    /// Replica slots: blob `slot / replicas`, held by `holder`, in `replica_state`.
    holder: Vec<u32>,
    replica_state: Vec<ReplicaState>,
    healthy_count_by_node: Vec<u32>,
    digest_by_node: Vec<u128>,
    /// Daemon instances: (node, daemon index, state, pid).
    instances: Vec<(u32, usize, DaemonModel, u32)>,
    /// Per node: its replica slots and its daemon instances.
    slots_by_node: Vec<Vec<u32>>,
    instances_by_node: Vec<Vec<u32>>,
    next_pid: u32,
    /// RTT peers per node (0: no RTT samples).
    rtt_peers: usize,
}

/// Whether two events go in one signed section: operator intents together, a node's
/// facts with the same node's.
fn same_sender(a: &Event, b: &Event) -> bool {
    use crate::trust::{native_sender_of, Sender};
    let sender = native_sender_of(&a.kind);
    sender == native_sender_of(&b.kind) && (sender == Sender::Operator || a.origin == b.origin)
}

fn capacity_bytes(node: usize, version: u64) -> u64 {
    (1u64 << 40) + (node as u64 % 4) * (1 << 38) + version * (1 << 30)
}

fn zone_name(node: usize, nodes: usize) -> String {
    format!("zone-{}", node % nodes.min(3))
}

fn is_storage(node: usize) -> bool {
    node.is_multiple_of(2)
}

fn digest_part(hash: &BlobHash) -> u128 {
    u128::from_le_bytes(hash[..16].try_into().expect("16 bytes"))
}

impl Generator {
    /// Checks the options against themselves and against the fold limits the log will
    /// be folded with, so that every generated event is accepted.
    pub fn new(options: GenOptions, limits: &FoldLimits) -> Result<Generator, GenError> {
        let invalid = |flag, reason: String| Err(GenError::Invalid { flag, reason });
        let too_many = |flag, count: u64, limit: &str, max: u32| {
            Err(GenError::Invalid { flag, reason: format!("{count} exceeds the fold limit {limit} ({max})") })
        };
        let nodes = options.nodes as u64;
        let storage_nodes = nodes.div_ceil(2);
        if nodes > limits.nodes_max as u64 {
            return too_many("nodes", nodes, "nodes_max", limits.nodes_max);
        }
        if options.blobs > limits.blobs_max {
            return too_many("blobs", options.blobs as u64, "blobs_max", limits.blobs_max);
        }
        let replica_rows = options.blobs as u64 * options.replicas as u64;
        if replica_rows > limits.replicas_max as u64 {
            return too_many("blobs", replica_rows, "replicas_max (blobs x replicas)", limits.replicas_max);
        }
        if nodes + storage_nodes > limits.daemons_max as u64 {
            return too_many("nodes", nodes + storage_nodes, "daemons_max (daemon instances)", limits.daemons_max);
        }
        if limits.symbols_max < 5 || limits.name_bytes_max < 10 {
            return invalid(
                "nodes",
                "the fold limits leave no room for 3 zones, 2 labels and 10-byte names".to_string(),
            );
        }
        if options.nodes == 0 || options.nodes > 60_000 {
            return invalid("nodes", format!("{} is outside 1..=60000", options.nodes));
        }
        if options.replicas == 0 || options.replicas as u32 > options.nodes {
            return invalid("replicas", format!("{} must be 1..=nodes ({})", options.replicas, options.nodes));
        }
        if options.blobs as u64 * options.replicas as u64 > 50_000_000 {
            return invalid("blobs", "blobs x replicas above 50 million".to_string());
        }
        if options.record_events == 0 || options.record_events > 65_536 {
            return invalid("record-events", format!("{} is outside 1..=65536", options.record_events));
        }
        let nodes = options.nodes as usize;
        let mut rng = Rng::new(options.seed);
        let names: Vec<String> = (0..nodes).map(|node| format!("node-{node:04}")).collect();
        let position = (0..nodes)
            .map(|_| (rng.below(100_000) as i64, rng.below(100_000) as i64, 100 + rng.below(2_000) as i64))
            .collect();
        let hashes: Vec<BlobHash> = (0..options.blobs as u64)
            .map(|blob| {
                let mut input = [0u8; 16];
                input[..8].copy_from_slice(&options.seed.to_le_bytes());
                input[8..].copy_from_slice(&blob.to_le_bytes());
                *blake3::hash(&input).as_bytes()
            })
            .collect();
        let mut generator = Generator {
            rng,
            produced: 0,
            setup: Vec::new().into_iter(),
            time_ms: GEN_EPOCH_MS,
            seq: vec![0; nodes],
            up: vec![true; nodes],
            down_count: 0,
            capability_version: vec![0; nodes],
            cordoned: vec![false; nodes],
            in_maintenance: vec![false; nodes],
            position,
            hashes,
            holder: Vec::new(),
            replica_state: Vec::new(),
            healthy_count_by_node: vec![0; nodes],
            digest_by_node: vec![0; nodes],
            instances: Vec::new(),
            slots_by_node: vec![Vec::new(); nodes],
            instances_by_node: vec![Vec::new(); nodes],
            next_pid: 1000,
            rtt_peers: (nodes - 1).min(RTT_PEERS_MAX).min(limits.rtt_pairs_max as usize / nodes),
            names,
            options,
        };
        let setup = generator.setup_events();
        if (setup.len() as u64) > generator.options.events {
            return invalid(
                "events",
                format!(
                    "{} is too few: this cluster's setup alone takes {} events",
                    generator.options.events,
                    setup.len()
                ),
            );
        }
        generator.setup = setup.into_iter();
        Ok(generator)
    }

    fn event(&mut self, origin: usize, kind: EventKind) -> Event {
        self.seq[origin] += 1;
        Event { origin: self.names[origin].clone(), origin_seq: self.seq[origin], kind }
    }

    fn capability(&mut self, node: usize) -> Event {
        let fork_of = self.capability_version[node];
        let version = fork_of + 1;
        self.capability_version[node] = version;
        let labels = vec![if is_storage(node) { "storage" } else { "edge" }.to_string()];
        let capability = Capability {
            version,
            fork_of,
            zone: zone_name(node, self.names.len()),
            capacity_bytes: capacity_bytes(node, version),
            labels,
            endpoint: String::new(),
        };
        self.event(node, EventKind::Capability(Box::new(capability)))
    }

    fn daemon_spec(name: &str) -> DaemonSpec {
        DaemonSpec {
            args: vec!["--serve".to_string()],
            env: vec![EnvVar { key: "RUST_LOG".to_string(), value: "info".to_string() }],
            working_dir: "/var/lib/meshos".to_string(),
            essential: name == "indexer",
            health_timeout_ms: 30_000,
            ..DaemonSpec::new(name, &format!("/usr/local/bin/{name}"))
        }
    }

    fn set_replica(&mut self, slot: usize, next: ReplicaState) {
        let node = self.holder[slot] as usize;
        let blob = slot / self.options.replicas as usize;
        let part = digest_part(&self.hashes[blob]);
        let was_healthy = self.replica_state[slot] == ReplicaState::Healthy;
        let is_healthy = next == ReplicaState::Healthy;
        if was_healthy && !is_healthy {
            self.healthy_count_by_node[node] -= 1;
            self.digest_by_node[node] = self.digest_by_node[node].wrapping_sub(part);
        }
        if is_healthy && !was_healthy {
            self.healthy_count_by_node[node] += 1;
            self.digest_by_node[node] = self.digest_by_node[node].wrapping_add(part);
        }
        self.replica_state[slot] = next;
    }

    fn setup_events(&mut self) -> Vec<Event> {
        let nodes = self.names.len();
        let mut events = Vec::new();
        for node in 0..nodes {
            events.push(self.capability(node));
            events.push(self.event(node, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 })));
        }
        for name in DAEMONS {
            let runs_on = if name == "indexer" {
                DaemonPlacement::AllNodes
            } else {
                DaemonPlacement::Label("storage".to_string())
            };
            let spec = Box::new(Self::daemon_spec(name));
            events.push(self.event(ADMIN_ORIGIN, EventKind::DaemonIntent { spec, runs_on }));
        }
        for node in 0..nodes {
            for (daemon, name) in DAEMONS.iter().enumerate() {
                if daemon == 1 && !is_storage(node) {
                    continue;
                }
                let pid = self.next_pid;
                self.next_pid += 1;
                self.instances_by_node[node].push(self.instances.len() as u32);
                self.instances.push((node as u32, daemon, DaemonModel::Running, pid));
                for signal in [
                    DaemonSignal::Started { pid },
                    DaemonSignal::Registered { pid },
                    DaemonSignal::Health { healthy: true },
                ] {
                    events.push(self.event(node, EventKind::Daemon { daemon: name.to_string(), signal }));
                }
            }
        }
        // Blobs: every announcement (each node's in a run), then the placement intents
        // (the operator's), then every node's copies (Pulling, then Healthy): grouped by
        // sender, as each record of a real log has one signer, and each step only
        // after what it needs.
        let replicas = self.options.replicas as usize;
        let mut sizes = Vec::with_capacity(self.hashes.len());
        let mut copies: Vec<Vec<usize>> = vec![Vec::new(); nodes];
        for blob in 0..self.hashes.len() {
            sizes.push(1024 + self.rng.below(1 << 30));
            let start = self.rng.below(nodes as u64) as usize;
            let step = 1 + self.rng.below(nodes.max(2) as u64 - 1) as usize;
            let mut chosen: Vec<usize> = Vec::with_capacity(replicas);
            let mut candidate = start;
            while chosen.len() < replicas {
                if !chosen.contains(&candidate) {
                    chosen.push(candidate);
                }
                candidate = (candidate + step) % nodes;
                if chosen.contains(&candidate) {
                    candidate = (candidate + 1) % nodes;
                }
            }
            for node in chosen {
                let slot = self.holder.len();
                self.holder.push(node as u32);
                self.replica_state.push(ReplicaState::Pulling);
                self.set_replica(slot, ReplicaState::Healthy);
                self.slots_by_node[node].push(slot as u32);
                copies[node].push(blob);
            }
        }
        for announcer in 0..nodes {
            for blob in (announcer..self.hashes.len()).step_by(nodes) {
                let hash = self.hashes[blob];
                events.push(self.event(announcer, EventKind::BlobAnnounce { blob: hash, size_bytes: sizes[blob] }));
            }
        }
        for blob in 0..self.hashes.len() {
            let intent = PlacementIntent {
                blob: self.hashes[blob],
                replicas: replicas as u8,
                zone_spread: true,
                pinned: Vec::new(),
            };
            events.push(self.event(ADMIN_ORIGIN, EventKind::PlacementIntent(intent)));
        }
        for (node, blobs) in copies.iter().enumerate() {
            for state in [ReplicaState::Pulling, ReplicaState::Healthy] {
                for &blob in blobs {
                    events.push(self.event(node, EventKind::ReplicaUpdate { blob: self.hashes[blob], state }));
                }
            }
        }
        events
    }

    fn heartbeat(&mut self, node: usize) -> Event {
        let load_permille = self.rng.below(1001) as u16;
        self.event(node, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille }))
    }

    /// One live event of `node` (which is up).
    fn live_event_of(&mut self, node: usize) -> Event {
        let nodes = self.names.len();
        match self.rng.below(100) {
            35..=59 => self.replica_churn(node),
            60..=79 if self.rtt_peers > 0 => {
                let to = (node + 1 + self.rng.below(self.rtt_peers as u64) as usize) % nodes;
                let (ax, ay, ah) = self.position[node];
                let (bx, by, bh) = self.position[to];
                let distance = (((ax - bx).pow(2) + (ay - by).pow(2)) as f64).sqrt() as i64;
                let jitter = self.rng.below(200) as i64;
                let rtt_us = (distance + ah + bh + jitter) as u32;
                let peer = self.names[to].clone();
                self.event(node, EventKind::Rtt { peer, rtt_us })
            }
            80..=89 => self.daemon_event(node),
            90..=93 => {
                let blob_count = self.healthy_count_by_node[node];
                let digest = self.digest_by_node[node].to_le_bytes();
                self.event(node, EventKind::InventoryDigest { blob_count, digest })
            }
            94..=96 if nodes > 1 => self.node_status_event(node),
            99 => self.capability(node),
            _ => self.heartbeat(node),
        }
    }

    fn replica_churn(&mut self, node: usize) -> Event {
        let held = &self.slots_by_node[node];
        if held.is_empty() {
            return self.heartbeat(node);
        }
        let slot = held[self.rng.below(held.len() as u64) as usize] as usize;
        let next = match self.replica_state[slot] {
            ReplicaState::Healthy => match self.rng.below(10) {
                0..=2 => ReplicaState::Corrupt,
                3..=4 => ReplicaState::Deleted,
                _ => ReplicaState::Healthy,
            },
            ReplicaState::Corrupt => ReplicaState::Deleted,
            ReplicaState::Deleted => ReplicaState::Pulling,
            ReplicaState::Pulling => ReplicaState::Healthy,
        };
        self.set_replica(slot, next);
        let blob = self.hashes[slot / self.options.replicas as usize];
        self.event(node, EventKind::ReplicaUpdate { blob, state: next })
    }

    fn daemon_event(&mut self, node: usize) -> Event {
        let own = &self.instances_by_node[node];
        if own.is_empty() {
            return self.heartbeat(node);
        }
        let instance = own[self.rng.below(own.len() as u64) as usize] as usize;
        let (_, daemon, model, pid) = self.instances[instance];
        let (signal, next, pid) = match model {
            DaemonModel::Running => match self.rng.below(20) {
                0..=11 => (DaemonSignal::Health { healthy: self.rng.below(20) != 0 }, model, pid),
                12..=18 => (DaemonSignal::Saturation { permille: self.rng.below(1001) as u16 }, model, pid),
                _ => (DaemonSignal::Crashed { signal: 9 }, DaemonModel::Crashed, pid),
            },
            DaemonModel::Crashed => {
                let pid = self.next_pid;
                self.next_pid += 1;
                (DaemonSignal::Started { pid }, DaemonModel::Started, pid)
            }
            DaemonModel::Started => (DaemonSignal::Registered { pid }, DaemonModel::Running, pid),
        };
        self.instances[instance] = (node as u32, daemon, next, pid);
        self.event(node, EventKind::Daemon { daemon: DAEMONS[daemon].to_string(), signal })
    }

    /// `node` reports its own status: a node going down says so before it falls silent
    /// (the rest of the cluster learns it from its silence); the record ends there.
    fn node_status_event(&mut self, node: usize) -> Event {
        let nodes = self.names.len();
        let may_go_down = node != ADMIN_ORIGIN && self.down_count < nodes as u32 / 4;
        let status = if may_go_down && self.rng.percent(50) {
            self.up[node] = false;
            self.down_count += 1;
            NodeStatus::Down
        } else {
            NodeStatus::Suspect
        };
        let name = self.names[node].clone();
        self.event(node, EventKind::NodeHealth(NodeHealth::Status { node: name, status }))
    }

    /// A live record of at most `count` events from one sender: a few operator
    /// commands (2 in 100 records), else one node's facts (a node that was down comes
    /// back with a heartbeat first; one that goes down ends its record).
    fn live_record(&mut self, count: u64, batch: &mut EventBatch) {
        if self.rng.below(100) < 2 {
            for _ in 0..(1 + self.rng.below(3)).min(count) {
                let event = self.admin_event();
                batch.events.push(event);
            }
            return;
        }
        let node = self.rng.below(self.names.len() as u64) as usize;
        if !self.up[node] {
            self.up[node] = true;
            self.down_count -= 1;
            let heartbeat = self.heartbeat(node);
            batch.events.push(heartbeat);
        }
        while (batch.events.len() as u64) < count && self.up[node] {
            let event = self.live_event_of(node);
            batch.events.push(event);
        }
    }

    fn admin_event(&mut self) -> Event {
        let nodes = self.names.len();
        let target = self.rng.below(nodes as u64) as usize;
        let node = self.names[target].clone();
        let command = match self.rng.below(6) {
            0 => {
                self.cordoned[target] = !self.cordoned[target];
                if self.cordoned[target] {
                    AdminCommand::Cordon { node }
                } else {
                    AdminCommand::Uncordon { node }
                }
            }
            1 => {
                self.in_maintenance[target] = !self.in_maintenance[target];
                if self.in_maintenance[target] {
                    AdminCommand::EnterMaintenance { node }
                } else {
                    AdminCommand::ExitMaintenance { node }
                }
            }
            2 => {
                self.cordoned[target] = true;
                AdminCommand::Drain { node }
            }
            3 => AdminCommand::RestartAllDaemons { node: Some(node) },
            4 => AdminCommand::ClearAvoid { node: None },
            _ => AdminCommand::InvalidatePlacement { blob: None },
        };
        self.signed_admin(command)
    }

    /// An admin command (the log's sealer puts it in an operator section).
    fn signed_admin(&mut self, command: AdminCommand) -> Event {
        self.event(ADMIN_ORIGIN, EventKind::Admin(Box::new(command)))
    }

    /// Events produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Fills `batch` with the next record's events and returns its log time, or
    /// `None` once `options.events` events have been produced.
    pub fn next_batch(&mut self, batch: &mut EventBatch) -> Option<u64> {
        batch.events.clear();
        if self.produced >= self.options.events {
            return None;
        }
        let count = (self.options.events - self.produced).min(self.options.record_events as u64);
        // A record has one sender (as a node's or an operator's record does): the
        // setup's next run of one sender, or a live record.
        while (batch.events.len() as u64) < count {
            let Some(next) = self.setup.as_slice().first() else { break };
            if batch.events.last().is_some_and(|last| !same_sender(last, next)) {
                break;
            }
            batch.events.push(self.setup.next().expect("peeked"));
        }
        if batch.events.is_empty() {
            self.live_record(count, batch);
        }
        debug_assert!(batch.events.windows(2).all(|pair| same_sender(&pair[0], &pair[1])));
        self.produced += batch.events.len() as u64;
        self.time_ms += 50 + self.rng.below(100);
        Some(self.time_ms)
    }
}
