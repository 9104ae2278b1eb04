//! Building a `Snapshot` from the state: one pass per table, into `Vec`s that keep
//! their capacity from one snapshot to the next (`Snapshot::fill_from`).
//!
//! Invariants: reads the state only; every list picked from a table stops at its
//! `SnapshotLimits` bound and counts the rest; the result passes `check_native_shape`
//! (asserted).

use crate::action::ACTION_KIND_NAMES;
use crate::config::SnapshotLimits;
use crate::event::ReplicaState;
use crate::reconcile::gates::{Gate, GATE_NAMES};
use crate::reconcile::maintenance::{needed_copies, safe_elsewhere};
use crate::reconcile::replicas::counted;
use crate::state::daemons::SpecPlacement;
use crate::state::ids::{BlobRow, Reserved};
use crate::state::nodes::MaintenanceState;
use crate::state::rejections::REJECT_REASON_NAMES;
use crate::state::State;

use super::shape::check_native_shape;
use super::*;

/// Maintenance state names by code (`MaintenanceState as u8`).
fn maintenance_names() -> [&'static str; 6] {
    let names = [
        MaintenanceState::Active,
        MaintenanceState::EnteringMaintenance,
        MaintenanceState::Maintenance,
        MaintenanceState::ExitingMaintenance,
        MaintenanceState::DrainFailed,
        MaintenanceState::Recovery,
    ]
    .map(|state| (state as usize, state.name()));
    debug_assert!(names.iter().enumerate().all(|(code, (state, _))| code == *state), "codes are dense from 0");
    names.map(|(_, name)| name)
}

fn refill_names(target: &mut Vec<String>, names: &[&str]) {
    target.clear();
    target.extend(names.iter().map(|name| name.to_string()));
}

