//! The closed set of actions reconcile emits, addressed by row ids.
//!
//! Every action carries a deterministic id (the log position of the pass that emitted
//! it and its index in that pass's list) and the node that must execute it. Tracked
//! actions (daemon starts and stops, pulls, migrations, drops, verifications) enter
//! the in-flight table until their outcome event or their timeout; advisory ones
//! (reduce heat, mark avoid, apply backoff) take effect in the state when emitted and
//! are sent to their node for information.
//!
//! Invariants: actions name rows, never external ids (the executor maps rows to names
//! through the state); `ActionKind` is `Copy` so an action list lives in an arena.

use crate::event::ActionId;
use crate::state::ids::{BlobRow, NodeRow, SpecRow};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ActionKind {
    /// Start the spec's daemon on the executing node.
    StartDaemon { spec: SpecRow },
    /// Stop the spec's daemon on the executing node (control event, SIGTERM, SIGKILL).
    StopDaemon { spec: SpecRow },
    /// Stop then start the spec's daemon on the executing node: its health reports
    /// stopped for longer than the spec's health timeout.
    RestartDaemon { spec: SpecRow },
    /// Fetch a copy of `blob` from `source` onto the executing node (a repair).
    PullReplica { blob: BlobRow, source: NodeRow },
    /// Move the copy of `blob` held by `from` (off the plan) onto the executing node
    /// (on the plan); the old copy is dropped once the new one is stable.
    MigrateBlob { blob: BlobRow, from: NodeRow },
    /// Delete the executing node's copy of `blob` (never the last healthy one).
    DropReplica { blob: BlobRow },
    /// The executing node is saturated: shed load to this level (permille).
    ReduceHeat { permille: u16 },
    /// Mark (or clear) the executing node as avoided for new copies.
    MarkAvoid { avoid: bool },
    /// Pulls of `blob` wait until `until_ms` after repeated failures.
    ApplyBackoff { blob: BlobRow, until_ms: u64 },
    /// Re-hash the executing node's copy of `blob` and report it.
    VerifyReplica { blob: BlobRow },
}

/// Stable names, indexed by `ActionKind::code`.
pub const ACTION_KIND_NAMES: [&str; 10] = [
    "start_daemon",
    "stop_daemon",
    "pull_replica",
    "migrate_blob",
    "drop_replica",
    "reduce_heat",
    "mark_avoid",
    "apply_backoff",
    "verify_replica",
    "restart_daemon",
];

impl ActionKind {
    pub fn code(&self) -> u8 {
        match self {
            ActionKind::StartDaemon { .. } => 0,
            ActionKind::StopDaemon { .. } => 1,
            ActionKind::PullReplica { .. } => 2,
            ActionKind::MigrateBlob { .. } => 3,
            ActionKind::DropReplica { .. } => 4,
            ActionKind::ReduceHeat { .. } => 5,
            ActionKind::MarkAvoid { .. } => 6,
            ActionKind::ApplyBackoff { .. } => 7,
            ActionKind::VerifyReplica { .. } => 8,
            ActionKind::RestartDaemon { .. } => 9,
        }
    }

    pub fn name(&self) -> &'static str {
        ACTION_KIND_NAMES[self.code() as usize]
    }

    /// The blob the action is about, if any.
    pub fn blob(&self) -> Option<BlobRow> {
        match *self {
            ActionKind::PullReplica { blob, .. }
            | ActionKind::MigrateBlob { blob, .. }
            | ActionKind::DropReplica { blob }
            | ActionKind::ApplyBackoff { blob, .. }
            | ActionKind::VerifyReplica { blob } => Some(blob),
            _ => None,
        }
    }

    /// The other node a move reads from (pull source, migration origin).
    pub fn peer(&self) -> Option<NodeRow> {
        match *self {
            ActionKind::PullReplica { source, .. } => Some(source),
            ActionKind::MigrateBlob { from, .. } => Some(from),
            _ => None,
        }
    }

    /// Daemon starts, stops and restarts: they count against `daemon_inflight_max`.
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            ActionKind::StartDaemon { .. } | ActionKind::StopDaemon { .. } | ActionKind::RestartDaemon { .. }
        )
    }

    /// The daemon spec a start, stop or restart is about.
    pub fn daemon_spec(&self) -> Option<SpecRow> {
        match *self {
            ActionKind::StartDaemon { spec } | ActionKind::StopDaemon { spec } | ActionKind::RestartDaemon { spec } => {
                Some(spec)
            }
            _ => None,
        }
    }

    /// Pulls and migrations: they move bytes and count against the move budgets.
    pub fn is_move(&self) -> bool {
        matches!(self, ActionKind::PullReplica { .. } | ActionKind::MigrateBlob { .. })
    }

    /// Tracked actions wait in flight for an outcome; advisory ones do not.
    pub fn is_tracked(&self) -> bool {
        !matches!(self, ActionKind::ReduceHeat { .. } | ActionKind::MarkAvoid { .. } | ActionKind::ApplyBackoff { .. })
    }
}

/// One action: its id, the node that executes it, and what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Action {
    pub id: ActionId,
    pub node: NodeRow,
    pub kind: ActionKind,
}

/// A one-line description of an action with external names, e.g.
/// `node-b: pull_replica blob 07070707… from node-a`.
pub fn describe(state: &crate::state::State, action: &Action) -> String {
    let node = |row: NodeRow| state.nodes.name[row.index()].to_string();
    let blob = |row: BlobRow| {
        let hash = &state.blobs.hash[row.index()];
        format!("{:02x}{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2], hash[3])
    };
    let detail = match action.kind {
        ActionKind::StartDaemon { spec } | ActionKind::StopDaemon { spec } | ActionKind::RestartDaemon { spec } => {
            state.specs.spec[spec.index()].name.clone()
        }
        ActionKind::PullReplica { blob: row, source } => format!("{} from {}", blob(row), node(source)),
        ActionKind::MigrateBlob { blob: row, from } => format!("{} from {}", blob(row), node(from)),
        ActionKind::DropReplica { blob: row } | ActionKind::VerifyReplica { blob: row } => blob(row),
        ActionKind::ReduceHeat { permille } => format!("to {permille}"),
        ActionKind::MarkAvoid { avoid } => avoid.to_string(),
        ActionKind::ApplyBackoff { blob: row, until_ms } => format!("{} until {until_ms}", blob(row)),
    };
    format!("{}: {} {}", node(action.node), action.kind.name(), detail)
}
