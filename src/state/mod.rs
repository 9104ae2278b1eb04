//! The folded state: struct-of-arrays tables of nodes, blobs, replicas, daemons and
//! RTT pairs, plus in-flight actions, the operators' keyring and rejections, and its
//! 128-bit commitment; `checkpoint` puts a state in a file and loads it back.
//!
//! Invariants: the state is a pure function of the records folded into it (see
//! `fold`); rows are dense and in order of first appearance in the log; hash maps
//! only find rows by key and are never iterated; `state_hash` covers every column
//! in row order. Nothing here does I/O or reads a clock, but `checkpoint`, which
//! reads and writes checkpoint files and never folds.

pub mod blobs;
pub mod checkpoint;
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
#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Symbols {
    pub names: Vec<Box<str>>,
    /// Name to id; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
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

    /// Rebuilds `index` from `names` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.names.len());
        for (row, name) in self.names.iter().enumerate() {
            if self.index.insert(name.clone(), SymbolId::from_index(row)).is_some() {
                return Err(format!("symbol `{name}` is interned twice"));
            }
        }
        Ok(())
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
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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
    /// Config, not state: a checkpoint stores their fingerprint and takes them from
    /// the loading node's config, which must be equal (`checkpoint`).
    #[rkyv(with = rkyv::with::Skip)]
    pub limits: FoldLimits,
    #[rkyv(with = rkyv::with::Skip)]
    pub reconcile: ReconcileConfig,
    /// Blobs fold touched since the last reconcile pass, each once (`blobs.dirty`).
    pub dirty_blobs: Reserved<BlobRow>,
    /// Daemon intents, instances or nodes changed since the last pass.
    pub daemons_dirty: bool,
    /// Reconcile's own bookkeeping (gates, cursors), part of the state.
    pub gates: Gates,
}

