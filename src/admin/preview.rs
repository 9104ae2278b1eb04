//! What an admin event would do, without appending it (`meshos admin ... --dry-run`).
//!
//! The node's log is read WITHOUT its writer's lock (`redex::embedded::read_unlocked`:
//! complete records only, a torn tail a running node is still writing is left out)
//! and replayed through the same `Engine` a node runs (fold, then the incremental
//! pass after every record), so the state is the node's at that position. Then one
//! synthetic record is applied at the next position and the last record's time,
//! holding the command in an operator section signed with the operator's key as if
//! at that time (valid `OPERATOR_VALIDITY_MS` from it, a fresh nonce). The result
//! says whether fold would apply the
//! event or why it would reject it (so a dry run also proves the key is accepted),
//! which actions the pass after it emits, and, for commands that move copies off a
//! node (enter maintenance, drain, drop every replica of a node), the copies that must
//! move first (counted copies elsewhere below the blob's intent), the blobs that
//! would be left exactly at their intent, their bytes, the expected time to safe from
//! the measured transfer rate, and the daemons that stop.
//!
//! Invariants: nothing is written anywhere (the log directory is only read); the
//! preview is a pure function of the log's complete records, the config and the
//! signed event.

use std::path::Path;

use crate::action::{describe, ActionKind};
use crate::config::Config;
use crate::engine::Engine;
use crate::event::{blob_hex, AdminCommand, ReplicaState};
use crate::reconcile::maintenance::{needed_copies, safe_elsewhere, time_to_safe_ms};
use crate::redex::embedded::{read_unlocked, UnlockedRead};
use crate::state::ids::NodeRow;
use crate::state::State;

use super::{command_code, AdminError, OperatorKey, COMMAND_NAMES};

/// What the dry run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    /// The last complete record of the log the preview starts from.
    pub log_position: u64,
    /// Why the read stopped short of the files' end (a record being written, or damage).
    pub log_tail: Option<String>,
    pub command: &'static str,
    /// Fold would apply the event (else `rejection` says why).
    pub applied: bool,
    /// (reason name, message) when fold would reject it.
    pub rejection: Option<(&'static str, String)>,
    /// The actions the pass after the event emits (within this pass's budgets).
    pub actions: Vec<String>,
    /// Per node the command moves copies off, what that takes.
    pub nodes: Vec<NodeImpact>,
}

/// What a command that empties a node takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeImpact {
    pub node: String,
    /// Maintenance state before and after the event (and its pass).
    pub maintenance_before: &'static str,
    pub maintenance_after: &'static str,
    /// Healthy copies the node holds.
    pub healthy_copies: u32,
    /// Copies that must be placed elsewhere first: without this node their blob has
    /// fewer counted copies than its intent.
    pub copies_to_move: Vec<CopyToMove>,
    pub bytes_to_move: u64,
    /// Blobs left exactly at their intent without this node (no margin left).
    pub blobs_at_intent: u32,
    /// Expected time until every copy is safe, from the measured transfer rate (None:
    /// no move has finished yet, so no rate is known; 0: nothing to move).
    pub time_to_safe_ms: Option<u64>,
    /// Daemons that stop on the node (non-essential ones, for maintenance).
    pub daemons_to_stop: Vec<String>,
}

/// One copy that must move before the node can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyToMove {
    pub blob: String,
    pub size_bytes: u64,
    /// Counted copies on nodes that stay, and the copies the blob needs.
    pub copies_elsewhere: u32,
    pub copies_needed: u32,
}

/// Replays the log in `dir` read-only, through record `up_to` at most (u64::MAX: all
/// complete records), as a node does (fold and the pass after every record).
pub fn replay_read_only(dir: &Path, config: &Config, up_to: u64) -> Result<(Engine, UnlockedRead), AdminError> {
    if !dir.is_dir() {
        return Err(AdminError::Invalid(format!(
            "no log at {}: is the node's data_dir in its config right, and has the node run?",
            dir.display()
        )));
    }
    let mut engine = Engine::new(config);
    let read = read_unlocked(dir, config, &mut |record| {
        engine.apply(record.position, record.time_ms, record.payload);
        record.position < up_to
    })?;
    Ok((engine, read))
}

/// Reads the node's log (`dir`) read-only and previews `command`, signed by `key` as
/// `operator`, on top of it.
pub fn preview(
    dir: &Path,
    config: &Config,
    key: &OperatorKey,
    operator: &str,
    command: &AdminCommand,
) -> Result<Preview, AdminError> {
    let (engine, read) = replay_read_only(dir, config, u64::MAX)?;
    let signed_ms = engine.state.now_ms;
    let kinds = vec![super::command_kind(command.clone())];
    let expires_ms = signed_ms.saturating_add(super::OPERATOR_VALIDITY_MS);
    let payload =
        super::seal_operator(key, operator, config.genesis.cluster_id(), kinds, expires_ms, &super::random_nonce()?);
    let mut preview = preview_on(engine, &payload, command, signed_ms);
    preview.log_tail = read.stopped_at.map(|damage| damage.to_string());
    Ok(preview)
}

