//! The behaviour snapshot for Deck: what the cluster is doing and why, as one rkyv
//! archive in a file that Deck (or `meshos snapshot show`) maps read-only and reads in
//! place, with no copy and no deserialisation.
//!
//! It holds what the seed's sections 8 and 12 ask Deck to show, as far as the state
//! knows it: in-flight actions; pending work (blobs held back, the gate holding each
//! and when it opens; the global gates and budgets); recent failures (rejected events,
//! failed and timed-out actions); drift (blobs away from their intent, in totals and
//! a bounded list); heat (node load and the hot mark, daemon saturation); the locality
//! map (network coordinates and measured RTT pairs); node health and maintenance with
//! drain progress, the copies that block a drain and the expected time to safe;
//! daemon status; placement stability; the log position and state hash; and, apart
//! from the state, the writing node's ingest counters (frames refused per reason,
//! connections refused or closed per limit, the partial-frame budget).
//!
//! File layout (`file.rs`):
//!
//! ```text
//! offset  size  field
//!  0      8     magic "MSHSNAP\0"
//!  8      4     format version (u32 LE), `FORMAT_VERSION`
//! 12      4     CRC-32C (u32 LE) of the archive
//! 16      n     rkyv archive (little endian, 32-bit offsets), root `Snapshot` at the end
//! ```
//!
//! Layout of the archive: big tables are columnar (one `Vec` per field, indexed by the
//! state's row ids: node `n` is `nodes.*[n]`, blob `b` is `blobs.*[b]`), lists of
//! varying length per row are CSR (`holder_start[b]..holder_start[b + 1]` indexes
//! `holder_*`), small tables are `Vec`s of row structs. Enumerations are stored as
//! their `u8` code; `names` in the same file maps every code to its stable name, so a
//! reader needs no table of its own. `NONE` (u32::MAX) is "no row".
//!
//! Invariants: a snapshot is a pure function of the state, the writer's name, the
//! write time, its fence and ingest counters (set by the writer; empty in
//! `Snapshot::from_state`) and the `SnapshotLimits`; every column of a
//! table has the table's length (asserted by `check_shape`, which the builder runs);
//! every list picked from a table is bounded by a `SnapshotLimits` field and its total
//! is counted beside it; a file is only ever published whole (temporary file, fsync,
//! rename, directory fsync) and never modified in place, so a reader that mapped it
//! keeps a consistent view; a reader validates the whole archive (header, checksum,
//! bytecheck, format version) once before handing out a reference into it.
//! Never: changes the state, runs a reconcile pass, or panics on a file's contents.

mod build;
mod file;
mod mapped;
mod shape;
mod summary;

pub use file::{
    encode_into, temporary_path, write_atomically, write_file_atomically, SnapshotWriter, WriteReport, WriterStats,
};
pub use mapped::{validate_bytes, MappedSnapshot};
pub use summary::SnapshotSummary;

use std::path::PathBuf;

use rkyv::{Archive, Deserialize, Serialize};

/// Bumped whenever an archived type below changes.
pub const FORMAT_VERSION: u32 = 3;
/// The first bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"MSHSNAP\0";
/// Bytes before the archive (magic, version, checksum); a multiple of the archive's
/// alignment, so the archive of a page-aligned mapping is aligned.
pub const HEADER_BYTES: usize = 16;
/// Alignment of the archive (enough for every archived type).
pub const ALIGN_BYTES: usize = 16;
/// "No row" in a row column of the snapshot.
pub const NONE: u32 = u32::MAX;

const _: () = assert!(HEADER_BYTES.is_multiple_of(ALIGN_BYTES));

/// `Blobs::drift` codes (`names.drift`).
pub const DRIFT_NONE: u8 = 0;
/// Fewer counted copies than the intent wants.
pub const DRIFT_UNDER: u8 = 1;
/// More counted copies than the intent wants.
pub const DRIFT_OVER: u8 = 2;
/// As many counted copies as wanted, but not where the plan puts them (or the plan
/// must be recomputed).
pub const DRIFT_OFF_PLAN: u8 = 3;
pub const DRIFT_NAMES: [&str; 4] = ["none", "under", "over", "off_plan"];

