//! A short account of a mapped snapshot for people and scripts (`meshos snapshot
//! show`): counts read in place from the archive, names from its own name tables.
//!
//! Invariant: reads the archive only; every count is a sum over a column or list of
//! the file, so it agrees with what Deck reads from the same file.

use super::{ArchivedSnapshot, DRIFT_NAMES};

/// How many rows carry each named code (codes with no row are left out).
pub type NamedCounts = Vec<(String, u32)>;

/// One node away from Active, with its drain progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAway {
    pub node: String,
    pub maintenance: String,
    pub since_ms: u64,
    pub unsafe_copies: u32,
    pub moving_copies: u32,
    pub daemons_left: u32,
    pub unsafe_bytes: u64,
    /// Expected time to safe (None: no transfer rate measured yet).
    pub eta_ms: Option<u64>,
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub format_version: u32,
    pub writer_node: String,
    pub written_unix_ms: u64,
    pub position: u64,
    pub log_time_ms: u64,
    pub events_applied: u64,
    pub state_hash: u128,
    pub nodes: u32,
    pub nodes_live: u32,
    pub nodes_by_status: NamedCounts,
    pub nodes_by_maintenance: NamedCounts,
    pub nodes_away: Vec<NodeAway>,
    pub blobs: u32,
    pub copies: u32,
    pub daemons: u32,
    pub daemons_running: u32,
    pub daemons_unhealthy: u32,
    pub actions_inflight: u32,
    pub actions_by_kind: NamedCounts,
    pub blobs_held: u32,
    pub blobs_held_by_gate: NamedCounts,
    pub daemons_backing_off: u32,
    pub daemons_gated: u32,
    /// Blobs per drift code other than none.
    pub drift: NamedCounts,
    pub copies_missing: u64,
    pub copies_surplus: u64,
    pub backpressure: bool,
    pub brake: bool,
    pub window_moves: u32,
    pub throttle_moves_max: u32,
    pub moves_inflight: u32,
    pub pull_inflight_max: u32,
    pub placement_epoch: u32,
    pub plans_invalid: u32,
    pub copies_off_plan: u32,
    pub copies_pulling: u32,
    pub rejected_total: u64,
    pub actions_failed: u64,
    pub actions_timed_out: u64,
    pub drain_blockers: u32,
    pub rtt_pairs: u32,
    /// Why the writing node stopped acting (empty: it acts).
    pub fence: String,
    /// Nodes whose latest committed state hash is not the majority's at its position.
    pub nodes_diverged: Vec<String>,
    /// The writer's latest state commitment (a clustered node): its position, how
    /// many nodes committed at that position, and how many of them the same hash.
    pub commitment_position: u64,
    pub commitment_reporting: u32,
    pub commitment_agreeing: u32,
    /// The writing node's ingest counters (`IngestView`); every reason listed, zeros
    /// included.
    pub ingest_connections_open: u64,
    pub ingest_frames_in: u64,
    pub ingest_partial_frame_bytes: u64,
    pub ingest_partial_frame_bytes_peak: u64,
    pub ingest_partial_frame_bytes_max: u64,
    pub ingest_frame_errors: Vec<(String, u64)>,
    pub ingest_connection_refusals: Vec<(String, u64)>,
}

/// Counts of `codes` by name in `names` (in code order, zero counts left out).
fn by_name<'a>(codes: impl Iterator<Item = u8>, names: impl Iterator<Item = &'a str>) -> NamedCounts {
    let mut counts = [0u32; 256];
    for code in codes {
        counts[code as usize] += 1;
    }
    let mut named: NamedCounts = Vec::new();
    for (code, name) in names.enumerate().take(256) {
        if counts[code] > 0 {
            named.push((name.to_string(), counts[code]));
        }
    }
    // Codes past the name table (a newer writer) are counted as "unknown".
    let known = named.iter().map(|(_, count)| *count).sum::<u32>();
    let total = counts.iter().sum::<u32>();
    if total > known {
        named.push(("unknown".to_string(), total - known));
    }
    named
}

