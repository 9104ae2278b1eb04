//! Actions emitted by reconcile and not yet settled, keyed by their deterministic id.
//!
//! Invariants: an action id is inserted once (by reconcile) and removed once (by its
//! outcome or its timeout); iteration is in id order (a `BTreeMap`), never in hash
//! order. Fold settles outcomes; it never invents actions.

use std::collections::BTreeMap;

use super::hash::StateHasher;
use super::ids::NodeRow;
use crate::event::ActionId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightAction {
    /// The node that must execute the action.
    pub node: NodeRow,
    /// The action's kind code (defined with the action enum in reconcile).
    pub kind: u8,
    pub emitted_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Debug, Default, Clone)]
pub struct InflightTable {
    pub actions: BTreeMap<ActionId, InflightAction>,
    pub succeeded: u64,
    pub failed: u64,
}

impl InflightTable {
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    pub fn insert(&mut self, id: ActionId, action: InflightAction) {
        let previous = self.actions.insert(id, action);
        assert!(previous.is_none(), "action {id:?} emitted twice");
    }

    /// Removes a settled action; `None` when no such action is in flight.
    pub fn settle(&mut self, id: ActionId, success: bool) -> Option<InflightAction> {
        let action = self.actions.remove(&id)?;
        if success {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
        Some(action)
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("inflight", self.len());
        hasher.u64(self.succeeded);
        hasher.u64(self.failed);
        for (id, action) in &self.actions {
            hasher.u64(id.position);
            hasher.u32(id.index);
            hasher.u32(action.node.0);
            hasher.u8(action.kind);
            hasher.u64(action.emitted_ms);
            hasher.u64(action.deadline_ms);
        }
    }
}