/// Reconcile's gate bookkeeping, carried from pass to pass.
#[derive(Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
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
            keyring: Keyring::from_genesis(&config.genesis),
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

    /// Every column of every table has its table's length (the error names the first
    /// that has not). Checked before anything indexes a loaded state by row.
    pub fn check_columns(&self) -> Result<(), String> {
        self.nodes.check_columns()?;
        self.blobs.check_columns()?;
        self.replicas.check_columns()?;
        self.specs.check_columns()?;
        self.daemons.check_columns()?;
        self.rtt.check_columns()?;
        ids::columns_in_step(
            "identities",
            self.keyring.identity_name.len(),
            &[
                ("identity_key", self.keyring.identity_key.len()),
                ("identity_revoked", self.keyring.identity_revoked.len()),
            ],
        )?;
        ids::columns_in_step("inflight", self.nodes.len(), &[("moves_by_node", self.inflight.moves_by_node.len())])
    }

    /// Rebuilds every key-to-row map from its table's columns and gives the working
    /// lists their reserved room back: what a checkpoint does not store.
    pub fn rebuild_indexes(&mut self) -> Result<(), String> {
        self.symbols.rebuild_index()?;
        self.nodes.rebuild_index()?;
        self.blobs.rebuild_index()?;
        self.replicas.rebuild_index()?;
        self.specs.rebuild_index()?;
        self.daemons.rebuild_index()?;
        self.rtt.rebuild_index()?;
        self.keyring.rebuild_index()?;
        // As fold and `InflightTable::new` reserve them: neither list grows in a pass.
        let room = self.blobs.len().saturating_sub(self.dirty_blobs.len());
        self.dirty_blobs.reserve(room);
        let room = self.inflight.capacity.saturating_sub(self.inflight.entries.len());
        self.inflight.entries.reserve_exact(room);
        Ok(())
    }

    /// Asserts every cross-table invariant (`verify_invariants`). O(rows); tests call
    /// it after folding, replay calls it in debug builds.
    pub fn check_invariants(&self) {
        if let Err(what) = self.verify_invariants() {
            panic!("state invariant broken: {what}");
        }
    }

    /// Checks every cross-table invariant: columns in step, derived counts match their
    /// columns, every row id in a column points at an existing row, maps and columns
    /// agree in size, bounded lists within their limits. Never panics, whatever the
    /// state holds (a loaded checkpoint is checked with it); the error names the first
    /// broken invariant.
    pub fn verify_invariants(&self) -> Result<(), String> {
        macro_rules! ensure {
            ($condition:expr, $($what:tt)+) => {
                if !$condition {
                    return Err(format!($($what)+));
                }
            };
        }
        macro_rules! ensure_eq {
            ($left:expr, $right:expr, $what:literal) => {
                if $left != $right {
                    return Err(format!(concat!($what, ": {:?} != {:?}"), $left, $right));
                }
            };
        }
        self.check_columns()?;
        let (nodes, blobs) = (self.nodes.len(), self.blobs.len());
        ensure_eq!(self.nodes.index.len(), nodes, "node index out of step");
        ensure_eq!(self.blobs.index.len(), blobs, "blob index out of step");
        ensure_eq!(self.replicas.index.len(), self.replicas.len(), "replica index out of step");
        ensure_eq!(self.specs.index.len(), self.specs.len(), "daemon spec index out of step");
        ensure_eq!(self.daemons.index.len(), self.daemons.len(), "daemon index out of step");
        ensure_eq!(self.rtt.index.len(), self.rtt.len(), "rtt index out of step");
        ensure_eq!(self.symbols.index.len(), self.symbols.names.len(), "symbol index out of step");
        let mut healthy = vec![0u32; blobs];
        let mut live = 0u32;
        let mut copies = vec![0u32; nodes];
        let mut digests = vec![0u128; nodes];
        for row in 0..self.replicas.len() {
            let (blob, node) = (self.replicas.blob[row].0 as usize, self.replicas.node[row].0 as usize);
            ensure!(blob < blobs && node < nodes, "replica {row} points past its tables");
            let state = self.replicas.state[row];
            live += (state != crate::event::ReplicaState::Deleted) as u32;
            if state == crate::event::ReplicaState::Healthy {
                healthy[blob] += 1;
                copies[node] += 1;
                let hash = &self.blobs.hash[blob];
                digests[node] = digests[node].wrapping_add(u128::from_le_bytes(hash[..16].try_into().expect("16")));
            }
        }
        ensure!(healthy == self.blobs.healthy_count, "blob healthy counts drifted from the replica table");
        ensure!(copies == self.nodes.healthy_copies, "node inventory counts drifted");
        ensure!(digests == self.nodes.healthy_digest, "node inventory digests drifted");
        ensure_eq!(live, self.replicas.live, "live replica count drifted");
        let replica_rows = self.replicas.len();
        for rows in &self.nodes.replica_rows {
            ensure!(rows.iter().all(|row| (row.0 as usize) < replica_rows), "a node's replica row past the table");
        }
        for rows in &self.blobs.replica_rows {
            ensure!(rows.iter().all(|row| (row.0 as usize) < replica_rows), "a blob's replica row past the table");
        }
        for row in 0..blobs {
            let announced_by = self.blobs.announced_by[row];
            ensure!(
                announced_by.is_none() || (announced_by.0 as usize) < nodes,
                "blob {row} announced by a node past the table"
            );
            ensure!(
                self.blobs.plan[row].iter().all(|node| (node.0 as usize) < nodes),
                "blob {row} plans a node past the table"
            );
            ensure!(
                self.blobs.pinned[row].iter().all(|node| (node.0 as usize) < nodes),
                "pinned node past the node table"
            );
        }
        let running = self.daemons.state.iter().filter(|state| state.is_running()).count() as u32;
        ensure_eq!(running, self.daemons.running, "running daemon count drifted");
        for row in 0..self.daemons.len() {
            ensure!(
                (self.daemons.spec[row].0 as usize) < self.specs.len() && (self.daemons.node[row].0 as usize) < nodes,
                "daemon {row} points past its tables"
            );
        }
        for row in 0..self.rtt.len() {
            let (from, to) = (self.rtt.from[row], self.rtt.to[row]);
            ensure!(from != to && (from.0 as usize) < nodes && (to.0 as usize) < nodes, "rtt pair {row} is invalid");
        }
        let symbols = self.symbols.names.len();
        let symbol_ok = |id: SymbolId| id.is_none() || (id.0 as usize) < symbols;
        ensure!(self.nodes.zone.iter().all(|&zone| symbol_ok(zone)), "a node's zone past the symbols");
        ensure!(self.nodes.labels.iter().flatten().all(|&label| symbol_ok(label)), "a node's label past the symbols");
        for placement in &self.specs.runs_on {
            match placement {
                daemons::SpecPlacement::Label(label) => ensure!(symbol_ok(*label), "a spec's label past the symbols"),
                daemons::SpecPlacement::Nodes(rows) => {
                    ensure!(rows.iter().all(|node| (node.0 as usize) < nodes), "a spec's node past the node table")
                }
                daemons::SpecPlacement::AllNodes | daemons::SpecPlacement::Nowhere => {}
            }
        }
        ensure!(symbols <= self.limits.symbols_max as usize, "symbols past symbols_max");
        ensure!(
            self.nodes.labels.iter().all(|labels| labels.len() <= self.limits.labels_per_node_max as usize),
            "labels past labels_per_node_max"
        );
        self.keyring.verify_invariants(
            self.limits.keyring_keys_max,
            self.limits.nodes_max,
            self.limits.operator_nonces_max,
        )?;
        let inflight = &self.inflight;
        ensure!(inflight.entries.len() <= inflight.capacity, "more in-flight actions than the table's capacity");
        for entry in inflight.entries.iter() {
            let action = &entry.action;
            ensure!((action.node.0 as usize) < nodes, "in-flight action {:?} on a node past the table", action.id);
            ensure!(action.kind.is_tracked(), "in-flight action {:?} is not tracked", action.id);
            ensure!(
                action.kind.peer().is_none_or(|peer| (peer.0 as usize) < nodes),
                "in-flight action {:?} peer past the table",
                action.id
            );
            ensure!(
                action.kind.blob().is_none_or(|blob| (blob.0 as usize) < blobs),
                "in-flight action {:?} blob past the table",
                action.id
            );
            ensure!(
                action.kind.daemon_spec().is_none_or(|spec| (spec.0 as usize) < self.specs.len()),
                "in-flight action {:?} spec past the table",
                action.id
            );
        }
        ensure!(self.rejections.kept.len() <= self.rejections.kept_max, "rejections past kept_max");
        ensure_eq!(self.rejections.total, self.rejections.by_reason.iter().sum::<u64>(), "rejection counts drifted");
        ensure!(self.dirty_blobs.iter().all(|blob| (blob.0 as usize) < blobs), "a dirty blob past the table");
        Ok(())
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
