//! The deterministic cluster simulator behind `meshos sim`: it plays every node's
//! executor against the real fold and reconcile, injects faults, and checks
//! reconcile's safety and liveness invariants after every pass.
//!
//! Model. The simulator keeps the ground truth (which node really holds which blob on
//! disk, healthy or silently corrupt; which daemons really run; which nodes are up,
//! partitioned or slow) and a queue of executions in progress with completion times.
//! Each step is one log record: the sim clock advances 100..300 ms, then due
//! completions, heartbeats (every reachable node about once a second), RTT samples
//! from a plane-plus-height latency map, inventory digests and injected faults become
//! events; the batch is folded with `fold::fold_payload` at the next position with the
//! sim clock as commit time, exactly as a node folds it, and an incremental reconcile
//! pass runs. Its actions for reachable nodes are scheduled; those for crashed or
//! partitioned nodes are lost and time out. The first half of the steps is the fault
//! phase; in the quiet phase every node comes back and no new fault starts.
//!
//! Invariants: the run is a pure function of `SimOptions` and the `Config` (one
//! SplitMix64 stream, no clock, no thread, no hash-map iteration: ground truth lives
//! in vectors and B-trees); the simulator never writes into `State`, it only reads it
//! (to map rows to names, to know whether an action is still in flight, to check
//! invariants) and feeds it events; a fault never destroys the last healthy copy of a
//! blob on disk (crashes keep disks, corruption spares the last two healthy copies),
//! so every data loss the checks see is reconcile's doing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use smallvec::SmallVec;

use crate::action::{Action, ActionKind};
use crate::config::{Config, ReconcileConfig};
use crate::event::{
    AdminCommand, BlobHash, Capability, DaemonPlacement, DaemonSignal, DaemonSpec, Event, EventKind, NodeHealth,
    Outcome, PlacementIntent, ReplicaState,
};
use crate::fold::fold_payload;
use crate::reconcile::{Reconciler, Scope};
use crate::sim::gen::GEN_EPOCH_MS;
use crate::sim::rng::Rng;
use crate::state::blobs::PLAN_NODES_MAX;
use crate::state::ids::{BlobRow, NodeRow, SpecRow};
use crate::state::nodes::MaintenanceState;
use crate::state::State;
use crate::wire;

/// What to simulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: u32,
    pub blobs: u32,
    /// Copies wanted per blob at the start (intent changes move it by one).
    pub replicas: u8,
    /// Log records after setup; the first half is the fault phase.
    pub steps: u32,
}

impl SimOptions {
    /// Options that cannot make a meaningful cluster, naming the flag and why.
    pub fn check(&self) -> Result<(), String> {
        if self.nodes < 3 || self.nodes > 10_000 {
            return Err(format!("--nodes: {} is outside 3..=10000", self.nodes));
        }
        if self.blobs == 0 || self.blobs > 1_000_000 {
            return Err(format!("--blobs: {} is outside 1..=1000000", self.blobs));
        }
        let replicas_max = (PLAN_NODES_MAX as u32 - 1).min(self.nodes - 1);
        if self.replicas == 0 || self.replicas as u32 > replicas_max {
            return Err(format!("--replicas: {} is outside 1..={replicas_max} (below --nodes)", self.replicas));
        }
        if self.steps < 2 {
            return Err(format!("--steps: {} is below 2 (a fault phase and a quiet phase)", self.steps));
        }
        Ok(())
    }
}

/// One broken invariant: the step and log position of the pass after which it was
/// seen, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub step: u32,
    pub position: u64,
    pub what: String,
}

/// Counters that explain a run (printed by the CLI on stderr, not part of the report line).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    pub crashes: u32,
    pub partitions: u32,
    pub slow_nodes: u32,
    pub corruptions: u32,
    pub intent_changes: u32,
    /// Actions addressed to a node that was unreachable when they were sent.
    pub lost_actions: u64,
    /// Executions abandoned because their node became unreachable.
    pub abandoned: u64,
    pub failed_moves: u64,
    /// Moves that finished after reconcile had timed them out.
    pub late_moves: u64,
    /// Moves into a node that already held a healthy copy on disk (verification would have done).
    pub redundant_moves: u64,
    pub drops: u64,
    pub verifies: u64,
    pub timed_out: u64,
    /// Advisory actions seen: avoid marks set, backoffs applied.
    pub avoid_marks: u64,
    pub backoffs: u64,
    /// Steps after which the mass-failure brake was on.
    pub brake_steps: u32,
    /// Rejoins that started a new incarnation (their copies were fenced).
    pub fenced_rejoins: u64,
    /// Maintenance: nodes sent into it, drains that reached Maintenance, drains that
    /// failed at their deadline, nodes sent back; the most nodes away at once.
    pub maintenance_entries: u32,
    pub drains_completed: u32,
    pub drains_failed: u32,
    pub maintenance_exits: u32,
    pub away_max: u32,
    /// The first quiet-phase step after which the cluster was converged (0: never).
    pub converged_at_step: u32,
    /// Why the cluster was not converged at the last step (empty when it was).
    pub unconverged: String,
}

/// The outcome of a run; `Display` gives the one line the CLI prints last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u32,
    pub faults: u32,
    pub violations: Vec<Violation>,
    pub converged: bool,
    /// Pulls and migrations executed (failed ones included).
    pub moves: u64,
    /// Copies that truly had to move (see `needed` accounting in `Sim::account_plans`).
    pub needed: u64,
    pub stats: SimStats,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sim: seed={} steps={} faults={} violations={} converged={} moves={} needed={}",
            self.seed,
            self.steps,
            self.faults,
            self.violations.len(),
            self.converged,
            self.moves,
            self.needed
        )
    }
}

/// The thrash bound: moves may exceed the copies that had to move by this factor plus
/// a constant (retries of failed and timed-out transfers, redundant moves into fenced
/// copies).
pub const THRASH_FACTOR: u64 = 3;
pub const THRASH_SLACK_MOVES: u64 = 100;

/// Most violations kept (a broken invariant tends to repeat every pass).
const VIOLATIONS_KEPT_MAX: usize = 100;

const DAEMONS: [&str; 2] = ["indexer", "scrubber"];
const STEP_MS_MIN: u64 = 100;
const STEP_MS_SPAN: u64 = 200;
const HEARTBEAT_MS: u64 = 1_000;
const DIGEST_MS_MIN: u64 = 20_000;
const DIGEST_MS_SPAN: u64 = 20_000;
/// RTT inflation of a slow node (the avoid mark enters at 3x the median).
const SLOW_FACTOR: u64 = 6;
const LOAD_PERMILLE: u16 = 100;
/// The simulator's caps on the drain deadline and the recovery window.
const SIM_DRAIN_DEADLINE_MS: u64 = 60_000;
const SIM_RECOVERY_MS: u64 = 20_000;
/// A drain must have ended (Maintenance or DrainFailed) this long past its deadline.
const DRAIN_END_SLACK_MS: u64 = 5_000;

