//! The engine: fold then reconcile, record after record, exactly as every node and
//! every replay does it.
//!
//! One `Engine` owns the state and the reconciler. [`Engine::apply`] folds one record
//! and runs the incremental reconcile pass after it, returning that pass's actions;
//! `logtool::replay --reconcile` and the node's main loop both call it, so a replay of
//! a node's log reaches the node's state hash at every position.
//!
//! Invariants: pure like fold and reconcile (no I/O, no clock, no `Result`); records
//! are applied in position order with no gap (fold asserts it).

use crate::action::Action;
use crate::config::Config;
use crate::fold::{fold_payload, fold_payload_verified, VerifiedSections};
use crate::reconcile::{Reconciler, Scope};
use crate::state::State;

pub struct Engine {
    pub state: State,
    reconciler: Reconciler,
}

impl Engine {
    pub fn new(config: &Config) -> Engine {
        Engine { state: State::new(config), reconciler: Reconciler::new() }
    }

    /// An engine that goes on from `state` (a loaded checkpoint): the next record it
    /// applies is `state.position + 1`. The reconciler keeps nothing between passes
    /// but scratch space, so this engine emits what one that folded every record
    /// from position 1 would.
    pub fn from_state(state: State) -> Engine {
        Engine { state, reconciler: Reconciler::new() }
    }

    /// Folds record `position` (committed at `time_ms`) and runs the pass after it;
    /// returns the state and the pass's actions (valid until the next call).
    pub fn apply(&mut self, position: u64, time_ms: u64, payload: &[u8]) -> (&State, &[Action]) {
        fold_payload(&mut self.state, position, time_ms, payload);
        let actions = self.reconciler.pass(&mut self.state, Scope::Incremental);
        (&self.state, actions)
    }

    /// `apply` with the sections a verifier already checked (`fold::verified_sections`
    /// on another thread): the same state and actions, less work on this thread.
    pub fn apply_verified(
        &mut self,
        position: u64,
        time_ms: u64,
        payload: &[u8],
        verified: VerifiedSections,
    ) -> (&State, &[Action]) {
        fold_payload_verified(&mut self.state, position, time_ms, payload, verified);
        let actions = self.reconciler.pass(&mut self.state, Scope::Incremental);
        (&self.state, actions)
    }

    /// Folds a record without a reconcile pass (replay of fold alone).
    pub fn fold_only(&mut self, position: u64, time_ms: u64, payload: &[u8]) {
        fold_payload(&mut self.state, position, time_ms, payload);
    }

    /// `fold_only` with the sections a verifier already checked.
    pub fn fold_only_verified(&mut self, position: u64, time_ms: u64, payload: &[u8], verified: VerifiedSections) {
        fold_payload_verified(&mut self.state, position, time_ms, payload, verified);
    }
}
