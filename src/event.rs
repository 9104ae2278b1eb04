//! The closed set of inputs MeshOS folds: one `Event` enum, archived with rkyv.
//!
//! Every event carries its origin node (the node that produced it, by name) and
//! that node's origin sequence number, strictly increasing per origin; fold uses
//! the pair to reject duplicates and reordering. A log record carries one
//! `EventBatch`. Events hold only external ids (node names, blob hashes, daemon
//! names); dense row ids exist only inside the state and never travel.
//!
//! Invariants: adding or changing a variant changes the wire format, so it bumps
//! `wire::VERSION` and the golden test. Archived events are read in place after
//! validation (`wire::access_batch`); nothing here panics on any byte string.

use rkyv::{Archive, Deserialize, Serialize};

/// A blob's content hash (blake3, 32 bytes).
pub type BlobHash = [u8; 32];

/// One batch of events, committed as one log record.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct EventBatch {
    pub events: Vec<Event>,
}

/// One input, from one origin node.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Event {
    /// Name of the node that produced the event.
    pub origin: String,
    /// The origin's own sequence number; strictly increasing per origin.
    pub origin_seq: u64,
    pub kind: EventKind,
}

/// Every kind of input the seed names.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum EventKind {
    /// The origin node reports the state of its copy of a blob.
    ReplicaUpdate { blob: BlobHash, state: ReplicaState },
    /// A daemon on the origin node changed state or reported a signal.
    Daemon { daemon: String, signal: DaemonSignal },
    /// A round trip measured from the origin node to `peer`.
    Rtt { peer: String, rtt_us: u32 },
    /// Node health: the origin's own heartbeat, or its view of a node's status.
    NodeHealth(NodeHealth),
    /// An operator command. Applied only from a section signed by a key of the
    /// cluster keyring (`trust`). Boxed: rare, and larger than every hot event.
    Admin(Box<AdminCommand>),
    /// A blob exists (announced by the node that first stored it).
    BlobAnnounce { blob: BlobHash, size_bytes: u64 },
    /// Desired placement of a blob (from Dataforts or the built-in planner).
    PlacementIntent(PlacementIntent),
    /// A daemon that should run, and where (or nowhere, to remove it). Boxed: it is
    /// rare and large, and every archived event is as large as the largest variant.
    DaemonIntent { spec: Box<DaemonSpec>, runs_on: DaemonPlacement },
    /// The origin node's attributes, a new version forked from `fork_of`. Boxed: rare
    /// and large (every archived event is as large as the largest variant).
    Capability(Box<Capability>),
    /// The executor reports how an action ended.
    ActionOutcome { action: ActionId, outcome: Outcome },
    /// The origin node's digest of the blobs it holds on disk.
    InventoryDigest { blob_count: u32, digest: [u8; 16] },
    /// The origin node's sequencer raised (or lowered) global backpressure: its
    /// queues run deep or its commits are slow, so non-repair moves wait.
    Backpressure { raised: bool },
    /// The origin node's state hash after folding record `position` (a multiple of
    /// `[cluster] commitment_interval_records`), and the lowest position it still needs
    /// to restart (after its oldest kept checkpoint; 0: all). Nodes compare hashes at
    /// equal positions; the log is trimmed below what every live node still needs.
    Commitment { position: u64, state_hash: [u8; 16], needs_position: u64 },
}

/// State of one node's copy of one blob, as its holder reports it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
#[repr(u8)]
pub enum ReplicaState {
    /// Transfer under way; does not count.
    Pulling = 1,
    /// Stored and hash-verified; counts toward the blob's intent.
    Healthy = 2,
    /// Failed verification; does not count.
    Corrupt = 3,
    /// Removed from the node's disk.
    Deleted = 4,
}

/// A daemon lifecycle signal.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DaemonSignal {
    /// The process was spawned by the node.
    Started { pid: u32 },
    /// The process registered through the SDK.
    Registered { pid: u32 },
    /// The process exited by itself with an exit code.
    Exited { code: i32 },
    /// The process died on a signal or was declared hung.
    Crashed { signal: i32 },
    /// The process was stopped on purpose.
    Stopped,
    /// A health report.
    Health { healthy: bool },
    /// A saturation report, in thousandths of full load.
    Saturation { permille: u16 },
}

