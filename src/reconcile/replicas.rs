//! Replica enforcement: count compliance against the plan, repairs from the nearest
//! healthy holder, drift correction by migration, verification of fenced or suspect
//! copies, drops of corrupt and (once the plan is stable) surplus copies.
//!
//! Invariants: a copy counts only if it is healthy, on a live node, and verified in
//! the node's current incarnation (rejoin fencing); a drop is emitted only when every
//! planned node holds a counted copy that has been healthy for the stabilisation
//! period, so the last healthy copy is never dropped; a pull or migration targets a
//! node of the current plan, which only holds eligible nodes; every emission checks
//! the gates in order (backoff, brake, backpressure, throttle, budgets) and records
//! the gate that held it.

use bumpalo::collections::Vec as BumpVec;
use bumpalo::Bump;
use smallvec::SmallVec;

use super::gates::Gate;
use super::{nodes, Out, Scope};
use crate::action::ActionKind;
use crate::event::ReplicaState;
use crate::locality;
use crate::placement::{self, Candidate};
use crate::state::blobs::PLAN_NODES_MAX;
use crate::state::ids::{BlobRow, NodeRow, ReplicaRow};
use crate::state::State;

/// Rendezvous epoch used for every plan: invalidating placement recomputes from the
/// current eligibility and weights; it does not reshuffle blobs.
pub(crate) const PLAN_EPOCH: u32 = 0;

pub(crate) fn run(arena: &Bump, state: &mut State, out: &mut Out, plan_scratch: &mut Vec<(f64, u32)>, scope: Scope) {
    let now_ms = state.now_ms;
    let gate_may_open = state.gates.capacity_freed || now_ms >= state.gates.next_open_ms;
    let mut blobs: BumpVec<BlobRow> = BumpVec::with_capacity_in(state.dirty_blobs.len(), arena);
    let touched: &mut [bool] = arena.alloc_slice_fill_copy(state.blobs.len(), false);
    for blob in state.dirty_blobs.drain(..) {
        state.blobs.dirty[blob.index()] = false;
        touched[blob.index()] = true;
        blobs.push(blob);
    }
    if gate_may_open {
        state.gates.next_open_ms = u64::MAX;
        if state.gates.brake {
            state.gates.next_open_ms = state.gates.brake_until_ms;
        }
    }
    if scope == Scope::Full {
        flag_all(arena, state, &mut blobs);
    } else if gate_may_open {
        for (blob, &waiting) in state.blobs.waiting.iter().enumerate() {
            if waiting {
                blobs.push(BlobRow::from_index(blob));
            }
        }
    }
    if blobs.is_empty() {
        return;
    }
    blobs.sort_unstable();
    blobs.dedup();
    let mut ordered = BumpVec::with_capacity_in(blobs.len(), arena);
    for &blob in blobs.iter() {
        ordered.push((priority(state, blob), blob));
    }
    ordered.sort_unstable();
    let candidates = nodes::candidates(arena, state);
    for &(_, blob) in ordered.iter() {
        let waiting = state.blobs.waiting[blob.index()];
        if !touched[blob.index()] && waiting && (!gate_may_open || still_held(state, blob)) {
            // Nothing about the blob changed and no gate can have opened for it (the
            // same rule in both scopes): evaluating it would hold it again. Keep the
            // hold and its timer.
            let until_ms = state.blobs.held_until_ms[blob.index()];
            if until_ms > 0 {
                state.gates.next_open_ms = state.gates.next_open_ms.min(until_ms);
            }
            continue;
        }
        evaluate(arena, state, out, blob, &candidates, plan_scratch);
    }
}

/// Whether a healthy copy of the blob sits on a node that went down within the brake
/// window (its repair is what the brake holds).
fn has_recent_loss(state: &State, blob: BlobRow) -> bool {
    state.blobs.replica_rows[blob.index()].iter().any(|row| {
        state.replicas.state[row.index()] == ReplicaState::Healthy
            && nodes::recently_down(state, state.replicas.node[row.index()].index())
    })
}