/// A copy on a node's disk. Corruption is silent: the holder learns of it only by
/// verifying (or through its scrubber's inventory digest). `incarnation` is the
/// holder's incarnation in the state when the copy went bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    Healthy,
    Corrupt { incarnation: u32 },
}

/// How an execution ends, drawn when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Normal,
    /// The transfer fails (connection reset).
    Fail,
    /// The transfer finishes after reconcile's timeout.
    Late,
}

#[derive(Debug, Clone, Copy)]
struct Execution {
    action: Action,
    fate: Fate,
}

/// Per-seed fault rates, per mille per step (faults) or percent per move (transfers).
#[derive(Debug, Clone, Copy)]
struct Rates {
    crash_permille: u64,
    partition_permille: u64,
    slow_permille: u64,
    corrupt_permille: u64,
    intent_permille: u64,
    maintenance_permille: u64,
    move_fail_percent: u64,
    move_late_percent: u64,
}

struct Sim {
    options: SimOptions,
    reconcile: ReconcileConfig,
    rng: Rng,
    rates: Rates,
    state: State,
    reconciler: Reconciler,
    now_ms: u64,
    step: u32,
    fault_steps: u32,
    events: Vec<Event>,
    // Nodes (sim index == state row, asserted at setup).
    names: Vec<String>,
    seq: Vec<u64>,
    coordinate: Vec<(i64, i64, i64)>,
    crashed_until_ms: Vec<u64>,
    partitioned_until_ms: Vec<u64>,
    slow_until_ms: Vec<u64>,
    was_reachable: Vec<bool>,
    unreachable_since_ms: Vec<u64>,
    next_heartbeat_ms: Vec<u64>,
    next_digest_ms: Vec<u64>,
    daemon_running: Vec<[bool; 2]>,
    /// The operator wants the node in maintenance (sent EnterMaintenance, not yet Exit).
    maintenance_wanted: Vec<bool>,
    /// The maintenance state seen after the previous pass, to count drain outcomes.
    maintenance_seen: Vec<MaintenanceState>,
    capability_version: Vec<u64>,
    daemon_died: Vec<[bool; 2]>,
    next_pid: u32,
    // Blobs (sim index == state row).
    hashes: Vec<BlobHash>,
    disk: Vec<SmallVec<[(u32, Disk); 8]>>,
    held: Vec<BTreeSet<u32>>,
    replicas_wanted: Vec<u8>,
    zone_spread: Vec<bool>,
    previous_plan: Vec<SmallVec<[NodeRow; PLAN_NODES_MAX]>>,
    // Executions in progress, by (due time, sequence).
    queue: BTreeMap<(u64, u64), Execution>,
    queue_seq: u64,
    // Report.
    faults: u32,
    violations: Vec<Violation>,
    violations_total: u64,
    moves: u64,
    needed: u64,
    stats: SimStats,
    rejections_seen: u64,
    /// Seals each record's mixed events into signed sections (test keys).
    sealer: crate::trust::testing::MixedSealer,
    /// Every record folded (commit time, payload), when `run_logged` asked for them.
    log: Option<Vec<(u64, rkyv::util::AlignedVec<{ wire::ALIGN_BYTES }>)>>,
}

/// Runs the simulation and checks every invariant after every pass; `progress` is
/// called after each step with (step, steps).
pub fn run(options: &SimOptions, config: &Config, progress: &mut dyn FnMut(u32, u32)) -> SimReport {
    if let Err(reason) = options.check() {
        panic!("invalid SimOptions: {reason}");
    }
    let mut sim = Sim::new(options.clone(), config);
    sim.setup();
    for step in 1..=options.steps {
        sim.step(step);
        progress(step, options.steps);
    }
    sim.finish()
}

/// The config the simulator folds with: `config` with the drain deadline and the
/// recovery window shortened, so drains fail and recoveries end within the run (the
/// defaults are an hour and a minute; the quiet phase lasts a few minutes of log time).
pub fn sim_config(config: &Config) -> Config {
    let reconcile = ReconcileConfig {
        drain_deadline_ms: config.reconcile.drain_deadline_ms.min(SIM_DRAIN_DEADLINE_MS),
        recovery_ms: config.reconcile.recovery_ms.min(SIM_RECOVERY_MS),
        ..config.reconcile
    };
    Config { reconcile, ..config.clone() }
}

/// `run`, keeping every record the simulation folded: (commit time, payload) in
/// position order from 1, to be replayed with `sim_config(config)` (tests replay them
/// through `Engine`, which reaches the simulator's state at every position).
pub fn run_logged(
    options: &SimOptions,
    config: &Config,
) -> (SimReport, Vec<(u64, rkyv::util::AlignedVec<{ wire::ALIGN_BYTES }>)>) {
    if let Err(reason) = options.check() {
        panic!("invalid SimOptions: {reason}");
    }
    let mut sim = Sim::new(options.clone(), config);
    sim.log = Some(Vec::new());
    sim.setup();
    for step in 1..=options.steps {
        sim.step(step);
    }
    let log = sim.log.take().unwrap_or_default();
    (sim.finish(), log)
}

/// A simulated node's capability, version `version` forked from `fork_of`.
fn node_capability(node: usize, version: u64, fork_of: u64) -> Capability {
    Capability {
        version,
        fork_of,
        zone: format!("zone-{}", node % 3),
        capacity_bytes: (1u64 << 40) + (node as u64 % 4) * (1 << 38),
        labels: vec![if is_storage(node) { "storage" } else { "edge" }.to_string()],
        endpoint: String::new(),
    }
}

fn node_name(node: usize) -> String {
    format!("node-{node:04}")
}

fn daemon_spec(name: &str) -> DaemonSpec {
    DaemonSpec {
        working_dir: "/var/lib/meshos".to_string(),
        essential: name == "indexer",
        stop_grace_ms: 5_000,
        ..DaemonSpec::new(name, &format!("/usr/local/bin/{name}"))
    }
}

fn is_storage(node: usize) -> bool {
    node.is_multiple_of(2)
}