/// Node health as reported in the log.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum NodeHealth {
    /// The origin node is alive; `load_permille` is its load in thousandths.
    Heartbeat { load_permille: u16 },
    /// The origin's view of `node`'s status (possibly itself).
    Status { node: String, status: NodeStatus },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
#[repr(u8)]
pub enum NodeStatus {
    Up = 1,
    Suspect = 2,
    Down = 3,
    /// Left the cluster on purpose.
    Left = 4,
}

/// An operator command and the node (or blob) it applies to.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum AdminCommand {
    EnterMaintenance {
        node: String,
    },
    ExitMaintenance {
        node: String,
    },
    Drain {
        node: String,
    },
    Cordon {
        node: String,
    },
    Uncordon {
        node: String,
    },
    /// Restart every daemon on `node`, or on every node when `None`.
    RestartAllDaemons {
        node: Option<String>,
    },
    /// Clear the avoid mark of `node`, or of every node when `None`.
    ClearAvoid {
        node: Option<String>,
    },
    /// Drop the replicas `node` holds (of one blob, or all when `None`). Fold refuses
    /// the one-blob form when that copy is the blob's only healthy one
    /// (`would_drop_last_copy`); for the node-wide form reconcile keeps every last
    /// healthy copy (it never drops one).
    DropReplicas {
        node: String,
        blob: Option<BlobHash>,
    },
    /// Recompute placement for one blob, or for all when `None`.
    InvalidatePlacement {
        blob: Option<BlobHash>,
    },
    /// Key rotation: the cluster keyring becomes `keys` (in this order) at `version`,
    /// which must be the current version plus one. Version 1 is the genesis.
    SetKeyring {
        version: u64,
        keys: Vec<[u8; 32]>,
    },
    /// Admits node `name` with its ed25519 public key (a known name gets the new key:
    /// a reinstalled node); its records are folded from then on.
    AdmitNode {
        name: String,
        key: [u8; 32],
    },
    /// Revokes node `name`'s key and marks the node left: nothing it signs is folded
    /// again, and trimming the log stops waiting for it.
    RemoveNode {
        name: String,
    },
}

/// Desired placement of one blob.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PlacementIntent {
    pub blob: BlobHash,
    /// Healthy copies wanted.
    pub replicas: u8,
    /// Spread copies over distinct zones where possible.
    pub zone_spread: bool,
    /// Nodes that must hold a copy.
    pub pinned: Vec<String>,
}

/// What a daemon is and how it is supervised.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct DaemonSpec {
    pub name: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub working_dir: String,
    /// Essential daemons keep running on a node in maintenance.
    pub essential: bool,
    /// Restart when no health report arrives for this long (0: no health check).
    pub health_timeout_ms: u32,
    pub restart: RestartPolicy,
    /// Time between the shutdown control event and SIGKILL.
    pub stop_grace_ms: u32,
}

