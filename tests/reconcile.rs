//! Reconcile, data-driven: each case is a small event list and the exact actions the
//! pass after each record must emit (described with names), covering every action
//! kind and every gate; plus full versus incremental equality on generated logs.

mod common;

use common::event;
use meshos::action::describe;
use meshos::config::{Config, ReconcileConfig};
use meshos::event::*;
use meshos::fold::fold_payload;
use meshos::reconcile::{Reconciler, Scope};
use meshos::state::State;

/// Folds records one by one (100 ms apart unless a record says otherwise) and runs an
/// incremental pass after each; returns the described actions of every pass.
struct Harness {
    state: State,
    reconciler: Reconciler,
    time_ms: u64,
    seqs: std::collections::BTreeMap<String, u64>,
}

impl Harness {
    fn new(reconcile: ReconcileConfig) -> Harness {
        let config = Config { reconcile, ..Config::for_tests() };
        Harness {
            state: State::new(&config),
            reconciler: Reconciler::new(),
            time_ms: 1_000_000,
            seqs: Default::default(),
        }
    }

    /// One record at `time_ms + after_ms`; the actions of the pass after it.
    fn step(&mut self, after_ms: u64, events: Vec<Event>) -> Vec<String> {
        self.time_ms += after_ms;
        let payload = meshos::trust::testing::seal_for(&self.state, &events, self.time_ms);
        let position = self.state.position + 1;
        fold_payload(&mut self.state, position, self.time_ms, &payload);
        assert_eq!(self.state.rejections.total, 0, "{:?}", self.state.rejections.kept);
        let mut full = self.state.clone();
        let full_actions: Vec<String> = {
            let mut reconciler = Reconciler::new();
            reconciler.pass(&mut full, Scope::Full).iter().map(|action| describe(&full, action)).collect()
        };
        let actions: Vec<String> = {
            let state = &mut self.state;
            let emitted = self.reconciler.pass(state, Scope::Incremental).to_vec();
            emitted.iter().map(|action| describe(state, action)).collect()
        };
        assert_eq!(actions, full_actions, "incremental and full passes differ at position {position}");
        assert_eq!(self.state.state_hash(), full.state_hash(), "states differ after the pass at {position}");
        self.state.check_invariants();
        actions
    }

    /// An event from `origin` with its next origin sequence number.
    fn ev(&mut self, origin: &str, kind: EventKind) -> Event {
        let seq = self.seqs.entry(origin.to_string()).or_insert(0);
        *seq += 1;
        event(origin, *seq, kind)
    }

    /// An admin command (sealed in an operator section signed by the test key).
    fn signed(&mut self, origin: &str, command: AdminCommand) -> Event {
        self.ev(origin, EventKind::Admin(Box::new(command)))
    }

    /// Nodes join with one zone each and a heartbeat (the sealer admits their test
    /// keys in the same record; the genesis trusts the test operator key).
    fn join(&mut self, names: &[&str]) -> Vec<String> {
        let mut events = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let capability = Capability {
                version: 1,
                fork_of: 0,
                zone: format!("z{index}"),
                capacity_bytes: 1 << 40,
                labels: vec!["storage".into()],
                endpoint: String::new(),
            };
            events.push(self.ev(name, EventKind::Capability(Box::new(capability))));
            events.push(self.ev(name, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })));
        }
        self.step(100, events)
    }

    fn heartbeats(&mut self, after_ms: u64, names: &[&str]) -> Vec<String> {
        let events = names
            .iter()
            .map(|name| self.ev(name, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })))
            .collect::<Vec<_>>();
        self.step(after_ms, events)
    }

    fn replica(&mut self, node: &str, blob: BlobHash, state: ReplicaState) -> Event {
        self.ev(node, EventKind::ReplicaUpdate { blob, state })
    }

    fn blob_with_intent(&mut self, origin: &str, blob: BlobHash, replicas: u8, pinned: &[&str]) -> Vec<Event> {
        let announce = self.ev(origin, EventKind::BlobAnnounce { blob, size_bytes: 100 });
        let intent = PlacementIntent {
            blob,
            replicas,
            zone_spread: false,
            pinned: pinned.iter().map(|name| name.to_string()).collect(),
        };
        let intent = self.ev(origin, EventKind::PlacementIntent(intent));
        vec![announce, intent]
    }

    fn outcome(&mut self, node: &str, position: u64, index: u32, outcome: Outcome) -> Event {
        self.ev(node, EventKind::ActionOutcome { action: ActionId { position, index }, outcome })
    }
}

const B1: BlobHash = [0x11; 32];
const B2: BlobHash = [0x22; 32];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

#[test]
fn a_converged_cluster_emits_nothing() {
    let mut h = Harness::new(ReconcileConfig::default());
    assert!(h.join(&["a", "b", "c"]).is_empty());
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.ev("a", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    events.push(h.ev("b", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    assert!(h.step(100, events).is_empty());
    for _ in 0..5 {
        assert!(h.heartbeats(1_000, &["a", "b", "c"]).is_empty());
    }
}

#[test]
fn a_missing_copy_is_pulled_from_a_holder_and_settles() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.ev("a", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    assert_eq!(h.step(100, events), strings(&["b: pull_replica 11111111 from a"]));
    assert_eq!(h.state.inflight.moves, 1);
    let position = h.state.position;
    let done = vec![h.outcome("b", position, 0, Outcome::Success), h.replica("b", B1, ReplicaState::Healthy)];
    assert!(h.step(100, done).is_empty());
    assert_eq!(h.state.inflight.moves, 0);
}

#[test]
fn drift_is_migrated_then_the_old_copy_dropped_after_stabilisation() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 5_000, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 1, &["b"]);
    events.push(h.ev("a", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    assert_eq!(h.step(100, events), strings(&["b: migrate_blob 11111111 from a"]));
    let position = h.state.position;
    let done = vec![h.outcome("b", position, 0, Outcome::Success), h.replica("b", B1, ReplicaState::Healthy)];
    assert!(h.step(100, done).is_empty(), "the new copy is not stable yet");
    let blob = h.state.blobs.find(&B1).unwrap().index();
    assert_eq!(meshos::reconcile::gates::Gate::from_code(h.state.blobs.held_by[blob]).name(), "stabilisation");
    assert!(h.heartbeats(2_000, &["a", "b", "c"]).is_empty());
    assert_eq!(h.heartbeats(3_000, &["a", "b", "c"]), strings(&["a: drop_replica 11111111"]));
}

#[test]
fn the_last_healthy_copy_is_never_dropped() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 0, ..ReconcileConfig::default() });
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 1, &["b"]);
    events.push(h.ev("a", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    h.step(100, events);
    // The migration fails for good: b never gets a copy; a's copy must stay.
    for _ in 0..10 {
        let actions = h.heartbeats(200_000, &["a", "b"]);
        assert!(actions.iter().all(|action| !action.contains("drop_replica")), "{actions:?}");
    }
}

#[test]
fn a_rejoining_node_is_fenced_until_verified() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.ev("a", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    events.push(h.ev("b", EventKind::ReplicaUpdate { blob: B1, state: ReplicaState::Healthy }));
    h.step(100, events);
    let down = h.ev("b", EventKind::NodeHealth(NodeHealth::Status { node: "b".into(), status: NodeStatus::Down }));
    let actions = h.step(100, vec![down]);
    assert!(actions.iter().all(|action| !action.starts_with("b:")), "{actions:?}");
    let back = h.heartbeats(100, &["b"]);
    assert!(back.contains(&"b: verify_replica 11111111".to_string()), "{back:?}");
}

#[test]
fn daemons_start_where_wanted_and_stop_when_removed() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b"]);
    let spec = web_spec(0);
    let intent =
        h.ev("a", EventKind::DaemonIntent { spec: Box::new(spec.clone()), runs_on: DaemonPlacement::AllNodes });
    assert_eq!(h.step(100, vec![intent]), strings(&["a: start_daemon web", "b: start_daemon web"]));
    let position = h.state.position;
    let started = vec![
        h.outcome("a", position, 0, Outcome::Success),
        h.ev("a", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 10 } }),
        h.outcome("b", position, 1, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 11 } }),
    ];
    assert!(h.step(100, started).is_empty());
    let hot = h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Saturation { permille: 950 } });
    assert_eq!(h.step(100, vec![hot]), strings(&["b: reduce_heat to 700"]));
    let removed = h.ev("a", EventKind::DaemonIntent { spec: Box::new(spec), runs_on: DaemonPlacement::Nowhere });
    assert_eq!(h.step(100, vec![removed]), strings(&["a: stop_daemon web", "b: stop_daemon web"]));
}

