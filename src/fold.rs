//! Fold: apply one log record to the state. Pure: no I/O, no clock, no randomness,
//! no `Result`; the record's commit time is the only time.
//!
//! Invariants: records are folded in position order with no gap (asserted); an
//! event is either applied whole or rejected whole into `state.rejections` with a
//! reason naming what is wrong; nothing in an event can panic fold; an origin's
//! sequence numbers must strictly increase (a replayed duplicate is rejected);
//! only a heartbeat or a capability update from a node introduces that node; an
//! admin event applies only signed by a key of the cluster keyring (see `admin`);
//! every growing table checks its row limit first. Hot path (replica updates): three
//! hash lookups and no allocation.

use rkyv::rancor;

use crate::event::{
    AdminCommand, ArchivedCapability, ArchivedDaemonPlacement, ArchivedDaemonSignal, ArchivedEvent, ArchivedEventKind,
    ArchivedNodeHealth, ArchivedNodeStatus, ArchivedOutcome, ArchivedPlacementIntent, ArchivedReplicaState, BlobHash,
    DaemonSpec, NodeStatus, ReplicaState,
};
use crate::state::daemons::{DaemonState, SpecPlacement};
use crate::state::ids::{NodeRow, SymbolId};
use crate::state::keyring::{key_prefix_hex, PublicKey};
use crate::state::nodes::MaintenanceState;
use crate::state::rejections::{RejectReason, Rejection};
use crate::state::State;
use crate::trust::{self, Section, Sender, SignerKind};
use crate::wire;

type Applied = Result<(), RejectReason>;

/// Which sections of a record a verifier ahead of fold already found validly signed
/// (bit `i`: section `i`; sections past 63 are always verified in fold). A pure
/// function of the payload and the cluster id (`verified_sections`), so it changes
/// how fast fold runs, never what it decides.
pub type VerifiedSections = u64;

