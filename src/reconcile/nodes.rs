//! Node-level reconcile: liveness and eligibility from log time, the avoid mark from
//! locality, the mass-failure brake, heat; and the plan invalidations they cause.
//!
//! Invariants: `nodes.live`/`nodes.eligible` hold what the previous pass computed, so
//! a change is seen exactly once; a node that loses eligibility leaves every plan it
//! was in before any blob is evaluated, so no pull targets an ineligible node; the
//! avoid mark has hysteresis (enter above `avoid_enter_permille` of the median RTT,
//! leave below `avoid_exit_permille`).

use bumpalo::collections::Vec as BumpVec;
use bumpalo::Bump;

use super::Out;
use crate::action::ActionKind;
use crate::event::NodeStatus;
use crate::placement::{self, Candidate};
use crate::state::ids::{BlobRow, NodeRow};
use crate::state::nodes::MaintenanceState;
use crate::state::State;

/// Saturation (permille) at which a node is told to reduce heat, and below which the
/// mark clears; the level it is asked to shed to.
const HOT_ENTER_PERMILLE: u16 = 900;
const HOT_EXIT_PERMILLE: u16 = 700;
const HEAT_TARGET_PERMILLE: u16 = 700;

/// Fewest nodes with RTT data before any is judged slow against the median.
const AVOID_NODES_MIN: usize = 3;

/// Whether `node` is up and heard from within `node_down_ms` at log time `now_ms`.
pub fn is_live(state: &State, node: usize, now_ms: u64) -> bool {
    let status = state.nodes.status[node];
    let heard = now_ms.saturating_sub(state.nodes.last_heartbeat_ms[node]) <= state.reconcile.node_down_ms;
    matches!(status, NodeStatus::Up | NodeStatus::Suspect) && heard
}

/// When a node that is not live went down: its Down/Left status, or the end of the
/// heartbeat grace period.
pub fn down_at_ms(state: &State, node: usize) -> u64 {
    match state.nodes.status[node] {
        NodeStatus::Down | NodeStatus::Left => state.nodes.status_since_ms[node],
        _ => state.nodes.last_heartbeat_ms[node] + state.reconcile.node_down_ms,
    }
}

/// A node's placement weight: its capacity, scaled down by its load, where a node
/// told to reduce heat (a saturated daemon) counts as fully loaded, so new plans steer
/// away from it until it cools; plans that hold it are not changed for that.
pub fn placement_weight(state: &State, node: usize) -> f64 {
    let nodes = &state.nodes;
    let load_permille = if nodes.hot[node] { nodes.load_permille[node].max(1000) } else { nodes.load_permille[node] };
    placement::weight(nodes.capacity_bytes[node], load_permille)
}

/// The eligible nodes as placement candidates, in row order.
pub fn candidates<'a>(arena: &'a Bump, state: &State) -> BumpVec<'a, Candidate> {
    let nodes = &state.nodes;
    let mut out = BumpVec::with_capacity_in(nodes.len(), arena);
    for node in 0..nodes.len() {
        if nodes.eligible[node] {
            out.push(Candidate {
                node: NodeRow::from_index(node),
                key: nodes.key[node],
                weight: placement_weight(state, node),
                zone: nodes.zone[node],
            });
        }
    }
    out
}

pub(crate) fn refresh(arena: &Bump, state: &mut State, out: &mut Out) {
    let now_ms = state.now_ms;
    mark_slow_nodes(arena, state, out);

    let node_count = state.nodes.len();
    let mut lost: BumpVec<NodeRow> = BumpVec::new_in(arena);
    let mut gained: BumpVec<NodeRow> = BumpVec::new_in(arena);
    let mut backpressure = false;
    for node in 0..node_count {
        let live = is_live(state, node, now_ms);
        // A node that went away cannot lower what it raised: only live nodes count.
        backpressure |= live & state.nodes.backpressure[node];
        let nodes = &state.nodes;
        let eligible = live
            && !nodes.cordoned[node]
            && !nodes.draining[node]
            && nodes.maintenance[node] == MaintenanceState::Active
            && !nodes.avoid[node]
            && nodes.capacity_bytes[node] > 0;
        let row = NodeRow::from_index(node);
        if live != nodes.live[node] {
            state.nodes.live[node] = live;
            state.daemons_dirty = true;
            state.mark_node_blobs_dirty(row);
            if !live {
                // Work addressed to a node that went away, or reading from it, is lost:
                // free its budget now instead of waiting out the action timeout.
                while let Some(lost_action) = state.inflight.cancel_first_involving(row) {
                    crate::fold::cancel_effects(state, &lost_action.action);
                }
            }
        }
        if eligible != state.nodes.eligible[node] {
            state.nodes.eligible[node] = eligible;
            if eligible {
                gained.push(row);
            } else {
                lost.push(row);
            }
        }
    }
    if !lost.is_empty() || !gained.is_empty() {
        invalidate_plans(arena, state, &lost, &gained);
    }
    if backpressure != state.gates.backpressure {
        state.gates.backpressure = backpressure;
        // Lowered: the moves it held may go now.
        state.gates.capacity_freed |= !backpressure;
    }
    brake(state, now_ms);
}