/// Node b's capability after its first (version 2, forked from 1): what a node
/// leaving maintenance publishes.
fn fresh_capability() -> EventKind {
    let capability = Capability {
        version: 2,
        fork_of: 1,
        zone: "z1".into(),
        capacity_bytes: 1 << 40,
        labels: vec!["storage".into()],
        endpoint: String::new(),
    };
    EventKind::Capability(Box::new(capability))
}

fn web_spec(health_timeout_ms: u32) -> DaemonSpec {
    DaemonSpec {
        working_dir: "/".into(),
        health_timeout_ms,
        stop_grace_ms: 1_000,
        ..DaemonSpec::new("web", "/bin/web")
    }
}

impl Harness {
    /// One node `a` runs daemon `web` (started and settled); returns the harness.
    fn with_web_running(health_timeout_ms: u32) -> Harness {
        let mut h = Harness::new(ReconcileConfig::default());
        h.join(&["a"]);
        let spec = web_spec(health_timeout_ms);
        let intent = h.ev("a", EventKind::DaemonIntent { spec: Box::new(spec), runs_on: DaemonPlacement::AllNodes });
        assert_eq!(h.step(100, vec![intent]), strings(&["a: start_daemon web"]));
        let position = h.state.position;
        h.run_started(position, 0, 1)
    }

    /// The start action at (`position`, `index`) succeeded and web runs with `pid`.
    fn run_started(mut self, position: u64, index: u32, pid: u32) -> Harness {
        let events = vec![
            self.outcome("a", position, index, Outcome::Success),
            self.ev("a", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid } }),
        ];
        assert!(self.step(10, events).is_empty());
        self
    }

    fn web(&mut self, after_ms: u64, signal: DaemonSignal) -> Vec<String> {
        self.web_on("a", after_ms, signal)
    }

    /// `web` on `a` ends unplanned five times within 60 s (the default policy's limit):
    /// crash, wait out the backoff, start, ..., then an exit. Returns its instance row.
    fn crash_looped() -> (Harness, meshos::state::ids::DaemonRow) {
        let mut h = Harness::with_web_running(0);
        for pid in 2..6 {
            h.web(100, DaemonSignal::Crashed { signal: 11 });
            let (_, actions) = h.wait_for_actions(20_000);
            assert_eq!(actions, strings(&["a: start_daemon web"]));
            let position = h.state.position;
            h = h.run_started(position, 0, pid);
        }
        h.web(100, DaemonSignal::Exited { code: 1 });
        let row = h.state.daemons.find(h.state.specs.find("web").unwrap(), h.state.nodes.find("a").unwrap()).unwrap();
        (h, row)
    }

    /// `web` (health timeout 5 s) stops reporting health and is restarted.
    fn hung_web_restarted() -> Harness {
        let mut h = Harness::with_web_running(5_000);
        let (_, actions) = h.wait_for_actions(20_000);
        assert_eq!(actions, strings(&["a: restart_daemon web"]));
        h
    }

    /// Heartbeats every 100 ms until the pass emits something; returns the log time
    /// waited and the actions.
    fn wait_for_actions(&mut self, limit_ms: u64) -> (u64, Vec<String>) {
        let mut waited = 0;
        while waited < limit_ms {
            waited += 100;
            let actions = self.heartbeats(100, &["a"]);
            if !actions.is_empty() {
                return (waited, actions);
            }
        }
        (waited, Vec::new())
    }
}

#[test]
fn a_crashing_daemon_restarts_with_doubling_delays_that_reset_after_a_stable_run() {
    let mut h = Harness::with_web_running(0);
    let mut delays = Vec::new();
    for pid in 2..5 {
        assert!(h.web(100, DaemonSignal::Crashed { signal: 9 }).is_empty(), "not at once: backoff");
        let crashed_at = h.time_ms;
        let (_, actions) = h.wait_for_actions(10_000);
        assert_eq!(actions, strings(&["a: start_daemon web"]));
        delays.push(h.time_ms - crashed_at);
        let position = h.state.position;
        h = h.run_started(position, 0, pid);
    }
    // Log time from the crash to the start: the 1 s base, then 2 s, then 4 s (the
    // pass runs on the first heartbeat at or after the end of the backoff).
    assert_eq!(delays, vec![1_000, 2_000, 4_000]);
    // Ten minutes of healthy running: the next crash waits the base again.
    for _ in 0..601 {
        h.heartbeats(1_000, &["a"]);
    }
    assert!(h.web(0, DaemonSignal::Crashed { signal: 9 }).is_empty());
    let crashed_at = h.time_ms;
    h.wait_for_actions(10_000);
    assert_eq!(h.time_ms - crashed_at, 1_000, "backoff back to the base after a stable run");
}

#[test]
fn a_crash_looping_daemon_is_gated_until_an_operator_restarts_it() {
    let (mut h, row) = Harness::crash_looped();
    assert!(h.state.daemons.gated[row.index()], "five unplanned ends within the window gate it");
    let (waited, actions) = h.wait_for_actions(120_000);
    assert!(actions.is_empty(), "gated: no restart after {waited} ms");
    let restart = h.ev("ops", EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }));
    h.step(10, vec![restart]);
    let command = AdminCommand::RestartAllDaemons { node: Some("a".into()) };
    let admin = h.signed("ops", command);
    assert_eq!(h.step(10, vec![admin]), strings(&["a: start_daemon web"]), "the operator's restart opens the gate");
    assert!(!h.state.daemons.gated[row.index()]);
}