impl Sim {
    fn new(options: SimOptions, config: &Config) -> Sim {
        let config = &sim_config(config);
        let mut rng = Rng::new(options.seed);
        let rates = Rates {
            crash_permille: 5 + rng.below(11),
            partition_permille: 1 + rng.below(3),
            slow_permille: 2 + rng.below(5),
            corrupt_permille: 20 + rng.below(61),
            intent_permille: 40 + rng.below(111),
            move_fail_percent: 2 + rng.below(7),
            move_late_percent: rng.below(3),
            maintenance_permille: 0,
        };
        // Drawn from its own stream, so the other per-seed rates keep the values they
        // had before maintenance was simulated.
        let rates = Rates { maintenance_permille: 5 + Rng::new(options.seed ^ 0x6d61_696e).below(16), ..rates };
        let nodes = options.nodes as usize;
        let blobs = options.blobs as usize;
        let coordinate = (0..nodes)
            .map(|_| (rng.below(20_000) as i64, rng.below(20_000) as i64, 100 + rng.below(900) as i64))
            .collect();
        let hashes = (0..blobs as u64)
            .map(|blob| {
                let mut input = [0u8; 24];
                input[..8].copy_from_slice(b"meshsim!");
                input[8..16].copy_from_slice(&options.seed.to_le_bytes());
                input[16..].copy_from_slice(&blob.to_le_bytes());
                *blake3::hash(&input).as_bytes()
            })
            .collect();
        Sim {
            reconcile: config.reconcile,
            rng,
            rates,
            state: State::new(config),
            reconciler: Reconciler::new(),
            now_ms: GEN_EPOCH_MS,
            step: 0,
            fault_steps: options.steps / 2,
            events: Vec::new(),
            names: (0..nodes).map(node_name).collect(),
            seq: vec![0; nodes],
            coordinate,
            crashed_until_ms: vec![0; nodes],
            partitioned_until_ms: vec![0; nodes],
            slow_until_ms: vec![0; nodes],
            was_reachable: vec![true; nodes],
            maintenance_wanted: vec![false; nodes],
            maintenance_seen: vec![MaintenanceState::Active; nodes],
            capability_version: vec![1; nodes],
            unreachable_since_ms: vec![0; nodes],
            next_heartbeat_ms: vec![0; nodes],
            next_digest_ms: vec![0; nodes],
            daemon_running: vec![[false; 2]; nodes],
            daemon_died: vec![[false; 2]; nodes],
            next_pid: 1000,
            hashes,
            disk: vec![SmallVec::new(); blobs],
            held: vec![BTreeSet::new(); nodes],
            replicas_wanted: vec![options.replicas; blobs],
            zone_spread: (0..blobs).map(|blob| blob % 4 != 0).collect(),
            previous_plan: vec![SmallVec::new(); blobs],
            queue: BTreeMap::new(),
            queue_seq: 0,
            faults: 0,
            violations: Vec::new(),
            violations_total: 0,
            moves: 0,
            needed: 0,
            stats: SimStats::default(),
            rejections_seen: 0,
            sealer: crate::trust::testing::MixedSealer::new(config.genesis.cluster_id()),
            log: None,
            options,
        }
    }

    // ---- ground truth -------------------------------------------------------------

    fn crashed(&self, node: usize) -> bool {
        self.crashed_until_ms[node] > self.now_ms
    }

    fn reachable(&self, node: usize) -> bool {
        !self.crashed(node) && self.partitioned_until_ms[node] <= self.now_ms
    }

    fn slow(&self, node: usize) -> bool {
        self.slow_until_ms[node] > self.now_ms
    }

    fn disk_copy(&self, blob: usize, node: usize) -> Option<Disk> {
        self.disk[blob].iter().find(|(holder, _)| *holder as usize == node).map(|(_, copy)| *copy)
    }

    fn healthy_on_disk(&self, blob: usize) -> usize {
        self.disk[blob].iter().filter(|(_, copy)| *copy == Disk::Healthy).count()
    }

    fn write_disk(&mut self, blob: usize, node: usize, copy: Disk) {
        match self.disk[blob].iter_mut().find(|(holder, _)| *holder as usize == node) {
            Some(entry) => entry.1 = copy,
            None => self.disk[blob].push((node as u32, copy)),
        }
        self.held[node].insert(blob as u32);
    }

    fn delete_disk(&mut self, blob: usize, node: usize) -> Option<Disk> {
        let position = self.disk[blob].iter().position(|(holder, _)| *holder as usize == node)?;
        let (_, copy) = self.disk[blob].remove(position);
        let removed = self.held[node].remove(&(blob as u32));
        assert!(removed, "disk index out of step for blob {blob} on node {node}");
        Some(copy)
    }

    // ---- events -------------------------------------------------------------------

    fn emit(&mut self, node: usize, kind: EventKind) {
        self.seq[node] += 1;
        self.events.push(Event { origin: self.names[node].clone(), origin_seq: self.seq[node], kind });
    }

    /// An admin command (sealed into an operator section with the test operator key).
    fn admin(&mut self, node: usize, command: AdminCommand) {
        self.emit(node, EventKind::Admin(Box::new(command)));
    }