/// Whether the gate recorded on a waiting blob is still closed.
fn still_held(state: &State, blob: BlobRow) -> bool {
    let index = blob.index();
    let config = &state.reconcile;
    match Gate::from_code(state.blobs.held_by[index]) {
        Gate::MoveBudget => state.inflight.moves >= config.pull_inflight_max,
        Gate::Throttle => state.gates.window_moves >= config.throttle_moves_max,
        Gate::Backoff | Gate::Stabilisation => state.now_ms < state.blobs.held_until_ms[index],
        Gate::Brake => state.gates.brake && has_recent_loss(state, blob),
        Gate::Backpressure => state.gates.backpressure,
        Gate::DropBudget => state.inflight.drops >= config.drop_inflight_max,
        Gate::VerifyBudget => state.inflight.verifies >= config.verify_inflight_max,
        // Node budgets free only through settles, timeouts and cancels, which all set
        // `capacity_freed`.
        Gate::NodeBudget => !state.gates.capacity_freed,
        Gate::PassFull | Gate::NoSource | Gate::None => false,
    }
}

/// The full scan: one pass over the replica columns counts, per blob, the counted
/// copies on planned nodes and whether anything else needs a look; then one pass over
/// the blob columns flags the blobs that do.
fn flag_all(arena: &Bump, state: &State, flagged: &mut BumpVec<BlobRow>) {
    // Per blob, one byte: the counted copies on planned nodes in the low 7 bits (a plan
    // holds at most 8 nodes), "something else needs a look" in the high bit.
    const TROUBLE: u8 = 0x80;
    const _: () = assert!(PLAN_NODES_MAX < TROUBLE as usize);
    let blob_count = state.blobs.len();
    let tally: &mut [u8] = arena.alloc_slice_fill_copy(blob_count, 0u8);
    let replicas = &state.replicas;
    let (live, incarnation) = (&state.nodes.live, &state.nodes.incarnation);
    // Slices of one known length, so the column reads below need no bounds checks.
    let rows = replicas.len();
    let (blobs_of, nodes_of, states) = (&replicas.blob[..rows], &replicas.node[..rows], &replicas.state[..rows]);
    let verified_of = &replicas.verified_incarnation[..rows];
    let (planned_of, verify_of, drop_of) =
        (&replicas.planned[..rows], &replicas.verify_requested[..rows], &replicas.drop_requested[..rows]);
    let (mut current, mut count, mut flags) = (blobs_of.first().map_or(0, |blob| blob.index()), 0u8, 0u8);
    for row in 0..rows {
        let blob = blobs_of[row].index();
        let node = nodes_of[row].index();
        let replica_state = states[row];
        let healthy = replica_state == ReplicaState::Healthy;
        let node_live = live[node];
        let verified = verified_of[row] == incarnation[node];
        let counted = healthy & node_live & verified;
        let planned = planned_of[row];
        let trouble = (counted & !planned)
            | ((replica_state == ReplicaState::Corrupt) & node_live)
            | (healthy & node_live & !verified)
            | (counted & (verify_of[row] | drop_of[row]));
        // Copies of a blob are mostly adjacent rows: accumulate in a register and write
        // the byte back when the blob changes, instead of a read-modify-write per row.
        if blob != current {
            tally[current] = (tally[current] + count) | flags;
            (current, count, flags) = (blob, 0, 0);
        }
        count += (counted & planned) as u8;
        flags |= trouble as u8 * TROUBLE;
    }
    if rows > 0 {
        tally[current] = (tally[current] + count) | flags;
    }
    let blobs = &state.blobs;
    for (blob, &tallied) in tally.iter().enumerate() {
        let needs = !blobs.plan_valid[blob] | (tallied != blobs.plan_len[blob]) | blobs.waiting[blob];
        if needs & (blobs.replicas_wanted[blob] > 0) {
            flagged.push(BlobRow::from_index(blob));
        }
    }
}

/// One copy of a blob as evaluation sees it.
#[derive(Clone, Copy)]
struct Held {
    row: ReplicaRow,
    node: NodeRow,
    counted: bool,
    planned: bool,
}