#[test]
fn a_daemon_whose_health_reports_stop_is_restarted_after_its_timeout() {
    let mut h = Harness::with_web_running(5_000);
    // Reports every 2 s keep it running.
    for _ in 0..5 {
        assert!(h.web(2_000, DaemonSignal::Health { healthy: true }).is_empty());
    }
    let last_report_at = h.time_ms;
    let (_, actions) = h.wait_for_actions(20_000);
    assert_eq!(actions, strings(&["a: restart_daemon web"]));
    assert_eq!(h.time_ms - last_report_at, 5_100, "restarted on the first pass past the 5 s timeout");
    // While the restart is in flight nothing more is asked.
    let (_, again) = h.wait_for_actions(2_000);
    assert!(again.is_empty());
}

#[test]
fn new_plans_steer_away_from_a_node_told_to_reduce_heat() {
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut planned_on_b = Vec::new();
    for hot in [false, true] {
        let mut h = Harness::new(ReconcileConfig::default());
        h.join(&names);
        if hot {
            let intent = h.ev(
                "a",
                EventKind::DaemonIntent {
                    spec: Box::new(web_spec(0)),
                    runs_on: DaemonPlacement::Nodes(vec!["b".into()]),
                },
            );
            assert_eq!(h.step(10, vec![intent]), strings(&["b: start_daemon web"]));
            let position = h.state.position;
            let events = vec![
                h.outcome("b", position, 0, Outcome::Success),
                h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 7 } }),
                h.ev(
                    "b",
                    EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Saturation { permille: 950 } },
                ),
            ];
            assert_eq!(h.step(10, events), strings(&["b: reduce_heat to 700"]));
        }
        let mut events = Vec::new();
        for index in 0..300u32 {
            let mut blob = [0u8; 32];
            blob[..4].copy_from_slice(&index.to_le_bytes());
            blob[31] = 0x5a;
            events.extend(h.blob_with_intent("a", blob, 1, &[]));
        }
        h.step(10, events);
        let b = h.state.nodes.find("b").unwrap();
        let on_b = (0..h.state.blobs.len()).filter(|&blob| h.state.blobs.plan[blob].contains(&b)).count();
        planned_on_b.push(on_b);
    }
    let (cool, hot) = (planned_on_b[0], planned_on_b[1]);
    eprintln!("plans holding b: {cool} of 300 cool, {hot} of 300 hot");
    assert!(cool >= 30, "about a sixth of 300 plans hold b when it is cool: {cool}");
    assert!(hot * 2 < cool, "new plans steer away from hot b: {hot} vs {cool}");
}

/// On a generated cluster life (no executor: actions time out and back off), the
/// incremental pass after every record equals a full pass on the same state, and the
/// states stay identical.
#[test]
fn incremental_equals_full_on_generated_logs() {
    for seed in [1u64, 2, 3] {
        let options = meshos::sim::gen::GenOptions {
            seed,
            nodes: 12,
            blobs: 120,
            replicas: 3,
            events: 12_000,
            record_events: 64,
        };
        let records = common::generate(options);
        let mut state = State::new(&Config::for_tests());
        let mut incremental = Reconciler::new();
        let mut full = Reconciler::new();
        let mut emitted = 0usize;
        for (index, (time_ms, payload)) in records.iter().enumerate() {
            fold_payload(&mut state, index as u64 + 1, *time_ms, payload);
            let mut other = state.clone();
            let expected: Vec<_> = full.pass(&mut other, Scope::Full).to_vec();
            let actions: Vec<_> = incremental.pass(&mut state, Scope::Incremental).to_vec();
            assert_eq!(actions, expected, "seed {seed}: passes differ after record {}", index + 1);
            assert_eq!(state.state_hash(), other.state_hash(), "seed {seed}: states differ after record {}", index + 1);
            emitted += actions.len();
        }
        state.check_invariants();
        assert!(emitted > 0, "seed {seed}: the generated churn should need actions");
        println!("seed {seed}: {emitted} actions over {} records", records.len());
    }
}

fn held(h: &Harness, blob: BlobHash) -> &'static str {
    let row = h.state.blobs.find(&blob).unwrap().index();
    meshos::reconcile::gates::Gate::from_code(h.state.blobs.held_by[row]).name()
}

/// Two blobs, each with one healthy copy on `a`, pinned to a and b (2 replicas).
fn two_degraded_blobs(h: &mut Harness) -> Vec<String> {
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.extend(h.blob_with_intent("a", B2, 2, &["a", "b"]));
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("a", B2, ReplicaState::Healthy));
    h.step(100, events)
}

#[test]
fn move_budget_holds_the_second_pull_until_the_first_settles() {
    let mut h = Harness::new(ReconcileConfig { pull_inflight_max: 1, ..ReconcileConfig::default() });
    assert_eq!(two_degraded_blobs(&mut h), strings(&["b: pull_replica 11111111 from a"]));
    assert_eq!(held(&h, B2), "move_budget");
    let position = h.state.position;
    let done = vec![h.outcome("b", position, 0, Outcome::Success), h.replica("b", B1, ReplicaState::Healthy)];
    assert_eq!(h.step(100, done), strings(&["b: pull_replica 22222222 from a"]));
    assert_eq!(held(&h, B2), "none");
}

#[test]
fn node_budget_limits_pulls_into_one_node() {
    let mut h = Harness::new(ReconcileConfig { pull_inflight_per_node_max: 1, ..ReconcileConfig::default() });
    assert_eq!(two_degraded_blobs(&mut h), strings(&["b: pull_replica 11111111 from a"]));
    assert_eq!(held(&h, B2), "node_budget");
}

#[test]
fn throttle_window_caps_moves_and_reopens() {
    let mut h = Harness::new(ReconcileConfig {
        throttle_moves_max: 1,
        throttle_window_ms: 10_000,
        ..ReconcileConfig::default()
    });
    assert_eq!(two_degraded_blobs(&mut h), strings(&["b: pull_replica 11111111 from a"]));
    assert_eq!(held(&h, B2), "throttle");
    assert!(h.heartbeats(5_000, &["a", "b", "c"]).is_empty());
    assert_eq!(h.heartbeats(5_000, &["a", "b", "c"]), strings(&["b: pull_replica 22222222 from a"]));
}

#[test]
fn a_failed_pull_backs_off_and_says_so() {
    let mut h = Harness::new(ReconcileConfig { pull_backoff_base_ms: 4_000, ..ReconcileConfig::default() });
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    assert_eq!(h.step(100, events), strings(&["b: pull_replica 11111111 from a"]));
    let position = h.state.position;
    let failed = h.outcome("b", position, 0, Outcome::Failure { reason: "connection reset".into() });
    let until = h.time_ms + 100 + 4_000;
    assert_eq!(h.step(100, vec![failed]), vec![format!("b: apply_backoff 11111111 until {until}")]);
    assert_eq!(held(&h, B1), "backoff");
    assert!(h.heartbeats(2_000, &["a", "b"]).is_empty());
    assert_eq!(h.heartbeats(2_000, &["a", "b"]), strings(&["b: pull_replica 11111111 from a"]));
}

