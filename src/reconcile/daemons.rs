//! Daemon reconcile: start the daemons that should run on a live node and do not;
//! stop those that run where they should not (a removed intent, a node in
//! maintenance for non-essential daemons). Crash-loop gating and restart backoff
//! arrive with the supervision issue.
//!
//! Invariants: at most one start or stop per (spec, node) is in flight; nothing is
//! started on a node that is not live; budgets (`daemon_inflight_max`) hold.

use super::Out;
use crate::action::ActionKind;
use crate::state::daemons::SpecPlacement;
use crate::state::ids::{NodeRow, SpecRow};
use crate::state::nodes::MaintenanceState;
use crate::state::State;

fn wanted_on(state: &State, spec: usize, node: usize) -> bool {
    let nodes = &state.nodes;
    let placed = match &state.specs.runs_on[spec] {
        SpecPlacement::AllNodes => true,
        SpecPlacement::Label(label) => nodes.labels[node].contains(label),
        SpecPlacement::Nodes(rows) => rows.iter().any(|row| row.index() == node),
        SpecPlacement::Nowhere => false,
    };
    let essential = state.specs.spec[spec].essential;
    placed && nodes.live[node] && (nodes.maintenance[node] == MaintenanceState::Active || essential)
}

pub(crate) fn run(state: &mut State, out: &mut Out) {
    let config = state.reconcile;
    for spec in 0..state.specs.len() {
        for node in 0..state.nodes.len() {
            let (spec_row, node_row) = (SpecRow::from_index(spec), NodeRow::from_index(node));
            let running =
                state.daemons.find(spec_row, node_row).is_some_and(|row| state.daemons.state[row.index()].is_running());
            let wanted = wanted_on(state, spec, node);
            let kind = match (wanted, running) {
                (true, false) => ActionKind::StartDaemon { spec: spec_row },
                (false, true) if state.nodes.live[node] => ActionKind::StopDaemon { spec: spec_row },
                _ => continue,
            };
            if state.inflight.contains(node_row, &kind) {
                continue;
            }
            if state.inflight.daemon_actions >= config.daemon_inflight_max || out.full() {
                state.daemons_dirty = true;
                return;
            }
            out.emit(state, node_row, kind);
        }
    }
}