pub(crate) fn counted(state: &State, row: usize) -> bool {
    let node = state.replicas.node[row].index();
    state.replicas.state[row] == ReplicaState::Healthy
        && state.nodes.live[node]
        && state.replicas.verified_incarnation[row] == state.nodes.incarnation[node]
}

/// 0 for a blob with fewer counted copies than wanted (repairs first), 1 otherwise.
fn priority(state: &State, blob: BlobRow) -> u8 {
    let counted_copies =
        state.blobs.replica_rows[blob.index()].iter().filter(|row| counted(state, row.index())).count();
    (counted_copies >= state.blobs.replicas_wanted[blob.index()] as usize) as u8
}

/// Records that `gate` holds the blob's next action until `until_ms` (0: until
/// capacity frees) and queues the blob to be looked at again then. The first gate of
/// a pass is the one shown; every gate that can open re-queues the blob (a blob with
/// no source is queued by fold when a copy reappears).
fn hold(state: &mut State, blob: BlobRow, gate: Gate, until_ms: u64) {
    let index = blob.index();
    if state.blobs.held_by[index] == Gate::None as u8 {
        state.blobs.held_by[index] = gate as u8;
        state.blobs.held_until_ms[index] = until_ms;
    }
    state.blobs.waiting[index] |= gate != Gate::NoSource;
    if gate == Gate::PassFull {
        // Nothing frees "room in the pass": look again at the very next pass.
        state.gates.next_open_ms = state.gates.next_open_ms.min(state.now_ms);
    }
    if until_ms > 0 {
        state.gates.next_open_ms = state.gates.next_open_ms.min(until_ms);
    }
}

/// Recomputes the blob's plan from the eligible candidates and refreshes the
/// `planned` flag of its copies. Copies an operator asked to drop keep their node out.
fn recompute_plan(
    arena: &Bump,
    state: &mut State,
    blob: BlobRow,
    candidates: &[Candidate],
    scratch: &mut Vec<(f64, u32)>,
) {
    let index = blob.index();
    let mut excluded: BumpVec<NodeRow> = BumpVec::new_in(arena);
    for &row in &state.blobs.replica_rows[index] {
        if state.replicas.drop_requested[row.index()] && state.replicas.state[row.index()] != ReplicaState::Deleted {
            excluded.push(state.replicas.node[row.index()]);
        }
    }
    let filtered;
    let pool: &[Candidate] = if excluded.is_empty() {
        candidates
    } else {
        filtered = BumpVec::from_iter_in(candidates.iter().copied().filter(|c| !excluded.contains(&c.node)), arena);
        &filtered
    };
    let pinned = BumpVec::from_iter_in(
        state.blobs.pinned[index]
            .iter()
            .copied()
            .filter(|node| state.nodes.eligible[node.index()] && !excluded.contains(node)),
        arena,
    );
    let wanted = state.blobs.replicas_wanted[index];
    let mut plan = SmallVec::new();
    let hash = state.blobs.hash[index];
    placement::plan(&hash, PLAN_EPOCH, wanted, state.blobs.zone_spread[index], &pinned, pool, scratch, &mut plan);
    debug_assert!(plan.len() <= PLAN_NODES_MAX && plan.iter().all(|node: &NodeRow| state.nodes.eligible[node.index()]));
    let floor = plan
        .iter()
        .map(|node: &NodeRow| {
            let node = node.index();
            let weight = nodes::placement_weight(state, node);
            placement::score(state.nodes.key[node], &hash, PLAN_EPOCH, weight)
        })
        .fold(f64::INFINITY, f64::min);
    state.blobs.plan_len[index] = plan.len() as u8;
    state.blobs.plan_floor[index] = if plan.is_empty() { f64::NEG_INFINITY } else { floor };
    for position in 0..state.blobs.replica_rows[index].len() {
        let row = state.blobs.replica_rows[index][position].index();
        state.replicas.planned[row] = plan.contains(&state.replicas.node[row]);
    }
    state.blobs.plan[index] = plan;
    state.blobs.plan_valid[index] = true;
}