#[test]
fn a_timed_out_pull_is_retried_after_backoff() {
    let config =
        ReconcileConfig { action_timeout_ms: 5_000, pull_backoff_base_ms: 1_000, ..ReconcileConfig::default() };
    let mut h = Harness::new(config);
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    h.step(100, events);
    let timed_out = h.heartbeats(5_000, &["a", "b"]);
    assert!(timed_out[0].starts_with("b: apply_backoff 11111111"), "{timed_out:?}");
    assert_eq!(h.state.inflight.timed_out, 1);
    assert_eq!(h.heartbeats(1_000, &["a", "b"]), strings(&["b: pull_replica 11111111 from a"]));
}

#[test]
fn backpressure_from_the_log_lets_only_repairs_out_until_lowered() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let raise = h.ev("c", EventKind::Backpressure { raised: true });
    assert!(h.step(10, vec![raise]).is_empty());
    assert!(h.state.gates.backpressure, "a live node's raised backpressure holds the cluster");
    let mut events = h.blob_with_intent("a", B1, 1, &["b"]);
    events.extend(h.blob_with_intent("a", B2, 2, &["a", "b"]));
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("a", B2, ReplicaState::Healthy));
    assert_eq!(
        h.step(100, events),
        strings(&["b: pull_replica 22222222 from a"]),
        "the repair goes, the migration waits"
    );
    assert_eq!(held(&h, B1), "backpressure");
    let lower = h.ev("c", EventKind::Backpressure { raised: false });
    assert_eq!(h.step(10, vec![lower]), strings(&["b: migrate_blob 11111111 from a"]), "lowered: the migration goes");
    assert!(!h.state.gates.backpressure);
}

#[test]
fn backpressure_of_a_node_that_went_down_does_not_hold_the_cluster() {
    let mut h = Harness::new(ReconcileConfig { node_down_ms: 1_000, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c"]);
    let raise = h.ev("c", EventKind::Backpressure { raised: true });
    h.step(10, vec![raise]);
    assert!(h.state.gates.backpressure);
    h.heartbeats(2_000, &["a", "b"]);
    assert!(!h.state.gates.backpressure, "c stopped heartbeating: its mark no longer counts");
}

#[test]
fn no_source_is_recorded_when_every_copy_is_gone() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Corrupt));
    assert_eq!(h.step(100, events), strings(&["a: drop_replica 11111111"]));
    assert_eq!(held(&h, B1), "no_source");
}

#[test]
fn the_brake_holds_repairs_when_many_nodes_vanish_at_once() {
    let mut h = Harness::new(ReconcileConfig { node_down_ms: 3_000, ..ReconcileConfig::default() });
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    h.join(&names);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    h.step(100, events);
    // b, c and d fall silent together: 3 of 8 is over the 25 % share.
    h.heartbeats(2_000, &["a", "e", "f", "g", "h"]);
    let actions = h.heartbeats(2_000, &["a", "e", "f", "g", "h"]);
    assert!(h.state.gates.brake, "brake should be on");
    assert!(actions.iter().all(|action| !action.contains("pull_replica")), "{actions:?}");
    assert_eq!(held(&h, B1), "brake");
}

#[test]
fn a_slow_node_is_marked_avoid_with_hysteresis() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c", "d"]);
    let mut samples = Vec::new();
    for (from, to, rtt_us) in
        [("a", "b", 1_000), ("b", "c", 1_000), ("c", "a", 1_000), ("a", "d", 9_000), ("b", "d", 9_000)]
    {
        samples.push(h.ev(from, EventKind::Rtt { peer: to.into(), rtt_us }));
    }
    let actions = h.step(100, samples);
    assert_eq!(actions, strings(&["d: mark_avoid true"]));
    assert!(h.state.nodes.avoid[h.state.nodes.find("d").unwrap().index()]);
}

#[test]
fn budgets_hold_verifications_drops_and_full_passes() {
    let config = ReconcileConfig { verify_inflight_max: 1, drop_inflight_max: 1, ..ReconcileConfig::default() };
    let mut h = Harness::new(config);
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 1, &["a"]);
    events.extend(h.blob_with_intent("a", B2, 1, &["a"]));
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("a", B2, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Corrupt));
    events.push(h.replica("b", B2, ReplicaState::Corrupt));
    assert_eq!(h.step(100, events), strings(&["b: drop_replica 11111111"]));
    assert_eq!(held(&h, B2), "drop_budget");
    let position = h.state.position;
    let dropped = vec![h.outcome("b", position, 0, Outcome::Success), h.replica("b", B1, ReplicaState::Deleted)];
    assert_eq!(h.step(100, dropped), strings(&["b: drop_replica 22222222"]));
    let position = h.state.position;
    let dropped = vec![h.outcome("b", position, 0, Outcome::Success), h.replica("b", B2, ReplicaState::Deleted)];
    assert!(h.step(100, dropped).is_empty());
    let down = h.ev("a", EventKind::NodeHealth(NodeHealth::Status { node: "a".into(), status: NodeStatus::Down }));
    h.step(100, vec![down]);
    let back = h.heartbeats(100, &["a"]);
    assert_eq!(back, strings(&["a: verify_replica 11111111"]));
    assert_eq!(held(&h, B2), "verify_budget");

    let mut tight = Harness::new(ReconcileConfig { actions_per_pass_max: 1, ..ReconcileConfig::default() });
    assert_eq!(two_degraded_blobs(&mut tight), strings(&["b: pull_replica 11111111 from a"]));
    assert_eq!(held(&tight, B2), "pass_full");
}

#[test]
fn a_cordoned_node_drains_by_migration_then_drop() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 1_000, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    assert!(h.step(100, events).is_empty());
    let cordon = h.signed("a", AdminCommand::Cordon { node: "b".into() });
    assert_eq!(h.step(100, vec![cordon]), strings(&["c: migrate_blob 11111111 from b"]));
    let position = h.state.position;
    let done = vec![h.outcome("c", position, 0, Outcome::Success), h.replica("c", B1, ReplicaState::Healthy)];
    assert!(h.step(100, done).is_empty(), "b's copy stays until c's is stable");
    assert_eq!(h.heartbeats(1_000, &["a", "b", "c"]), strings(&["b: drop_replica 11111111"]));
}

#[test]
fn an_inventory_digest_that_disagrees_triggers_verification() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    h.step(100, events);
    let agrees = u128::from_le_bytes(B1[..16].try_into().unwrap()).to_le_bytes();
    let good = h.ev("a", EventKind::InventoryDigest { blob_count: 1, digest: agrees });
    assert!(h.step(100, vec![good]).is_empty());
    let bad = h.ev("b", EventKind::InventoryDigest { blob_count: 0, digest: [0; 16] });
    assert_eq!(h.step(100, vec![bad]), strings(&["b: verify_replica 11111111"]));
}