impl ArchivedSnapshot {
    /// The summary of this snapshot.
    pub fn summary(&self) -> SnapshotSummary {
        let nodes = &self.nodes;
        let names = &self.names;
        let nodes_away = (0..nodes.name.len())
            .filter(|&node| nodes.maintenance[node] != 0)
            .map(|node| NodeAway {
                node: nodes.name[node].to_string(),
                maintenance: ArchivedSnapshot::name_of(&names.maintenance, nodes.maintenance[node]).to_string(),
                since_ms: nodes.maintenance_since_ms[node].to_native(),
                unsafe_copies: nodes.drain_unsafe_copies[node].to_native(),
                moving_copies: nodes.drain_moving_copies[node].to_native(),
                daemons_left: nodes.drain_daemons_left[node].to_native(),
                unsafe_bytes: nodes.drain_unsafe_bytes[node].to_native(),
                eta_ms: Some(nodes.drain_eta_ms[node].to_native()).filter(|eta| *eta != u64::MAX),
                deadline_ms: nodes.drain_deadline_ms[node].to_native(),
            })
            .collect();
        let running = |state: u8| {
            names
                .daemon_state
                .get(state as usize)
                .is_some_and(|name| name.as_str() == "started" || name.as_str() == "registered")
        };
        let blobs_held_by_gate = self
            .pending
            .blobs_held_by_gate
            .iter()
            .enumerate()
            .filter(|(code, count)| *code > 0 && count.to_native() > 0)
            .map(|(code, count)| (ArchivedSnapshot::name_of(&names.gate, code as u8).to_string(), count.to_native()))
            .collect();
        let drift = by_name(self.blobs.drift.iter().copied(), DRIFT_NAMES.iter().copied())
            .into_iter()
            .filter(|(name, _)| name != DRIFT_NAMES[0])
            .collect();
        let gates = &self.gates;
        let writer = (0..nodes.name.len()).find(|&node| nodes.name[node].as_str() == self.writer_node.as_str());
        let (mut commitment_position, mut commitment_reporting, mut commitment_agreeing) = (0, 0, 0);
        if let Some(writer) = writer.filter(|&writer| nodes.commitment_position[writer].to_native() > 0) {
            commitment_position = nodes.commitment_position[writer].to_native();
            for node in 0..nodes.name.len() {
                if nodes.commitment_position[node].to_native() == commitment_position {
                    commitment_reporting += 1;
                    commitment_agreeing += u32::from(nodes.commitment_hash[node] == nodes.commitment_hash[writer]);
                }
            }
        }
        SnapshotSummary {
            format_version: self.format_version.to_native(),
            writer_node: self.writer_node.to_string(),
            written_unix_ms: self.written_unix_ms.to_native(),
            position: self.position.to_native(),
            log_time_ms: self.log_time_ms.to_native(),
            events_applied: self.events_applied.to_native(),
            state_hash: self.state_hash(),
            nodes: nodes.name.len() as u32,
            nodes_live: nodes.live.iter().filter(|live| **live).count() as u32,
            nodes_by_status: by_name(nodes.status.iter().copied(), names.node_status.iter().map(|name| name.as_str())),
            nodes_by_maintenance: by_name(
                nodes.maintenance.iter().copied(),
                names.maintenance.iter().map(|name| name.as_str()),
            ),
            nodes_away,
            blobs: self.blobs.hash.len() as u32,
            copies: self.blobs.holder_node.len() as u32,
            daemons: self.daemons.len() as u32,
            daemons_running: self.daemons.iter().filter(|daemon| running(daemon.state)).count() as u32,
            daemons_unhealthy: self.daemons.iter().filter(|daemon| running(daemon.state) && !daemon.healthy).count()
                as u32,
            actions_inflight: self.actions.len() as u32,
            actions_by_kind: by_name(
                self.actions.iter().map(|action| action.kind),
                names.action_kind.iter().map(|name| name.as_str()),
            ),
            blobs_held: self.pending.blobs_held.to_native(),
            blobs_held_by_gate,
            daemons_backing_off: self.pending.daemons_backing_off.to_native(),
            daemons_gated: self.pending.daemons_gated.to_native(),
            drift,
            copies_missing: self.drift.copies_missing.to_native(),
            copies_surplus: self.drift.copies_surplus.to_native(),
            backpressure: gates.backpressure,
            brake: gates.brake,
            window_moves: gates.window_moves.to_native(),
            throttle_moves_max: gates.throttle_moves_max.to_native(),
            moves_inflight: gates.moves_inflight.to_native(),
            pull_inflight_max: gates.pull_inflight_max.to_native(),
            placement_epoch: self.placement.placement_epoch.to_native(),
            plans_invalid: self.placement.plans_invalid.to_native(),
            copies_off_plan: self.placement.copies_off_plan.to_native(),
            copies_pulling: self.placement.copies_pulling.to_native(),
            rejected_total: self.failures.rejected_total.to_native(),
            actions_failed: self.failures.actions_failed.to_native(),
            actions_timed_out: self.failures.actions_timed_out.to_native(),
            drain_blockers: self.drain_blockers.total.to_native(),
            rtt_pairs: self.locality.rtt_pairs_total.to_native(),
            fence: self.fence.to_string(),
            nodes_diverged: (0..nodes.name.len())
                .filter(|&node| nodes.commitment_disagrees[node])
                .map(|node| nodes.name[node].to_string())
                .collect(),
            commitment_position,
            commitment_reporting,
            commitment_agreeing,
            ingest_connections_open: self.ingest.connections_open.to_native(),
            ingest_frames_in: self.ingest.frames_in.to_native(),
            ingest_partial_frame_bytes: self.ingest.partial_frame_bytes.to_native(),
            ingest_partial_frame_bytes_peak: self.ingest.partial_frame_bytes_peak.to_native(),
            ingest_partial_frame_bytes_max: self.ingest.partial_frame_bytes_max.to_native(),
            // Parallel lists of unequal length (a damaged writer) pair up to the shorter.
            ingest_frame_errors: self
                .ingest
                .frame_error_names
                .iter()
                .zip(self.ingest.frame_errors.iter())
                .map(|(name, count)| (name.to_string(), count.to_native()))
                .collect(),
            ingest_connection_refusals: self
                .ingest
                .connection_refusal_names
                .iter()
                .zip(self.ingest.connection_refusals.iter())
                .map(|(name, count)| (name.to_string(), count.to_native()))
                .collect(),
        }
    }
}
