//! Reconcile: one deterministic pass from desired versus actual state to a minimal
//! list of actions, written into a bumpalo arena that is reset every pass.
//!
//! A pass runs after every log record (`Scope::Incremental`: the blobs the record
//! touched, the blobs waiting on a gate that may have opened, and the timers that fell
//! due) or over every row (`Scope::Full`, what the headline benchmark measures). For
//! the same state both scopes emit the same actions: every blob that can need work is
//! either dirty or waiting, and evaluating a blob that needs none emits nothing.
//!
//! Order of a pass (control plane first, then the column loops):
//! 1. nodes: liveness and eligibility from log time, the avoid mark (locality), the
//!    mass-failure brake; eligibility changes invalidate the plans they affect;
//! 2. timers: in-flight actions past their deadline time out (and back off);
//! 3. blobs: candidates (dirty or waiting, or all flagged by the full scan) sorted by
//!    priority (repairs of degraded blobs first, rebalancing last, then row), each
//!    evaluated once: plan, repairs, migrations, verifications, drops, through gates;
//! 4. anti-entropy: a bounded, rotating slice of replicas is re-verified when due;
//! 5. daemons: start what should run and does not, stop what runs and should not;
//! 6. heat: saturated nodes are told to shed load;
//! 7. maintenance: drain progress and the steps of the maintenance state machine.
//!
//! Invariants: no I/O, no clock but `state.now_ms`, no randomness, no `Result`, no
//! hash-map iteration; no heap allocation in a pass outside the arena once the
//! reconciler is warm; every emitted tracked action enters the in-flight table with
//! a deadline; nothing is emitted past a budget; the last healthy copy is never
//! dropped; pulls target only eligible nodes.

pub mod daemons;
pub mod gates;
pub mod maintenance;
pub mod nodes;
pub mod replicas;

use bumpalo::collections::Vec as BumpVec;
use bumpalo::Bump;

use crate::action::{Action, ActionKind};
use crate::event::ActionId;
use crate::state::State;

/// Which rows a pass looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// What the last record touched, what waits on a gate that may have opened, timers.
    Incremental,
    /// Every row.
    Full,
}

/// Owns the arena and the scratch buffers of reconcile passes. Keep one per state and
/// reuse it: after warm-up a pass allocates nothing outside the arena.
pub struct Reconciler {
    arena: Bump,
    /// The placement planner's scratch (grows to the node count once).
    plan_scratch: Vec<(f64, u32)>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconciler {
    pub fn new() -> Reconciler {
        Reconciler { arena: Bump::with_capacity(1 << 20), plan_scratch: Vec::new() }
    }

    /// Runs one pass over `state` at its current position and returns the actions,
    /// valid until the next pass.
    pub fn pass(&mut self, state: &mut State, scope: Scope) -> &[Action] {
        self.arena.reset();
        let actions = run(&self.arena, &mut self.plan_scratch, state, scope);
        actions.into_bump_slice()
    }
}

/// The action list of one pass, with its id counter and bound.
pub(crate) struct Out<'a> {
    pub actions: BumpVec<'a, Action>,
    pub position: u64,
    pub max: usize,
}

impl<'a> Out<'a> {
    pub fn full(&self) -> bool {
        self.actions.len() >= self.max
    }

    /// Appends an action for `node`; a tracked one enters the in-flight table.
    pub fn emit(&mut self, state: &mut State, node: crate::state::ids::NodeRow, kind: ActionKind) {
        assert!(!self.full(), "pass emitted past actions_per_pass_max");
        let id = ActionId { position: self.position, index: self.actions.len() as u32 };
        let action = Action { id, node, kind };
        if kind.is_tracked() {
            let deadline_ms = state.now_ms + state.reconcile.action_timeout_ms;
            state.inflight.insert(action, state.now_ms, deadline_ms);
        }
        self.actions.push(action);
    }
}

fn run<'a>(
    arena: &'a Bump,
    plan_scratch: &mut Vec<(f64, u32)>,
    state: &mut State,
    scope: Scope,
) -> BumpVec<'a, Action> {
    let max = state.reconcile.actions_per_pass_max as usize;
    let mut out = Out { actions: BumpVec::with_capacity_in(64.min(max), arena), position: state.position, max };
    let now_ms = state.now_ms;

    nodes::refresh(arena, state, &mut out);

    while let Some(expired) = state.inflight.pop_expired(now_ms) {
        crate::fold::settle_effects(state, &expired.action, false);
    }
    if now_ms >= state.gates.window_start_ms + state.reconcile.throttle_window_ms {
        state.gates.window_start_ms = now_ms;
        state.gates.window_moves = 0;
        state.gates.capacity_freed = true;
    }

    replicas::run(arena, state, &mut out, plan_scratch, scope);
    replicas::anti_entropy(state, &mut out);
    if scope == Scope::Full || state.daemons_dirty || now_ms >= state.gates.daemons_due_ms {
        // Cleared first: a pass that runs out of budget sets it again.
        state.daemons_dirty = false;
        daemons::run(state, &mut out);
    }
    nodes::heat(arena, state, &mut out);
    maintenance::run(arena, state);
    state.gates.capacity_freed = false;
    out.actions
}