    fn heartbeat(&mut self, node: usize) {
        self.emit(node, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: LOAD_PERMILLE }));
        self.next_heartbeat_ms[node] = self.now_ms + HEARTBEAT_MS - 100 + self.rng.below(200);
    }

    fn replica(&mut self, node: usize, blob: usize, state: ReplicaState) {
        let hash = self.hashes[blob];
        self.emit(node, EventKind::ReplicaUpdate { blob: hash, state });
    }

    /// The node's scrubber digest over the copies it holds that really are healthy.
    fn digest(&mut self, node: usize) {
        let (mut count, mut sum) = (0u32, 0u128);
        for &blob in &self.held[node] {
            if self.disk_copy(blob as usize, node) == Some(Disk::Healthy) {
                count += 1;
                let hash = &self.hashes[blob as usize];
                sum = sum.wrapping_add(u128::from_le_bytes(hash[..16].try_into().expect("16 bytes")));
            }
        }
        self.emit(node, EventKind::InventoryDigest { blob_count: count, digest: sum.to_le_bytes() });
        self.next_digest_ms[node] = self.now_ms + DIGEST_MS_MIN + self.rng.below(DIGEST_MS_SPAN);
    }

    /// Folds the pending events as the next record at the sim clock and runs an
    /// incremental pass; returns the pass's actions.
    fn commit(&mut self) -> Vec<Action> {
        let events = std::mem::take(&mut self.events);
        let payload = self.sealer.seal(&events, self.now_ms);
        let position = self.state.position + 1;
        fold_payload(&mut self.state, position, self.now_ms, &payload);
        assert_eq!(self.state.position, position, "fold did not advance to the record's position");
        if let Some(log) = &mut self.log {
            log.push((self.now_ms, payload));
        }
        if self.state.rejections.total > self.rejections_seen {
            self.rejections_seen = self.state.rejections.total;
            let last = self.state.rejections.kept.back().map_or(String::new(), |rejection| rejection.to_string());
            self.violate(format!("fold rejected a simulated event (a simulator bug): {last}"));
        }
        self.reconciler.pass(&mut self.state, Scope::Incremental).to_vec()
    }

    fn violate(&mut self, what: String) {
        self.violations_total += 1;
        if self.violations.len() < VIOLATIONS_KEPT_MAX {
            self.violations.push(Violation { step: self.step, position: self.state.position, what });
        }
    }

    // ---- setup --------------------------------------------------------------------

    fn setup(&mut self) {
        let nodes = self.names.len();
        for node in 0..nodes {
            self.emit(node, EventKind::Capability(Box::new(node_capability(node, 1, 0))));
            self.heartbeat(node);
            self.next_digest_ms[node] = self.now_ms + self.rng.below(DIGEST_MS_MIN + DIGEST_MS_SPAN);
        }
        for name in DAEMONS {
            let runs_on =
                if name == "indexer" { DaemonPlacement::AllNodes } else { DaemonPlacement::Label("storage".into()) };
            self.emit(0, EventKind::DaemonIntent { spec: Box::new(daemon_spec(name)), runs_on });
        }
        let actions = self.commit();
        for (node, name) in self.names.iter().enumerate() {
            assert_eq!(self.state.nodes.find(name), Some(NodeRow::from_index(node)), "node rows follow join order");
        }
        for (spec, name) in DAEMONS.iter().enumerate() {
            assert_eq!(self.state.specs.find(name), Some(SpecRow::from_index(spec)), "spec rows follow intent order");
        }
        self.schedule(&actions);

        // Blobs and their intents; the pass computes every plan (and holds each blob
        // for want of a source), then the copies appear on the planned nodes directly.
        self.now_ms += STEP_MS_MIN;
        for blob in 0..self.hashes.len() {
            let announcer = blob % nodes;
            let hash = self.hashes[blob];
            self.emit(announcer, EventKind::BlobAnnounce { blob: hash, size_bytes: 1 << 20 });
            let intent = PlacementIntent {
                blob: hash,
                replicas: self.replicas_wanted[blob],
                zone_spread: self.zone_spread[blob],
                pinned: Vec::new(),
            };
            self.emit(announcer, EventKind::PlacementIntent(intent));
        }
        let actions = self.commit();
        assert!(actions.iter().all(|action| !action.kind.is_move()), "no copy exists yet, so nothing can move");
        self.schedule(&actions);
        self.now_ms += STEP_MS_MIN;
        for blob in 0..self.hashes.len() {
            assert_eq!(self.state.blobs.find(&self.hashes[blob]), Some(BlobRow::from_index(blob)));
            assert!(self.state.blobs.plan_valid[blob], "setup pass left blob {blob} unplanned");
            let plan = self.state.blobs.plan[blob].clone();
            assert_eq!(plan.len(), self.replicas_wanted[blob] as usize, "setup plan of blob {blob} is short");
            for node in plan.iter() {
                self.write_disk(blob, node.index(), Disk::Healthy);
                self.replica(node.index(), blob, ReplicaState::Healthy);
            }
            self.previous_plan[blob] = plan;
        }
        let actions = self.commit();
        assert!(actions.iter().all(|action| !action.kind.is_move()), "a placed cluster needs no move");
        self.schedule(&actions);
        self.check_after_pass(&actions);
    }

    // ---- one step -----------------------------------------------------------------

    fn step(&mut self, step: u32) {
        self.step = step;
        self.now_ms += STEP_MS_MIN + self.rng.below(STEP_MS_SPAN + 1);
        let quiet = step > self.fault_steps;
        if quiet && step == self.fault_steps + 1 {
            // The quiet phase: every node comes back and stops being slow.
            self.crashed_until_ms.fill(0);
            self.partitioned_until_ms.fill(0);
            self.slow_until_ms.fill(0);
        }
        if !quiet {
            self.inject_faults();
        }
        self.exit_maintenance(quiet);
        self.returns();
        self.complete_due();
        for node in 0..self.names.len() {
            if self.reachable(node) && self.now_ms >= self.next_heartbeat_ms[node] {
                self.heartbeat(node);
            }
        }
        self.rtt_samples();
        for node in 0..self.names.len() {
            if self.reachable(node) && self.now_ms >= self.next_digest_ms[node] {
                self.digest(node);
            }
        }
        let timed_out_before = self.state.inflight.timed_out;
        let actions = self.commit();
        self.stats.timed_out += self.state.inflight.timed_out - timed_out_before;
        self.stats.brake_steps += self.state.gates.brake as u32;
        for action in &actions {
            match action.kind {
                ActionKind::MarkAvoid { avoid: true } => self.stats.avoid_marks += 1,
                ActionKind::ApplyBackoff { .. } => self.stats.backoffs += 1,
                _ => {}
            }
        }
        self.schedule(&actions);
        self.check_after_pass(&actions);
        self.account_plans();
        self.account_maintenance();
        if quiet {
            match self.convergence() {
                Ok(()) if self.stats.converged_at_step == 0 => self.stats.converged_at_step = step,
                Ok(()) => {}
                Err(reason) => {
                    self.stats.converged_at_step = 0;
                    self.stats.unconverged = reason;
                }
            }
        }
    }

    /// Nodes that became reachable again report what a restart or a healed link shows:
    /// a crashed node's daemons died, and its inventory.
    fn returns(&mut self) {
        for node in 0..self.names.len() {
            let reachable = self.reachable(node);
            if reachable == self.was_reachable[node] {
                continue;
            }
            self.was_reachable[node] = reachable;
            if !reachable {
                self.unreachable_since_ms[node] = self.now_ms;
                continue;
            }
            self.heartbeat(node);
            for (spec, name) in DAEMONS.iter().enumerate() {
                if !std::mem::take(&mut self.daemon_died[node][spec]) {
                    continue;
                }
                let logged_running = self
                    .state
                    .daemons
                    .find(SpecRow::from_index(spec), NodeRow::from_index(node))
                    .is_some_and(|row| self.state.daemons.state[row.index()].is_running());
                if logged_running {
                    let signal = DaemonSignal::Crashed { signal: 9 };
                    self.emit(node, EventKind::Daemon { daemon: name.to_string(), signal });
                }
            }
            self.digest(node);
        }
    }

    fn inject_faults(&mut self) {
        let nodes = self.names.len();
        let unreachable = (0..nodes).filter(|&node| !self.reachable(node)).count();
        let down_max = (nodes / 10).max(1);
        let rates = self.rates;
        if self.rng.below(1000) < rates.crash_permille && unreachable < down_max {
            let node = self.rng.below(nodes as u64) as usize;
            if self.reachable(node) {
                self.crashed_until_ms[node] = self.now_ms + 10_000 + self.rng.below(140_000);
                for spec in 0..DAEMONS.len() {
                    if std::mem::take(&mut self.daemon_running[node][spec]) {
                        self.daemon_died[node][spec] = true;
                    }
                }
                self.tear_writes(node);
                self.faults += 1;
                self.stats.crashes += 1;
            }
        }
        let unreachable = (0..nodes).filter(|&node| !self.reachable(node)).count();
        if self.rng.below(1000) < rates.partition_permille && unreachable + 2 <= down_max {
            // One partition in four cuts off every node the down cap allows (a tenth of
            // the cluster, enough to trip the mass-failure brake) for long enough.
            let room = down_max - unreachable;
            let large = self.rng.below(4) == 0;
            let size = if large { room } else { 2 + self.rng.below((room - 1).min(2 + nodes / 25) as u64) as usize };
            let until_ms = self.now_ms + if large { 70_000 } else { 5_000 } + self.rng.below(85_000);
            let first = self.rng.below(nodes as u64) as usize;
            let mut cut = 0;
            for offset in 0..nodes {
                let node = (first + offset * 7) % nodes;
                if cut < size && self.reachable(node) {
                    self.partitioned_until_ms[node] = until_ms;
                    cut += 1;
                }
            }
            self.faults += 1;
            self.stats.partitions += 1;
        }
        if self.rng.below(1000) < rates.slow_permille {
            let node = self.rng.below(nodes as u64) as usize;
            if !self.slow(node) {
                self.slow_until_ms[node] = self.now_ms + 20_000 + self.rng.below(100_000);
                self.faults += 1;
                self.stats.slow_nodes += 1;
            }
        }
        if self.rng.below(1000) < rates.corrupt_permille {
            self.corrupt();
        }
        if self.rng.below(1000) < rates.intent_permille {
            self.change_intent();
        }
        if self.rng.below(1000) < rates.maintenance_permille {
            self.enter_maintenance();
        }
    }

    /// An operator sends reachable nodes into maintenance, keeping at most a third of
    /// the nodes away at once: usually one, one time in eight as many as that allows
    /// (a rack's worth of nodes drained together).
    fn enter_maintenance(&mut self) {
        let nodes = self.names.len();
        let burst = self.rng.below(8) == 0;
        let mut count = if burst { nodes } else { 1 };
        let first = self.rng.below(nodes as u64) as usize;
        for offset in 0..nodes {
            let away = self.maintenance_wanted.iter().filter(|&&wanted| wanted).count();
            if count == 0 || (away + 1) * 3 > nodes {
                break;
            }
            let node = (first + offset * 7) % nodes;
            if self.maintenance_wanted[node] || !self.reachable(node) {
                continue;
            }
            self.maintenance_wanted[node] = true;
            let command = AdminCommand::EnterMaintenance { node: self.names[node].clone() };
            self.admin(node, command);
            self.stats.maintenance_entries += 1;
            self.stats.away_max = self.stats.away_max.max(away as u32 + 1);
            count -= 1;
        }
        self.faults += 1;
    }

    /// Nodes whose drain ended (Maintenance or DrainFailed) come back: during faults
    /// after a while, in the quiet phase at once. The node publishes a fresh capability,
    /// as a node back from maintenance does.
    fn exit_maintenance(&mut self, quiet: bool) {
        for node in 0..self.names.len() {
            let state = self.state.nodes.maintenance[node];
            let drained = matches!(state, MaintenanceState::Maintenance | MaintenanceState::DrainFailed);
            if !self.maintenance_wanted[node] || !drained || !self.reachable(node) {
                continue;
            }
            if !quiet && self.rng.below(100) >= 5 {
                continue;
            }
            self.maintenance_wanted[node] = false;
            let command = AdminCommand::ExitMaintenance { node: self.names[node].clone() };
            self.admin(node, command);
            let version = self.capability_version[node];
            self.capability_version[node] = version + 1;
            self.emit(node, EventKind::Capability(Box::new(node_capability(node, version + 1, version))));
            self.stats.maintenance_exits += 1;
        }
    }

    /// (i) A node that reached Maintenance left every blob it holds with its intent met
    /// (at least one copy) on nodes that stay: copies on disk, on nodes not away, that
    /// are healthy or silently corrupt (which nobody can know before verifying).
    fn check_drained(&mut self, node: usize) {
        for blob in 0..self.disk.len() {
            if self.disk_copy(blob, node) != Some(Disk::Healthy) {
                continue;
            }
            let wanted = (self.state.blobs.replicas_wanted[blob] as usize).max(1);
            let stays = self.disk[blob]
                .iter()
                .filter(|&&(other, _)| {
                    let other = other as usize;
                    let known_healthy = self
                        .state
                        .replicas
                        .find(BlobRow::from_index(blob), NodeRow::from_index(other))
                        .is_some_and(|row| self.state.replicas.state[row.index()] == ReplicaState::Healthy);
                    other != node && known_healthy && !self.state.nodes.maintenance[other].is_away()
                })
                .count();
            if stays < wanted {
                let what = format!(
                    "(i) {} reached Maintenance while blob {blob} has {stays} of {wanted} copies on nodes that stay",
                    self.names[node]
                );
                self.violate(what);
            }
        }
    }

    /// Counts drain outcomes and checks that no drain outlives its deadline.
    fn account_maintenance(&mut self) {
        for node in 0..self.names.len() {
            let state = self.state.nodes.maintenance[node];
            let before = std::mem::replace(&mut self.maintenance_seen[node], state);
            if before == MaintenanceState::EnteringMaintenance {
                match state {
                    MaintenanceState::Maintenance => {
                        self.stats.drains_completed += 1;
                        self.check_drained(node);
                    }
                    MaintenanceState::DrainFailed => self.stats.drains_failed += 1,
                    _ => {}
                }
            }
            let deadline_ms = self.state.nodes.drain_deadline_ms[node];
            if state == MaintenanceState::EnteringMaintenance && self.now_ms > deadline_ms + DRAIN_END_SLACK_MS {
                let what = format!(
                    "(h) the drain of {} passed its deadline without ending ({} copies unsafe)",
                    self.names[node], self.state.nodes.drain_unsafe_copies[node]
                );
                self.violate(what);
            }
        }
    }

    /// Silently corrupts one healthy copy of a random blob that keeps at least two
    /// other healthy copies on disk.
    fn corrupt(&mut self) {
        let blob = self.rng.below(self.hashes.len() as u64) as usize;
        if self.healthy_on_disk(blob) < 3 {
            return;
        }
        let healthy: SmallVec<[u32; 8]> =
            self.disk[blob].iter().filter(|(_, copy)| *copy == Disk::Healthy).map(|(node, _)| *node).collect();
        let node = healthy[self.rng.below(healthy.len() as u64) as usize] as usize;
        let incarnation = self.state.nodes.incarnation[node];
        self.write_disk(blob, node, Disk::Corrupt { incarnation });
        assert!(self.healthy_on_disk(blob) >= 2, "corruption must spare the last healthy copies");
        if self.state.blobs.plan[blob].contains(&NodeRow::from_index(node)) {
            self.needed += 1;
        }
        self.faults += 1;
        self.stats.corruptions += 1;
    }

    /// A crash tears a few of the node's copies (they read back corrupt), each only if
    /// its blob keeps two other healthy copies: what the node reports after it comes
    /// back must be verified before it counts (rejoin fencing).
    fn tear_writes(&mut self, node: usize) {
        let held: Vec<u32> = self.held[node].iter().copied().collect();
        if held.is_empty() {
            return;
        }
        for _ in 0..3 {
            let blob = held[self.rng.below(held.len() as u64) as usize] as usize;
            if self.disk_copy(blob, node) != Some(Disk::Healthy) || self.healthy_on_disk(blob) < 3 {
                continue;
            }
            let incarnation = self.state.nodes.incarnation[node];
            self.write_disk(blob, node, Disk::Corrupt { incarnation });
            self.stats.corruptions += 1;
            if self.state.blobs.plan[blob].contains(&NodeRow::from_index(node)) {
                self.needed += 1;
            }
        }
    }

    /// An operator changes a blob's intent: one copy more or fewer, or a pinned node.
    fn change_intent(&mut self) {
        let blob = self.rng.below(self.hashes.len() as u64) as usize;
        let nodes = self.names.len();
        let base = self.options.replicas;
        let (low, high) = (base.saturating_sub(1).max(1), (base + 1).min(PLAN_NODES_MAX as u8).min(nodes as u8 - 1));
        let current = self.replicas_wanted[blob];
        let mut pinned = Vec::new();
        let replicas = match self.rng.below(3) {
            0 if current < high => current + 1,
            1 if current > low => current - 1,
            _ => {
                let node = self.rng.below(nodes as u64) as usize;
                pinned.push(self.names[node].clone());
                current
            }
        };
        self.replicas_wanted[blob] = replicas;
        let intent = PlacementIntent { blob: self.hashes[blob], replicas, zone_spread: self.zone_spread[blob], pinned };
        let origin = (0..nodes).map(|offset| (blob + offset) % nodes).find(|&node| self.reachable(node));
        let origin = origin.expect("at most a tenth of the nodes is ever unreachable");
        self.emit(origin, EventKind::PlacementIntent(intent));
        self.faults += 1;
        self.stats.intent_changes += 1;
    }

    /// RTT samples between reachable nodes from the latency map; a slow node's are inflated.
    fn rtt_samples(&mut self) {
        let nodes = self.names.len();
        for _ in 0..(nodes / 10).max(2) {
            let from = self.rng.below(nodes as u64) as usize;
            let to = (from + 1 + self.rng.below(nodes as u64 - 1) as usize) % nodes;
            if !self.reachable(from) || !self.reachable(to) {
                continue;
            }
            let (ax, ay, ah) = self.coordinate[from];
            let (bx, by, bh) = self.coordinate[to];
            let (dx, dy) = ((ax - bx) as f64, (ay - by) as f64);
            let base_us = (dx * dx + dy * dy).sqrt() as u64 + (ah + bh) as u64;
            let factor = if self.slow(from) || self.slow(to) { SLOW_FACTOR } else { 1 };
            let jitter_us = self.rng.below(base_us / 10 + 1);
            let rtt_us = ((base_us + jitter_us) * factor).min(9_000_000) as u32;
            self.emit(from, EventKind::Rtt { peer: self.names[to].clone(), rtt_us });
        }
    }

    // ---- executors ----------------------------------------------------------------

    /// Queues the pass's tracked actions for their nodes; an action for an unreachable
    /// node is lost (reconcile times it out).
    fn schedule(&mut self, actions: &[Action]) {
        for action in actions {
            if !action.kind.is_tracked() {
                continue;
            }
            let node = action.node.index();
            if !self.reachable(node) {
                self.stats.lost_actions += 1;
                continue;
            }
            let (delay_ms, fate) = match action.kind {
                ActionKind::PullReplica { blob, .. } | ActionKind::MigrateBlob { blob, .. } => {
                    self.moves += 1;
                    if self.disk_copy(blob.index(), node) == Some(Disk::Healthy) {
                        self.stats.redundant_moves += 1;
                    }
                    // Failed and slow transfers are faults: none in the quiet phase.
                    let roll = if self.step > self.fault_steps { 100 } else { self.rng.below(100) };
                    if roll < self.rates.move_late_percent {
                        (self.reconcile.action_timeout_ms + 1_000 + self.rng.below(20_000), Fate::Late)
                    } else if roll < self.rates.move_late_percent + self.rates.move_fail_percent {
                        (300 + self.rng.below(2_000), Fate::Fail)
                    } else {
                        (300 + self.rng.below(2_200), Fate::Normal)
                    }
                }
                ActionKind::DropReplica { .. } => (50 + self.rng.below(250), Fate::Normal),
                ActionKind::VerifyReplica { .. } => (50 + self.rng.below(450), Fate::Normal),
                _ => (100 + self.rng.below(900), Fate::Normal),
            };
            self.queue_seq += 1;
            self.queue.insert((self.now_ms + delay_ms, self.queue_seq), Execution { action: *action, fate });
        }
    }

    fn in_flight(&self, action: &Action) -> bool {
        self.state.inflight.entries.iter().any(|entry| entry.action.id == action.id)
    }

    fn outcome(&mut self, action: &Action, success: bool, reason: &str) {
        if !self.in_flight(action) {
            return; // Reconcile timed it out already; nobody waits for this answer.
        }
        let outcome = if success { Outcome::Success } else { Outcome::Failure { reason: reason.to_string() } };
        self.emit(action.node.index(), EventKind::ActionOutcome { action: action.id, outcome });
    }

    fn complete_due(&mut self) {
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let execution = entry.remove();
            let action = execution.action;
            let node = action.node.index();
            if !self.reachable(node) {
                self.stats.abandoned += 1;
                continue;
            }
            if action.kind.is_move() && self.maintenance_wanted[node] {
                // Entering maintenance cancelled every move into the node (fold): its
                // executor reads that in the log and abandons the transfer.
                self.stats.abandoned += 1;
                continue;
            }
            match action.kind {
                ActionKind::PullReplica { blob, source } | ActionKind::MigrateBlob { blob, from: source } => {
                    let blob = blob.index();
                    let source_ok =
                        self.reachable(source.index()) && self.disk_copy(blob, source.index()) == Some(Disk::Healthy);
                    if execution.fate == Fate::Fail || !source_ok {
                        self.stats.failed_moves += 1;
                        let reason = if source_ok { "connection reset" } else { "source has no healthy copy" };
                        self.outcome(&action, false, reason);
                        continue;
                    }
                    if execution.fate == Fate::Late {
                        self.stats.late_moves += 1;
                    }
                    self.write_disk(blob, node, Disk::Healthy);
                    self.replica(node, blob, ReplicaState::Healthy);
                    self.outcome(&action, true, "");
                }
                ActionKind::DropReplica { blob } => {
                    let blob = blob.index();
                    self.stats.drops += 1;
                    let removed = self.delete_disk(blob, node);
                    if removed == Some(Disk::Healthy) && self.healthy_on_disk(blob) == 0 {
                        self.violate(format!(
                            "(a) {} dropped the last healthy copy of blob {blob} ({})",
                            self.names[node],
                            crate::event::blob_hex(&self.hashes[blob])
                        ));
                    }
                    self.replica(node, blob, ReplicaState::Deleted);
                    self.outcome(&action, true, "");
                }
                ActionKind::VerifyReplica { blob } => {
                    let blob = blob.index();
                    self.stats.verifies += 1;
                    let truth = match self.disk_copy(blob, node) {
                        Some(Disk::Healthy) => ReplicaState::Healthy,
                        Some(Disk::Corrupt { .. }) => ReplicaState::Corrupt,
                        None => ReplicaState::Deleted,
                    };
                    self.replica(node, blob, truth);
                    self.outcome(&action, true, "");
                }
                ActionKind::StartDaemon { spec } => {
                    let (spec, name) = (spec.index(), DAEMONS[spec.index()]);
                    let pid = self.next_pid;
                    self.next_pid += 1;
                    self.daemon_running[node][spec] = true;
                    self.emit(
                        node,
                        EventKind::Daemon { daemon: name.to_string(), signal: DaemonSignal::Started { pid } },
                    );
                    let signal = DaemonSignal::Registered { pid };
                    self.emit(node, EventKind::Daemon { daemon: name.to_string(), signal });
                    self.outcome(&action, true, "");
                }
                ActionKind::StopDaemon { spec } => {
                    let (spec, name) = (spec.index(), DAEMONS[spec.index()]);
                    self.daemon_running[node][spec] = false;
                    self.emit(node, EventKind::Daemon { daemon: name.to_string(), signal: DaemonSignal::Stopped });
                    self.outcome(&action, true, "");
                }
                ActionKind::RestartDaemon { spec } => {
                    let (spec, name) = (spec.index(), DAEMONS[spec.index()]);
                    let pid = self.next_pid;
                    self.next_pid += 1;
                    self.daemon_running[node][spec] = true;
                    for signal in
                        [DaemonSignal::Stopped, DaemonSignal::Started { pid }, DaemonSignal::Registered { pid }]
                    {
                        self.emit(node, EventKind::Daemon { daemon: name.to_string(), signal });
                    }
                    self.outcome(&action, true, "");
                }
                ActionKind::ReduceHeat { .. } | ActionKind::MarkAvoid { .. } | ActionKind::ApplyBackoff { .. } => {
                    unreachable!("advisory actions are never queued")
                }
            }
        }
    }

    // ---- checks -------------------------------------------------------------------

    fn check_after_pass(&mut self, actions: &[Action]) {
        let mut found = check_actions(&self.state, actions);
        found.extend(check_budgets(&self.state));
        found.extend(self.check_counted_copies());
        found.extend(self.check_drops(actions));
        for what in found {
            self.violate(what);
        }
        self.state.check_invariants();
    }

    /// (c): every copy reconcile counts is really on disk, and not corrupt since
    /// before the holder's current incarnation (fencing must have re-verified it).
    fn check_counted_copies(&self) -> Vec<String> {
        let mut found = Vec::new();
        let (replicas, nodes) = (&self.state.replicas, &self.state.nodes);
        for row in 0..replicas.len() {
            let node = replicas.node[row].index();
            let counted = replicas.state[row] == ReplicaState::Healthy
                && nodes.live[node]
                && replicas.verified_incarnation[row] == nodes.incarnation[node];
            if !counted {
                continue;
            }
            let blob = replicas.blob[row].index();
            match self.disk_copy(blob, node) {
                Some(Disk::Healthy) => {}
                Some(Disk::Corrupt { incarnation }) if incarnation >= nodes.incarnation[node] => {}
                Some(Disk::Corrupt { incarnation }) => found.push(format!(
                    "(c) blob {blob} counted on {} (incarnation {}) though corrupt since incarnation {incarnation}",
                    self.names[node], nodes.incarnation[node]
                )),
                None => found.push(format!("(c) blob {blob} counted on {} which holds no copy", self.names[node])),
            }
        }
        found
    }

    /// (a, c) at emission: a drop of a copy the state calls healthy (surplus or
    /// operator-dropped) goes out only while every planned node really holds the blob,
    /// healthy or corrupt only since its current incarnation (undetectable yet): a drop
    /// justified by a fenced or vanished copy is caught here, before it executes.
    fn check_drops(&self, actions: &[Action]) -> Vec<String> {
        let mut found = Vec::new();
        let state = &self.state;
        for action in actions {
            let ActionKind::DropReplica { blob } = action.kind else { continue };
            let row = state.replicas.find(blob, action.node).expect("a drop names an existing copy");
            if state.replicas.state[row.index()] != ReplicaState::Healthy {
                continue;
            }
            for node in state.blobs.plan[blob.index()].iter() {
                let incarnation = state.nodes.incarnation[node.index()];
                match self.disk_copy(blob.index(), node.index()) {
                    Some(Disk::Healthy) => {}
                    Some(Disk::Corrupt { incarnation: since }) if since >= incarnation => {}
                    truth => found.push(format!(
                        "(c) {} while planned {} holds {truth:?} (incarnation {incarnation})",
                        crate::action::describe(state, action),
                        self.names[node.index()]
                    )),
                }
            }
        }
        found
    }

    /// `needed`: every time a node enters a blob's plan without a healthy copy on disk,
    /// one copy truly has to move there (losses, displacement by intent changes and by
    /// nodes leaving eligibility all show up this way); corruption of a planned copy is
    /// counted where it is injected.
    fn account_plans(&mut self) {
        for blob in 0..self.hashes.len() {
            if !self.state.blobs.plan_valid[blob] || self.state.blobs.plan[blob] == self.previous_plan[blob] {
                continue;
            }
            let plan = self.state.blobs.plan[blob].clone();
            for node in plan.iter() {
                if !self.previous_plan[blob].contains(node) && self.disk_copy(blob, node.index()) != Some(Disk::Healthy)
                {
                    self.needed += 1;
                }
            }
            self.previous_plan[blob] = plan;
        }
    }

    /// (f): every blob has exactly its plan's counted copies, the plan is as long as
    /// the intent, the disks agree, no surplus or corrupt copy is left, nothing is in
    /// flight, and every node is back.
    fn convergence(&self) -> Result<(), String> {
        let state = &self.state;
        if let Some(entry) = state.inflight.entries.first() {
            return Err(format!(
                "{} actions in flight, the first: {}",
                state.inflight.len(),
                crate::action::describe(state, &entry.action)
            ));
        }
        if let Some(node) = (0..self.names.len()).find(|&node| !state.nodes.live[node]) {
            return Err(format!("{} is not live", self.names[node]));
        }
        if let Some(node) =
            (0..self.names.len()).find(|&node| state.nodes.maintenance[node] != MaintenanceState::Active)
        {
            return Err(format!("{} is {}", self.names[node], state.nodes.maintenance[node].name()));
        }
        for blob in 0..self.hashes.len() {
            let plan = &state.blobs.plan[blob];
            let gate = crate::reconcile::gates::Gate::from_code(state.blobs.held_by[blob]).name();
            let wanted = self.replicas_wanted[blob];
            if state.blobs.replicas_wanted[blob] != wanted
                || !state.blobs.plan_valid[blob]
                || plan.len() != wanted as usize
            {
                return Err(format!("blob {blob}: plan of {} nodes for {wanted} wanted (held by {gate})", plan.len()));
            }
            for &row in &state.blobs.replica_rows[blob] {
                let (node, replica_state) = (state.replicas.node[row.index()], state.replicas.state[row.index()]);
                let planned = plan.contains(&node);
                let counted = replica_state == ReplicaState::Healthy
                    && state.replicas.verified_incarnation[row.index()] == state.nodes.incarnation[node.index()];
                if planned && !counted {
                    return Err(format!(
                        "blob {blob}: planned copy on {} is {replica_state:?}, not counted (held by {gate})",
                        self.names[node.index()]
                    ));
                }
                if !planned && replica_state != ReplicaState::Deleted {
                    return Err(format!(
                        "blob {blob}: surplus {replica_state:?} copy left on {} (held by {gate})",
                        self.names[node.index()]
                    ));
                }
            }
            for node in plan.iter() {
                if state.replicas.find(BlobRow::from_index(blob), *node).is_none() {
                    return Err(format!(
                        "blob {blob}: no copy on planned {} (held by {gate})",
                        self.names[node.index()]
                    ));
                }
            }
            let disk_ok = self.disk[blob].len() == plan.len()
                && self.disk[blob]
                    .iter()
                    .all(|(node, copy)| *copy == Disk::Healthy && plan.contains(&NodeRow::from_index(*node as usize)));
            if !disk_ok {
                return Err(format!("blob {blob}: disks hold {:?}, the plan is {plan:?}", self.disk[blob]));
            }
        }
        Ok(())
    }

    fn finish(mut self) -> SimReport {
        let converged = self.stats.converged_at_step > 0;
        if converged {
            self.stats.unconverged.clear();
        }
        let bound = THRASH_FACTOR * self.needed + THRASH_SLACK_MOVES;
        if self.moves > bound {
            self.violate(format!(
                "(g) thrash: {} moves for {} needed (bound {THRASH_FACTOR}x + {THRASH_SLACK_MOVES} = {bound})",
                self.moves, self.needed
            ));
        }
        if self.violations_total > self.violations.len() as u64 {
            let dropped = self.violations_total - self.violations.len() as u64;
            self.violations.push(Violation {
                step: self.step,
                position: self.state.position,
                what: format!("... and {dropped} more violations not kept"),
            });
        }
        self.stats.fenced_rejoins = self.state.nodes.incarnation.iter().map(|&count| count as u64).sum();
        SimReport {
            seed: self.options.seed,
            steps: self.options.steps,
            faults: self.faults,
            violations: self.violations,
            converged,
            moves: self.moves,
            needed: self.needed,
            stats: self.stats,
        }
    }
}

