//! Actions emitted by reconcile and not yet settled, keyed by their deterministic id,
//! with the move and verification budgets they consume and their deadlines.
//!
//! Invariants: an action id is inserted once (by reconcile) and removed once (by its
//! outcome in fold, or its timeout in reconcile); `moves`, `moves_by_node` and
//! `verifies` always equal what the table holds; iteration is in id or deadline
//! order (`BTreeMap`/`BTreeSet`), never in hash order.

use std::collections::{BTreeMap, BTreeSet};

use super::hash::StateHasher;
use super::ids::NodeRow;
use crate::action::{Action, ActionKind};
use crate::event::ActionId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightAction {
    pub action: Action,
    pub emitted_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, Default, Clone)]
pub struct InflightTable {
    pub actions: BTreeMap<ActionId, InflightAction>,
    /// (deadline, id) of every action in flight, for timeouts in log time.
    pub deadlines: BTreeSet<(u64, ActionId)>,
    /// Pulls and migrations in flight, in all and per node (as target and as source).
    pub moves: u32,
    pub moves_by_node: Vec<u32>,
    pub verifies: u32,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
}

impl InflightTable {
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    fn count(&mut self, action: &Action, add: bool) {
        let delta = |value: &mut u32| {
            if add {
                *value += 1
            } else {
                assert!(*value > 0, "in-flight count underflow");
                *value -= 1
            }
        };
        if action.kind.is_move() {
            delta(&mut self.moves);
            for node in [Some(action.node), action.kind.peer()].into_iter().flatten() {
                if self.moves_by_node.len() <= node.index() {
                    self.moves_by_node.resize(node.index() + 1, 0);
                }
                delta(&mut self.moves_by_node[node.index()]);
            }
        }
        if matches!(action.kind, ActionKind::VerifyReplica { .. }) {
            delta(&mut self.verifies);
        }
    }

    /// Moves in flight into or out of `node`.
    pub fn moves_at(&self, node: NodeRow) -> u32 {
        self.moves_by_node.get(node.index()).copied().unwrap_or(0)
    }

    pub fn insert(&mut self, action: Action, emitted_ms: u64, deadline_ms: u64) {
        assert!(action.kind.is_tracked(), "advisory actions are not tracked");
        let previous = self.actions.insert(action.id, InflightAction { action, emitted_ms, deadline_ms });
        assert!(previous.is_none(), "action {:?} emitted twice", action.id);
        self.deadlines.insert((deadline_ms, action.id));
        self.count(&action, true);
    }

    /// Removes a settled action; `None` when no such action is in flight.
    pub fn settle(&mut self, id: ActionId, success: bool) -> Option<InflightAction> {
        let entry = self.remove(id)?;
        if success {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
        Some(entry)
    }

    fn remove(&mut self, id: ActionId) -> Option<InflightAction> {
        let entry = self.actions.remove(&id)?;
        let removed = self.deadlines.remove(&(entry.deadline_ms, id));
        assert!(removed, "deadline index out of step");
        self.count(&entry.action, false);
        Some(entry)
    }

    /// Removes and returns the first action whose deadline is at or before `now_ms`.
    pub fn pop_expired(&mut self, now_ms: u64) -> Option<InflightAction> {
        let &(deadline_ms, id) = self.deadlines.first()?;
        if deadline_ms > now_ms {
            return None;
        }
        self.timed_out += 1;
        self.remove(id)
    }

    /// Whether an action of the same kind on the same blob and node is in flight.
    pub fn contains(&self, node: NodeRow, kind: &ActionKind) -> bool {
        self.actions.values().any(|entry| entry.action.node == node && entry.action.kind == *kind)
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("inflight", self.len());
        for counter in [self.succeeded, self.failed, self.timed_out] {
            hasher.u64(counter);
        }
        hasher.u32(self.moves);
        hasher.u32(self.verifies);
        for (id, entry) in &self.actions {
            hasher.u64(id.position);
            hasher.u32(id.index);
            hash_action(hasher, &entry.action);
            hasher.u64(entry.emitted_ms);
            hasher.u64(entry.deadline_ms);
        }
    }
}

/// Writes an action's fields in a fixed layout.
pub fn hash_action(hasher: &mut StateHasher, action: &Action) {
    hasher.u64(action.id.position);
    hasher.u32(action.id.index);
    hasher.u32(action.node.0);
    hasher.u8(action.kind.code());
    let (first, second): (u64, u64) = match action.kind {
        ActionKind::StartDaemon { spec } | ActionKind::StopDaemon { spec } => (spec.0 as u64, 0),
        ActionKind::PullReplica { blob, source } => (blob.0 as u64, source.0 as u64),
        ActionKind::MigrateBlob { blob, from } => (blob.0 as u64, from.0 as u64),
        ActionKind::DropReplica { blob } | ActionKind::VerifyReplica { blob } => (blob.0 as u64, 0),
        ActionKind::ReduceHeat { permille } => (permille as u64, 0),
        ActionKind::MarkAvoid { avoid } => (avoid as u64, 0),
        ActionKind::ApplyBackoff { blob, until_ms } => (blob.0 as u64, until_ms),
    };
    hasher.u64(first);
    hasher.u64(second);
}
