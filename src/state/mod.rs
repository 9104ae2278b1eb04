//! The folded state: struct-of-arrays tables of nodes, blobs, replicas, daemons and
//! RTT pairs, plus in-flight actions, the operators' keyring and rejections, and its
//! 128-bit commitment.
//!
//! Invariants: the state is a pure function of the records folded into it (see
//! `fold`); rows are dense and in order of first appearance in the log; hash maps
//! only find rows by key and are never iterated; `state_hash` covers every column
//! in row order. Nothing here does I/O or reads a clock.

pub mod blobs;
pub mod daemons;
pub mod hash;
pub mod ids;
pub mod inflight;
pub mod keyring;
pub mod nodes;
pub mod rejections;
pub mod rtt;

use std::fmt;

use hashbrown::HashMap;

use self::blobs::{BlobTable, ReplicaTable};
use self::daemons::{DaemonTable, SpecTable};
use self::hash::StateHasher;
use self::ids::{BlobRow, NodeRow, Reserved, SymbolId};
use self::inflight::InflightTable;
use self::keyring::Keyring;
use self::nodes::NodeTable;
use self::rejections::Rejections;
use self::rtt::RttTable;
use crate::config::{Config, FoldLimits, ReconcileConfig};

/// Interned strings (zones, labels), in order of first appearance.
#[derive(Debug, Default, Clone)]
pub struct Symbols {
    pub names: Vec<Box<str>>,
    pub index: HashMap<Box<str>, SymbolId>,
}

impl Symbols {
    pub fn intern(&mut self, name: &str) -> SymbolId {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        let id = SymbolId::from_index(self.names.len());
        self.names.push(name.into());
        self.index.insert(name.into(), id);
        id
    }

    pub fn find(&self, name: &str) -> Option<SymbolId> {
        self.index.get(name).copied()
    }

    pub fn name(&self, id: SymbolId) -> &str {
        if id.is_none() {
            ""
        } else {
            &self.names[id.index()]
        }
    }

    fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("symbols", self.names.len());
        for name in &self.names {
            hasher.str(name);
        }
    }
}

/// Everything fold knows.
#[derive(Debug, Clone)]
pub struct State {
    /// Position of the last record folded (0 before the first).
    pub position: u64,
    /// Log time: the largest record commit time seen, in ms.
    pub now_ms: u64,
    pub events_applied: u64,
    /// Bumped (wrapping; compare for equality only) by a cluster-wide "invalidate placement".
    pub placement_epoch: u32,
    pub nodes: NodeTable,
    pub blobs: BlobTable,
    pub replicas: ReplicaTable,
    pub specs: SpecTable,
    pub daemons: DaemonTable,
    pub rtt: RttTable,
    pub inflight: InflightTable,
    pub symbols: Symbols,
    /// The operators' keys whose signed admin events fold applies (see `keyring`).
    pub keyring: Keyring,
    pub rejections: Rejections,
    pub limits: FoldLimits,
    pub reconcile: ReconcileConfig,
    /// Blobs fold touched since the last reconcile pass, each once (`blobs.dirty`).
    pub dirty_blobs: Reserved<BlobRow>,
    /// Daemon intents, instances or nodes changed since the last pass.
    pub daemons_dirty: bool,
    /// Reconcile's own bookkeeping (gates, cursors), part of the state.
    pub gates: Gates,
}

/// Reconcile's gate bookkeeping, carried from pass to pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gates {
    /// Start of the current throttle window and the moves started in it.
    pub window_start_ms: u64,
    pub window_moves: u32,
    /// Earliest time a held gate opens (u64::MAX: none is timed).
    pub next_open_ms: u64,
    /// Capacity freed (an action settled or timed out) since the last pass.
    pub capacity_freed: bool,
    /// The mass-failure brake is on (too many nodes went down within the window), and
    /// when its earliest counted failure leaves the window (u64::MAX when off).
    pub brake: bool,
    pub brake_until_ms: u64,
    /// Global backpressure is raised (set through the log by the sequencer).
    pub backpressure: bool,
    /// Anti-entropy cursor over the replica table.
    pub verify_cursor: u32,
    /// Earliest log time a daemon timer falls due (a restart backoff ends, a health
    /// report is overdue); u64::MAX when none is set.
    pub daemons_due_ms: u64,
    /// Measured transfer rate of finished moves (EWMA, bytes per second of log time;
    /// 0 until the first one).
    pub transfer_bytes_per_s: u64,
}