/// Verifies every section's signature of `payload` for `cluster_id` (what fold would
/// check), for a verifier running ahead of fold on another thread.
pub fn verified_sections(payload: &[u8], cluster_id: &crate::trust::ClusterId) -> VerifiedSections {
    let mut verified = 0;
    for (index, section) in trust::sections(payload).enumerate().take(64) {
        match section {
            Ok(section) if trust::record::verify(&section, cluster_id) => verified |= 1 << index,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    verified
}

/// Folds `payload` (signed sections, see `trust::record`) as record `position`
/// committed at `time_ms`, verifying every signature here.
pub fn fold_payload(state: &mut State, position: u64, time_ms: u64, payload: &[u8]) {
    fold_payload_verified(state, position, time_ms, payload, 0)
}

/// `fold_payload` with the sections a verifier already checked (`verified`).
pub fn fold_payload_verified(
    state: &mut State,
    position: u64,
    time_ms: u64,
    payload: &[u8],
    verified: VerifiedSections,
) {
    // An empty payload has nothing to align (and an empty buffer's pointer need not be
    // aligned: copying it would recurse forever).
    if !payload.is_empty() && !(payload.as_ptr() as usize).is_multiple_of(wire::ALIGN_BYTES) {
        // Validity must depend on the bytes, never on where they sit in memory.
        let mut aligned = rkyv::util::AlignedVec::<{ wire::ALIGN_BYTES }>::with_capacity(payload.len());
        aligned.extend_from_slice(payload);
        return fold_payload_verified(state, position, time_ms, &aligned, verified);
    }
    begin_record(state, position, time_ms);
    state.keyring.prune_window(state.now_ms);
    for (index, section) in trust::sections(payload).enumerate() {
        match section {
            Ok(section) => fold_section(state, position, &section, index < 64 && verified & (1 << index) != 0),
            Err(error) => {
                let reason = RejectReason::BadSection { code: error.reason_code(), offset: error_offset(&error) };
                reject_whole(state, position, "", "record", reason);
            }
        }
    }
}

fn error_offset(error: &trust::SectionError) -> u32 {
    use trust::SectionError::*;
    let offset = match error {
        Empty => 0,
        Truncated { offset, .. }
        | BadMagic { offset }
        | BadVersion { offset, .. }
        | BadKind { offset, .. }
        | BadName { offset, .. }
        | BadPadding { offset } => *offset,
    };
    offset.min(u32::MAX as usize) as u32
}

/// One rejection for a whole section or record (`event_index` u32::MAX).
fn reject_whole(state: &mut State, position: u64, signer: &str, kind: &'static str, reason: RejectReason) {
    state.rejections.push(Rejection {
        position,
        event_index: u32::MAX,
        origin: truncated(signer, state.limits.name_bytes_max),
        origin_seq: 0,
        kind,
        reason,
    });
}

/// Whether the section's signer may sign in this cluster now: the node's admitted
/// key, or an operator key of the keyring within its validity and not replayed.
/// Cheap checks first; the signature last (unless already verified).
fn admit_section(state: &State, section: &Section<'_>, verified: bool) -> Applied {
    let name = || truncated(section.name, state.limits.name_bytes_max);
    match section.kind {
        SignerKind::Unsigned => return Err(RejectReason::UnsignedSection),
        SignerKind::Node => {
            if !state.keyring.node_key_is(section.name, &section.key) {
                return Err(match state.keyring.identity(section.name) {
                    None => RejectReason::NodeNotAdmitted(name()),
                    Some(row) if state.keyring.identity_revoked[row] => RejectReason::NodeRevoked(name()),
                    Some(_) => RejectReason::WrongNodeKey { node: name(), key: key_prefix_hex(&section.key).into() },
                });
            }
        }
        SignerKind::Operator => {
            if !state.keyring.contains(&section.key) {
                return Err(if state.keyring.version == 0 {
                    RejectReason::NoGenesis
                } else {
                    RejectReason::UnknownAdminKey(key_prefix_hex(&section.key).into())
                });
            }
            let now_ms = state.now_ms;
            if section.expires_ms < now_ms {
                return Err(RejectReason::OperatorExpired { expires_ms: section.expires_ms, now_ms });
            }
            if section.expires_ms - now_ms > state.limits.operator_validity_max_ms {
                return Err(RejectReason::OperatorValidityTooLong { expires_ms: section.expires_ms, now_ms });
            }
            if state.keyring.operator_window.contains(&(section.expires_ms, section.nonce)) {
                return Err(RejectReason::OperatorReplayed { expires_ms: section.expires_ms });
            }
            if state.keyring.operator_window.len() >= state.limits.operator_nonces_max as usize {
                return Err(RejectReason::TableFull("operator replay window"));
            }
        }
    }
    if !verified && !trust::record::verify(section, &state.keyring.cluster_id) {
        return Err(RejectReason::BadSignature { signer: name(), key: key_prefix_hex(&section.key).into() });
    }
    Ok(())
}

/// Folds one section: its signer admitted, then each event if that signer may send it.
fn fold_section(state: &mut State, position: u64, section: &Section<'_>, verified: bool) {
    if let Err(reason) = admit_section(state, section, verified) {
        return reject_whole(state, position, section.name, "section", reason);
    }
    let batch = match wire::access_batch(section.body) {
        Ok(batch) => batch,
        Err(_) => {
            let reason = RejectReason::BadPayload { payload_bytes: section.body.len().min(u32::MAX as usize) as u32 };
            return reject_whole(state, position, section.name, "section", reason);
        }
    };
    let operator = section.kind == SignerKind::Operator;
    if operator {
        // Consumed once admitted, whatever becomes of its events: a copy is a replay.
        state.keyring.operator_window.insert((section.expires_ms, section.nonce));
    }
    for (index, event) in batch.events.iter().enumerate() {
        let applied = match (operator, trust::sender_of(&event.kind)) {
            (true, Sender::Operator) => apply_operator_event(state, &event.kind),
            (false, Sender::Node) if event.origin.as_str() == section.name => apply_event(state, event),
            (false, Sender::Node) => Err(RejectReason::OriginNotSigner {
                origin: truncated(event.origin.as_str(), state.limits.name_bytes_max),
                signer: truncated(section.name, state.limits.name_bytes_max),
            }),
            (false, Sender::Operator) => Err(RejectReason::OperatorOnly(event.kind.name())),
            (true, Sender::Node) => Err(RejectReason::NodeOnly(event.kind.name())),
        };
        match applied {
            Ok(()) => state.events_applied += 1,
            Err(reason) => state.rejections.push(Rejection {
                position,
                event_index: index as u32,
                origin: truncated(
                    if operator { section.name } else { event.origin.as_str() },
                    state.limits.name_bytes_max,
                ),
                origin_seq: if operator { 0 } else { event.origin_seq.to_native() },
                kind: event.kind.name(),
                reason,
            }),
        }
    }
}

/// An operator intent from an admitted operator section.
fn apply_operator_event(state: &mut State, kind: &ArchivedEventKind) -> Applied {
    match kind {
        ArchivedEventKind::Admin(command) => admin(state, command),
        ArchivedEventKind::PlacementIntent(intent) => placement_intent(state, intent),
        ArchivedEventKind::DaemonIntent { spec, runs_on } => daemon_intent(state, spec, runs_on),
        _ => unreachable!("only operator intents reach here (trust::sender_of)"),
    }
}

fn begin_record(state: &mut State, position: u64, time_ms: u64) {
    assert_eq!(position, state.position + 1, "records must be folded in order, without gaps");
    state.position = position;
    state.now_ms = state.now_ms.max(time_ms);
}

fn truncated(text: &str, bytes_max: u32) -> Box<str> {
    let mut end = text.len().min(bytes_max as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].into()
}

fn check_name(name: &str, state: &State) -> Applied {
    let max = state.limits.name_bytes_max;
    if name.is_empty() || name.len() > max as usize {
        return Err(RejectReason::BadName { bytes: name.len() as u32, max });
    }
    Ok(())
}

fn find_node(state: &State, name: &str) -> Result<NodeRow, RejectReason> {
    state.nodes.find(name).ok_or_else(|| RejectReason::UnknownNode(truncated(name, state.limits.name_bytes_max)))
}

fn find_blob(state: &State, hash: &BlobHash) -> Result<crate::state::ids::BlobRow, RejectReason> {
    state.blobs.find(hash).ok_or(RejectReason::UnknownBlob(*hash))
}

fn apply_event(state: &mut State, event: &ArchivedEvent) -> Applied {
    let origin_name = event.origin.as_str();
    let origin_seq = event.origin_seq.to_native();
    let known = state.nodes.find(origin_name);
    // 0 before the node joined: its first number must be within the step too.
    let last = known.map_or(0, |row| state.nodes.origin_seq_last[row.index()]);
    if known.is_some() && origin_seq <= last {
        return Err(RejectReason::StaleOriginSeq { last, got: origin_seq });
    }
    if origin_seq.saturating_sub(last) > state.limits.origin_seq_step_max {
        return Err(RejectReason::OriginSeqJump { last, got: origin_seq, step_max: state.limits.origin_seq_step_max });
    }
    let origin = match (known, &event.kind) {
        (Some(row), _) => row,
        (None, ArchivedEventKind::NodeHealth(ArchivedNodeHealth::Heartbeat { .. })) => {
            join(state, origin_name, origin_seq)?
        }
        (None, ArchivedEventKind::Capability(capability)) => {
            check_capability(state, 0, capability)?;
            join(state, origin_name, origin_seq)?
        }
        (None, _) => return Err(RejectReason::UnknownOrigin(truncated(origin_name, state.limits.name_bytes_max))),
    };
    match &event.kind {
        ArchivedEventKind::ReplicaUpdate { blob, state: replica_state } => {
            replica_update(state, origin, blob, *replica_state)
        }
        ArchivedEventKind::Daemon { daemon, signal } => daemon_signal(state, origin, daemon.as_str(), signal),
        ArchivedEventKind::Rtt { peer, rtt_us } => rtt_sample(state, origin, peer.as_str(), rtt_us.to_native()),
        ArchivedEventKind::NodeHealth(health) => node_health(state, origin, health),
        ArchivedEventKind::BlobAnnounce { blob, size_bytes } => {
            blob_announce(state, origin, blob, size_bytes.to_native())
        }
        ArchivedEventKind::Capability(capability) => apply_capability(state, origin, capability),
        ArchivedEventKind::ActionOutcome { action, outcome } => {
            action_outcome(state, origin, action.to_native(), outcome)
        }
        ArchivedEventKind::InventoryDigest { blob_count, digest } => {
            inventory_digest(state, origin, blob_count.to_native(), *digest);
            Ok(())
        }
        ArchivedEventKind::Backpressure { raised } => {
            state.nodes.backpressure[origin.index()] = *raised;
            Ok(())
        }
        ArchivedEventKind::Commitment { position, state_hash, needs_position } => {
            commitment(state, origin, position.to_native(), *state_hash, needs_position.to_native())
        }
        ArchivedEventKind::Admin(_)
        | ArchivedEventKind::PlacementIntent(_)
        | ArchivedEventKind::DaemonIntent { .. } => {
            unreachable!("operator intents never reach a node's events (trust::sender_of)")
        }
    }?;
    state.nodes.origin_seq_last[origin.index()] = origin_seq;
    Ok(())
}

/// A node's state commitment: kept only if it moves forward and names a position the
/// log has reached (a hash of the future is not a commitment).
fn commitment(state: &mut State, origin: NodeRow, position: u64, hash: [u8; 16], needs_position: u64) -> Applied {
    let index = origin.index();
    let last = state.nodes.commitment_position[index];
    if position <= last || position > state.position || needs_position > position.saturating_add(1) {
        return Err(RejectReason::BadCommitment { position, last, log_position: state.position });
    }
    state.nodes.commitment_position[index] = position;
    state.nodes.commitment_hash[index] = hash;
    state.nodes.needs_position[index] = needs_position;
    Ok(())
}

/// An executor reports how an action ended: it leaves the in-flight table and its
/// effects apply (a cancellation frees capacity and backs nothing off).
fn action_outcome(
    state: &mut State,
    origin: NodeRow,
    id: crate::event::ActionId,
    outcome: &ArchivedOutcome,
) -> Applied {
    let index = state.inflight.index_of(id).ok_or(RejectReason::UnknownAction(id))?;
    // Only the node the action was addressed to reports how it ended.
    if state.inflight.entries[index].action.node != origin {
        return Err(RejectReason::NotYourAction(id));
    }
    if let ArchivedOutcome::Cancelled { .. } = outcome {
        let cancelled = state.inflight.cancel_at(index);
        cancel_effects(state, &cancelled.action);
        return Ok(());
    }
    let success = matches!(outcome, ArchivedOutcome::Success);
    let settled = state.inflight.settle_at(index, success);
    if success && settled.action.kind.is_move() {
        measure_transfer(state, &settled);
    }
    settle_effects(state, &settled.action, success);
    Ok(())
}

/// Folds one finished move into the measured transfer rate (an EWMA over moves, in
/// bytes per second of log time), which drains use for their time-to-safe.
fn measure_transfer(state: &mut State, settled: &crate::state::inflight::InflightAction) {
    let Some(blob) = settled.action.kind.blob() else { return };
    let duration_ms = state.now_ms.saturating_sub(settled.emitted_ms).max(1);
    let sample = state.blobs.size_bytes[blob.index()].saturating_mul(1000) / duration_ms;
    let rate = &mut state.gates.transfer_bytes_per_s;
    *rate = if *rate == 0 { sample } else { *rate - (*rate >> 3) + (sample >> 3) };
}

/// What an action's end changes beyond the in-flight table: capacity frees, the blob
/// is looked at again, a failed move backs the blob off (doubling, capped). A
/// cancelled action (its node went away) frees capacity without backing off.
pub fn cancel_effects(state: &mut State, action: &crate::action::Action) {
    state.gates.capacity_freed = true;
    state.daemons_dirty |= action.kind.is_daemon();
    if let Some(blob) = action.kind.blob() {
        state.mark_blob_dirty(blob);
    }
}

/// See `cancel_effects`; this is the outcome (or timeout) path.
pub fn settle_effects(state: &mut State, action: &crate::action::Action, success: bool) {
    state.gates.capacity_freed = true;
    if action.kind.is_daemon() {
        state.daemons_dirty = true;
    }
    if let (crate::action::ActionKind::StartDaemon { spec }, false) = (action.kind, success) {
        // A start that failed (the command cannot run) is an unplanned end of a run of
        // no length: backoff and the crash-loop gate apply, so a bad spec is retried
        // ever more slowly and then gated instead of being retried on every pass.
        let now_ms = state.now_ms;
        let row = match state.daemons.find(spec, action.node) {
            Some(row) => Some(row),
            None if state.daemons.len() < state.limits.daemons_max as usize => {
                let row = state.daemons.insert_started(spec, action.node, 0, now_ms);
                state.daemons.set_state(row, crate::state::daemons::DaemonState::Exited, now_ms);
                Some(row)
            }
            None => None,
        };
        if let Some(row) = row.filter(|row| !state.daemons.state[row.index()].is_running()) {
            let policy = state.specs.spec[spec.index()].restart;
            state.daemons.started_ms[row.index()] = now_ms;
            state.daemons.record_unplanned_end(row, &policy, now_ms);
        }
    }
    if let crate::action::ActionKind::RestartDaemon { spec } = action.kind {
        // A health restart is an unplanned end: backoff and the crash-loop window; and
        // health is awaited afresh from now (the new run's `Started` may come later).
        if let Some(row) = state.daemons.find(spec, action.node) {
            let policy = state.specs.spec[spec.index()].restart;
            state.daemons.record_unplanned_end(row, &policy, state.now_ms);
            let index = row.index();
            state.daemons.started_ms[index] = state.daemons.started_ms[index].max(state.now_ms);
        }
    }
    let Some(blob) = action.kind.blob() else { return };
    let index = blob.index();
    if action.kind.is_move() {
        if success {
            state.blobs.pull_failures[index] = 0;
        } else {
            let failures = state.blobs.pull_failures[index].saturating_add(1);
            state.blobs.pull_failures[index] = failures;
            let config = &state.reconcile;
            let backoff_ms = config.pull_backoff_base_ms.saturating_mul(1u64 << (failures - 1).min(40));
            state.blobs.backoff_until_ms[index] = state.now_ms + backoff_ms.min(config.pull_backoff_max_ms);
        }
    }
    state.mark_blob_dirty(blob);
}

/// Adds (or removes) a healthy copy of `hash` to the log's view of `node`'s inventory.
fn count_inventory(state: &mut State, node: NodeRow, hash: &BlobHash, add: bool) {
    let index = node.index();
    let part = u128::from_le_bytes(hash[..16].try_into().expect("16 bytes"));
    let (copies, digest) = (&mut state.nodes.healthy_copies[index], &mut state.nodes.healthy_digest[index]);
    if add {
        *copies += 1;
        *digest = digest.wrapping_add(part);
    } else {
        *copies -= 1;
        *digest = digest.wrapping_sub(part);
    }
}

/// Records a node's inventory digest; when it disagrees with the log's view (the count
/// and wrapping sum of the first 16 bytes of the hashes of its healthy copies, kept
/// incrementally), every healthy copy on the node is queued for verification.
fn inventory_digest(state: &mut State, node: NodeRow, blob_count: u32, digest: [u8; 16]) {
    let index = node.index();
    state.nodes.inventory_blob_count[index] = blob_count;
    state.nodes.inventory_digest[index] = digest;
    state.nodes.inventory_reported_ms[index] = state.now_ms;
    if state.nodes.healthy_copies[index] == blob_count && state.nodes.healthy_digest[index].to_le_bytes() == digest {
        return;
    }
    for position in 0..state.nodes.replica_rows[index].len() {
        let row = state.nodes.replica_rows[index][position];
        if state.replicas.state[row.index()] == ReplicaState::Healthy {
            state.replicas.verify_requested[row.index()] = true;
            let blob = state.replicas.blob[row.index()];
            state.mark_blob_dirty(blob);
        }
    }
}

/// Interns a node announcing itself.
fn join(state: &mut State, name: &str, origin_seq: u64) -> Result<NodeRow, RejectReason> {
    check_name(name, state)?;
    if state.nodes.len() >= state.limits.nodes_max as usize {
        return Err(RejectReason::TableFull("node"));
    }
    state.inflight.add_node();
    Ok(state.nodes.insert(name, origin_seq, state.now_ms))
}

fn native_replica_state(state: ArchivedReplicaState) -> ReplicaState {
    match state {
        ArchivedReplicaState::Pulling => ReplicaState::Pulling,
        ArchivedReplicaState::Healthy => ReplicaState::Healthy,
        ArchivedReplicaState::Corrupt => ReplicaState::Corrupt,
        ArchivedReplicaState::Deleted => ReplicaState::Deleted,
    }
}

fn native_node_status(status: ArchivedNodeStatus) -> NodeStatus {
    match status {
        ArchivedNodeStatus::Up => NodeStatus::Up,
        ArchivedNodeStatus::Suspect => NodeStatus::Suspect,
        ArchivedNodeStatus::Down => NodeStatus::Down,
        ArchivedNodeStatus::Left => NodeStatus::Left,
    }
}

fn replica_update(state: &mut State, node: NodeRow, hash: &BlobHash, reported: ArchivedReplicaState) -> Applied {
    let blob = find_blob(state, hash)?;
    let next = native_replica_state(reported);
    let now_ms = state.now_ms;
    let incarnation = state.nodes.incarnation[node.index()];
    let replicas = &mut state.replicas;
    let Some(row) = replicas.find(blob, node) else {
        if next == ReplicaState::Deleted {
            return Err(RejectReason::UnknownReplica { blob: *hash });
        }
        if replicas.len() >= state.limits.replicas_max as usize {
            return Err(RejectReason::TableFull("replica"));
        }
        let row = replicas.insert(blob, node, next, incarnation, now_ms);
        let planned = state.blobs.plan_valid[blob.index()] && state.blobs.plan[blob.index()].contains(&node);
        replicas.planned[row.index()] = planned;
        state.blobs.replica_rows[blob.index()].push(row);
        state.nodes.replica_rows[node.index()].push(row);
        state.blobs.healthy_count[blob.index()] += (next == ReplicaState::Healthy) as u32;
        if next == ReplicaState::Healthy {
            count_inventory(state, node, hash, true);
        }
        state.mark_blob_dirty(blob);
        return Ok(());
    };
    let index = row.index();
    let previous = replicas.state[index];
    if next == ReplicaState::Healthy {
        // A healthy report is a verification: it lifts rejoin fencing and resets the
        // anti-entropy clock, even when the state itself does not change.
        replicas.verified_incarnation[index] = incarnation;
        replicas.verified_ms[index] = now_ms;
        replicas.verify_requested[index] = false;
    }
    if previous != next {
        replicas.state[index] = next;
        replicas.since_ms[index] = now_ms;
        let was_deleted = (previous == ReplicaState::Deleted) as u32;
        let is_deleted = (next == ReplicaState::Deleted) as u32;
        replicas.live = replicas.live + was_deleted - is_deleted;
        let healthy = &mut state.blobs.healthy_count[blob.index()];
        *healthy = *healthy + (next == ReplicaState::Healthy) as u32 - (previous == ReplicaState::Healthy) as u32;
        if (next == ReplicaState::Healthy) != (previous == ReplicaState::Healthy) {
            count_inventory(state, node, hash, next == ReplicaState::Healthy);
        }
    }
    state.mark_blob_dirty(blob);
    Ok(())
}

fn daemon_signal(state: &mut State, node: NodeRow, name: &str, signal: &ArchivedDaemonSignal) -> Applied {
    apply_daemon_signal(state, node, name, signal)?;
    // Lifecycle changes what should run; a health report moves the health deadline of
    // a spec that has one (the pass recomputes `gates.daemons_due_ms`); saturation
    // changes nothing here (heat reads it every pass).
    let dirty = match signal {
        ArchivedDaemonSignal::Saturation { .. } => false,
        ArchivedDaemonSignal::Health { .. } => {
            state.specs.find(name).is_some_and(|spec| state.specs.spec[spec.index()].health_timeout_ms > 0)
        }
        _ => true,
    };
    state.daemons_dirty |= dirty;
    Ok(())
}

fn apply_daemon_signal(state: &mut State, node: NodeRow, name: &str, signal: &ArchivedDaemonSignal) -> Applied {
    let unknown = || RejectReason::UnknownDaemon(truncated(name, state.limits.name_bytes_max));
    let spec = state.specs.find(name).ok_or_else(unknown)?;
    let row = state.daemons.find(spec, node);
    let now_ms = state.now_ms;
    let daemons = &mut state.daemons;
    if let ArchivedDaemonSignal::Started { pid } = signal {
        let pid = pid.to_native();
        let Some(row) = row else {
            if daemons.len() >= state.limits.daemons_max as usize {
                return Err(RejectReason::TableFull("daemon"));
            }
            daemons.insert_started(spec, node, pid, now_ms);
            return Ok(());
        };
        let index = row.index();
        if daemons.state[index].is_running() {
            return Err(RejectReason::DaemonAlreadyRunning(name.into()));
        }
        daemons.set_state(row, DaemonState::Started, now_ms);
        daemons.pid[index] = pid;
        daemons.started_ms[index] = now_ms;
        daemons.starts[index] = daemons.starts[index].saturating_add(1);
        daemons.healthy[index] = false;
        daemons.saturation_permille[index] = 0;
        return Ok(());
    }
    let row = row
        .filter(|row| daemons.state[row.index()].is_running())
        .ok_or_else(|| RejectReason::DaemonNotRunning(name.into()))?;
    let index = row.index();
    match signal {
        ArchivedDaemonSignal::Started { .. } => unreachable!("handled above"),
        ArchivedDaemonSignal::Registered { pid } => {
            let reported = pid.to_native();
            if reported != daemons.pid[index] {
                return Err(RejectReason::PidMismatch { daemon: name.into(), running: daemons.pid[index], reported });
            }
            if daemons.state[index] != DaemonState::Registered {
                daemons.set_state(row, DaemonState::Registered, now_ms);
            }
        }
        ArchivedDaemonSignal::Exited { code } => {
            daemons.set_state(row, DaemonState::Exited, now_ms);
            daemons.last_exit[index] = code.to_native();
            daemons.healthy[index] = false;
            // A daemon that ends by itself is restarted like a crashed one (it is still
            // wanted), with the same backoff and crash-loop count; not so the end of a
            // stop this node was asked for (SIGTERM may end in an exit or a signal).
            if !stop_in_flight(&state.inflight, node, spec) {
                let policy = state.specs.spec[spec.index()].restart;
                daemons.record_unplanned_end(row, &policy, now_ms);
            }
        }
        ArchivedDaemonSignal::Crashed { signal } => {
            daemons.set_state(row, DaemonState::Crashed, now_ms);
            daemons.last_exit[index] = signal.to_native();
            daemons.crashes[index] = daemons.crashes[index].saturating_add(1);
            daemons.healthy[index] = false;
            if !stop_in_flight(&state.inflight, node, spec) {
                let policy = state.specs.spec[spec.index()].restart;
                daemons.record_unplanned_end(row, &policy, now_ms);
            }
        }
        ArchivedDaemonSignal::Stopped => {
            daemons.set_state(row, DaemonState::Stopped, now_ms);
            daemons.healthy[index] = false;
        }
        ArchivedDaemonSignal::Health { healthy } => {
            daemons.healthy[index] = *healthy;
            daemons.last_health_ms[index] = now_ms;
        }
        ArchivedDaemonSignal::Saturation { permille } => {
            daemons.saturation_permille[index] = permille.to_native().min(1000);
        }
    }
    Ok(())
}

/// Whether the end of `spec` on `node` was asked for: a stop, or the stop half of a
/// restart (whose settling records the unplanned end itself).
fn stop_in_flight(
    inflight: &crate::state::inflight::InflightTable,
    node: NodeRow,
    spec: crate::state::ids::SpecRow,
) -> bool {
    use crate::action::ActionKind;
    inflight.contains(node, &ActionKind::StopDaemon { spec })
        || inflight.contains(node, &ActionKind::RestartDaemon { spec })
}

fn rtt_sample(state: &mut State, from: NodeRow, peer: &str, rtt_us: u32) -> Applied {
    let to = find_node(state, peer)?;
    if to == from {
        return Err(RejectReason::RttToSelf);
    }
    let now_ms = state.now_ms;
    // The measuring node moves its own coordinate toward what the sample says.
    let remote = state.nodes.coordinate[to.index()];
    let vivaldi = crate::locality::VivaldiConfig::default();
    crate::locality::update(&mut state.nodes.coordinate[from.index()], from.0, &remote, to.0, rtt_us as f64, &vivaldi);
    let shift = state.limits.rtt_ewma_shift;
    for node in [from, to] {
        let average = &mut state.nodes.rtt_average_us[node.index()];
        *average = if *average == 0 {
            rtt_us
        } else {
            (*average as i64 + ((rtt_us as i64 - *average as i64) >> shift)) as u32
        };
    }
    match state.rtt.find(from, to) {
        Some(row) => state.rtt.record(row, rtt_us, state.limits.rtt_ewma_shift, now_ms),
        None => {
            if state.rtt.len() >= state.limits.rtt_pairs_max as usize {
                return Err(RejectReason::TableFull("rtt pair"));
            }
            state.rtt.insert(from, to, rtt_us, now_ms);
        }
    }
    Ok(())
}

/// Sets a node's status. A node back from Down or Left, or heard from again after a
/// silence longer than `node_down_ms`, starts a new incarnation: its copies stop
/// counting until each is verified again (rejoin fencing).
fn set_status(state: &mut State, node: NodeRow, status: NodeStatus, silent_return: bool) {
    let index = node.index();
    let previous = state.nodes.status[index];
    let returns =
        status == NodeStatus::Up && (matches!(previous, NodeStatus::Down | NodeStatus::Left) || silent_return);
    if returns {
        state.nodes.incarnation[index] = state.nodes.incarnation[index].saturating_add(1);
    }
    if previous != status {
        state.nodes.status[index] = status;
        state.nodes.status_since_ms[index] = state.now_ms;
    }
    if returns {
        // The node's copies are fenced now: look at its blobs again. (Liveness changes
        // without a new incarnation are seen by reconcile's node refresh, which marks
        // the node's blobs itself.)
        state.mark_node_blobs_dirty(node);
    }
    state.daemons_dirty |= returns || previous != status;
}

fn node_health(state: &mut State, origin: NodeRow, health: &ArchivedNodeHealth) -> Applied {
    match health {
        ArchivedNodeHealth::Heartbeat { load_permille } => {
            let index = origin.index();
            let silent_ms = state.now_ms.saturating_sub(state.nodes.last_heartbeat_ms[index]);
            let silent_return = silent_ms > state.reconcile.node_down_ms;
            state.nodes.last_heartbeat_ms[index] = state.now_ms;
            state.nodes.load_permille[index] = load_permille.to_native().min(1000);
            set_status(state, origin, NodeStatus::Up, silent_return);
        }
        ArchivedNodeHealth::Status { node, status } => {
            // A node speaks for itself only; others' status comes from their silence
            // (liveness) or from an operator (`remove-node`).
            let node = find_node(state, node.as_str())?;
            if node != origin {
                return Err(RejectReason::StatusOfAnotherNode(truncated(
                    state.nodes.name[node.index()].as_ref(),
                    state.limits.name_bytes_max,
                )));
            }
            set_status(state, node, native_node_status(*status), false);
        }
    }
    Ok(())
}

/// The target rows of a command aimed at one node, or at every node when `None`.
fn node_or_all(state: &State, node: Option<&str>) -> Result<std::ops::Range<usize>, RejectReason> {
    match node {
        Some(name) => {
            let row = find_node(state, name)?;
            Ok(row.index()..row.index() + 1)
        }
        None => Ok(0..state.nodes.len()),
    }
}

/// An operator's command (its section's signer and replay window were checked). The
/// archived command is deserialized to native (admin events are rare control-plane
/// input); it applies whole or not at all.
fn admin(state: &mut State, command: &rkyv::boxed::ArchivedBox<crate::event::ArchivedAdminCommand>) -> Applied {
    let command: AdminCommand = rkyv::deserialize::<AdminCommand, rancor::Error>(command.get())
        .map_err(|_| RejectReason::InvalidIntent("admin command does not deserialize"))?;
    apply_admin(state, &command)
}

/// A key rotation (or the genesis): checks the version and the key list, then installs it.
fn set_keyring(state: &mut State, version: u64, keys: &[PublicKey]) -> Applied {
    let current = state.keyring.version;
    if version != current.wrapping_add(1) {
        return Err(RejectReason::StaleKeyringVersion { current, got: version });
    }
    if keys.is_empty() {
        return Err(RejectReason::InvalidKeyring("no keys"));
    }
    if keys.len() > state.limits.keyring_keys_max as usize {
        return Err(RejectReason::InvalidKeyring("more keys than keyring_keys_max"));
    }
    if keys.iter().enumerate().any(|(index, key)| keys[..index].contains(key)) {
        return Err(RejectReason::InvalidKeyring("a key appears twice"));
    }
    if !keys.iter().all(crate::admin::is_public_key) {
        return Err(RejectReason::InvalidKeyring("a key is not an ed25519 public key"));
    }
    state.keyring.install(version, keys);
    Ok(())
}

/// Admits a node's key: a valid name and key, a key no other node holds, room.
fn admit_node(state: &mut State, name: &str, key: &PublicKey) -> Applied {
    trust::check_node_name(name)
        .map_err(|_| RejectReason::BadNodeName(truncated(name, state.limits.name_bytes_max)))?;
    if !trust::is_public_key(key) {
        return Err(RejectReason::InvalidKeyring("a node key is not an ed25519 public key"));
    }
    let holder = (0..state.keyring.identities()).find(|&row| &state.keyring.identity_key[row] == key);
    if holder.is_some_and(|row| state.keyring.identity_name[row].as_ref() != name) {
        return Err(RejectReason::InvalidKeyring("another node was admitted with this key"));
    }
    if state.keyring.identity(name).is_none() && state.keyring.identities() >= state.limits.nodes_max as usize {
        return Err(RejectReason::TableFull("identity"));
    }
    state.keyring.admit(name, key);
    Ok(())
}

fn apply_admin(state: &mut State, command: &AdminCommand) -> Applied {
    match command {
        // The keyring is not a node role: nothing for reconcile to look at again.
        AdminCommand::SetKeyring { version, keys } => return set_keyring(state, *version, keys),
        AdminCommand::AdmitNode { name, key } => return admit_node(state, name, key),
        AdminCommand::RemoveNode { name } => {
            if !state.keyring.revoke(name) {
                return Err(RejectReason::NodeNotAdmitted(truncated(name, state.limits.name_bytes_max)));
            }
            if let Some(node) = state.nodes.find(name) {
                set_status(state, node, NodeStatus::Left, false);
            }
        }
        AdminCommand::EnterMaintenance { node } => {
            let index = find_node(state, node.as_str())?.index();
            let now_ms = state.now_ms;
            let nodes = &mut state.nodes;
            match nodes.maintenance[index] {
                // Already on its way in, in, or failed to drain: nothing new (idempotent).
                MaintenanceState::EnteringMaintenance
                | MaintenanceState::Maintenance
                | MaintenanceState::DrainFailed => {}
                MaintenanceState::Active | MaintenanceState::ExitingMaintenance | MaintenanceState::Recovery => {
                    nodes.maintenance[index] = MaintenanceState::EnteringMaintenance;
                    nodes.maintenance_since_ms[index] = now_ms;
                    nodes.drain_deadline_ms[index] = now_ms.saturating_add(state.reconcile.drain_deadline_ms);
                    nodes.capability_version_at_enter[index] = nodes.capability_version[index];
                    state.daemons_dirty = true;
                    state.mark_node_blobs_dirty(NodeRow::from_index(index));
                    // No new copies land there: moves into it already in flight stop.
                    while let Some(cancelled) = state.inflight.cancel_first_move_into(NodeRow::from_index(index)) {
                        cancel_effects(state, &cancelled.action);
                    }
                }
            }
        }
        AdminCommand::ExitMaintenance { node } => {
            let index = find_node(state, node.as_str())?.index();
            let now_ms = state.now_ms;
            match state.nodes.maintenance[index] {
                MaintenanceState::Active => return Err(RejectReason::NotInMaintenance(node.as_str().into())),
                MaintenanceState::EnteringMaintenance
                | MaintenanceState::Maintenance
                | MaintenanceState::DrainFailed => {
                    state.nodes.maintenance[index] = MaintenanceState::ExitingMaintenance;
                    state.nodes.maintenance_since_ms[index] = now_ms;
                    state.daemons_dirty = true;
                }
                MaintenanceState::ExitingMaintenance | MaintenanceState::Recovery => {}
            }
        }
        AdminCommand::Drain { node } => {
            let index = find_node(state, node.as_str())?.index();
            state.nodes.cordoned[index] = true;
            state.nodes.draining[index] = true;
        }
        AdminCommand::Cordon { node } => {
            let index = find_node(state, node.as_str())?.index();
            state.nodes.cordoned[index] = true;
        }
        AdminCommand::Uncordon { node } => {
            let index = find_node(state, node.as_str())?.index();
            state.nodes.cordoned[index] = false;
            state.nodes.draining[index] = false;
        }
        AdminCommand::RestartAllDaemons { node } => {
            let rows = node_or_all(state, node.as_ref().map(|name| name.as_str()))?;
            for generation in &mut state.nodes.restart_generation[rows.clone()] {
                *generation = generation.wrapping_add(1);
            }
            // The operator's restart opens crash-loop gates and forgets restart history.
            let now_ms = state.now_ms;
            for daemon in 0..state.daemons.len() {
                if rows.contains(&state.daemons.node[daemon].index()) {
                    state.daemons.clear_restart_history(crate::state::ids::DaemonRow::from_index(daemon), now_ms);
                }
            }
            state.daemons_dirty = true;
        }
        AdminCommand::ClearAvoid { node } => {
            let rows = node_or_all(state, node.as_ref().map(|name| name.as_str()))?;
            state.nodes.avoid[rows].fill(false);
        }
        AdminCommand::DropReplicas { node, blob } => {
            let target = find_node(state, node.as_str())?;
            match blob.as_ref() {
                Some(hash) => {
                    let blob = find_blob(state, hash)?;
                    let row = state.replicas.find(blob, target).ok_or(RejectReason::UnknownReplica { blob: *hash })?;
                    // Refused where it would remove the last healthy copy; the node-wide
                    // form only marks, and reconcile never drops a last healthy copy.
                    let healthy = state.replicas.state[row.index()] == ReplicaState::Healthy;
                    if healthy && state.blobs.healthy_count[blob.index()] <= 1 {
                        return Err(RejectReason::WouldDropLastCopy { blob: *hash });
                    }
                    state.replicas.drop_requested[row.index()] = true;
                    state.blobs.plan_valid[blob.index()] = false;
                    state.mark_blob_dirty(blob);
                }
                None => {
                    for &row in &state.nodes.replica_rows[target.index()] {
                        state.replicas.drop_requested[row.index()] = true;
                        state.blobs.plan_valid[state.replicas.blob[row.index()].index()] = false;
                    }
                    state.mark_node_blobs_dirty(target);
                }
            }
        }
        AdminCommand::InvalidatePlacement { blob } => match blob.as_ref() {
            Some(hash) => {
                let blob = find_blob(state, hash)?;
                let epoch = &mut state.blobs.placement_epoch[blob.index()];
                *epoch = epoch.wrapping_add(1);
                state.blobs.plan_valid[blob.index()] = false;
                state.mark_blob_dirty(blob);
            }
            None => {
                state.placement_epoch = state.placement_epoch.wrapping_add(1);
                for index in 0..state.blobs.len() {
                    state.blobs.plan_valid[index] = false;
                    state.mark_blob_dirty(crate::state::ids::BlobRow::from_index(index));
                }
            }
        },
    }
    // Node roles changed: daemons (drain, restart) and eligibility are looked at again.
    state.daemons_dirty = true;
    Ok(())
}

fn blob_announce(state: &mut State, origin: NodeRow, hash: &BlobHash, size_bytes: u64) -> Applied {
    if let Some(blob) = state.blobs.find(hash) {
        let known_bytes = state.blobs.size_bytes[blob.index()];
        if known_bytes != size_bytes {
            return Err(RejectReason::BlobSizeMismatch { blob: *hash, known_bytes, announced_bytes: size_bytes });
        }
        return Ok(());
    }
    if state.blobs.len() >= state.limits.blobs_max as usize {
        return Err(RejectReason::TableFull("blob"));
    }
    state.blobs.insert(*hash, size_bytes, origin, state.now_ms);
    // Room for every blob to be dirty at once: reconcile never grows this list.
    let room = state.blobs.len().saturating_sub(state.dirty_blobs.len());
    state.dirty_blobs.reserve(room);
    Ok(())
}

fn placement_intent(state: &mut State, intent: &ArchivedPlacementIntent) -> Applied {
    let blob = find_blob(state, &intent.blob)?;
    if intent.replicas as usize > crate::state::blobs::PLAN_NODES_MAX {
        return Err(RejectReason::InvalidIntent("more replicas than PLAN_NODES_MAX (8)"));
    }
    if intent.pinned.len() > intent.replicas as usize {
        return Err(RejectReason::InvalidIntent("more pinned nodes than replicas"));
    }
    let mut pinned = smallvec::SmallVec::new();
    for name in intent.pinned.iter() {
        let node = find_node(state, name.as_str())?;
        if pinned.contains(&node) {
            return Err(RejectReason::InvalidIntent("a node is pinned twice"));
        }
        pinned.push(node);
    }
    let index = blob.index();
    state.blobs.replicas_wanted[index] = intent.replicas;
    state.blobs.zone_spread[index] = intent.zone_spread;
    state.blobs.pinned[index] = pinned;
    state.blobs.intent_ms[index] = state.now_ms;
    state.blobs.plan_valid[index] = false;
    state.mark_blob_dirty(blob);
    Ok(())
}

fn daemon_intent(
    state: &mut State,
    spec: &crate::event::ArchivedDaemonSpec,
    runs_on: &ArchivedDaemonPlacement,
) -> Applied {
    check_name(spec.name.as_str(), state)?;
    let name = spec.name.as_str();
    // The name is a directory on every node (DATA_DIR/daemons/NAME).
    if name.contains(['/', '\0']) || name == "." || name == ".." {
        return Err(RejectReason::InvalidIntent("daemon name must not contain '/' or NUL, nor be . or .."));
    }
    let removal = matches!(runs_on, ArchivedDaemonPlacement::Nowhere);
    if let (true, Some(row)) = (removal, state.specs.find(name)) {
        // A removal names the daemon only: the declared spec (its stop grace above all)
        // stays, and running daemons are not told to reload.
        state.specs.runs_on[row.index()] = SpecPlacement::Nowhere;
        state.specs.intent_ms[row.index()] = state.now_ms;
        state.daemons_dirty = true;
        return Ok(());
    }
    let restart = &spec.restart;
    if !removal && spec.command.is_empty() {
        return Err(RejectReason::InvalidIntent("daemon command is empty"));
    }
    let spec_bytes = spec.command.len()
        + spec.working_dir.len()
        + spec.args.iter().map(|arg| arg.len()).sum::<usize>()
        + spec.env.iter().map(|var| var.key.len() + var.value.len()).sum::<usize>();
    if spec_bytes > state.limits.daemon_spec_bytes_max as usize {
        return Err(RejectReason::InvalidIntent("daemon spec larger than daemon_spec_bytes_max"));
    }
    if restart.backoff_base_ms == 0 || restart.backoff_max_ms < restart.backoff_base_ms {
        return Err(RejectReason::InvalidIntent("restart backoff needs 0 < base <= max"));
    }
    if restart.crash_loop_limit == 0 || restart.crash_loop_window_ms == 0 {
        return Err(RejectReason::InvalidIntent("crash-loop limit and window must be above 0"));
    }
    if state.specs.find(spec.name.as_str()).is_none() && state.specs.len() >= state.limits.daemon_specs_max as usize {
        return Err(RejectReason::TableFull("daemon spec"));
    }
    let spec = rkyv::deserialize::<DaemonSpec, rancor::Error>(spec)
        .map_err(|_| RejectReason::InvalidIntent("daemon spec does not deserialize"))?;
    let placement = match runs_on {
        ArchivedDaemonPlacement::AllNodes => SpecPlacement::AllNodes,
        ArchivedDaemonPlacement::Nowhere => SpecPlacement::Nowhere,
        ArchivedDaemonPlacement::Nodes(names) => {
            let mut rows = smallvec::SmallVec::new();
            for name in names.iter() {
                let row = find_node(state, name.as_str())?;
                if !rows.contains(&row) {
                    rows.push(row);
                }
            }
            SpecPlacement::Nodes(rows)
        }
        ArchivedDaemonPlacement::Label(label) => {
            check_name(label.as_str(), state)?;
            check_symbols_room(state, state.symbols.find(label.as_str()).is_none() as usize)?;
            SpecPlacement::Label(state.symbols.intern(label.as_str()))
        }
    };
    state.specs.upsert(spec, placement, state.now_ms);
    state.daemons_dirty = true;
    Ok(())
}

/// Everything that can reject a capability update, checked before any change (a
/// node's first capability is checked before the node is interned).
fn check_capability(state: &State, current: u64, capability: &ArchivedCapability) -> Applied {
    let version = capability.version.to_native();
    let fork_of = capability.fork_of.to_native();
    if fork_of != current || version <= current {
        return Err(RejectReason::CapabilityForkMismatch { current, fork_of, version });
    }
    let zone = capability.zone.as_str();
    if !zone.is_empty() {
        check_name(zone, state)?;
    }
    if capability.endpoint.len() > state.limits.name_bytes_max as usize {
        return Err(RejectReason::InvalidIntent("capability endpoint longer than name_bytes_max"));
    }
    let labels_max = state.limits.labels_per_node_max;
    if capability.labels.len() > labels_max as usize {
        return Err(RejectReason::InvalidIntent("more capability labels than labels_per_node_max"));
    }
    let mut new_symbols = (!zone.is_empty() && state.symbols.find(zone).is_none()) as usize;
    for label in capability.labels.iter() {
        check_name(label.as_str(), state)?;
        new_symbols += state.symbols.find(label.as_str()).is_none() as usize;
    }
    check_symbols_room(state, new_symbols)
}

/// Whether `capability` is the node's current one again: its version, zone, capacity,
/// labels (in order) and endpoint, all equal.
fn is_current_capability(state: &State, node: NodeRow, capability: &ArchivedCapability) -> bool {
    let index = node.index();
    let nodes = &state.nodes;
    let version = capability.version.to_native();
    let symbol_is = |name: &str, symbol: SymbolId| {
        if name.is_empty() {
            symbol == SymbolId::NONE
        } else {
            state.symbols.find(name) == Some(symbol)
        }
    };
    version != 0
        && version == nodes.capability_version[index]
        && capability.capacity_bytes.to_native() == nodes.capacity_bytes[index]
        && capability.endpoint.as_str() == &*nodes.endpoint[index]
        && symbol_is(capability.zone.as_str(), nodes.zone[index])
        && capability.labels.len() == nodes.labels[index].len()
        && capability
            .labels
            .iter()
            .zip(nodes.labels[index].iter())
            .all(|(label, &symbol)| symbol_is(label.as_str(), symbol))
}

/// Rejects when interning `new_symbols` more names would pass `symbols_max`.
fn check_symbols_room(state: &State, new_symbols: usize) -> Applied {
    if state.symbols.names.len() + new_symbols > state.limits.symbols_max as usize {
        return Err(RejectReason::TableFull("symbol"));
    }
    Ok(())
}

fn apply_capability(state: &mut State, node: NodeRow, capability: &ArchivedCapability) -> Applied {
    let index = node.index();
    if is_current_capability(state, node, capability) {
        // The node published its current capability again (a publication it resent
        // while the first was delayed, as across a NATS failover): nothing changes.
        return Ok(());
    }
    check_capability(state, state.nodes.capability_version[index], capability)?;
    let zone = capability.zone.as_str();
    let zone = if zone.is_empty() { SymbolId::NONE } else { state.symbols.intern(zone) };
    let labels = capability.labels.iter().map(|label| state.symbols.intern(label.as_str())).collect();
    let nodes = &mut state.nodes;
    nodes.capability_version[index] = capability.version.to_native();
    nodes.zone[index] = zone;
    nodes.capacity_bytes[index] = capability.capacity_bytes.to_native();
    nodes.labels[index] = labels;
    nodes.endpoint[index] = capability.endpoint.as_str().into();
    state.daemons_dirty = true;
    Ok(())
}