impl Snapshot {
    /// The snapshot of `state`, written by `writer_node` (the write time is 0 until a
    /// writer sets it).
    pub fn from_state(state: &State, writer_node: &str, limits: &SnapshotLimits) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.fill_from(state, writer_node, limits);
        snapshot
    }

    /// Replaces this snapshot's contents with the snapshot of `state`, reusing its
    /// buffers.
    pub fn fill_from(&mut self, state: &State, writer_node: &str, limits: &SnapshotLimits) {
        self.format_version = FORMAT_VERSION;
        self.writer_node.clear();
        self.writer_node.push_str(writer_node);
        self.written_unix_ms = 0;
        self.position = state.position;
        self.log_time_ms = state.now_ms;
        self.events_applied = state.events_applied;
        self.state_hash = state.state_hash().to_le_bytes();
        self.fill_names();
        self.symbols.clear();
        self.symbols.extend(state.symbols.names.iter().map(|name| name.to_string()));
        self.fill_nodes(state);
        self.fill_blobs(state, limits);
        self.fill_daemons(state);
        self.fill_actions(state);
        self.fill_pending(state, limits);
        self.fill_gates(state);
        self.fill_failures(state, limits);
        self.fill_placement(state);
        self.fill_locality(state, limits);
        self.fill_drain_blockers(state, limits);
        if let Err(reason) = check_native_shape(self) {
            panic!("snapshot built out of shape: {reason}");
        }
    }

    fn fill_names(&mut self) {
        let names = &mut self.names;
        refill_names(&mut names.node_status, &NODE_STATUS_NAMES);
        refill_names(&mut names.maintenance, &maintenance_names());
        refill_names(&mut names.replica_state, &REPLICA_STATE_NAMES);
        refill_names(&mut names.daemon_state, &DAEMON_STATE_NAMES);
        refill_names(&mut names.spec_placement, &SPEC_PLACEMENT_NAMES);
        refill_names(&mut names.gate, &GATE_NAMES);
        refill_names(&mut names.action_kind, &ACTION_KIND_NAMES);
        refill_names(&mut names.reject_reason, &REJECT_REASON_NAMES);
        refill_names(&mut names.drift, &DRIFT_NAMES);
    }

    fn fill_nodes(&mut self, state: &State) {
        let from = &state.nodes;
        let to = &mut self.nodes;
        to.name.clear();
        to.name.extend(from.name.iter().map(|name| name.to_string()));
        copy(&mut to.status, from.status.iter().map(|status| *status as u8));
        copy(&mut to.status_since_ms, from.status_since_ms.iter().copied());
        copy(&mut to.live, from.live.iter().copied());
        copy(&mut to.eligible, from.eligible.iter().copied());
        copy(&mut to.last_heartbeat_ms, from.last_heartbeat_ms.iter().copied());
        copy(&mut to.incarnation, from.incarnation.iter().copied());
        copy(&mut to.load_permille, from.load_permille.iter().copied());
        copy(&mut to.hot, from.hot.iter().copied());
        copy(&mut to.avoid, from.avoid.iter().copied());
        copy(&mut to.cordoned, from.cordoned.iter().copied());
        copy(&mut to.draining, from.draining.iter().copied());
        copy(&mut to.backpressure, from.backpressure.iter().copied());
        copy(&mut to.maintenance, from.maintenance.iter().map(|maintenance| *maintenance as u8));
        copy(&mut to.maintenance_since_ms, from.maintenance_since_ms.iter().copied());
        copy(&mut to.drain_unsafe_copies, from.drain_unsafe_copies.iter().copied());
        copy(&mut to.drain_moving_copies, from.drain_moving_copies.iter().copied());
        copy(&mut to.drain_daemons_left, from.drain_daemons_left.iter().copied());
        copy(&mut to.drain_unsafe_bytes, from.drain_unsafe_bytes.iter().copied());
        copy(&mut to.drain_eta_ms, from.drain_eta_ms.iter().copied());
        copy(&mut to.drain_deadline_ms, from.drain_deadline_ms.iter().copied());
        copy(&mut to.capability_version, from.capability_version.iter().copied());
        copy(&mut to.capability_version_at_enter, from.capability_version_at_enter.iter().copied());
        copy(&mut to.zone, from.zone.iter().map(|zone| zone.0));
        copy(&mut to.capacity_bytes, from.capacity_bytes.iter().copied());
        to.label_start.clear();
        to.label.clear();
        to.label_start.push(0);
        for labels in &from.labels {
            to.label.extend(labels.iter().map(|label| label.0));
            to.label_start.push(to.label.len() as u32);
        }
        copy(&mut to.healthy_copies, from.healthy_copies.iter().copied());
        copy(&mut to.commitment_position, from.commitment_position.iter().copied());
        copy(&mut to.commitment_hash, from.commitment_hash.iter().copied());
        copy(&mut to.needs_position, from.needs_position.iter().copied());
        commitments_disagreeing(from, &mut to.commitment_disagrees);
        // The per-node move counters grow with the node table (one per node).
        copy(
            &mut to.moves_inflight,
            (0..from.len()).map(|node| state.inflight.moves_by_node.get(node).copied().unwrap_or(0)),
        );
        copy(&mut to.inventory_blob_count, from.inventory_blob_count.iter().copied());
        copy(&mut to.inventory_reported_ms, from.inventory_reported_ms.iter().copied());
    }

    fn fill_blobs(&mut self, state: &State, limits: &SnapshotLimits) {
        let from = &state.blobs;
        let to = &mut self.blobs;
        copy(&mut to.hash, from.hash.iter().copied());
        copy(&mut to.size_bytes, from.size_bytes.iter().copied());
        copy(&mut to.replicas_wanted, from.replicas_wanted.iter().copied());
        copy(&mut to.healthy_count, from.healthy_count.iter().copied());
        copy(&mut to.held_by, from.held_by.iter().copied());
        copy(&mut to.held_until_ms, from.held_until_ms.iter().copied());
        copy(&mut to.backoff_until_ms, from.backoff_until_ms.iter().copied());
        copy(&mut to.pull_failures, from.pull_failures.iter().copied());
        copy(&mut to.plan_valid, from.plan_valid.iter().copied());
        to.plan_start.clear();
        to.plan_node.clear();
        to.plan_start.push(0);
        for plan in &from.plan {
            to.plan_node.extend(plan.iter().map(|node| node.0));
            to.plan_start.push(to.plan_node.len() as u32);
        }
        to.holder_start.clear();
        to.holder_node.clear();
        to.holder_state.clear();
        to.holder_flags.clear();
        to.counted_copies.clear();
        to.drift.clear();
        to.holder_start.push(0);
        let drift = &mut self.drift;
        *drift = Drift { listed: std::mem::take(&mut drift.listed), ..Drift::default() };
        drift.listed.clear();
        let placement = &mut self.placement;
        placement.copies_off_plan = 0;
        placement.copies_pulling = 0;
        let replicas = &state.replicas;
        for blob in 0..from.len() {
            let mut counted_copies = 0u32;
            let mut off_plan = false;
            for &replica in &from.replica_rows[blob] {
                let replica = replica.index();
                let replica_state = replicas.state[replica];
                if replica_state == ReplicaState::Deleted {
                    continue;
                }
                let is_counted = counted(state, replica);
                let planned = replicas.planned[replica];
                counted_copies += is_counted as u32;
                if is_counted && !planned {
                    off_plan = true;
                    placement.copies_off_plan += 1;
                }
                placement.copies_pulling += (replica_state == ReplicaState::Pulling) as u32;
                let flags = (planned as u8 * HOLDER_PLANNED)
                    | (is_counted as u8 * HOLDER_COUNTED)
                    | (replicas.verify_requested[replica] as u8 * HOLDER_VERIFY_REQUESTED)
                    | (replicas.drop_requested[replica] as u8 * HOLDER_DROP_REQUESTED);
                to.holder_node.push(replicas.node[replica].0);
                to.holder_state.push(replica_state as u8);
                to.holder_flags.push(flags);
            }
            to.holder_start.push(to.holder_node.len() as u32);
            let wanted = from.replicas_wanted[blob] as u32;
            let code = if wanted == 0 {
                DRIFT_NONE
            } else if counted_copies < wanted {
                drift.blobs_under += 1;
                drift.copies_missing += (wanted - counted_copies) as u64;
                DRIFT_UNDER
            } else if counted_copies > wanted {
                drift.blobs_over += 1;
                drift.copies_surplus += (counted_copies - wanted) as u64;
                DRIFT_OVER
            } else if off_plan || !from.plan_valid[blob] {
                drift.blobs_off_plan += 1;
                DRIFT_OFF_PLAN
            } else {
                DRIFT_NONE
            };
            to.counted_copies.push(counted_copies);
            to.drift.push(code);
        }
        // Under-replicated blobs first (the ones at risk), then surplus, then off plan.
        let listed_max = limits.drift_listed_max as usize;
        for code in [DRIFT_UNDER, DRIFT_OVER, DRIFT_OFF_PLAN] {
            let room = listed_max - drift.listed.len();
            let rows = to.drift.iter().enumerate().filter(|(_, drift)| **drift == code).take(room);
            drift.listed.extend(rows.map(|(blob, _)| blob as u32));
        }
        debug_assert!(drift.listed.len() <= listed_max);
    }

    fn fill_daemons(&mut self, state: &State) {
        self.specs.clear();
        for spec in 0..state.specs.len() {
            let declared = &state.specs.spec[spec];
            let runs_on = match state.specs.runs_on[spec] {
                SpecPlacement::AllNodes => 0,
                SpecPlacement::Label(_) => 1,
                SpecPlacement::Nodes(_) => 2,
                SpecPlacement::Nowhere => 3,
            };
            self.specs.push(SpecView {
                name: declared.name.clone(),
                essential: declared.essential,
                health_timeout_ms: declared.health_timeout_ms,
                generation: state.specs.generation[spec],
                runs_on,
            });
        }
        let from = &state.daemons;
        self.daemons.clear();
        for daemon in 0..from.len() {
            self.daemons.push(DaemonView {
                spec: from.spec[daemon].0,
                node: from.node[daemon].0,
                state: from.state[daemon] as u8,
                state_since_ms: from.state_since_ms[daemon],
                pid: from.pid[daemon],
                healthy: from.healthy[daemon],
                last_health_ms: from.last_health_ms[daemon],
                saturation_permille: from.saturation_permille[daemon],
                starts: from.starts[daemon],
                crashes: from.crashes[daemon],
                last_exit: from.last_exit[daemon],
                backoff_ms: from.backoff_ms[daemon],
                start_after_ms: from.start_after_ms[daemon],
                recent_ends: from.recent_ends_ms[daemon].len() as u32,
                gated: from.gated[daemon],
            });
        }
    }

    fn fill_actions(&mut self, state: &State) {
        self.actions.clear();
        for entry in state.inflight.entries.iter() {
            let action = &entry.action;
            self.actions.push(ActionView {
                position: action.id.position,
                index: action.id.index,
                kind: action.kind.code(),
                node: action.node.0,
                blob: action.kind.blob().map_or(NONE, |blob| blob.0),
                peer: action.kind.peer().map_or(NONE, |node| node.0),
                spec: action.kind.daemon_spec().map_or(NONE, |spec| spec.0),
                emitted_ms: entry.emitted_ms,
                deadline_ms: entry.deadline_ms,
            });
        }
    }

    fn fill_pending(&mut self, state: &State, limits: &SnapshotLimits) {
        let pending = &mut self.pending;
        pending.blobs_held = 0;
        pending.blobs_held_by_gate.clear();
        pending.blobs_held_by_gate.resize(GATE_NAMES.len(), 0);
        pending.listed.clear();
        let blobs = &state.blobs;
        for blob in 0..blobs.len() {
            let gate = blobs.held_by[blob];
            if gate == Gate::None as u8 {
                continue;
            }
            pending.blobs_held += 1;
            assert!((gate as usize) < GATE_NAMES.len(), "blob {blob} held by unknown gate code {gate}");
            pending.blobs_held_by_gate[gate as usize] += 1;
            if pending.listed.len() < limits.pending_listed_max as usize {
                pending.listed.push(PendingBlob { blob: blob as u32, gate, opens_at_ms: blobs.held_until_ms[blob] });
            }
        }
        let daemons = &state.daemons;
        let waiting = |daemon: usize| !daemons.state[daemon].is_running();
        pending.daemons_backing_off = (0..daemons.len())
            .filter(|&daemon| {
                waiting(daemon) && !daemons.gated[daemon] && daemons.start_after_ms[daemon] > state.now_ms
            })
            .count() as u32;
        pending.daemons_gated =
            (0..daemons.len()).filter(|&daemon| waiting(daemon) && daemons.gated[daemon]).count() as u32;
    }

    fn fill_gates(&mut self, state: &State) {
        let (gates, config, inflight) = (&state.gates, &state.reconcile, &state.inflight);
        self.gates = GatesView {
            backpressure: gates.backpressure,
            backpressure_nodes: state.nodes.backpressure.iter().filter(|raised| **raised).count() as u32,
            brake: gates.brake,
            brake_until_ms: gates.brake_until_ms,
            window_start_ms: gates.window_start_ms,
            window_moves: gates.window_moves,
            throttle_window_ms: config.throttle_window_ms,
            throttle_moves_max: config.throttle_moves_max,
            moves_inflight: inflight.moves,
            pull_inflight_max: config.pull_inflight_max,
            pull_inflight_per_node_max: config.pull_inflight_per_node_max,
            verifies_inflight: inflight.verifies,
            verify_inflight_max: config.verify_inflight_max,
            drops_inflight: inflight.drops,
            drop_inflight_max: config.drop_inflight_max,
            daemon_actions_inflight: inflight.daemon_actions,
            daemon_inflight_max: config.daemon_inflight_max,
            next_open_ms: gates.next_open_ms,
            daemons_due_ms: gates.daemons_due_ms,
            transfer_bytes_per_s: gates.transfer_bytes_per_s,
            stabilisation_ms: config.stabilisation_ms,
            node_down_ms: config.node_down_ms,
            drain_deadline_ms: config.drain_deadline_ms,
            recovery_ms: config.recovery_ms,
            action_timeout_ms: config.action_timeout_ms,
        };
    }

    fn fill_failures(&mut self, state: &State, limits: &SnapshotLimits) {
        let (rejections, inflight) = (&state.rejections, &state.inflight);
        let failures = &mut self.failures;
        failures.rejected_total = rejections.total;
        copy(&mut failures.rejected_by_reason, rejections.by_reason.iter().copied());
        failures.actions_succeeded = inflight.succeeded;
        failures.actions_failed = inflight.failed;
        failures.actions_timed_out = inflight.timed_out;
        failures.actions_cancelled = inflight.cancelled;
        failures.recent.clear();
        let skip = rejections.kept.len().saturating_sub(limits.failures_listed_max as usize);
        for rejection in rejections.kept.iter().skip(skip) {
            failures.recent.push(FailureView {
                position: rejection.position,
                event_index: rejection.event_index,
                origin: rejection.origin.to_string(),
                origin_seq: rejection.origin_seq,
                kind: rejection.kind.to_string(),
                reason: rejection.reason.code() as u8,
                message: rejection.reason.to_string(),
            });
        }
    }

    /// After `fill_blobs` (which counts the copies off plan and pulling).
    fn fill_placement(&mut self, state: &State) {
        let blobs = &state.blobs;
        let placement = &mut self.placement;
        placement.placement_epoch = state.placement_epoch;
        placement.blobs_with_intent = blobs.replicas_wanted.iter().filter(|wanted| **wanted > 0).count() as u32;
        placement.plans_invalid =
            (0..blobs.len()).filter(|&blob| blobs.replicas_wanted[blob] > 0 && !blobs.plan_valid[blob]).count() as u32;
        placement.moves_inflight = state.inflight.moves;
        placement.nodes_eligible = state.nodes.eligible.iter().filter(|eligible| **eligible).count() as u32;
    }

    fn fill_locality(&mut self, state: &State, limits: &SnapshotLimits) {
        let nodes = &state.nodes;
        let to = &mut self.locality;
        copy(&mut to.coordinate_x_us, nodes.coordinate.iter().map(|coordinate| coordinate.x_us));
        copy(&mut to.coordinate_y_us, nodes.coordinate.iter().map(|coordinate| coordinate.y_us));
        copy(&mut to.coordinate_height_us, nodes.coordinate.iter().map(|coordinate| coordinate.height_us));
        copy(&mut to.coordinate_error, nodes.coordinate.iter().map(|coordinate| coordinate.error));
        copy(&mut to.rtt_average_us, nodes.rtt_average_us.iter().copied());
        let rtt = &state.rtt;
        to.rtt_pairs_total = rtt.len() as u32;
        let listed_max = limits.rtt_pairs_listed_max as usize;
        let rows: Vec<u32> = if rtt.len() <= listed_max {
            (0..rtt.len() as u32).collect()
        } else {
            // The most recently sampled pairs (ties: the later row), listed by row.
            let mut rows: Vec<u32> = (0..rtt.len() as u32).collect();
            if listed_max > 0 {
                let cut = rows.len() - listed_max;
                rows.select_nth_unstable_by_key(cut, |&pair| (rtt.last_ms[pair as usize], pair));
                rows.drain(..cut);
                rows.sort_unstable();
            } else {
                rows.clear();
            }
            rows
        };
        copy(&mut to.rtt_from, rows.iter().map(|&pair| rtt.from[pair as usize].0));
        copy(&mut to.rtt_to, rows.iter().map(|&pair| rtt.to[pair as usize].0));
        copy(&mut to.rtt_pair_average_us, rows.iter().map(|&pair| rtt.average_us[pair as usize]));
        copy(&mut to.rtt_last_us, rows.iter().map(|&pair| rtt.last_us[pair as usize]));
        copy(&mut to.rtt_samples, rows.iter().map(|&pair| rtt.samples[pair as usize]));
        copy(&mut to.rtt_last_ms, rows.iter().map(|&pair| rtt.last_ms[pair as usize]));
    }

    fn fill_drain_blockers(&mut self, state: &State, limits: &SnapshotLimits) {
        let blockers = &mut self.drain_blockers;
        blockers.total = 0;
        blockers.listed.clear();
        for node in 0..state.nodes.len() {
            if !matches!(
                state.nodes.maintenance[node],
                MaintenanceState::EnteringMaintenance | MaintenanceState::DrainFailed
            ) {
                continue;
            }
            // The same predicate as the drain in `reconcile::maintenance`: a healthy
            // copy of the node blocks until enough counted copies stay elsewhere.
            for &replica in &state.nodes.replica_rows[node] {
                let replica = replica.index();
                if state.replicas.state[replica] != ReplicaState::Healthy {
                    continue;
                }
                let blob = state.replicas.blob[replica];
                let (elsewhere, needed) = (safe_elsewhere(state, blob, node), needed_copies(state, blob));
                if elsewhere >= needed {
                    continue;
                }
                blockers.total += 1;
                if blockers.listed.len() < limits.drain_blockers_listed_max as usize {
                    blockers.listed.push(DrainBlocker {
                        node: node as u32,
                        blob: blob.0,
                        copies_elsewhere: elsewhere as u32,
                        copies_needed: needed as u32,
                        moving: move_in_flight(&state.inflight.entries, blob),
                    });
                }
            }
        }
    }
}

