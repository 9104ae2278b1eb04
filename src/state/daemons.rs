//! Daemon specs (desired daemons, from daemon intent) and daemon instances (one spec
//! running, or not, on one node).
//!
//! Invariants: every column has its table's length; `specs.index` maps a daemon name
//! to its spec row and `daemons.index` maps `(spec, node)` to its instance row; rows
//! are never removed (a removed spec keeps its row with placement `Nowhere`).

use hashbrown::HashMap;
use smallvec::SmallVec;

use super::hash::StateHasher;
use super::ids::{check_columns, pair_key, DaemonRow, NodeRow, SpecRow, SymbolId};
use crate::event::DaemonSpec;

/// Where a spec runs, with node names resolved to rows.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum SpecPlacement {
    AllNodes,
    Label(SymbolId),
    Nodes(SmallVec<[NodeRow; 4]>),
    Nowhere,
}

#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SpecTable {
    /// The spec as last declared (cold data: read by reconcile and the executor).
    pub spec: Vec<DaemonSpec>,
    pub runs_on: Vec<SpecPlacement>,
    pub intent_ms: Vec<u64>,
    /// Bumped by every new intent for the same name.
    pub generation: Vec<u32>,
    /// Daemon name to row; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
    pub index: HashMap<Box<str>, SpecRow>,
}

impl SpecTable {
    pub fn len(&self) -> usize {
        self.spec.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spec.is_empty()
    }

    #[inline]
    pub fn find(&self, name: &str) -> Option<SpecRow> {
        self.index.get(name).copied()
    }

    /// Inserts a new spec, or replaces the spec of an existing name and bumps its generation.
    pub fn upsert(&mut self, spec: DaemonSpec, runs_on: SpecPlacement, now_ms: u64) -> SpecRow {
        if let Some(row) = self.find(&spec.name) {
            let index = row.index();
            self.spec[index] = spec;
            self.runs_on[index] = runs_on;
            self.intent_ms[index] = now_ms;
            self.generation[index] = self.generation[index].wrapping_add(1);
            return row;
        }
        let row = SpecRow::from_index(self.len());
        self.index.insert(spec.name.as_str().into(), row);
        self.spec.push(spec);
        self.runs_on.push(runs_on);
        self.intent_ms.push(now_ms);
        self.generation.push(1);
        debug_assert!(self.generation.len() == self.len() && self.index.len() == self.len());
        row
    }

    /// Every column has the table's length (the error names the first that has not).
    /// A new column must be listed here.
    pub fn check_columns(&self) -> Result<(), String> {
        check_columns!(self, "daemon_specs", runs_on, intent_ms, generation)
    }

    /// Rebuilds `index` from the specs' names (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.len());
        for (row, spec) in self.spec.iter().enumerate() {
            if self.index.insert(spec.name.as_str().into(), SpecRow::from_index(row)).is_some() {
                return Err(format!("daemon `{}` has two spec rows", spec.name));
            }
        }
        Ok(())
    }
    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("daemon_specs", self.len());
        for row in 0..self.len() {
            let spec = &self.spec[row];
            hasher.str(&spec.name);
            hasher.str(&spec.command);
            hasher.u64(spec.args.len() as u64);
            for arg in &spec.args {
                hasher.str(arg);
            }
            hasher.u64(spec.env.len() as u64);
            for var in &spec.env {
                hasher.str(&var.key);
                hasher.str(&var.value);
            }
            hasher.str(&spec.working_dir);
            hasher.bool(spec.essential);
            hasher.u32(spec.health_timeout_ms);
            let restart = &spec.restart;
            hasher.u32(restart.backoff_base_ms);
            hasher.u32(restart.backoff_max_ms);
            hasher.u32(restart.reset_after_ms);
            hasher.u16(restart.crash_loop_limit);
            hasher.u32(restart.crash_loop_window_ms);
            hasher.u32(spec.stop_grace_ms);
            match &self.runs_on[row] {
                SpecPlacement::AllNodes => hasher.u8(0),
                SpecPlacement::Label(label) => {
                    hasher.u8(1);
                    hasher.u32(label.0);
                }
                SpecPlacement::Nodes(nodes) => {
                    hasher.u8(2);
                    hasher.u64(nodes.len() as u64);
                    for node in nodes {
                        hasher.u32(node.0);
                    }
                }
                SpecPlacement::Nowhere => hasher.u8(3),
            }
            hasher.u64(self.intent_ms[row]);
            hasher.u32(self.generation[row]);
        }
    }
}