/// `Blobs::holder_flags` bits.
/// The holder is in the blob's plan.
pub const HOLDER_PLANNED: u8 = 1;
/// The copy counts: healthy, on a live node, verified in the node's incarnation.
pub const HOLDER_COUNTED: u8 = 2;
/// The holder's inventory disagreed with the log: the copy is to be verified again.
pub const HOLDER_VERIFY_REQUESTED: u8 = 4;
/// An operator asked for the copy to go.
pub const HOLDER_DROP_REQUESTED: u8 = 8;

/// Names of `NodeStatus` codes (index = code).
pub const NODE_STATUS_NAMES: [&str; 5] = ["unknown", "up", "suspect", "down", "left"];
/// Names of `ReplicaState` codes (index = code).
pub const REPLICA_STATE_NAMES: [&str; 5] = ["unknown", "pulling", "healthy", "corrupt", "deleted"];
/// Names of `DaemonState` codes (index = code).
pub const DAEMON_STATE_NAMES: [&str; 6] = ["unknown", "started", "registered", "exited", "crashed", "stopped"];
/// Names of `SpecView::runs_on` codes.
pub const SPEC_PLACEMENT_NAMES: [&str; 4] = ["all_nodes", "label", "nodes", "nowhere"];

/// Why a snapshot cannot be written or read, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot map the file: {source}")]
    Map { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: {file_bytes} bytes is too short for a snapshot (at least {HEADER_BYTES} header bytes and an archive)"
    )]
    TooShort { path: PathBuf, file_bytes: u64 },
    #[error("{path}: not a MeshOS snapshot (magic {found:02x?}, expected \"MSHSNAP\\0\")")]
    NotASnapshot { path: PathBuf, found: [u8; 8] },
    #[error("{path}: snapshot format version {found}; this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path}: checksum mismatch: header says {expected:08x}, the archive hashes to {actual:08x} (damaged or truncated)")]
    Checksum { path: PathBuf, expected: u32, actual: u32 },
    #[error("{path}: archive fails validation: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot archive the snapshot: {reason}")]
    Archive { reason: String },
}

/// The whole snapshot. Row columns hold the state's row ids.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct Snapshot {
    /// `FORMAT_VERSION` of the writer (also in the file header).
    pub format_version: u32,
    /// The node that wrote the file, and when (wall clock, ms since the Unix epoch; 0
    /// when built without a writer).
    pub writer_node: String,
    pub written_unix_ms: u64,
    /// The state's log position (last record folded), log time, events applied and
    /// 128-bit state hash (little endian).
    pub position: u64,
    pub log_time_ms: u64,
    pub events_applied: u64,
    pub state_hash: [u8; 16],
    /// Why the writing node stopped acting on its own decisions (its state diverged
    /// from the cluster's, or another process runs under its name); empty when it acts.
    pub fence: String,
    /// Code -> name tables for every `u8` code in the file.
    pub names: Names,
    /// Interned strings of the state (zones, labels), by symbol id.
    pub symbols: Vec<String>,
    pub nodes: Nodes,
    pub blobs: Blobs,
    pub specs: Vec<SpecView>,
    pub daemons: Vec<DaemonView>,
    /// Actions emitted and not yet settled, in the in-flight table's order.
    pub actions: Vec<ActionView>,
    pub pending: Pending,
    pub gates: GatesView,
    pub failures: Failures,
    pub drift: Drift,
    pub placement: PlacementView,
    pub locality: Locality,
    pub drain_blockers: DrainBlockers,
    /// The writing node's ingest counters (not part of the state; empty when built
    /// without a node).
    pub ingest: IngestView,
}

