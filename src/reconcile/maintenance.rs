//! Maintenance nodes: the state machine Active -> EnteringMaintenance -> Maintenance
//! -> ExitingMaintenance -> Recovery -> Active, with DrainFailed when a drain misses
//! its deadline. Admin events (fold) move a node in and out; this pass moves it along:
//!
//! - EnteringMaintenance (and DrainFailed): the node is ineligible, so plans leave it
//!   and its copies are repaired elsewhere; non-essential daemons are stopped. Every
//!   pass counts what blocks the drain: counted copies on the node whose blob has
//!   fewer counted copies elsewhere than it needs (its intent, at least one), how many
//!   of those are moving, and non-essential daemons still running. Nothing left: the
//!   node is in Maintenance. The unsafe copies' bytes over the measured transfer rate
//!   (finished moves, EWMA in log time) give the expected time to safe. Past the deadline first: DrainFailed (which still turns
//!   into Maintenance if the drain completes later). A copy that does not count
//!   (corrupt, fenced, on a node that is not live) blocks nothing, and a gated,
//!   crash-looping daemon is not running, so neither holds a drain hostage.
//! - ExitingMaintenance: once the node is live, has published a capability newer than
//!   the one it had when maintenance began, runs every daemon wanted on it, each
//!   reporting healthy (or registered through the SDK, when its spec has no health
//!   check), and its round trips are measured again (fresh RTT samples on
//!   `rtt_stable_pairs` pairs, fewer with fewer live peers): Recovery.
//! - Recovery: after `recovery_ms` (the ramp-up window), Active; only then is it
//!   eligible for new copies again.
//!
//! Invariants: pure (log time only); every transition here is one step along the
//! machine; the drain counters are recomputed from the tables every pass, so both
//! scopes agree; no copy is dropped here (drops stay with the replica pass, which
//! never drops a last healthy copy).

use bumpalo::Bump;

use crate::event::ReplicaState;
use crate::state::daemons::DaemonState;
use crate::state::ids::{BlobRow, NodeRow, SpecRow};
use crate::state::nodes::MaintenanceState;
use crate::state::State;

/// Per pass, built once when some node drains: which blobs have a move in flight, and
/// how many non-essential daemons run on each node.
struct DrainScratch<'a> {
    moving: &'a [bool],
    daemons_left: &'a [u32],
}

fn drain_scratch<'a>(arena: &'a Bump, state: &State) -> DrainScratch<'a> {
    let moving: &mut [bool] = arena.alloc_slice_fill_copy(state.blobs.len(), false);
    for entry in state.inflight.entries.iter() {
        if let (true, Some(blob)) = (entry.action.kind.is_move(), entry.action.kind.blob()) {
            moving[blob.index()] = true;
        }
    }
    let daemons_left: &mut [u32] = arena.alloc_slice_fill_copy(state.nodes.len(), 0);
    let daemons = &state.daemons;
    for row in 0..daemons.len() {
        let counts = daemons.state[row].is_running() && !state.specs.spec[daemons.spec[row].index()].essential;
        daemons_left[daemons.node[row].index()] += counts as u32;
    }
    DrainScratch { moving, daemons_left }
}

pub(crate) fn run(arena: &Bump, state: &mut State) {
    let now_ms = state.now_ms;
    let draining = state.nodes.maintenance.iter().any(|maintenance| {
        matches!(maintenance, MaintenanceState::EnteringMaintenance | MaintenanceState::DrainFailed)
    });
    let scratch = draining.then(|| drain_scratch(arena, state));
    for node in 0..state.nodes.len() {
        match state.nodes.maintenance[node] {
            MaintenanceState::Active | MaintenanceState::Maintenance => {}
            MaintenanceState::EnteringMaintenance | MaintenanceState::DrainFailed => {
                drain(state, scratch.as_ref().expect("built when a node drains"), node, now_ms)
            }
            MaintenanceState::ExitingMaintenance => {
                let nodes = &state.nodes;
                let fresh = nodes.capability_version[node] > nodes.capability_version_at_enter[node];
                if nodes.live[node] && fresh && wanted_daemons_run(state, node) && rtt_measured_again(state, node) {
                    enter(state, node, MaintenanceState::Recovery, now_ms);
                }
            }
            MaintenanceState::Recovery => {
                if now_ms >= state.nodes.maintenance_since_ms[node].saturating_add(state.reconcile.recovery_ms) {
                    enter(state, node, MaintenanceState::Active, now_ms);
                }
            }
        }
    }
}

fn enter(state: &mut State, node: usize, next: MaintenanceState, now_ms: u64) {
    state.nodes.maintenance[node] = next;
    state.nodes.maintenance_since_ms[node] = now_ms;
    // Eligibility and wanted daemons change with the state.
    state.daemons_dirty = true;
    state.mark_node_blobs_dirty(NodeRow::from_index(node));
}