/// Previews `payload` (an operator section carrying `command`, signed at
/// `signed_ms`) on top of `engine`'s state (consumed: the synthetic record is applied
/// to it).
pub fn preview_on(mut engine: Engine, payload: &[u8], command: &AdminCommand, signed_ms: u64) -> Preview {
    let log_position = engine.state.position;
    let targets = target_nodes(&engine.state, command);
    let before: Vec<&'static str> =
        targets.iter().map(|row| engine.state.nodes.maintenance[row.index()].name()).collect();
    let rejected_before = engine.state.rejections.total;
    let time_ms = engine.state.now_ms.max(signed_ms);
    let (state, emitted) = engine.apply(log_position + 1, time_ms, payload);
    let actions: Vec<String> = emitted.iter().map(|action| describe(state, action)).collect();
    let rejection = (state.rejections.total > rejected_before)
        .then(|| state.rejections.kept.back().map(|rejection| (rejection.reason.name(), rejection.reason.to_string())))
        .flatten();
    let mut preview = Preview {
        log_position,
        log_tail: None,
        command: COMMAND_NAMES[command_code(command) as usize],
        applied: rejection.is_none(),
        rejection,
        actions,
        nodes: Vec::new(),
    };
    if preview.applied {
        for (row, maintenance_before) in targets.into_iter().zip(before) {
            let stops: Vec<String> = emitted
                .iter()
                .filter(|action| action.node == row && matches!(action.kind, ActionKind::StopDaemon { .. }))
                .map(|action| describe(state, action))
                .collect();
            preview.nodes.push(node_impact(state, row, maintenance_before, stops));
        }
    }
    preview
}

/// The nodes a command empties: enter maintenance, drain, drop every replica of a node.
fn target_nodes(state: &State, command: &AdminCommand) -> Vec<NodeRow> {
    let node = match command {
        AdminCommand::EnterMaintenance { node }
        | AdminCommand::Drain { node }
        | AdminCommand::DropReplicas { node, blob: None } => node,
        _ => return Vec::new(),
    };
    state.nodes.find(node).into_iter().collect()
}

fn node_impact(state: &State, row: NodeRow, maintenance_before: &'static str, stops: Vec<String>) -> NodeImpact {
    let node = row.index();
    let mut impact = NodeImpact {
        node: state.nodes.name[node].to_string(),
        maintenance_before,
        maintenance_after: state.nodes.maintenance[node].name(),
        healthy_copies: 0,
        copies_to_move: Vec::new(),
        bytes_to_move: 0,
        blobs_at_intent: 0,
        time_to_safe_ms: None,
        daemons_to_stop: Vec::new(),
    };
    for &replica in &state.nodes.replica_rows[node] {
        if state.replicas.state[replica.index()] != ReplicaState::Healthy {
            continue;
        }
        impact.healthy_copies += 1;
        let blob = state.replicas.blob[replica.index()];
        let (elsewhere, needed) = (safe_elsewhere(state, blob, node), needed_copies(state, blob));
        if elsewhere < needed {
            let size_bytes = state.blobs.size_bytes[blob.index()];
            impact.bytes_to_move = impact.bytes_to_move.saturating_add(size_bytes);
            impact.copies_to_move.push(CopyToMove {
                blob: blob_hex(&state.blobs.hash[blob.index()]),
                size_bytes,
                copies_elsewhere: elsewhere as u32,
                copies_needed: needed as u32,
            });
        } else if elsewhere == needed {
            impact.blobs_at_intent += 1;
        }
    }
    let eta_ms = time_to_safe_ms(state, impact.bytes_to_move);
    impact.time_to_safe_ms = (eta_ms != u64::MAX).then_some(eta_ms);
    // Daemons: every non-essential one running there stops for maintenance (the pass
    // may emit only part of them at once, within its budget).
    if state.nodes.maintenance[node].is_away() {
        for daemon in 0..state.daemons.len() {
            let spec = &state.specs.spec[state.daemons.spec[daemon].index()];
            if state.daemons.node[daemon] == row && state.daemons.state[daemon].is_running() && !spec.essential {
                impact.daemons_to_stop.push(spec.name.clone());
            }
        }
    } else {
        impact.daemons_to_stop = stops;
    }
    impact
}