#[test]
fn anti_entropy_reverifies_old_copies_a_slice_at_a_time() {
    let config = ReconcileConfig { verify_interval_ms: 60_000, verify_slice_replicas: 1, ..ReconcileConfig::default() };
    let mut h = Harness::new(config);
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    h.step(100, events);
    assert!(h.heartbeats(30_000, &["a", "b"]).is_empty(), "not due yet");
    assert_eq!(h.heartbeats(30_000, &["a", "b"]), strings(&["a: verify_replica 11111111"]));
    assert_eq!(h.heartbeats(100, &["a", "b"]), strings(&["b: verify_replica 11111111"]), "the slice rotates");
}

#[test]
fn invalidate_placement_recomputes_without_moving_a_satisfied_blob() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    h.step(100, events);
    let invalidate = h.signed("a", AdminCommand::InvalidatePlacement { blob: None });
    assert!(h.step(100, vec![invalidate]).is_empty(), "same inputs, same plan: nothing moves");
    let blob = h.state.blobs.find(&B1).unwrap().index();
    assert!(h.state.blobs.plan_valid[blob], "the plan was recomputed");
}

#[test]
fn work_on_a_node_that_goes_away_is_cancelled_not_left_to_time_out() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    assert_eq!(h.step(100, events), strings(&["b: pull_replica 11111111 from a"]));
    let down = h.ev("b", EventKind::NodeHealth(NodeHealth::Status { node: "b".into(), status: NodeStatus::Down }));
    assert_eq!(h.step(100, vec![down]), strings(&["c: pull_replica 11111111 from a"]), "repair goes elsewhere at once");
    assert_eq!((h.state.inflight.cancelled, h.state.inflight.moves), (1, 1));
}

const B3: BlobHash = [0x33; 32];

/// A blob held by a node budget is not re-evaluated by either scope until capacity
/// frees, even when another blob takes the last global move slot meanwhile (found by
/// review: the full pass used to re-hold it by `move_budget`, diverging).
#[test]
fn a_node_budget_hold_is_the_same_in_full_and_incremental_passes() {
    let mut h = Harness::new(ReconcileConfig {
        pull_inflight_max: 2,
        pull_inflight_per_node_max: 1,
        ..ReconcileConfig::default()
    });
    h.join(&["a", "b", "c", "d"]);
    // Y (row 0): repair into b from a. X (row 1): drift, migrate c -> b, held by b's node budget.
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.extend(h.blob_with_intent("a", B2, 1, &["b"]));
    events.push(h.replica("c", B2, ReplicaState::Healthy));
    let first = h.step(100, events);
    assert_eq!(first, strings(&["b: pull_replica 11111111 from a"]));
    assert_eq!(held(&h, B2), "node_budget");
    // Z (row 2, a repair, so evaluated first): takes the last global move slot. The
    // harness asserts that the full pass reaches the same state hash: it does not.
    let mut events = h.blob_with_intent("c", B3, 2, &["c", "d"]);
    events.push(h.replica("c", B3, ReplicaState::Healthy));
    h.step(100, events);
}

/// A surplus copy's drop is in flight when the plan moves onto that copy's node (the
/// planned node is cordoned): the copy being dropped does not count, so the other copy
/// is not dropped too (found by review: both copies were being deleted at once).
#[test]
fn a_copy_being_dropped_never_counts_so_two_drops_cannot_take_every_copy() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 0, ..ReconcileConfig::default() });
    h.join(&["a", "b"]);
    let mut events = h.blob_with_intent("a", B1, 1, &["b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    assert_eq!(h.step(100, events), strings(&["a: drop_replica 11111111"]));
    let cordon = h.signed("a", AdminCommand::Cordon { node: "b".into() });
    let actions = h.step(100, vec![cordon]);
    let drops = h.state.inflight.drops;
    assert!(drops < 2, "both copies have a drop in flight: {actions:?}");
}

/// An operator's "drop replicas" on a planned copy invalidates the plan, so the copy
/// is replaced elsewhere first and then dropped (found by review: it was ignored).
#[test]
fn an_operator_drop_of_a_planned_copy_replans_the_blob() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 0, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c", "d"]);
    let mut events = h.blob_with_intent("a", B1, 2, &[]);
    h.step(100, events.split_off(0));
    let blob = h.state.blobs.find(&B1).unwrap().index();
    let holders: Vec<String> =
        h.state.blobs.plan[blob].iter().map(|node| h.state.nodes.name[node.index()].to_string()).collect();
    let copies: Vec<Event> = holders.iter().map(|holder| h.replica(holder, B1, ReplicaState::Healthy)).collect();
    assert!(h.step(100, copies).is_empty());
    // Fold refuses to drop a blob's only healthy copy (tests/admin.rs); here another stays.
    let holder = holders[0].clone();
    let drop = h.signed("a", AdminCommand::DropReplicas { node: holder.clone(), blob: Some(B1) });
    let actions = h.step(100, vec![drop]);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(actions[0].ends_with(&format!("from {holder}")), "the copy on {holder} moves away: {actions:?}");
}

/// A pinned node that comes back (uncordoned) is planned again for every blob pinned
/// to it (found by review: only those it happened to outscore were replanned).
#[test]
fn a_returning_pinned_node_is_planned_again() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 0, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c", "d", "e"]);
    let hashes: Vec<BlobHash> = (0u8..32).map(|i| [i.wrapping_mul(7).wrapping_add(1); 32]).collect();
    let mut events = Vec::new();
    for hash in &hashes {
        events.extend(h.blob_with_intent("a", *hash, 1, &["b"]));
    }
    h.step(100, events);
    let cordon = h.signed("a", AdminCommand::Cordon { node: "b".into() });
    h.step(100, vec![cordon]);
    let uncordon = h.signed("a", AdminCommand::Uncordon { node: "b".into() });
    h.step(100, vec![uncordon]);
    let b = h.state.nodes.find("b").unwrap();
    let off_pin = hashes
        .iter()
        .filter(|hash| !h.state.blobs.plan[h.state.blobs.find(hash).unwrap().index()].contains(&b))
        .count();
    assert_eq!(off_pin, 0, "{off_pin} of 32 blobs pinned to b no longer plan b after b is uncordoned");
}

/// After a node flaps (with or without a global "invalidate placement" first), every
/// plan equals a fresh recompute (found by review: the gain check scored with another
/// epoch than the plans).
fn stale_plans_after_flap(invalidate_first: bool) -> usize {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 0, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c", "d", "e", "f"]);
    let hashes: Vec<BlobHash> = (0u8..64).map(|i| [i.wrapping_mul(5).wrapping_add(3); 32]).collect();
    let mut events = Vec::new();
    for hash in &hashes {
        events.extend(h.blob_with_intent("a", *hash, 2, &[]));
    }
    h.step(100, events);
    if invalidate_first {
        let all = h.signed("a", AdminCommand::InvalidatePlacement { blob: None });
        h.step(100, vec![all]);
    }
    let cordon = h.signed("a", AdminCommand::Cordon { node: "c".into() });
    h.step(100, vec![cordon]);
    let uncordon = h.signed("a", AdminCommand::Uncordon { node: "c".into() });
    h.step(100, vec![uncordon]);
    let mut fresh = h.state.clone();
    for blob in 0..fresh.blobs.len() {
        fresh.blobs.plan_valid[blob] = false;
    }
    Reconciler::new().pass(&mut fresh, Scope::Full);
    (0..h.state.blobs.len()).filter(|&blob| h.state.blobs.plan[blob] != fresh.blobs.plan[blob]).count()
}