/// The writing node's ingest counters since it started (its reactor's): what it
/// refused and why. Names and counts are parallel lists (`frame_error_names[i]` was
/// refused `frame_errors[i]` times), so a reader needs no table of its own.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct IngestView {
    pub connections_open: u64,
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Read-buffer bytes charged to the partial-frame budget now, the most ever, and
    /// the budget (`ingest.partial_frame_bytes_max`).
    pub partial_frame_bytes: u64,
    pub partial_frame_bytes_peak: u64,
    pub partial_frame_bytes_max: u64,
    /// Frames refused, per reason (the reactor's frame errors, payloads the
    /// sequencer refused included, and frames of a kind clients may not send).
    pub frame_error_names: Vec<String>,
    pub frame_errors: Vec<u64>,
    /// Connections refused or closed by a limit (over the limit, per address, idle,
    /// frame deadline) and waits for the partial-frame budget, per reason.
    pub connection_refusal_names: Vec<String>,
    pub connection_refusals: Vec<u64>,
}

/// Stable names of every code the file stores, indexed by code.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Names {
    pub node_status: Vec<String>,
    pub maintenance: Vec<String>,
    pub replica_state: Vec<String>,
    pub daemon_state: Vec<String>,
    pub spec_placement: Vec<String>,
    pub gate: Vec<String>,
    pub action_kind: Vec<String>,
    pub reject_reason: Vec<String>,
    pub drift: Vec<String>,
}

/// The node table, one column per field, indexed by node row.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct Nodes {
    pub name: Vec<String>,
    /// Health: reported status (`names.node_status`), reconcile's liveness and
    /// eligibility for new copies, heartbeat, incarnation (bumped on each return).
    pub status: Vec<u8>,
    pub status_since_ms: Vec<u64>,
    pub live: Vec<bool>,
    pub eligible: Vec<bool>,
    pub last_heartbeat_ms: Vec<u64>,
    pub incarnation: Vec<u32>,
    /// Heat: load reported with the heartbeat, and the hot mark (a daemon reported
    /// saturation; reduce_heat was sent).
    pub load_permille: Vec<u16>,
    pub hot: Vec<bool>,
    /// Avoided for new copies (RTT far above the median), cordoned, draining, and
    /// raising global backpressure.
    pub avoid: Vec<bool>,
    pub cordoned: Vec<bool>,
    pub draining: Vec<bool>,
    pub backpressure: Vec<bool>,
    /// Maintenance state (`names.maintenance`) and since when.
    pub maintenance: Vec<u8>,
    pub maintenance_since_ms: Vec<u64>,
    /// Drain progress, as the last reconcile pass computed it: copies not yet safe
    /// elsewhere and their bytes, how many of them are moving, non-essential daemons
    /// still running, the expected time to safe (u64::MAX: no transfer rate measured
    /// yet) and the deadline (past it: drain_failed).
    pub drain_unsafe_copies: Vec<u32>,
    pub drain_moving_copies: Vec<u32>,
    pub drain_daemons_left: Vec<u32>,
    pub drain_unsafe_bytes: Vec<u64>,
    pub drain_eta_ms: Vec<u64>,
    pub drain_deadline_ms: Vec<u64>,
    /// Capability: version, the version when maintenance began (exit needs a newer
    /// one), zone (symbol id or `NONE`), capacity, labels (CSR into `label`).
    pub capability_version: Vec<u64>,
    pub capability_version_at_enter: Vec<u64>,
    pub zone: Vec<u32>,
    pub capacity_bytes: Vec<u64>,
    pub label_start: Vec<u32>,
    pub label: Vec<u32>,
    /// Healthy copies the log says the node holds, moves in flight into or out of it.
    pub healthy_copies: Vec<u32>,
    pub moves_inflight: Vec<u32>,
    /// The node's last inventory digest report: blob count and when.
    pub inventory_blob_count: Vec<u32>,
    pub inventory_reported_ms: Vec<u64>,
    /// The node's latest state commitment (log position, state hash), what it still
    /// needs of the log, and whether its hash differs from the one most nodes committed
    /// at the same position (a diverged node).
    pub commitment_position: Vec<u64>,
    pub commitment_hash: Vec<[u8; 16]>,
    pub needs_position: Vec<u64>,
    pub commitment_disagrees: Vec<bool>,
}