fn move_in_flight(entries: &Reserved<crate::state::inflight::InflightAction>, blob: BlobRow) -> bool {
    entries.iter().any(|entry| entry.action.kind.is_move() && entry.action.kind.blob() == Some(blob))
}

/// Replaces `target`'s contents with `values`, keeping its capacity.
fn copy<T>(target: &mut Vec<T>, values: impl Iterator<Item = T>) {
    target.clear();
    target.extend(values);
}

/// For every node, true when its committed hash differs from one that a strict
/// majority (at least two) of the nodes committed at the same position holds. A tie,
/// or nodes still arriving at the position, flags nobody. One sort, not a scan of
/// every node per node and candidate (cubic in the nodes).
pub fn commitments_disagreeing(nodes: &crate::state::nodes::NodeTable, out: &mut Vec<bool>) {
    copy(out, std::iter::repeat_n(false, nodes.len()));
    let key = |row: usize| (nodes.commitment_position[row], nodes.commitment_hash[row]);
    let mut order: Vec<usize> = (0..nodes.len()).filter(|&row| nodes.commitment_position[row] != 0).collect();
    order.sort_unstable_by_key(|&row| key(row));
    for group in order.chunk_by(|&a, &b| nodes.commitment_position[a] == nodes.commitment_position[b]) {
        let reporting = group.len();
        let majority = group
            .chunk_by(|&a, &b| key(a) == key(b))
            .find(|run| run.len() >= 2 && run.len() * 2 > reporting)
            .map(|run| nodes.commitment_hash[run[0]]);
        if let Some(majority) = majority {
            for &row in group {
                out[row] = nodes.commitment_hash[row] != majority;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::nodes::NodeTable;

    fn table(commitments: &[(u64, u8)]) -> NodeTable {
        let mut nodes = NodeTable::default();
        for (index, &(position, hash)) in commitments.iter().enumerate() {
            let row = nodes.insert(&format!("node-{index}"), 1, 0).index();
            nodes.commitment_position[row] = position;
            nodes.commitment_hash[row] = [hash; 16];
        }
        nodes
    }

    fn flags(nodes: &NodeTable) -> Vec<bool> {
        let mut out = Vec::new();
        commitments_disagreeing(nodes, &mut out);
        out
    }

    #[test]
    fn a_node_against_a_strict_majority_at_its_position_disagrees() {
        let nodes = table(&[(100, 1), (100, 1), (100, 1), (100, 2), (0, 0), (200, 3), (200, 4)]);
        assert_eq!(flags(&nodes), [false, false, false, true, false, false, false]);
        // A tie flags nobody; a majority of one is none.
        assert_eq!(flags(&table(&[(5, 1), (5, 1), (5, 2), (5, 2)])), [false; 4]);
        assert_eq!(flags(&table(&[(5, 1), (5, 2)])), [false; 2]);
    }

    #[test]
    fn thousands_of_nodes_cost_little() {
        let nodes = table(&vec![(100, 7); 3000]);
        let started = std::time::Instant::now();
        assert!(flags(&nodes).iter().all(|disagrees| !disagrees));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
    }
}