#[test]
fn plans_after_invalidate_and_a_node_flap_match_a_fresh_recompute() {
    assert_eq!(stale_plans_after_flap(false), 0, "control");
    assert_eq!(stale_plans_after_flap(true), 0, "plans differ from a fresh recompute");
}

/// The brake holds a blob's repair only while the blob's own lost copy is within the
/// window, even if rolling failures keep the brake on for other nodes (found by review).
#[test]
fn the_brake_releases_a_blob_once_its_own_loss_leaves_the_window() {
    let mut h = Harness::new(ReconcileConfig::default());
    let names = ["a", "b", "c", "d", "e"];
    h.join(&names);
    let events = h.blob_with_intent("a", B1, 2, &[]);
    h.step(100, events);
    let row = h.state.blobs.find(&B1).unwrap();
    let plan: Vec<String> =
        h.state.blobs.plan[row.index()].iter().map(|n| h.state.nodes.name[n.index()].to_string()).collect();
    let (p1, p2) = (plan[0].clone(), plan[1].clone());
    let others: Vec<&str> = names.iter().copied().filter(|n| *n != p1 && *n != p2).collect();
    let copies = vec![h.replica(&p1, B1, ReplicaState::Healthy), h.replica(&p2, B1, ReplicaState::Healthy)];
    h.step(100, copies);
    let down = |h: &mut Harness, node: &str| {
        h.ev(node, EventKind::NodeHealth(NodeHealth::Status { node: node.into(), status: NodeStatus::Down }))
    };
    // t0: p1 and o1 down -> brake; the repair of p1's copy waits on it.
    let events = vec![down(&mut h, &p1), down(&mut h, others[0])];
    h.step(1_000, events);
    assert!(h.state.gates.brake);
    assert_eq!(held(&h, B1), "brake");
    // Rolling failures keep the brake on: o1 back and o2 down at +40 s, o1 down at +55 s.
    h.heartbeats(20_000, &[p2.as_str(), others[1], others[2]]);
    let mut events = vec![down(&mut h, others[1])];
    events.push(h.ev(others[0], EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })));
    events.push(h.ev(others[2], EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })));
    events.push(h.ev(&p2, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })));
    h.step(20_000, events);
    let mut events = vec![down(&mut h, others[0])];
    events.push(h.ev(others[2], EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })));
    h.step(15_000, events);
    // +75 s: p1 went down 75 s ago (window 60 s); the brake is on for o1 and o2 only.
    let actions = h.heartbeats(20_000, &[p2.as_str(), others[2]]);
    assert!(h.state.gates.brake);
    let p1_row = h.state.nodes.find(&p1).unwrap().index();
    assert!(!meshos::reconcile::nodes::recently_down(&h.state, p1_row));
    // The blob's own loss left the window: the brake (still on for others) lets its
    // repair go, and a fresh look at the blob finds nothing more to do.
    assert!(actions.iter().any(|action| action.contains("pull_replica 11111111")), "{actions:?}");
    let mut fresh = h.state.clone();
    fresh.mark_blob_dirty(row);
    assert!(Reconciler::new().pass(&mut fresh, Scope::Full).is_empty());
}

/// With a short plan (fewer eligible nodes than wanted), a counted copy on a live but
/// ineligible (cordoned) node is kept: dropping it would leave fewer copies than wanted.
#[test]
fn a_short_plan_keeps_copies_up_to_the_intent() {
    let mut h = Harness::new(ReconcileConfig { stabilisation_ms: 0, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 3, &[]);
    for node in ["a", "b", "c"] {
        events.push(h.replica(node, B1, ReplicaState::Healthy));
    }
    assert!(h.step(100, events).is_empty());
    let cordon = h.signed("a", AdminCommand::Cordon { node: "c".into() });
    let actions = h.step(100, vec![cordon]);
    assert!(actions.is_empty(), "3 wanted, 3 held, and reconcile drops one: {actions:?}");
}

#[test]
fn the_stop_half_of_a_restart_does_not_start_a_second_copy() {
    let mut h = Harness::hung_web_restarted();
    // The executor reports the stop half of the restart in its own record.
    let after_stop = h.web(100, DaemonSignal::Stopped);
    assert!(after_stop.is_empty(), "a restart is in flight, yet: {after_stop:?}");
}

#[test]
fn a_successful_restart_is_not_repeated_before_its_start_is_reported() {
    let mut h = Harness::hung_web_restarted();
    let position = h.state.position;
    let done = vec![h.outcome("a", position, 0, Outcome::Success)];
    let after = h.step(10, done);
    assert!(after.is_empty(), "restarted again at once: {after:?}");
}

#[test]
fn health_restarts_back_off_and_are_gated_like_crashes() {
    let mut h = Harness::with_web_running(5_000);
    let mut restarts = 0;
    for _ in 0..20 {
        let (_, actions) = h.wait_for_actions(20_000);
        if actions != strings(&["a: restart_daemon web"]) {
            break;
        }
        restarts += 1;
        let position = h.state.position;
        let pid = 100 + restarts;
        let events = vec![
            h.ev("a", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Stopped }),
            h.ev("a", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid } }),
            h.outcome("a", position, 0, Outcome::Success),
        ];
        h.step(10, events);
    }
    assert!(restarts < 20, "a hung daemon was restarted {restarts} times, every ~5 s, never gated");
    let row = h.state.daemons.find(h.state.specs.find("web").unwrap(), h.state.nodes.find("a").unwrap()).unwrap();
    assert!(h.state.daemons.gated[row.index()], "gated after {restarts} health restarts");
}

#[test]
fn the_gate_is_judged_on_the_recent_ends_only() {
    let (mut h, row) = Harness::crash_looped();
    assert!(h.state.daemons.gated[row.index()]);
    // Someone starts it by hand; it runs for an hour.
    h.web(100, DaemonSignal::Started { pid: 50 });
    for _ in 0..3_600 {
        h.heartbeats(1_000, &["a"]);
    }
    h.web(100, DaemonSignal::Crashed { signal: 11 });
    let (_, actions) = h.wait_for_actions(20_000);
    assert_eq!(actions, strings(&["a: start_daemon web"]), "one crash after an hour of running leaves it gated");
}