/// Predicted RTT between two nodes from their network coordinates.
fn predicted_us(state: &State, a: NodeRow, b: NodeRow) -> f64 {
    locality::predict_us(&state.nodes.coordinate[a.index()], &state.nodes.coordinate[b.index()])
}

fn evaluate(
    arena: &Bump,
    state: &mut State,
    out: &mut Out,
    blob: BlobRow,
    candidates: &[Candidate],
    scratch: &mut Vec<(f64, u32)>,
) {
    let index = blob.index();
    state.blobs.waiting[index] = false;
    state.blobs.held_by[index] = Gate::None as u8;
    state.blobs.held_until_ms[index] = 0;
    let wanted = state.blobs.replicas_wanted[index] as usize;
    if wanted == 0 {
        return;
    }
    if !state.blobs.plan_valid[index] {
        recompute_plan(arena, state, blob, candidates, scratch);
    }
    let now_ms = state.now_ms;
    let config = state.reconcile;

    let mut copies: BumpVec<Held> = BumpVec::with_capacity_in(state.blobs.replica_rows[index].len(), arena);
    let mut lost_recently = false;
    for &row in &state.blobs.replica_rows[index] {
        let r = row.index();
        let node = state.replicas.node[r];
        let planned = state.blobs.plan[index].contains(&node);
        debug_assert_eq!(planned, state.replicas.planned[r], "planned flag out of step with the plan");
        // A copy with a drop in flight is as good as gone: it neither counts nor serves
        // as a source, so a second drop can never take the last copies.
        let dropping = state.inflight.contains(node, &ActionKind::DropReplica { blob });
        copies.push(Held { row, node, counted: counted(state, r) && !dropping, planned });
        let healthy = state.replicas.state[r] == ReplicaState::Healthy;
        lost_recently |= healthy && nodes::recently_down(state, node.index());
    }
    let counted_total = copies.iter().filter(|copy| copy.counted).count();

    // Corrupt copies on live nodes are worthless: drop them.
    for copy in copies.iter() {
        let r = copy.row.index();
        let live = state.nodes.live[copy.node.index()];
        if state.replicas.state[r] != ReplicaState::Corrupt || !live {
            continue;
        }
        emit_budgeted(state, out, blob, copy.node, ActionKind::DropReplica { blob });
    }

    // Fenced copies (their node came back) and copies the inventory digest disputes
    // are verified before they count (or keep counting).
    for copy in copies.iter() {
        let r = copy.row.index();
        let node = copy.node.index();
        let healthy_live = state.replicas.state[r] == ReplicaState::Healthy && state.nodes.live[node];
        let fenced = state.replicas.verified_incarnation[r] != state.nodes.incarnation[node];
        if !(healthy_live && (fenced || state.replicas.verify_requested[r])) {
            continue;
        }
        emit_budgeted(state, out, blob, copy.node, ActionKind::VerifyReplica { blob });
    }

    // Every planned node without a counted copy gets one: a repair while the blob is
    // under-replicated, otherwise a migration of an off-plan copy (drift correction).
    let plan = state.blobs.plan[index].clone();
    let repair = counted_total < wanted;
    let mut moves_started: SmallVec<[NodeRow; 8]> = SmallVec::new();
    for &target in plan.iter() {
        if copies.iter().any(|copy| copy.counted && copy.node == target) || state.inflight.move_into(blob, target) {
            continue;
        }
        // A healthy copy already on the (live) target waits for its verification
        // (rejoin fencing or a disputed inventory) instead of being fetched again.
        let pending_verification = copies.iter().any(|copy| {
            copy.node == target
                && state.replicas.state[copy.row.index()] == ReplicaState::Healthy
                && state.nodes.live[target.index()]
        });
        if pending_verification || state.inflight.contains(target, &ActionKind::DropReplica { blob }) {
            continue;
        }
        if counted_total == 0 {
            hold(state, blob, Gate::NoSource, 0);
            break;
        }
        if out.full() {
            hold(state, blob, Gate::PassFull, 0);
            break;
        }
        let gate = move_gate(state, blob, repair, lost_recently, target);
        let gate = match gate {
            Some((Gate::Brake, _)) => Some((Gate::Brake, brake_opens_ms(state, blob))),
            other => other,
        };
        if let Some((gate, until_ms)) = gate {
            if gate == Gate::Backoff && state.blobs.backoff_announced_ms[index] != until_ms && !out.full() {
                state.blobs.backoff_announced_ms[index] = until_ms;
                out.emit(state, target, ActionKind::ApplyBackoff { blob, until_ms });
            }
            hold(state, blob, gate, until_ms);
            break;
        }
        let migrating_from = |state: &State, node: NodeRow| {
            state.inflight.entries.iter().any(|entry| entry.action.kind == ActionKind::MigrateBlob { blob, from: node })
                || moves_started.contains(&node)
        };
        let off_plan = copies.iter().find(|copy| copy.counted && !copy.planned && !migrating_from(state, copy.node));
        let per_node_max = config.pull_inflight_per_node_max;
        let kind = match off_plan {
            Some(copy) if !repair && state.inflight.moves_at(copy.node) < per_node_max => {
                ActionKind::MigrateBlob { blob, from: copy.node }
            }
            _ => {
                let source = copies
                    .iter()
                    .filter(|copy| copy.counted && state.inflight.moves_at(copy.node) < per_node_max)
                    .min_by(|a, b| {
                        predicted_us(state, a.node, target)
                            .total_cmp(&predicted_us(state, b.node, target))
                            .then(a.node.cmp(&b.node))
                    })
                    .map(|copy| copy.node);
                match source {
                    Some(source) => ActionKind::PullReplica { blob, source },
                    None => {
                        hold(state, blob, Gate::NodeBudget, 0);
                        break;
                    }
                }
            }
        };
        if let ActionKind::MigrateBlob { from, .. } = kind {
            moves_started.push(from);
        }
        state.gates.window_moves += 1;
        out.emit(state, target, kind);
    }

    // Surplus and operator-dropped copies go only once every planned node holds a
    // counted copy that has been healthy for the stabilisation period.
    let plan_len = plan.len();
    if plan_len == 0
        || state
            .inflight
            .entries
            .iter()
            .any(|entry| entry.action.kind.is_move() && entry.action.kind.blob() == Some(blob))
    {
        return;
    }
    let mut stable_at_ms = 0u64;
    let mut satisfied = 0usize;
    for &target in plan.iter() {
        if let Some(copy) = copies.iter().find(|copy| copy.counted && copy.node == target) {
            satisfied += 1;
            stable_at_ms = stable_at_ms.max(state.replicas.since_ms[copy.row.index()] + config.stabilisation_ms);
        }
    }
    let surplus = copies.iter().filter(|copy| copy.counted && !copy.planned).count();
    if satisfied < plan_len || surplus == 0 {
        return;
    }
    if now_ms < stable_at_ms {
        hold(state, blob, Gate::Stabilisation, stable_at_ms);
        return;
    }
    let mut remaining = copies.iter().filter(|copy| copy.counted).count();
    for copy in copies.iter().filter(|copy| copy.counted && !copy.planned) {
        // A short plan (fewer eligible nodes than wanted) keeps extra copies up to the
        // intent, unless the operator wants this one gone (drop requested, draining,
        // maintenance): a cordoned or avoided node's copy still protects the blob.
        let node = copy.node.index();
        // A copy on a node draining or in maintenance goes once the drain would call it
        // safe (copies that stay elsewhere meet the intent), never before.
        let away_and_safe = state.nodes.maintenance[node].is_away()
            && super::maintenance::safe_elsewhere(state, blob, node) >= super::maintenance::needed_copies(state, blob);
        let wanted_gone =
            state.replicas.drop_requested[copy.row.index()] || state.nodes.draining[node] || away_and_safe;
        if !wanted_gone && remaining <= wanted {
            continue;
        }
        // Belt and braces: the plan is satisfied, so this always leaves copies.
        assert!(remaining > satisfied.max(1), "a drop would leave fewer copies than the plan");
        remaining -= 1;
        if !emit_budgeted(state, out, blob, copy.node, ActionKind::DropReplica { blob }) {
            break;
        }
    }
}