/// Recomputes what blocks the drain of `node` and moves it to Maintenance when nothing
/// does, or to DrainFailed past its deadline.
fn drain(state: &mut State, scratch: &DrainScratch, node: usize, now_ms: u64) {
    let mut unsafe_copies = 0u32;
    let mut moving_copies = 0u32;
    let mut unsafe_bytes = 0u64;
    for &row in &state.nodes.replica_rows[node] {
        let row = row.index();
        // The node's own healthy copies block even while it is down or fenced: its data
        // is what the drain must place elsewhere. Corrupt and deleted copies do not.
        if state.replicas.state[row] != ReplicaState::Healthy {
            continue;
        }
        let blob = state.replicas.blob[row];
        if safe_elsewhere(state, blob, node) < needed_copies(state, blob) {
            unsafe_copies += 1;
            unsafe_bytes = unsafe_bytes.saturating_add(state.blobs.size_bytes[blob.index()]);
            moving_copies += scratch.moving[blob.index()] as u32;
        }
    }
    let daemons_left = scratch.daemons_left[node];
    let eta_ms = time_to_safe_ms(state, unsafe_bytes);
    let nodes = &mut state.nodes;
    nodes.drain_unsafe_bytes[node] = unsafe_bytes;
    nodes.drain_eta_ms[node] = eta_ms;
    nodes.drain_unsafe_copies[node] = unsafe_copies;
    nodes.drain_moving_copies[node] = moving_copies;
    nodes.drain_daemons_left[node] = daemons_left;
    // A node that is not live cannot be judged drained: its state is not known.
    if unsafe_copies == 0 && daemons_left == 0 && nodes.live[node] {
        enter(state, node, MaintenanceState::Maintenance, now_ms);
    } else if nodes.maintenance[node] == MaintenanceState::EnteringMaintenance
        && now_ms >= nodes.drain_deadline_ms[node]
    {
        nodes.maintenance[node] = MaintenanceState::DrainFailed;
        nodes.maintenance_since_ms[node] = now_ms;
    }
}

/// Expected time until `unsafe_bytes` of a node's copies are safe elsewhere: the bytes
/// at the measured transfer rate, the node's copies leaving through at most
/// `pull_inflight_per_node_max` moves at a time (u64::MAX: no rate measured yet).
pub(crate) fn time_to_safe_ms(state: &State, unsafe_bytes: u64) -> u64 {
    let rate = state.gates.transfer_bytes_per_s.saturating_mul(state.reconcile.pull_inflight_per_node_max as u64);
    match (unsafe_bytes, rate) {
        (0, _) => 0,
        (_, 0) => u64::MAX,
        (bytes, rate) => bytes.saturating_mul(1000) / rate,
    }
}

/// Copies `blob` needs to be safe without a node: its intent, and at least one.
pub(crate) fn needed_copies(state: &State, blob: BlobRow) -> usize {
    (state.blobs.replicas_wanted[blob.index()] as usize).max(1)
}

/// Counted copies of `blob` that stay: on a node other than `node` that is not itself
/// draining or in maintenance (two nodes draining together must not each call the
/// other's copy safe).
pub(crate) fn safe_elsewhere(state: &State, blob: BlobRow, node: usize) -> usize {
    state.blobs.replica_rows[blob.index()]
        .iter()
        .filter(|other| {
            let other = other.index();
            let holder = state.replicas.node[other].index();
            holder != node && !state.nodes.maintenance[holder].is_away() && super::replicas::counted(state, other)
        })
        .count()
}

/// Whether the round trips of `node` are measured again since it began exiting: fresh
/// samples on `rtt_stable_pairs` pairs that involve it, or on as many as there are
/// live peers when fewer. Runs only for a node exiting maintenance (rare), so the scan
/// of the RTT pairs costs nothing in steady state.
fn rtt_measured_again(state: &State, node: usize) -> bool {
    let since_ms = state.nodes.maintenance_since_ms[node];
    let peers_live = state.nodes.live.iter().enumerate().filter(|&(row, &live)| live && row != node).count();
    let needed = (state.reconcile.rtt_stable_pairs as usize).min(peers_live);
    let rtt = &state.rtt;
    let involves = |row: usize| rtt.from[row].index() == node || rtt.to[row].index() == node;
    needed == 0 || (0..rtt.len()).filter(|&row| involves(row) && rtt.last_ms[row] > since_ms).count() >= needed
}

/// Whether every daemon wanted on `node` runs there and has shown it is up: it
/// reported healthy since it started, or (when its spec has no health check) it
/// registered through the SDK.
fn wanted_daemons_run(state: &State, node: usize) -> bool {
    (0..state.specs.len()).all(|spec| {
        !super::daemons::wanted_on(state, spec, node)
            || state.daemons.find(SpecRow::from_index(spec), NodeRow::from_index(node)).is_some_and(|row| {
                let row = row.index();
                let daemons = &state.daemons;
                let health_checked = state.specs.spec[spec].health_timeout_ms > 0;
                (daemons.state[row].is_running() && daemons.healthy[row])
                    || (!health_checked && daemons.state[row] == DaemonState::Registered)
            })
    })
}