/// Drops plans that contain a node that lost eligibility, and plans a newly eligible
/// node would enter (it outscores the plan's floor, the plan is short, or it brings a
/// zone the plan lacks).
fn invalidate_plans(arena: &Bump, state: &mut State, lost: &[NodeRow], gained: &[NodeRow]) {
    // A mask, so a burst of lost nodes (a rack drained at once) costs one lookup per
    // planned node, not a scan of the lost list.
    let lost_mask: &mut [bool] = arena.alloc_slice_fill_copy(state.nodes.len(), false);
    for node in lost {
        lost_mask[node.index()] = true;
    }
    for blob in 0..state.blobs.len() {
        if state.blobs.replicas_wanted[blob] == 0 || !state.blobs.plan_valid[blob] {
            continue;
        }
        let plan = &state.blobs.plan[blob];
        let mut stale = plan.iter().any(|node| lost_mask[node.index()]);
        if !stale && !gained.is_empty() {
            let short = (state.blobs.plan_len[blob] as usize) < state.blobs.replicas_wanted[blob] as usize;
            let hash = &state.blobs.hash[blob];
            let epoch = super::replicas::PLAN_EPOCH;
            stale = short
                || gained.iter().any(|&node| {
                    let index = node.index();
                    let weight = placement_weight(state, index);
                    let beats =
                        placement::score(state.nodes.key[index], hash, epoch, weight) > state.blobs.plan_floor[blob];
                    let pinned = state.blobs.pinned[blob].contains(&node);
                    let zone = state.nodes.zone[index];
                    let new_zone = state.blobs.zone_spread[blob]
                        && !zone.is_none()
                        && !plan.iter().any(|planned| state.nodes.zone[planned.index()] == zone);
                    beats || new_zone || pinned
                });
        }
        if stale {
            state.blobs.plan_valid[blob] = false;
            state.mark_blob_dirty(BlobRow::from_index(blob));
        }
    }
}

/// The mass-failure brake: too large a share of nodes went down within the window,
/// or enough went silent together to suspect a partition. Planned departures (Left)
/// do not count.
fn brake(state: &mut State, now_ms: u64) {
    let config = state.reconcile;
    let window_start = now_ms.saturating_sub(config.mass_failure_window_ms);
    let (mut down_recent, mut silent_recent, mut earliest) = (0u64, 0u64, u64::MAX);
    let total = state.nodes.len() as u64;
    for node in 0..state.nodes.len() {
        if state.nodes.live[node] || state.nodes.status[node] == NodeStatus::Left {
            continue;
        }
        let down_at = down_at_ms(state, node);
        if down_at >= window_start {
            down_recent += 1;
            silent_recent += matches!(state.nodes.status[node], NodeStatus::Up | NodeStatus::Suspect) as u64;
            earliest = earliest.min(down_at);
        }
    }
    let share = down_recent * 1000 > config.mass_failure_share_permille as u64 * total;
    let partition = silent_recent >= 2.max(total / 10) && total >= 4;
    let brake = (share || partition) && down_recent > 1;
    if brake != state.gates.brake {
        state.gates.brake = brake;
        state.gates.capacity_freed = true;
    }
    state.gates.brake_until_ms = if brake { earliest + config.mass_failure_window_ms } else { u64::MAX };
    if brake {
        state.gates.next_open_ms = state.gates.next_open_ms.min(state.gates.brake_until_ms);
    }
}

/// Whether `node` went down within the brake window (its copies' repairs wait).
pub fn recently_down(state: &State, node: usize) -> bool {
    !state.nodes.live[node]
        && state.nodes.status[node] != NodeStatus::Left
        && down_at_ms(state, node) + state.reconcile.mass_failure_window_ms > state.now_ms
}

/// Marks nodes whose average RTT is far above the median of live nodes as avoided,
/// and clears the mark below the exit factor.
fn mark_slow_nodes(arena: &Bump, state: &mut State, out: &mut Out) {
    let mut averages: BumpVec<u32> = BumpVec::with_capacity_in(state.nodes.len(), arena);
    for node in 0..state.nodes.len() {
        let average = state.nodes.rtt_average_us[node];
        if average > 0 && state.nodes.live[node] {
            averages.push(average);
        }
    }
    if averages.len() < AVOID_NODES_MIN {
        return;
    }
    let middle = averages.len() / 2;
    let median = *averages.select_nth_unstable(middle).1 as u64;
    let config = state.reconcile;
    for node in 0..state.nodes.len() {
        let average = state.nodes.rtt_average_us[node] as u64;
        if average == 0 || !state.nodes.live[node] || out.full() {
            continue;
        }
        let avoid = state.nodes.avoid[node];
        let enter = !avoid && average * 1000 > median * config.avoid_enter_permille as u64;
        let leave = avoid && average * 1000 < median * config.avoid_exit_permille as u64;
        if enter || leave {
            state.nodes.avoid[node] = enter;
            out.emit(state, NodeRow::from_index(node), ActionKind::MarkAvoid { avoid: enter });
        }
    }
}

/// Tells saturated nodes to shed load (once, with hysteresis on the node's peak
/// daemon saturation).
pub(crate) fn heat(arena: &Bump, state: &mut State, out: &mut Out) {
    let mut peak = BumpVec::from_iter_in(std::iter::repeat_n(0u16, state.nodes.len()), arena);
    for row in 0..state.daemons.len() {
        let running = state.daemons.state[row].is_running() as u16;
        let node = state.daemons.node[row].index();
        peak[node] = peak[node].max(state.daemons.saturation_permille[row] * running);
    }
    for (node, &saturation) in peak.iter().enumerate() {
        let hot = state.nodes.hot[node];
        if !hot && saturation >= HOT_ENTER_PERMILLE && !out.full() {
            state.nodes.hot[node] = true;
            out.emit(state, NodeRow::from_index(node), ActionKind::ReduceHeat { permille: HEAT_TARGET_PERMILLE });
        } else if hot && saturation <= HOT_EXIT_PERMILLE {
            state.nodes.hot[node] = false;
        }
    }
}