/// The blob table, indexed by blob row, with each blob's copies (CSR) and plan (CSR).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Blobs {
    pub hash: Vec<[u8; 32]>,
    pub size_bytes: Vec<u64>,
    /// Healthy copies wanted (0: no placement intent).
    pub replicas_wanted: Vec<u8>,
    /// Copies in state healthy, and of those the ones that count (live node, verified
    /// in its incarnation).
    pub healthy_count: Vec<u32>,
    pub counted_copies: Vec<u32>,
    /// `DRIFT_*` code (`names.drift`).
    pub drift: Vec<u8>,
    /// The gate holding the blob's next action (`names.gate`, 0: none) and when it
    /// opens (0: when capacity frees).
    pub held_by: Vec<u8>,
    pub held_until_ms: Vec<u64>,
    /// Pull backoff after failed pulls: until when, and the consecutive failures.
    pub backoff_until_ms: Vec<u64>,
    pub pull_failures: Vec<u8>,
    /// The cached plan is valid (false: it is recomputed at the next look).
    pub plan_valid: Vec<bool>,
    /// Copies not deleted: `holder_start[b]..holder_start[b + 1]` indexes the
    /// holder columns (node row, `names.replica_state` code, `HOLDER_*` flags).
    pub holder_start: Vec<u32>,
    pub holder_node: Vec<u32>,
    pub holder_state: Vec<u8>,
    pub holder_flags: Vec<u8>,
    /// The nodes the plan puts copies on: `plan_start[b]..plan_start[b + 1]`.
    pub plan_start: Vec<u32>,
    pub plan_node: Vec<u32>,
}

/// A daemon spec (desired daemon).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct SpecView {
    pub name: String,
    pub essential: bool,
    pub health_timeout_ms: u32,
    pub generation: u32,
    /// `names.spec_placement` code.
    pub runs_on: u8,
}

/// One daemon instance (a spec on a node).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct DaemonView {
    /// Spec row (`specs`) and node row.
    pub spec: u32,
    pub node: u32,
    /// `names.daemon_state` code, since when.
    pub state: u8,
    pub state_since_ms: u64,
    pub pid: u32,
    pub healthy: bool,
    pub last_health_ms: u64,
    pub saturation_permille: u16,
    pub starts: u32,
    pub crashes: u32,
    /// Exit code of the last exit, or the signal of the last crash.
    pub last_exit: i32,
    /// Restart backoff: the delay after the last unplanned end, and no start before.
    pub backoff_ms: u32,
    pub start_after_ms: u64,
    /// Unplanned ends within the crash-loop window, and the crash-loop gate.
    pub recent_ends: u32,
    pub gated: bool,
}

/// An action in flight.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct ActionView {
    /// The action id: the position of the pass that emitted it and its index there.
    pub position: u64,
    pub index: u32,
    /// `names.action_kind` code.
    pub kind: u8,
    /// The executing node; the blob, the other node of a move (source), the daemon
    /// spec, each `NONE` when the kind has none.
    pub node: u32,
    pub blob: u32,
    pub peer: u32,
    pub spec: u32,
    pub emitted_ms: u64,
    pub deadline_ms: u64,
}

/// Work held back: blobs whose next action a gate holds, and daemons waiting.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Pending {
    /// Blobs held by a gate, in all and per gate (index = gate code).
    pub blobs_held: u32,
    pub blobs_held_by_gate: Vec<u32>,
    /// The first `pending_listed_max` held blobs by row.
    pub listed: Vec<PendingBlob>,
    /// Daemon instances not running that wait for their restart backoff, and those
    /// the crash-loop gate holds (until an operator restarts the node's daemons).
    pub daemons_backing_off: u32,
    pub daemons_gated: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct PendingBlob {
    pub blob: u32,
    /// `names.gate` code, and when it opens (0: when capacity frees).
    pub gate: u8,
    pub opens_at_ms: u64,
}

