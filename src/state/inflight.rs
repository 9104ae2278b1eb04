//! Actions emitted by reconcile and not yet settled, with the budgets they consume
//! and their deadlines in log time.
//!
//! Invariants: an action id is inserted once (by reconcile) and removed once (by its
//! outcome in fold, or its timeout in reconcile); the table never holds more than
//! its capacity (the sum of the in-flight budgets, reserved up front, so inserting
//! never allocates); `moves`, `moves_by_node`, `verifies`, `drops`, `daemon_actions`
//! always equal what the table holds. Entries are kept in insertion order, which is a
//! function of the log, and the hash visits them in that order.

use super::hash::StateHasher;
use super::ids::{NodeRow, Reserved};
use crate::action::{Action, ActionKind};
use crate::event::ActionId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InflightAction {
    pub action: Action,
    pub emitted_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InflightTable {
    pub entries: Reserved<InflightAction>,
    pub capacity: usize,
    /// Pulls and migrations in flight, in all and per node (as target and as source).
    pub moves: u32,
    pub moves_by_node: Vec<u32>,
    pub verifies: u32,
    pub drops: u32,
    pub daemon_actions: u32,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// Cancelled because their executor or their source stopped being live.
    pub cancelled: u64,
}

impl InflightTable {
    pub fn new(capacity: usize) -> InflightTable {
        InflightTable {
            entries: Reserved(Vec::with_capacity(capacity)),
            capacity,
            moves: 0,
            moves_by_node: Vec::new(),
            verifies: 0,
            drops: 0,
            daemon_actions: 0,
            succeeded: 0,
            failed: 0,
            timed_out: 0,
            cancelled: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Grows the per-node counters with the node table (called when a node joins).
    pub fn add_node(&mut self) {
        self.moves_by_node.push(0);
    }

    fn count(&mut self, action: &Action, add: bool) {
        fn step(value: &mut u32, add: bool) {
            if add {
                *value += 1;
            } else {
                assert!(*value > 0, "in-flight count underflow");
                *value -= 1;
            }
        }
        match action.kind {
            ActionKind::PullReplica { .. } | ActionKind::MigrateBlob { .. } => {
                step(&mut self.moves, add);
                step(&mut self.moves_by_node[action.node.index()], add);
                let peer = action.kind.peer().expect("moves have a peer");
                step(&mut self.moves_by_node[peer.index()], add);
            }
            ActionKind::VerifyReplica { .. } => step(&mut self.verifies, add),
            ActionKind::DropReplica { .. } => step(&mut self.drops, add),
            ActionKind::StartDaemon { .. } | ActionKind::StopDaemon { .. } | ActionKind::RestartDaemon { .. } => {
                step(&mut self.daemon_actions, add)
            }
            ActionKind::ReduceHeat { .. } | ActionKind::MarkAvoid { .. } | ActionKind::ApplyBackoff { .. } => {
                unreachable!("advisory actions are not tracked")
            }
        }
    }

    /// Moves in flight into or out of `node`.
    #[inline]
    pub fn moves_at(&self, node: NodeRow) -> u32 {
        self.moves_by_node[node.index()]
    }

    pub fn insert(&mut self, action: Action, emitted_ms: u64, deadline_ms: u64) {
        assert!(action.kind.is_tracked(), "advisory actions are not tracked");
        assert!(self.entries.len() < self.capacity, "in-flight table over its budgets");
        debug_assert!(self.entries.iter().all(|entry| entry.action.id != action.id), "action emitted twice");
        self.entries.push(InflightAction { action, emitted_ms, deadline_ms });
        self.count(&action, true);
    }

    fn remove_at(&mut self, index: usize) -> InflightAction {
        // `remove` (not `swap_remove`) keeps insertion order, so behaviour never depends
        // on which entry happened to be moved.
        let entry = self.entries.remove(index);
        self.count(&entry.action, false);
        entry
    }

    /// Where action `id` is in `entries` while it is in flight.
    pub fn index_of(&self, id: ActionId) -> Option<usize> {
        self.entries.iter().position(|entry| entry.action.id == id)
    }

    /// Removes the settled action at `index` (from `index_of`).
    pub fn settle_at(&mut self, index: usize, success: bool) -> InflightAction {
        if success {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
        self.remove_at(index)
    }

    /// Removes an action its executor gave up on (not the action's fault), as a cancellation.
    pub fn cancel_at(&mut self, index: usize) -> InflightAction {
        self.cancelled += 1;
        self.remove_at(index)
    }

    /// Removes and returns the earliest-deadline action (ties: lowest id) if its deadline
    /// is at or before `now_ms`.
    pub fn pop_expired(&mut self, now_ms: u64) -> Option<InflightAction> {
        let (index, entry) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.deadline_ms <= now_ms)
            .min_by_key(|(_, entry)| (entry.deadline_ms, entry.action.id))?;
        let _ = entry;
        self.timed_out += 1;
        Some(self.remove_at(index))
    }

    /// Removes and returns the first action (in table order) executed by `node` or
    /// reading from it: its work is lost with the node.
    pub fn cancel_first_involving(&mut self, node: NodeRow) -> Option<InflightAction> {
        let index = self
            .entries
            .iter()
            .position(|entry| entry.action.node == node || entry.action.kind.peer() == Some(node))?;
        self.cancelled += 1;
        Some(self.remove_at(index))
    }

    /// Removes and returns the first move into `node` (it stops taking new copies), as a
    /// cancellation; moves out of it continue.
    pub fn cancel_first_move_into(&mut self, node: NodeRow) -> Option<InflightAction> {
        let index = self.entries.iter().position(|entry| entry.action.node == node && entry.action.kind.is_move())?;
        self.cancelled += 1;
        Some(self.remove_at(index))
    }

    /// Whether the same action (node and kind) is already in flight.
    #[inline]
    pub fn contains(&self, node: NodeRow, kind: &ActionKind) -> bool {
        self.entries.iter().any(|entry| entry.action.node == node && entry.action.kind == *kind)
    }

    /// Whether any start, stop or restart of daemon `spec` on `node` is in flight (at
    /// most one may be: they would race on the same process).
    pub fn daemon_busy(&self, node: NodeRow, spec: crate::state::ids::SpecRow) -> bool {
        self.entries.iter().any(|entry| entry.action.node == node && entry.action.kind.daemon_spec() == Some(spec))
    }

    /// Whether any move of `blob` into `node` is in flight.
    #[inline]
    pub fn move_into(&self, blob: crate::state::ids::BlobRow, node: NodeRow) -> bool {
        self.entries.iter().any(|entry| {
            entry.action.node == node && entry.action.kind.is_move() && entry.action.kind.blob() == Some(blob)
        })
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("inflight", self.len());
        for counter in [self.succeeded, self.failed, self.timed_out, self.cancelled] {
            hasher.u64(counter);
        }
        for counter in [self.moves, self.verifies, self.drops, self.daemon_actions] {
            hasher.u32(counter);
        }
        hasher.u32_column(&self.moves_by_node);
        for entry in self.entries.iter() {
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
        ActionKind::StartDaemon { spec } | ActionKind::StopDaemon { spec } | ActionKind::RestartDaemon { spec } => {
            (spec.0 as u64, 0)
        }
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