impl Gates {
    fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("gates", 0);
        hasher.u64(self.window_start_ms);
        hasher.u32(self.window_moves);
        hasher.u64(self.next_open_ms);
        hasher.bool(self.capacity_freed);
        hasher.bool(self.brake);
        hasher.u64(self.brake_until_ms);
        hasher.bool(self.backpressure);
        hasher.u32(self.verify_cursor);
        hasher.u64(self.daemons_due_ms);
        hasher.u64(self.transfer_bytes_per_s);
    }
}

impl State {
    pub fn new(config: &Config) -> State {
        State {
            position: 0,
            now_ms: 0,
            events_applied: 0,
            placement_epoch: 0,
            nodes: NodeTable::default(),
            blobs: BlobTable::default(),
            replicas: ReplicaTable::default(),
            specs: SpecTable::default(),
            daemons: DaemonTable::default(),
            rtt: RttTable::default(),
            inflight: InflightTable::new(config.reconcile.tracked_inflight_max()),
            symbols: Symbols::default(),
            keyring: Keyring::default(),
            rejections: Rejections::new(config.fold.rejections_kept_max),
            limits: config.fold,
            reconcile: config.reconcile,
            dirty_blobs: Reserved(Vec::new()),
            daemons_dirty: false,
            gates: Gates {
                next_open_ms: u64::MAX,
                brake_until_ms: u64::MAX,
                daemons_due_ms: u64::MAX,
                ..Gates::default()
            },
        }
    }

    /// The 128-bit commitment over the whole state (limits excluded: they are config).
    pub fn state_hash(&self) -> u128 {
        let mut hasher = StateHasher::new();
        hasher.str("meshos-state-v1");
        hasher.u64(self.position);
        hasher.u64(self.now_ms);
        hasher.u64(self.events_applied);
        hasher.u32(self.placement_epoch);
        self.symbols.hash_into(&mut hasher);
        self.nodes.hash_into(&mut hasher);
        self.blobs.hash_into(&mut hasher);
        self.replicas.hash_into(&mut hasher);
        self.specs.hash_into(&mut hasher);
        self.daemons.hash_into(&mut hasher);
        self.rtt.hash_into(&mut hasher);
        self.inflight.hash_into(&mut hasher);
        self.keyring.hash_into(&mut hasher);
        self.rejections.hash_into(&mut hasher);
        hasher.section("dirty", self.dirty_blobs.len());
        for blob in self.dirty_blobs.iter() {
            hasher.u32(blob.0);
        }
        hasher.bool(self.daemons_dirty);
        self.gates.hash_into(&mut hasher);
        hasher.finish()
    }

    /// Queues `blob` for the next reconcile pass (once).
    #[inline]
    pub fn mark_blob_dirty(&mut self, blob: BlobRow) {
        let dirty = &mut self.blobs.dirty[blob.index()];
        if !*dirty {
            *dirty = true;
            self.dirty_blobs.push(blob);
        }
    }

    /// Queues every blob with a copy on `node` (its copies' standing changed).
    pub fn mark_node_blobs_dirty(&mut self, node: NodeRow) {
        for position in 0..self.nodes.replica_rows[node.index()].len() {
            let replica = self.nodes.replica_rows[node.index()][position];
            let blob = self.replicas.blob[replica.index()];
            self.mark_blob_dirty(blob);
        }
    }