/// The global gates with their budgets and timers.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct GatesView {
    /// Global backpressure (raised by some live node's sequencer) and how many nodes
    /// raise it.
    pub backpressure: bool,
    pub backpressure_nodes: u32,
    /// The mass-failure brake, and when its earliest counted failure leaves the
    /// window (u64::MAX when off).
    pub brake: bool,
    pub brake_until_ms: u64,
    /// The throttle window: its start, moves started in it, its length and allowance.
    pub window_start_ms: u64,
    pub window_moves: u32,
    pub throttle_window_ms: u64,
    pub throttle_moves_max: u32,
    /// Budgets: in flight now and the maximum.
    pub moves_inflight: u32,
    pub pull_inflight_max: u32,
    pub pull_inflight_per_node_max: u32,
    pub verifies_inflight: u32,
    pub verify_inflight_max: u32,
    pub drops_inflight: u32,
    pub drop_inflight_max: u32,
    pub daemon_actions_inflight: u32,
    pub daemon_inflight_max: u32,
    /// Earliest time a held gate opens, and a daemon timer falls due (u64::MAX: none).
    pub next_open_ms: u64,
    pub daemons_due_ms: u64,
    /// Measured transfer rate of finished moves (0 until the first one).
    pub transfer_bytes_per_s: u64,
    /// Timers that shape what Deck shows: a new copy must be healthy this long before
    /// a surplus copy goes; a node silent this long is down; a drain's deadline; the
    /// recovery window after maintenance; an action's timeout.
    pub stabilisation_ms: u64,
    pub node_down_ms: u64,
    pub drain_deadline_ms: u64,
    pub recovery_ms: u64,
    pub action_timeout_ms: u64,
}

/// What went wrong recently.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Failures {
    /// Events fold refused, in all and per reason (index = `names.reject_reason` code).
    pub rejected_total: u64,
    pub rejected_by_reason: Vec<u64>,
    /// Actions settled since the state began: succeeded, failed, timed out, cancelled.
    pub actions_succeeded: u64,
    pub actions_failed: u64,
    pub actions_timed_out: u64,
    pub actions_cancelled: u64,
    /// The latest rejections (oldest first), at most `failures_listed_max`.
    pub recent: Vec<FailureView>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct FailureView {
    pub position: u64,
    /// Index of the event in its record (u32::MAX: the whole record).
    pub event_index: u32,
    pub origin: String,
    pub origin_seq: u64,
    /// The event kind's name, the reason's code (`names.reject_reason`) and message.
    pub kind: String,
    pub reason: u8,
    pub message: String,
}

/// Blobs away from their intent (`Blobs::drift` holds every blob's code).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Drift {
    pub blobs_under: u32,
    pub blobs_over: u32,
    pub blobs_off_plan: u32,
    /// Counted copies missing (under) and in surplus (over), summed over blobs.
    pub copies_missing: u64,
    pub copies_surplus: u64,
    /// Blob rows, under-replicated first, then over, then off plan, each by row; at
    /// most `drift_listed_max`.
    pub listed: Vec<u32>,
}

/// How settled placement is.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct PlacementView {
    /// Bumped by every cluster-wide "invalidate placement".
    pub placement_epoch: u32,
    /// Blobs with an intent, and of those the ones whose plan is to be recomputed.
    pub blobs_with_intent: u32,
    pub plans_invalid: u32,
    /// Counted copies on nodes outside their blob's plan (to migrate or drop).
    pub copies_off_plan: u32,
    /// Copies being pulled (state pulling), and moves in flight.
    pub copies_pulling: u32,
    pub moves_inflight: u32,
    /// Nodes eligible for new copies.
    pub nodes_eligible: u32,
}