#[test]
fn a_planned_stop_that_ends_by_exit_is_not_a_crash() {
    let mut h = Harness::with_web_running(0);
    let a = h.state.nodes.find("a").unwrap();
    let web = h.state.specs.find("web").unwrap();
    let row = h.state.daemons.find(web, a).unwrap().index();
    for round in 0..5u32 {
        let removed =
            h.ev("a", EventKind::DaemonIntent { spec: Box::new(web_spec(0)), runs_on: DaemonPlacement::Nowhere });
        assert_eq!(h.step(100, vec![removed]), strings(&["a: stop_daemon web"]));
        let position = h.state.position;
        // SIGTERM: the daemon exits 0; the executor reports the exit, then the outcome.
        let events = vec![
            h.ev("a", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Exited { code: 0 } }),
            h.outcome("a", position, 0, Outcome::Success),
        ];
        h.step(10, events);
        let back =
            h.ev("a", EventKind::DaemonIntent { spec: Box::new(web_spec(0)), runs_on: DaemonPlacement::AllNodes });
        let actions = h.step(100, vec![back]);
        assert!(!h.state.daemons.gated[row], "gated by {} planned stops", round + 1);
        assert_eq!(actions, strings(&["a: start_daemon web"]), "round {round}: a planned stop delays the start");
        let position = h.state.position;
        h = h.run_started(position, 0, 10 + round);
    }
}

fn maintenance_of(h: &Harness, node: &str) -> &'static str {
    h.state.nodes.maintenance[h.state.nodes.find(node).unwrap().index()].name()
}

impl Harness {
    fn admin(&mut self, after_ms: u64, command: AdminCommand) -> Vec<String> {
        let event = self.signed("a", command);
        self.step(after_ms, vec![event])
    }
}

#[test]
fn a_node_entering_maintenance_drains_its_copies_and_non_essential_daemons_then_is_in_maintenance() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let spec = web_spec(0);
    let essential = DaemonSpec { name: "agent".into(), essential: true, ..web_spec(0) };
    let intents = vec![
        h.ev("a", EventKind::DaemonIntent { spec: Box::new(spec), runs_on: DaemonPlacement::Nodes(vec!["b".into()]) }),
        h.ev(
            "a",
            EventKind::DaemonIntent { spec: Box::new(essential), runs_on: DaemonPlacement::Nodes(vec!["b".into()]) },
        ),
    ];
    assert_eq!(h.step(10, intents), strings(&["b: start_daemon web", "b: start_daemon agent"]));
    let position = h.state.position;
    let mut events = vec![
        h.outcome("b", position, 0, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 1 } }),
        h.outcome("b", position, 1, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "agent".into(), signal: DaemonSignal::Started { pid: 2 } }),
    ];
    events.extend(h.blob_with_intent("a", B1, 2, &["a", "b"]));
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    assert!(h.step(10, events).is_empty());

    let actions = h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() });
    assert_eq!(maintenance_of(&h, "b"), "entering_maintenance");
    assert!(actions.contains(&"b: stop_daemon web".to_string()), "{actions:?}");
    assert!(!actions.iter().any(|action| action.contains("agent")), "essential daemons keep running: {actions:?}");
    assert!(actions.contains(&"c: migrate_blob 11111111 from b".to_string()), "{actions:?}");
    let b = h.state.nodes.find("b").unwrap().index();
    assert_eq!((h.state.nodes.drain_unsafe_copies[b], h.state.nodes.drain_moving_copies[b]), (1, 1));
    assert_eq!(h.state.nodes.drain_daemons_left[b], 1);
    // Entering again changes nothing.
    assert!(h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() }).is_empty());

    let (stop, pull) = (
        actions.iter().position(|a| a == "b: stop_daemon web").unwrap() as u32,
        actions.iter().position(|a| a.starts_with("c: migrate")).unwrap() as u32,
    );
    let position = h.state.position - 1;
    let events = vec![
        h.outcome("b", position, stop, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Stopped }),
    ];
    h.step(10, events);
    assert_eq!(maintenance_of(&h, "b"), "entering_maintenance", "b's copy is not yet safe elsewhere");
    let events = vec![h.outcome("c", position, pull, Outcome::Success), h.replica("c", B1, ReplicaState::Healthy)];
    h.step(10, events);
    assert_eq!(maintenance_of(&h, "b"), "maintenance", "the replacement counts and the daemon stopped");
    assert_eq!(h.state.nodes.drain_unsafe_copies[b], 0);
}

#[test]
fn a_drain_that_cannot_finish_fails_at_its_deadline_and_names_what_blocks_it() {
    let mut h = Harness::new(ReconcileConfig { drain_deadline_ms: 30_000, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c"]);
    // Three copies wanted on three nodes: nowhere to move b's copy.
    let mut events = h.blob_with_intent("a", B1, 3, &[]);
    for node in ["a", "b", "c"] {
        events.push(h.replica(node, B1, ReplicaState::Healthy));
    }
    h.step(10, events);
    let mut all = h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() });
    for _ in 0..29 {
        all.extend(h.heartbeats(1_000, &["a", "b", "c"]));
    }
    assert_eq!(maintenance_of(&h, "b"), "entering_maintenance");
    all.extend(h.heartbeats(1_000, &["a", "b", "c"]));
    assert_eq!(maintenance_of(&h, "b"), "drain_failed");
    let b = h.state.nodes.find("b").unwrap().index();
    assert_eq!(h.state.nodes.drain_unsafe_copies[b], 1, "the one copy with no room elsewhere blocks it");
    // The replica pass never drops the copy the drain names as blocking (the plan is
    // short: a and c; b's copy keeps the blob at its intent of 3).
    assert!(!all.iter().any(|action| action == "b: drop_replica 11111111"), "{all:?}");
}

#[test]
fn a_node_leaving_maintenance_recovers_after_a_fresh_capability_and_its_ramp_up_window() {
    let mut h = Harness::new(ReconcileConfig { recovery_ms: 5_000, ..ReconcileConfig::default() });
    h.join(&["a", "b"]);
    h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() });
    assert_eq!(maintenance_of(&h, "b"), "maintenance", "nothing to drain");
    h.admin(10, AdminCommand::ExitMaintenance { node: "b".into() });
    assert_eq!(maintenance_of(&h, "b"), "exiting_maintenance");
    h.heartbeats(1_000, &["a", "b"]);
    assert_eq!(maintenance_of(&h, "b"), "exiting_maintenance", "waits for a fresh capability");
    let event = h.ev("b", fresh_capability());
    h.step(10, vec![event]);
    assert_eq!(maintenance_of(&h, "b"), "exiting_maintenance", "waits for its round trips measured again");
    let sample = h.ev("a", EventKind::Rtt { peer: "b".into(), rtt_us: 500 });
    h.step(10, vec![sample]);
    assert_eq!(maintenance_of(&h, "b"), "recovery", "one live peer: one fresh pair is enough");
    let b = h.state.nodes.find("b").unwrap().index();
    assert!(!h.state.nodes.eligible[b], "no new copies during the ramp-up window");
    for _ in 0..4 {
        h.heartbeats(1_000, &["a", "b"]);
    }
    assert_eq!(maintenance_of(&h, "b"), "recovery");
    h.heartbeats(1_000, &["a", "b"]);
    assert_eq!(maintenance_of(&h, "b"), "active");
    h.heartbeats(10, &["a", "b"]);
    assert!(h.state.nodes.eligible[b]);
    // Exit of an active node is refused with its reason (the harness counts rejections).
    let event = h.signed("a", AdminCommand::ExitMaintenance { node: "b".into() });
    let payload = meshos::trust::testing::seal_for(&h.state, &[event], h.time_ms + 10);
    let position = h.state.position + 1;
    fold_payload(&mut h.state, position, h.time_ms + 10, &payload);
    assert_eq!(h.state.rejections.total, 1);
}