impl DaemonSpec {
    /// A spec with the defaults a spec file gets: no args or env, the daemon's own
    /// directory as working directory (empty), not essential, no health check, the
    /// anchors' restart policy, 10 s stop grace.
    pub fn new(name: &str, command: &str) -> DaemonSpec {
        DaemonSpec {
            name: name.to_string(),
            command: command.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            working_dir: String::new(),
            essential: false,
            health_timeout_ms: 0,
            restart: RestartPolicy::default(),
            stop_grace_ms: 10_000,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct RestartPolicy {
    pub backoff_base_ms: u32,
    pub backoff_max_ms: u32,
    /// Backoff resets after the daemon ran this long without an unplanned end.
    pub reset_after_ms: u32,
    /// Gate restarts after this many crashes within `crash_loop_window_ms`.
    pub crash_loop_limit: u16,
    pub crash_loop_window_ms: u32,
}

impl Default for RestartPolicy {
    /// The anchors' defaults: 1 s doubling to 5 min, reset after 10 min, gate at 5 crashes in 60 s.
    fn default() -> Self {
        RestartPolicy {
            backoff_base_ms: 1_000,
            backoff_max_ms: 300_000,
            reset_after_ms: 600_000,
            crash_loop_limit: 5,
            crash_loop_window_ms: 60_000,
        }
    }
}

/// Which nodes run a daemon.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DaemonPlacement {
    AllNodes,
    /// Nodes whose capabilities carry this label.
    Label(String),
    /// Exactly these nodes.
    Nodes(Vec<String>),
    /// No node: the daemon is removed.
    Nowhere,
}

/// A node's attributes, versioned: `version` forks from `fork_of` (0 for the first).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Capability {
    pub version: u64,
    pub fork_of: u64,
    pub zone: String,
    pub capacity_bytes: u64,
    pub labels: Vec<String>,
    /// The node's peer port (`host:port`) other nodes fetch blobs from and probe;
    /// empty when it serves none.
    pub endpoint: String,
}

/// A deterministic action id: the log position of the reconcile pass that emitted
/// the action and its index in that pass's list.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug))]
pub struct ActionId {
    pub position: u64,
    pub index: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Outcome {
    Success,
    Failure {
        reason: String,
    },
    /// The executor gave the action up for a reason that is not the action's fault
    /// (its node restarted or is shutting down): capacity frees, nothing backs off.
    Cancelled {
        reason: String,
    },
}

impl ArchivedActionId {
    pub fn to_native(&self) -> ActionId {
        ActionId { position: self.position.to_native(), index: self.index.to_native() }
    }
}

impl EventKind {
    /// A short stable name for messages and counters.
    pub fn name(&self) -> &'static str {
        archived_kind_name(self.code())
    }

    fn code(&self) -> u8 {
        match self {
            EventKind::ReplicaUpdate { .. } => 0,
            EventKind::Daemon { .. } => 1,
            EventKind::Rtt { .. } => 2,
            EventKind::NodeHealth(_) => 3,
            EventKind::Admin(_) => 4,
            EventKind::BlobAnnounce { .. } => 5,
            EventKind::PlacementIntent(_) => 6,
            EventKind::DaemonIntent { .. } => 7,
            EventKind::Capability(_) => 8,
            EventKind::ActionOutcome { .. } => 9,
            EventKind::InventoryDigest { .. } => 10,
            EventKind::Backpressure { .. } => 11,
            EventKind::Commitment { .. } => 12,
        }
    }
}

impl ArchivedEventKind {
    /// A short stable name for messages and counters.
    pub fn name(&self) -> &'static str {
        archived_kind_name(match self {
            ArchivedEventKind::ReplicaUpdate { .. } => 0,
            ArchivedEventKind::Daemon { .. } => 1,
            ArchivedEventKind::Rtt { .. } => 2,
            ArchivedEventKind::NodeHealth(_) => 3,
            ArchivedEventKind::Admin(_) => 4,
            ArchivedEventKind::BlobAnnounce { .. } => 5,
            ArchivedEventKind::PlacementIntent(_) => 6,
            ArchivedEventKind::DaemonIntent { .. } => 7,
            ArchivedEventKind::Capability(_) => 8,
            ArchivedEventKind::ActionOutcome { .. } => 9,
            ArchivedEventKind::InventoryDigest { .. } => 10,
            ArchivedEventKind::Backpressure { .. } => 11,
            ArchivedEventKind::Commitment { .. } => 12,
        })
    }
}

/// Names of event kinds, indexed by their code.
pub const EVENT_KIND_NAMES: [&str; 13] = [
    "replica_update",
    "daemon",
    "rtt",
    "node_health",
    "admin",
    "blob_announce",
    "placement_intent",
    "daemon_intent",
    "capability",
    "action_outcome",
    "inventory_digest",
    "backpressure",
    "commitment",
];

fn archived_kind_name(code: u8) -> &'static str {
    EVENT_KIND_NAMES[code as usize]
}

/// Formats a blob hash as lowercase hex.
pub fn blob_hex(blob: &BlobHash) -> String {
    hex(blob)
}

/// Lowercase hex of `bytes` (blob ids, keys, tokens).
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        use std::fmt::Write;
        let _ = write!(text, "{byte:02x}");
    }
    text
}