/// (b): every pull or migration the pass emitted targets a node that is eligible in
/// the state after the pass.
pub fn check_actions(state: &State, actions: &[Action]) -> Vec<String> {
    let mut found: Vec<String> = actions
        .iter()
        .filter(|action| action.kind.is_move() && !state.nodes.eligible[action.node.index()])
        .map(|action| format!("(b) move into an ineligible node: {}", crate::action::describe(state, action)))
        .collect();
    found.extend(
        actions
            .iter()
            .filter(|action| action.kind.is_move() && state.nodes.maintenance[action.node.index()].in_maintenance())
            .map(|action| {
                format!("(h) move into a node in or near maintenance: {}", crate::action::describe(state, action))
            }),
    );
    found
}

/// (d): in-flight work within its budgets (moves in all and per node, verifications,
/// drops, daemon actions).
pub fn check_budgets(state: &State) -> Vec<String> {
    let (inflight, config) = (&state.inflight, &state.reconcile);
    let mut found = Vec::new();
    let budgets = [
        ("moves", inflight.moves, config.pull_inflight_max),
        ("verifies", inflight.verifies, config.verify_inflight_max),
        ("drops", inflight.drops, config.drop_inflight_max),
        ("daemon actions", inflight.daemon_actions, config.daemon_inflight_max),
    ];
    for (what, count, max) in budgets {
        if count > max {
            found.push(format!("(d) {count} {what} in flight, budget {max}"));
        }
    }
    for (node, &count) in inflight.moves_by_node.iter().enumerate() {
        if count > config.pull_inflight_per_node_max {
            found.push(format!(
                "(d) {count} moves in flight at {}, budget {}",
                state.nodes.name[node], config.pull_inflight_per_node_max
            ));
        }
    }
    found
}