    /// Asserts every cross-table invariant: derived counts match their columns, every
    /// row id in a column points at an existing row, maps and columns agree in size.
    /// O(rows); tests call it after folding, replay calls it in debug builds.
    pub fn check_invariants(&self) {
        let (nodes, blobs) = (self.nodes.len(), self.blobs.len());
        assert_eq!(self.nodes.index.len(), nodes, "node index out of step");
        assert_eq!(self.blobs.index.len(), blobs, "blob index out of step");
        assert_eq!(self.replicas.index.len(), self.replicas.len(), "replica index out of step");
        assert_eq!(self.daemons.index.len(), self.daemons.len(), "daemon index out of step");
        assert_eq!(self.rtt.index.len(), self.rtt.len(), "rtt index out of step");
        let mut healthy = vec![0u32; blobs];
        let mut live = 0u32;
        for row in 0..self.replicas.len() {
            let (blob, node) = (self.replicas.blob[row], self.replicas.node[row]);
            assert!(blob.index() < blobs && node.index() < nodes, "replica {row} points past its tables");
            let state = self.replicas.state[row];
            healthy[blob.index()] += (state == crate::event::ReplicaState::Healthy) as u32;
            live += (state != crate::event::ReplicaState::Deleted) as u32;
        }
        assert_eq!(healthy, self.blobs.healthy_count, "blob healthy counts drifted from the replica table");
        let mut copies = vec![0u32; nodes];
        let mut digests = vec![0u128; nodes];
        for row in 0..self.replicas.len() {
            if self.replicas.state[row] == crate::event::ReplicaState::Healthy {
                let node = self.replicas.node[row].index();
                let hash = &self.blobs.hash[self.replicas.blob[row].index()];
                copies[node] += 1;
                digests[node] = digests[node].wrapping_add(u128::from_le_bytes(hash[..16].try_into().expect("16")));
            }
        }
        assert_eq!(copies, self.nodes.healthy_copies, "node inventory counts drifted");
        assert_eq!(digests, self.nodes.healthy_digest, "node inventory digests drifted");
        assert_eq!(live, self.replicas.live, "live replica count drifted");
        let running = self.daemons.state.iter().filter(|state| state.is_running()).count() as u32;
        assert_eq!(running, self.daemons.running, "running daemon count drifted");
        for row in 0..self.daemons.len() {
            assert!(self.daemons.spec[row].index() < self.specs.len() && self.daemons.node[row].index() < nodes);
        }
        for row in 0..self.rtt.len() {
            let (from, to) = (self.rtt.from[row], self.rtt.to[row]);
            assert!(from != to && from.index() < nodes && to.index() < nodes, "rtt pair {row} is invalid");
        }
        for pinned in &self.blobs.pinned {
            assert!(pinned.iter().all(|node| node.index() < nodes), "pinned node past the node table");
        }
        assert!(self.symbols.names.len() <= self.limits.symbols_max as usize, "symbols past symbols_max");
        assert!(self.nodes.labels.iter().all(|labels| labels.len() <= self.limits.labels_per_node_max as usize));
        self.keyring.check_invariants(self.limits.keyring_keys_max, self.limits.admin_keys_seen_max);
        assert!(self.rejections.kept.len() <= self.rejections.kept_max);
        assert_eq!(self.rejections.total, self.rejections.by_reason.iter().sum::<u64>());
    }

    pub fn summary(&self) -> Summary {
        Summary {
            position: self.position,
            state_hash: self.state_hash(),
            nodes: self.nodes.len() as u64,
            blobs: self.blobs.len() as u64,
            replicas: self.replicas.live as u64,
            daemons: self.daemons.running as u64,
            rejected: self.rejections.total,
        }
    }
}

/// The one-line account of a state that `meshos log replay` prints last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub position: u64,
    pub state_hash: u128,
    pub nodes: u64,
    pub blobs: u64,
    /// Replica rows not deleted.
    pub replicas: u64,
    /// Daemon instances running (started or registered).
    pub daemons: u64,
    pub rejected: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "position={} state_hash={} nodes={} blobs={} replicas={} daemons={} rejected={}",
            self.position,
            hash::hash_hex(self.state_hash),
            self.nodes,
            self.blobs,
            self.replicas,
            self.daemons,
            self.rejected
        )
    }
}