#[test]
fn a_drain_reports_its_expected_time_to_safe_from_the_measured_transfer_rate() {
    let mut h = Harness::new(ReconcileConfig { pull_inflight_per_node_max: 1, ..ReconcileConfig::default() });
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.extend(h.blob_with_intent("a", B2, 2, &["a", "b"]));
    for (node, blob) in [("a", B1), ("b", B1), ("a", B2), ("b", B2)] {
        events.push(h.replica(node, blob, ReplicaState::Healthy));
    }
    h.step(10, events);
    let actions = h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() });
    assert_eq!(actions.len(), 1, "one move at a time into c: {actions:?}");
    let b = h.state.nodes.find("b").unwrap().index();
    assert_eq!(h.state.nodes.drain_unsafe_bytes[b], 200, "two copies of 100 bytes are not yet safe");
    assert_eq!(h.state.nodes.drain_eta_ms[b], u64::MAX, "no transfer measured yet: unknown");
    // The first move takes 400 ms of log time: 100 bytes / 0.4 s = 250 bytes/s.
    let position = h.state.position;
    let moved = if actions[0].contains("11111111") { B1 } else { B2 };
    let events = vec![h.outcome("c", position, 0, Outcome::Success), h.replica("c", moved, ReplicaState::Healthy)];
    h.step(400, events);
    assert_eq!(h.state.gates.transfer_bytes_per_s, 250);
    assert_eq!(h.state.nodes.drain_unsafe_bytes[b], 100);
    assert_eq!(h.state.nodes.drain_eta_ms[b], 400, "100 bytes at 250 bytes/s through one move at a time");
}

#[test]
fn a_node_leaving_maintenance_waits_for_its_daemons_to_register() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b"]);
    let intent = h.ev(
        "a",
        EventKind::DaemonIntent { spec: Box::new(web_spec(0)), runs_on: DaemonPlacement::Nodes(vec!["b".into()]) },
    );
    assert_eq!(h.step(10, vec![intent]), strings(&["b: start_daemon web"]));
    let position = h.state.position;
    let events = vec![
        h.outcome("b", position, 0, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 1 } }),
    ];
    h.step(10, events);
    assert_eq!(h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() }), strings(&["b: stop_daemon web"]));
    let position = h.state.position;
    let events = vec![
        h.outcome("b", position, 0, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Stopped }),
    ];
    h.step(10, events);
    assert_eq!(maintenance_of(&h, "b"), "maintenance");
    let exit = h.signed("a", AdminCommand::ExitMaintenance { node: "b".into() });
    let fresh = h.ev("b", fresh_capability());
    assert_eq!(h.step(10, vec![exit, fresh]), strings(&["b: start_daemon web"]), "daemons restart on the way out");
    let position = h.state.position;
    let events = vec![
        h.outcome("b", position, 0, Outcome::Success),
        h.ev("b", EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid: 2 } }),
    ];
    h.step(10, events);
    assert_eq!(
        maintenance_of(&h, "b"),
        "exiting_maintenance",
        "started is not enough: it must register or report health"
    );
    h.web_on("b", 10, DaemonSignal::Registered { pid: 2 });
    assert_eq!(maintenance_of(&h, "b"), "exiting_maintenance", "and its round trips are not measured yet");
    let sample = h.ev("b", EventKind::Rtt { peer: "a".into(), rtt_us: 500 });
    h.step(10, vec![sample]);
    assert_eq!(maintenance_of(&h, "b"), "recovery");
}

impl Harness {
    fn web_on(&mut self, node: &str, after_ms: u64, signal: DaemonSignal) -> Vec<String> {
        let event = self.ev(node, EventKind::Daemon { daemon: "web".into(), signal });
        self.step(after_ms, vec![event])
    }
}

#[test]
fn two_nodes_draining_together_do_not_call_each_others_copy_safe() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    // One copy wanted; copies on b and c (one surplus); both enter maintenance.
    let mut events = h.blob_with_intent("a", B1, 1, &["b"]);
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    events.push(h.replica("c", B1, ReplicaState::Healthy));
    h.step(10, events);
    let enter = vec![
        h.signed("a", AdminCommand::EnterMaintenance { node: "b".into() }),
        h.signed("a", AdminCommand::EnterMaintenance { node: "c".into() }),
    ];
    h.step(10, enter);
    assert_eq!(maintenance_of(&h, "b"), "entering_maintenance", "c's copy is leaving too: not safe");
    assert_eq!(maintenance_of(&h, "c"), "entering_maintenance");
}

#[test]
fn a_node_that_goes_down_while_draining_is_not_declared_drained() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 1, &["b"]);
    events.push(h.replica("b", B1, ReplicaState::Healthy));
    h.step(10, events);
    let actions = h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() });
    assert!(actions.iter().any(|a| a.contains("from b")), "{actions:?}");
    assert_eq!(maintenance_of(&h, "b"), "entering_maintenance");
    // b's link flaps (or it reboots) before the move ends.
    let down = h.ev("b", EventKind::NodeHealth(NodeHealth::Status { node: "b".into(), status: NodeStatus::Down }));
    h.step(10, vec![down]);
    assert_ne!(
        maintenance_of(&h, "b"),
        "maintenance",
        "the only copy of the blob is still on b (unsafe bytes {})",
        h.state.nodes.drain_unsafe_bytes[node_index(&h, "b")]
    );
}

#[test]
fn a_move_into_a_node_in_flight_when_it_enters_maintenance_is_cancelled() {
    let mut h = Harness::new(ReconcileConfig::default());
    h.join(&["a", "b", "c"]);
    let mut events = h.blob_with_intent("a", B1, 2, &["a", "b"]);
    events.push(h.replica("a", B1, ReplicaState::Healthy));
    assert_eq!(h.step(10, events), strings(&["b: pull_replica 11111111 from a"]));
    h.admin(10, AdminCommand::EnterMaintenance { node: "b".into() });
    let b = node_index(&h, "b");
    let inbound = h.state.inflight.entries.iter().any(|e| e.action.kind.is_move() && e.action.node.index() == b);
    assert!(!inbound, "a pull into b is still in flight: it will land a new copy on a node entering maintenance");
}

fn node_index(h: &Harness, node: &str) -> usize {
    h.state.nodes.find(node).unwrap().index()
}
