//! Daemon reconcile: start the daemons that should run on a live node and do not;
//! stop those that run where they should not (a removed intent, a node in
//! maintenance for non-essential daemons); restart a running daemon whose health
//! reports stopped for longer than its spec's health timeout. A daemon that ended
//! unplanned (crash, exit) starts again only once its restart backoff is over (fold
//! sets it: the policy's base, doubling per end to its maximum, back to the base after
//! a stable run), and never while crash-loop gated (the policy's limit of ends within
//! its window) until an operator restarts the node's daemons.
//!
//! Invariants: at most one start, stop or restart per (spec, node) is in flight;
//! nothing is started on a node that is not live, before its backoff ends or while
//! gated; budgets (`daemon_inflight_max`) hold; `gates.daemons_due_ms` is the earliest
//! time a waiting start or an overdue health report needs a pass.

use super::Out;
use crate::action::ActionKind;
use crate::state::daemons::SpecPlacement;
use crate::state::ids::{NodeRow, SpecRow};
use crate::state::State;

/// Whether `spec` should run on `node`: placed there, the node live, and (unless the
/// daemon is essential) the node not draining or in maintenance.
pub(crate) fn wanted_on(state: &State, spec: usize, node: usize) -> bool {
    let nodes = &state.nodes;
    let placed = match &state.specs.runs_on[spec] {
        SpecPlacement::AllNodes => true,
        SpecPlacement::Label(label) => nodes.labels[node].contains(label),
        SpecPlacement::Nodes(rows) => rows.iter().any(|row| row.index() == node),
        SpecPlacement::Nowhere => false,
    };
    let essential = state.specs.spec[spec].essential;
    placed && nodes.live[node] && (!nodes.maintenance[node].is_away() || essential)
}

pub(crate) fn run(state: &mut State, out: &mut Out) {
    let config = state.reconcile;
    let now_ms = state.now_ms;
    let mut due_ms = u64::MAX;
    for spec in 0..state.specs.len() {
        let health_timeout_ms = state.specs.spec[spec].health_timeout_ms as u64;
        for node in 0..state.nodes.len() {
            let (spec_row, node_row) = (SpecRow::from_index(spec), NodeRow::from_index(node));
            let instance = state.daemons.find(spec_row, node_row).map(|row| row.index());
            let running = instance.is_some_and(|row| state.daemons.state[row].is_running());
            let wanted = wanted_on(state, spec, node);
            let kind = match (wanted, running) {
                (true, false) => {
                    if let Some(row) = instance {
                        if state.daemons.gated[row] {
                            continue;
                        }
                        let start_after_ms = state.daemons.start_after_ms[row];
                        if now_ms < start_after_ms {
                            due_ms = due_ms.min(start_after_ms);
                            continue;
                        }
                    }
                    ActionKind::StartDaemon { spec: spec_row }
                }
                (false, true) if state.nodes.live[node] => ActionKind::StopDaemon { spec: spec_row },
                (true, true) if health_timeout_ms > 0 => {
                    let row = instance.expect("a running daemon has a row");
                    let daemons = &state.daemons;
                    // Health is awaited from the start of the run, then from each report.
                    let heard_ms = daemons.last_health_ms[row].max(daemons.started_ms[row]);
                    let overdue_ms = heard_ms.saturating_add(health_timeout_ms);
                    if now_ms <= overdue_ms {
                        due_ms = due_ms.min(overdue_ms.saturating_add(1));
                        continue;
                    }
                    // A health restart is an unplanned end too: backoff and the gate apply.
                    if daemons.gated[row] {
                        continue;
                    }
                    if now_ms < daemons.start_after_ms[row] {
                        due_ms = due_ms.min(daemons.start_after_ms[row]);
                        continue;
                    }
                    ActionKind::RestartDaemon { spec: spec_row }
                }
                _ => continue,
            };
            if state.inflight.daemon_busy(node_row, spec_row) {
                continue;
            }
            if state.inflight.daemon_actions >= config.daemon_inflight_max || out.full() {
                state.daemons_dirty = true;
                state.gates.daemons_due_ms = due_ms;
                return;
            }
            out.emit(state, node_row, kind);
        }
    }
    state.gates.daemons_due_ms = due_ms;
}