/// What the log says a daemon instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[repr(u8)]
pub enum DaemonState {
    /// Spawned, not yet registered through the SDK.
    Started = 1,
    /// Registered through the SDK.
    Registered = 2,
    Exited = 3,
    Crashed = 4,
    Stopped = 5,
}

impl DaemonState {
    pub fn is_running(self) -> bool {
        matches!(self, DaemonState::Started | DaemonState::Registered)
    }

    pub fn name(self) -> &'static str {
        match self {
            DaemonState::Started => "started",
            DaemonState::Registered => "registered",
            DaemonState::Exited => "exited",
            DaemonState::Crashed => "crashed",
            DaemonState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DaemonTable {
    pub spec: Vec<SpecRow>,
    pub node: Vec<NodeRow>,
    pub state: Vec<DaemonState>,
    pub pid: Vec<u32>,
    /// Exit code of the last exit, or the signal of the last crash.
    pub last_exit: Vec<i32>,
    pub starts: Vec<u32>,
    pub crashes: Vec<u32>,
    pub state_since_ms: Vec<u64>,
    pub healthy: Vec<bool>,
    pub last_health_ms: Vec<u64>,
    pub saturation_permille: Vec<u16>,
    /// When the current (or last) run started: the stable period counts from here.
    pub started_ms: Vec<u64>,
    /// The restart delay applied after the last unplanned end (0: none yet); doubles
    /// per end up to the policy's maximum, back to the base after a stable run.
    pub backoff_ms: Vec<u32>,
    /// No start before this log time (restart backoff).
    pub start_after_ms: Vec<u64>,
    /// Log times of the unplanned ends within the policy's crash-loop window, oldest
    /// first, at most `crash_loop_limit` of them.
    pub recent_ends_ms: Vec<SmallVec<[u64; 8]>>,
    /// Crash-looping: no restart until an operator restarts the node's daemons.
    pub gated: Vec<bool>,
    /// Instances in state `Started` or `Registered`.
    pub running: u32,
    /// `(spec, node)` to row; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
    pub index: HashMap<u64, DaemonRow>,
}

impl DaemonTable {
    pub fn len(&self) -> usize {
        self.spec.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spec.is_empty()
    }

    #[inline]
    pub fn find(&self, spec: SpecRow, node: NodeRow) -> Option<DaemonRow> {
        self.index.get(&pair_key(spec.0, node.0)).copied()
    }

    /// Inserts an instance that was just started with `pid`.
    pub fn insert_started(&mut self, spec: SpecRow, node: NodeRow, pid: u32, now_ms: u64) -> DaemonRow {
        let row = DaemonRow::from_index(self.len());
        let previous = self.index.insert(pair_key(spec.0, node.0), row);
        assert!(previous.is_none(), "daemon instance interned twice");
        self.spec.push(spec);
        self.node.push(node);
        self.state.push(DaemonState::Started);
        self.pid.push(pid);
        self.last_exit.push(0);
        self.starts.push(1);
        self.crashes.push(0);
        self.state_since_ms.push(now_ms);
        self.healthy.push(false);
        self.last_health_ms.push(0);
        self.saturation_permille.push(0);
        self.started_ms.push(now_ms);
        self.backoff_ms.push(0);
        self.start_after_ms.push(0);
        self.recent_ends_ms.push(SmallVec::new());
        self.gated.push(false);
        self.running += 1;
        debug_assert!(self.gated.len() == self.len() && self.index.len() == self.len());
        row
    }

    /// An unplanned end (crash, exit) of instance `row` at `now_ms` under `policy`:
    /// sets the restart backoff and, on the policy's crash-loop limit, the gate.
    pub fn record_unplanned_end(&mut self, row: DaemonRow, policy: &crate::event::RestartPolicy, now_ms: u64) {
        let index = row.index();
        let stable = now_ms.saturating_sub(self.started_ms[index]) >= policy.reset_after_ms as u64;
        let base = policy.backoff_base_ms.max(1);
        self.backoff_ms[index] = if stable || self.backoff_ms[index] == 0 {
            base
        } else {
            self.backoff_ms[index].saturating_mul(2).min(policy.backoff_max_ms.max(base))
        };
        self.start_after_ms[index] = now_ms.saturating_add(self.backoff_ms[index] as u64);
        let window_start = now_ms.saturating_sub(policy.crash_loop_window_ms as u64);
        let ends = &mut self.recent_ends_ms[index];
        ends.retain(|end| *end > window_start);
        ends.push(now_ms);
        let limit = (policy.crash_loop_limit as usize).max(1);
        if ends.len() > limit {
            let excess = ends.len() - limit;
            ends.drain(..excess);
        }
        // From the window alone: a daemon started by hand while gated that then ran
        // longer than the window is judged on its recent ends only.
        self.gated[index] = policy.crash_loop_limit > 0 && ends.len() >= limit;
    }

    /// An operator restart: the gate opens and the restart history is forgotten.
    pub fn clear_restart_history(&mut self, row: DaemonRow, now_ms: u64) {
        let index = row.index();
        self.gated[index] = false;
        self.recent_ends_ms[index].clear();
        self.backoff_ms[index] = 0;
        self.start_after_ms[index] = now_ms;
    }

    /// Moves an instance to `state`, keeping the `running` count true.
    pub fn set_state(&mut self, row: DaemonRow, state: DaemonState, now_ms: u64) {
        let index = row.index();
        let was_running = self.state[index].is_running();
        self.state[index] = state;
        self.state_since_ms[index] = now_ms;
        self.running = self.running + state.is_running() as u32 - was_running as u32;
    }

    /// Every column has the table's length (the error names the first that has not).
    /// A new column must be listed here.
    pub fn check_columns(&self) -> Result<(), String> {
        check_columns!(
            self,
            "daemons",
            node,
            state,
            pid,
            last_exit,
            starts,
            crashes,
            state_since_ms,
            healthy,
            last_health_ms,
            saturation_permille,
            started_ms,
            backoff_ms,
            start_after_ms,
            recent_ends_ms,
            gated
        )
    }

    /// Rebuilds `index` from `spec` and `node` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.len());
        for row in 0..self.len() {
            let (spec, node) = (self.spec[row], self.node[row]);
            if self.index.insert(pair_key(spec.0, node.0), DaemonRow::from_index(row)).is_some() {
                return Err(format!("daemon spec row {} on node row {} has two rows", spec.0, node.0));
            }
        }
        Ok(())
    }
    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("daemons", self.len());
        hasher.u32(self.running);
        for row in 0..self.len() {
            hasher.u32(self.spec[row].0);
            hasher.u32(self.node[row].0);
            hasher.u8(self.state[row] as u8);
            hasher.u32(self.pid[row]);
            hasher.i32(self.last_exit[row]);
            hasher.u32(self.starts[row]);
            hasher.u32(self.crashes[row]);
            hasher.u64(self.state_since_ms[row]);
            hasher.bool(self.healthy[row]);
            hasher.u64(self.last_health_ms[row]);
            hasher.u16(self.saturation_permille[row]);
            hasher.u64(self.started_ms[row]);
            hasher.u32(self.backoff_ms[row]);
            hasher.u64(self.start_after_ms[row]);
            hasher.u64(self.recent_ends_ms[row].len() as u64);
            for end in &self.recent_ends_ms[row] {
                hasher.u64(*end);
            }
            hasher.bool(self.gated[row]);
        }
    }
}