/// Emits a drop or a verification of `blob` on `node` unless the same is in flight;
/// holds the blob when the pass is full or the kind's budget is used up. Returns
/// false when held.
fn emit_budgeted(state: &mut State, out: &mut Out, blob: BlobRow, node: NodeRow, kind: ActionKind) -> bool {
    if state.inflight.contains(node, &kind) {
        return true;
    }
    let config = &state.reconcile;
    let (used, budget, gate) = match kind {
        ActionKind::DropReplica { .. } => (state.inflight.drops, config.drop_inflight_max, Gate::DropBudget),
        ActionKind::VerifyReplica { .. } => (state.inflight.verifies, config.verify_inflight_max, Gate::VerifyBudget),
        _ => unreachable!("only drops and verifications are budgeted here"),
    };
    if out.full() || used >= budget {
        hold(state, blob, if out.full() { Gate::PassFull } else { gate }, 0);
        return false;
    }
    out.emit(state, node, kind);
    true
}

/// When the brake stops holding this blob: its last lost copy leaves the window.
fn brake_opens_ms(state: &State, blob: BlobRow) -> u64 {
    state.blobs.replica_rows[blob.index()]
        .iter()
        .map(|row| state.replicas.node[row.index()].index())
        .filter(|&node| nodes::recently_down(state, node))
        .map(|node| nodes::down_at_ms(state, node) + state.reconcile.mass_failure_window_ms)
        .max()
        .unwrap_or(0)
}