/// The locality map: every node's network coordinate (by node row) and the measured
/// RTT pairs.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[rkyv(derive(Debug))]
pub struct Locality {
    pub coordinate_x_us: Vec<f64>,
    pub coordinate_y_us: Vec<f64>,
    pub coordinate_height_us: Vec<f64>,
    pub coordinate_error: Vec<f64>,
    /// Moving average of every RTT sample the node took part in.
    pub rtt_average_us: Vec<u32>,
    /// Measured pairs in the state; the listed ones (every pair, or the
    /// `rtt_pairs_listed_max` most recently sampled), by row.
    pub rtt_pairs_total: u32,
    pub rtt_from: Vec<u32>,
    pub rtt_to: Vec<u32>,
    pub rtt_pair_average_us: Vec<u32>,
    pub rtt_last_us: Vec<u32>,
    pub rtt_samples: Vec<u32>,
    pub rtt_last_ms: Vec<u64>,
}

/// What blocks the drains: copies on a draining node (entering maintenance or drain
/// failed) that are not yet safe elsewhere, by the predicate reconcile uses.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct DrainBlockers {
    pub total: u32,
    /// At most `drain_blockers_listed_max`, by node row then replica row.
    pub listed: Vec<DrainBlocker>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct DrainBlocker {
    pub node: u32,
    pub blob: u32,
    /// Counted copies on nodes that stay, and how many are needed (intent, at least 1).
    pub copies_elsewhere: u32,
    pub copies_needed: u32,
    /// A move of the blob is in flight.
    pub moving: bool,
}

impl ArchivedSnapshot {
    /// The state hash as a number.
    pub fn state_hash(&self) -> u128 {
        u128::from_le_bytes(self.state_hash)
    }

    /// A node's name (empty for `NONE` or a row past the table).
    pub fn node_name(&self, row: u32) -> &str {
        self.nodes.name.get(row as usize).map_or("", |name| name.as_str())
    }

    /// The name of `code` in `table` ("unknown" past its end).
    pub fn name_of(table: &rkyv::vec::ArchivedVec<rkyv::string::ArchivedString>, code: u8) -> &str {
        table.get(code as usize).map_or("unknown", |name| name.as_str())
    }
}

impl ArchivedBlobs {
    /// Indexes into the holder columns of blob `blob` (empty past the table).
    pub fn holders(&self, blob: usize) -> std::ops::Range<usize> {
        csr_range(&self.holder_start, blob)
    }

    /// Indexes into `plan_node` of blob `blob` (empty past the table).
    pub fn plan(&self, blob: usize) -> std::ops::Range<usize> {
        csr_range(&self.plan_start, blob)
    }
}

impl ArchivedNodes {
    /// Indexes into `label` of node `node` (empty past the table).
    pub fn labels(&self, node: usize) -> std::ops::Range<usize> {
        csr_range(&self.label_start, node)
    }
}

