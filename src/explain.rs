//! `meshos explain`: why a blob, a node or a daemon is in the state it is, the last
//! actions reconcile decided about it, and what holds the next one back.
//!
//! The log is replayed read-only (without the node's lock, through the same fold and
//! pass after every record as the node), keeping the last `history_max` actions that
//! concern the target, then the final state is read for the rest. Replaying is what
//! makes every decision explainable: the same log gives the same actions here as on
//! the node.
//!
//! Invariants: reads only (nothing is appended or written); every line names what it
//! is about; an unknown target is an error that says so.

use std::collections::VecDeque;
use std::path::Path;

use crate::action::describe;
use crate::admin::AdminError;
use crate::config::Config;
use crate::engine::Engine;
use crate::event::{blob_hex, BlobHash};
use crate::reconcile::gates::GATE_NAMES;
use crate::state::State;

/// What to explain.
#[derive(Debug, Clone)]
pub enum Target {
    Blob(BlobHash),
    Node(String),
    Daemon(String),
}

impl Target {
    /// A blob id (64 hex), else a node name if one exists, else a daemon name.
    pub fn parse(text: &str, state: &State) -> Target {
        if let Some(hash) = crate::exec::blobstore::parse_hex(text) {
            return Target::Blob(hash);
        }
        if state.nodes.find(text).is_some() {
            return Target::Node(text.to_string());
        }
        Target::Daemon(text.to_string())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Explanation {
    /// What it is and why, now.
    pub now: Vec<String>,
    /// The last actions about it, oldest first: "position @ log time: action".
    pub history: Vec<String>,
    /// What holds its next action back, if anything.
    pub waiting: Vec<String>,
    pub position: u64,
}

/// Replays the log in `dir` and explains `text` (a blob id, node or daemon name).
pub fn explain(dir: &Path, config: &Config, text: &str, history_max: usize) -> Result<Explanation, AdminError> {
    let mut engine = Engine::new(config);
    let mut history: VecDeque<String> = VecDeque::with_capacity(history_max + 1);
    let mut target: Option<Target> = None;
    crate::redex::embedded::read_unlocked(dir, config, &mut |record| {
        let (state, actions) = engine.apply(record.position, record.time_ms, record.payload);
        if target.is_none() || matches!(target, Some(Target::Daemon(_))) {
            target = Some(Target::parse(text, state));
        }
        for action in actions.iter().filter(|action| concerns(state, action, target.as_ref().expect("set"))) {
            if history.len() == history_max {
                history.pop_front();
            }
            history.push_back(format!("{} @ {} ms: {}", action.id.position, state.now_ms, describe(state, action)));
        }
        true
    })?;
    let state = &engine.state;
    let target = target.unwrap_or_else(|| Target::parse(text, state));
    let mut explanation = Explanation { history: history.into(), position: state.position, ..Default::default() };
    match &target {
        Target::Blob(hash) => explain_blob(state, hash, &mut explanation)?,
        Target::Node(name) => explain_node(state, name, &mut explanation)?,
        Target::Daemon(name) => explain_daemon(state, name, &mut explanation)?,
    }
    Ok(explanation)
}

fn concerns(state: &State, action: &crate::action::Action, target: &Target) -> bool {
    match target {
        Target::Blob(hash) => {
            state.blobs.find(hash).is_some_and(|row| action.kind.blob() == Some(row) && action.kind.is_tracked())
        }
        Target::Node(name) => {
            state.nodes.find(name).is_some_and(|row| action.node == row || action.kind.peer() == Some(row))
        }
        Target::Daemon(name) => state.specs.find(name).is_some_and(|spec| action.kind.daemon_spec() == Some(spec)),
    }
}

fn in_ms(state: &State, at_ms: u64) -> String {
    format!("{} ms from now (log time)", at_ms.saturating_sub(state.now_ms))
}

fn explain_blob(state: &State, hash: &BlobHash, out: &mut Explanation) -> Result<(), AdminError> {
    let row = state
        .blobs
        .find(hash)
        .ok_or_else(|| AdminError::Invalid(format!("blob {} is not in the log", blob_hex(hash))))?;
    let index = row.index();
    let blobs = &state.blobs;
    let name = |node: crate::state::ids::NodeRow| state.nodes.name[node.index()].to_string();
    out.now.push(format!(
        "blob {}: {} bytes, {} replicas wanted{}, {} healthy",
        blob_hex(hash),
        blobs.size_bytes[index],
        blobs.replicas_wanted[index],
        if blobs.zone_spread[index] { " over zones" } else { "" },
        blobs.healthy_count[index]
    ));
    for &replica in &blobs.replica_rows[index] {
        let replica = replica.index();
        let node = state.replicas.node[replica];
        let counted = crate::reconcile::replicas::counted(state, replica);
        out.now.push(format!(
            "  copy on {}: {:?} since {} ms{}{}{}",
            name(node),
            state.replicas.state[replica],
            state.replicas.since_ms[replica],
            match (counted, state.replicas.state[replica] == crate::event::ReplicaState::Healthy) {
                (true, _) => ", counts",
                (false, false) => ", does not count (not healthy)",
                (false, true) => ", does not count (its node is not live, or not verified since it returned)",
            },
            if state.replicas.planned[replica] { ", on the plan" } else { ", off the plan" },
            if state.replicas.drop_requested[replica] { ", drop requested by an operator" } else { "" }
        ));
    }
    if blobs.plan_valid[index] {
        let plan: Vec<String> = blobs.plan[index].iter().map(|&node| name(node)).collect();
        out.now.push(format!("  plan: {}", plan.join(", ")));
    } else {
        out.now.push("  plan: to be recomputed on the next pass".to_string());
    }
    for entry in state.inflight.entries.iter().filter(|entry| entry.action.kind.blob() == Some(row)) {
        out.now.push(format!(
            "  in flight: {} (deadline {})",
            describe(state, &entry.action),
            in_ms(state, entry.deadline_ms)
        ));
    }
    let gate = blobs.held_by[index] as usize;
    if gate != 0 {
        let gate_name = GATE_NAMES.get(gate).copied().unwrap_or("unknown");
        out.waiting.push(format!(
            "held by the {gate_name} gate, looked at again {}",
            in_ms(state, blobs.held_until_ms[index])
        ));
    }
    if blobs.backoff_until_ms[index] > state.now_ms {
        out.waiting.push(format!(
            "pulls back off after {} failures, until {}",
            blobs.pull_failures[index],
            in_ms(state, blobs.backoff_until_ms[index])
        ));
    }
    Ok(())
}

fn explain_node(state: &State, name: &str, out: &mut Explanation) -> Result<(), AdminError> {
    let row =
        state.nodes.find(name).ok_or_else(|| AdminError::Invalid(format!("no node named `{name}` in the log")))?;
    let index = row.index();
    let nodes = &state.nodes;
    out.now.push(format!(
        "node {name}: status {:?} since {} ms, {}, {}; zone `{}`, load {}‰, {} healthy copies, capability v{}, peer port `{}`",
        nodes.status[index],
        nodes.status_since_ms[index],
        if nodes.live[index] { "live" } else { "not live (no heartbeat within node_down_ms)" },
        if nodes.eligible[index] { "eligible for new copies" } else { "not eligible for new copies" },
        state.symbols.name(nodes.zone[index]),
        nodes.load_permille[index],
        nodes.healthy_copies[index],
        nodes.capability_version[index],
        nodes.endpoint[index]
    ));
    out.now.push(format!(
        "  maintenance: {} since {} ms{}{}{}",
        nodes.maintenance[index].name(),
        nodes.maintenance_since_ms[index],
        if nodes.cordoned[index] { ", cordoned" } else { "" },
        if nodes.avoid[index] { ", avoided (RTT far above its peers)" } else { "" },
        if nodes.backpressure[index] { ", raising backpressure" } else { "" }
    ));
    if nodes.maintenance[index].is_away() {
        out.now.push(format!(
            "  drain: {} copies not yet safe elsewhere ({} bytes, {} moving), {} non-essential daemons left; deadline {}",
            nodes.drain_unsafe_copies[index],
            nodes.drain_unsafe_bytes[index],
            nodes.drain_moving_copies[index],
            nodes.drain_daemons_left[index],
            in_ms(state, nodes.drain_deadline_ms[index])
        ));
        if nodes.drain_unsafe_copies[index] > 0 {
            let eta = nodes.drain_eta_ms[index];
            out.waiting.push(if eta == u64::MAX {
                "the drain waits for its copies to move; no transfer measured yet, so no time to safe".to_string()
            } else {
                format!("the drain waits for its copies to move: about {eta} ms at the measured rate")
            });
        }
    }
    let inflight = state.inflight.entries.iter().filter(|entry| entry.action.node == row).count();
    out.now.push(format!("  actions in flight on it: {inflight}"));
    Ok(())
}

fn explain_daemon(state: &State, name: &str, out: &mut Explanation) -> Result<(), AdminError> {
    let spec = state
        .specs
        .find(name)
        .ok_or_else(|| AdminError::Invalid(format!("`{name}` is no blob id, node or daemon in the log")))?;
    let declared = &state.specs.spec[spec.index()];
    out.now.push(format!(
        "daemon {name}: `{}`, {}, health timeout {} ms, restart backoff {}..{} ms, gate at {} ends in {} ms; runs on {:?}",
        declared.command,
        if declared.essential { "essential" } else { "not essential" },
        declared.health_timeout_ms,
        declared.restart.backoff_base_ms,
        declared.restart.backoff_max_ms,
        declared.restart.crash_loop_limit,
        declared.restart.crash_loop_window_ms,
        state.specs.runs_on[spec.index()]
    ));
    let daemons = &state.daemons;
    for row in (0..daemons.len()).filter(|&row| daemons.spec[row] == spec) {
        let node = &state.nodes.name[daemons.node[row].index()];
        out.now.push(format!(
            "  on {node}: {} (pid {}) since {} ms, {}, {} starts, {} crashes, last exit {}",
            daemons.state[row].name(),
            daemons.pid[row],
            daemons.state_since_ms[row],
            if daemons.healthy[row] { "healthy" } else { "not reported healthy" },
            daemons.starts[row],
            daemons.crashes[row],
            daemons.last_exit[row]
        ));
        if daemons.gated[row] {
            out.waiting.push(format!(
                "on {node}: crash-loop gated ({} unplanned ends within the window); `meshos admin restart-daemons {node}` opens it",
                daemons.recent_ends_ms[row].len()
            ));
        } else if !daemons.state[row].is_running() && daemons.start_after_ms[row] > state.now_ms {
            out.waiting.push(format!(
                "on {node}: restart backoff of {} ms, next start {}",
                daemons.backoff_ms[row],
                in_ms(state, daemons.start_after_ms[row])
            ));
        }
    }
    for entry in state.inflight.entries.iter().filter(|entry| entry.action.kind.daemon_spec() == Some(spec)) {
        out.now.push(format!("  in flight: {}", describe(state, &entry.action)));
    }
    Ok(())
}