/// The first gate that holds a move of `blob` into `target`, with when it opens.
fn move_gate(state: &State, blob: BlobRow, repair: bool, lost_recently: bool, target: NodeRow) -> Option<(Gate, u64)> {
    let config = state.reconcile;
    let index = blob.index();
    if state.now_ms < state.blobs.backoff_until_ms[index] {
        return Some((Gate::Backoff, state.blobs.backoff_until_ms[index]));
    }
    if state.gates.brake && lost_recently {
        return Some((Gate::Brake, 0));
    }
    if state.gates.backpressure && !repair {
        return Some((Gate::Backpressure, 0));
    }
    if state.gates.window_moves >= config.throttle_moves_max {
        return Some((Gate::Throttle, state.gates.window_start_ms + config.throttle_window_ms));
    }
    if state.inflight.moves >= config.pull_inflight_max {
        return Some((Gate::MoveBudget, 0));
    }
    if state.inflight.moves_at(target) >= config.pull_inflight_per_node_max {
        return Some((Gate::NodeBudget, 0));
    }
    None
}

/// Anti-entropy: looks at the next `verify_slice_replicas` rows (rotating) and
/// verifies counted copies not verified for `verify_interval_ms`.
pub(crate) fn anti_entropy(state: &mut State, out: &mut Out) {
    let rows = state.replicas.len();
    if rows == 0 {
        return;
    }
    let config = state.reconcile;
    let slice = (config.verify_slice_replicas as usize).min(rows);
    let mut cursor = state.gates.verify_cursor as usize % rows;
    for _ in 0..slice {
        let row = cursor;
        cursor = (cursor + 1) % rows;
        if state.inflight.verifies >= config.verify_inflight_max || out.full() {
            // Stop here, so the rows not looked at are the first of the next slice.
            cursor = row;
            break;
        }
        let due = state.now_ms.saturating_sub(state.replicas.verified_ms[row]) >= config.verify_interval_ms;
        if !due || !counted(state, row) {
            continue;
        }
        let node = state.replicas.node[row];
        let kind = ActionKind::VerifyReplica { blob: state.replicas.blob[row] };
        if !state.inflight.contains(node, &kind) {
            out.emit(state, node, kind);
        }
    }
    state.gates.verify_cursor = cursor as u32;
}