/// `start[row]..start[row + 1]`, empty when out of range or not increasing (a valid
/// archive can still hold nonsense offsets; they must not panic a reader).
fn csr_range(start: &rkyv::vec::ArchivedVec<rkyv::rend::u32_le>, row: usize) -> std::ops::Range<usize> {
    match (start.get(row), start.get(row + 1)) {
        (Some(low), Some(high)) if low.to_native() <= high.to_native() => {
            low.to_native() as usize..high.to_native() as usize
        }
        _ => 0..0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SnapshotLimits};
    use crate::sim::fixtures::converged_cluster;

    fn encoded(snapshot: &Snapshot) -> rkyv::util::AlignedVec<ALIGN_BYTES> {
        encode_into(snapshot, rkyv::util::AlignedVec::new()).expect("archiving into memory")
    }

    #[test]
    fn a_converged_cluster_round_trips_in_memory() {
        let state = converged_cluster(&Config::for_tests(), 12, 40, 3);
        let snapshot = Snapshot::from_state(&state, "node-00000", &SnapshotLimits::default());
        let bytes = encoded(&snapshot);
        assert_eq!(&bytes[..8], &MAGIC);
        let archived = validate_bytes(&bytes).expect("valid");
        assert_eq!(archived.state_hash(), state.state_hash());
        assert_eq!(archived.blobs.holder_node.len(), 120);
        assert!(archived.blobs.drift.iter().all(|drift| *drift == DRIFT_NONE), "converged: no drift");
        assert!(archived.actions.is_empty() && archived.pending.blobs_held == 0);
        let summary = archived.summary();
        assert_eq!(summary.nodes_by_maintenance, vec![("active".to_string(), 12)]);
        assert!(summary.drift.is_empty() && summary.actions_by_kind.is_empty());
        // Reusing the buffers gives the same bytes.
        let mut reused =
            Snapshot::from_state(&converged_cluster(&Config::for_tests(), 3, 2, 1), "x", &SnapshotLimits::default());
        reused.fill_from(&state, "node-00000", &SnapshotLimits::default());
        assert_eq!(encoded(&reused).as_slice(), bytes.as_slice());
    }

    #[test]
    fn codes_past_the_name_tables_read_as_unknown() {
        let state = converged_cluster(&Config::for_tests(), 3, 2, 1);
        let mut snapshot = Snapshot::from_state(&state, "n", &SnapshotLimits::default());
        snapshot.nodes.maintenance[0] = 200;
        snapshot.names.maintenance.truncate(1);
        let bytes = encoded(&snapshot);
        let archived = validate_bytes(&bytes).expect("codes are not rows: still valid");
        assert_eq!(ArchivedSnapshot::name_of(&archived.names.maintenance, 200), "unknown");
        let summary = archived.summary();
        assert_eq!(summary.nodes_by_maintenance, vec![("active".to_string(), 2), ("unknown".to_string(), 1)]);
    }

    #[test]
    fn ingest_counters_round_trip_and_uneven_lists_do_not_panic() {
        let state = converged_cluster(&Config::for_tests(), 3, 2, 1);
        let mut snapshot = Snapshot::from_state(&state, "n", &SnapshotLimits::default());
        assert_eq!(snapshot.ingest, IngestView::default(), "not part of the state");
        snapshot.ingest = IngestView {
            connections_open: 3,
            frames_in: 40,
            partial_frame_bytes_max: 1 << 20,
            frame_error_names: vec!["bad_magic".to_string(), "bad_payload".to_string()],
            frame_errors: vec![10, 1],
            connection_refusal_names: vec!["per_address".to_string(), "idle_timeout".to_string()],
            connection_refusals: vec![7],
            ..IngestView::default()
        };
        let bytes = encoded(&snapshot);
        let summary = validate_bytes(&bytes).unwrap().summary();
        assert_eq!((summary.ingest_connections_open, summary.ingest_frames_in), (3, 40));
        assert_eq!(summary.ingest_frame_errors, vec![("bad_magic".to_string(), 10), ("bad_payload".to_string(), 1)]);
        assert_eq!(summary.ingest_connection_refusals, vec![("per_address".to_string(), 7)]);
    }

    #[test]
    fn out_of_range_rows_give_empty_ranges() {
        let state = converged_cluster(&Config::for_tests(), 3, 2, 1);
        let bytes = encoded(&Snapshot::from_state(&state, "n", &SnapshotLimits::default()));
        let archived = validate_bytes(&bytes).unwrap();
        assert_eq!(archived.blobs.holders(1), 1..2);
        assert_eq!(archived.blobs.holders(2), 0..0);
        assert_eq!(archived.blobs.plan(usize::MAX - 1), 0..0);
        assert_eq!(archived.nodes.labels(7), 0..0);
        assert_eq!(archived.node_name(NONE), "");
    }
}
