//! The blob table (one row per announced blob) and the replica table (one row per
//! blob held on a node).
//!
//! Invariants: every column of a table has the table's length; `blobs.index` maps a
//! hash to its row and `replicas.index` maps `(blob, node)` to its row; rows are
//! never removed (a deleted copy keeps its row with state `Deleted`);
//! `blobs.healthy_count[b]` always equals the number of replica rows of `b` in state
//! `Healthy`, and `replicas.live` the number of rows not `Deleted`.

use hashbrown::HashMap;
use smallvec::SmallVec;

use super::hash::StateHasher;
use super::ids::{check_columns, pair_key, BlobRow, NodeRow, ReplicaRow};
use crate::event::{BlobHash, ReplicaState};

/// Most copies one blob's intent may ask for (plans are stored inline).
pub const PLAN_NODES_MAX: usize = 8;

#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BlobTable {
    pub hash: Vec<BlobHash>,
    pub size_bytes: Vec<u64>,
    pub announced_by: Vec<NodeRow>,
    pub announced_ms: Vec<u64>,
    /// Healthy copies wanted; 0 while no placement intent exists.
    pub replicas_wanted: Vec<u8>,
    pub zone_spread: Vec<bool>,
    pub pinned: Vec<SmallVec<[NodeRow; 2]>>,
    pub intent_ms: Vec<u64>,
    /// Bumped (wrapping; compare for equality only) by "invalidate placement" for this blob.
    pub placement_epoch: Vec<u32>,
    pub healthy_count: Vec<u32>,
    /// Replica rows of the blob, in row order (an index kept by fold).
    pub replica_rows: Vec<SmallVec<[ReplicaRow; 4]>>,
    /// Reconcile's cached placement: the nodes that should hold a copy, and whether
    /// it must be recomputed (intent, epoch or node eligibility changed).
    pub plan: Vec<SmallVec<[NodeRow; PLAN_NODES_MAX]>>,
    pub plan_valid: Vec<bool>,
    /// The lowest rendezvous score in the plan (a newly eligible node scoring below it
    /// cannot enter the plan), and the plan's length (nodes available, at most wanted).
    pub plan_floor: Vec<f64>,
    pub plan_len: Vec<u8>,
    /// Reconcile held the blob's next action back and looks again when a gate opens.
    pub waiting: Vec<bool>,
    /// Consecutive failed or timed-out pulls, and the backoff they impose.
    pub pull_failures: Vec<u8>,
    pub backoff_until_ms: Vec<u64>,
    /// The backoff an `apply_backoff` action already announced (sent once per period).
    pub backoff_announced_ms: Vec<u64>,
    /// The gate holding the blob's next action back (0: none) and when it opens
    /// (0: when capacity frees). Written by reconcile, shown to operators.
    pub held_by: Vec<u8>,
    pub held_until_ms: Vec<u64>,
    /// Reconcile must look at the blob again (set by fold, cleared by reconcile).
    pub dirty: Vec<bool>,
    /// Hash to row; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
    pub index: HashMap<BlobHash, BlobRow>,
}

impl BlobTable {
    pub fn len(&self) -> usize {
        self.hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hash.is_empty()
    }

    #[inline]
    pub fn find(&self, hash: &BlobHash) -> Option<BlobRow> {
        self.index.get(hash).copied()
    }

    pub fn insert(&mut self, hash: BlobHash, size_bytes: u64, announced_by: NodeRow, now_ms: u64) -> BlobRow {
        assert!(!self.index.contains_key(&hash), "blob interned twice");
        let row = BlobRow::from_index(self.len());
        self.index.insert(hash, row);
        self.hash.push(hash);
        self.size_bytes.push(size_bytes);
        self.announced_by.push(announced_by);
        self.announced_ms.push(now_ms);
        self.replicas_wanted.push(0);
        self.zone_spread.push(false);
        self.pinned.push(SmallVec::new());
        self.intent_ms.push(0);
        self.placement_epoch.push(0);
        self.healthy_count.push(0);
        self.replica_rows.push(SmallVec::new());
        self.plan.push(SmallVec::new());
        self.plan_valid.push(false);
        self.plan_floor.push(0.0);
        self.plan_len.push(0);
        self.waiting.push(false);
        self.pull_failures.push(0);
        self.backoff_until_ms.push(0);
        self.backoff_announced_ms.push(0);
        self.held_by.push(0);
        self.held_until_ms.push(0);
        self.dirty.push(false);
        debug_assert!(self.dirty.len() == self.len() && self.index.len() == self.len());
        row
    }

    /// Every column has the table's length (the error names the first that has not).
    /// A new column must be listed here.
    pub fn check_columns(&self) -> Result<(), String> {
        check_columns!(
            self,
            "blobs",
            size_bytes,
            announced_by,
            announced_ms,
            replicas_wanted,
            zone_spread,
            pinned,
            intent_ms,
            placement_epoch,
            healthy_count,
            replica_rows,
            plan,
            plan_valid,
            plan_floor,
            plan_len,
            waiting,
            pull_failures,
            backoff_until_ms,
            backoff_announced_ms,
            held_by,
            held_until_ms,
            dirty
        )
    }

    /// Rebuilds `index` from `hash` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.len());
        for (row, hash) in self.hash.iter().enumerate() {
            if self.index.insert(*hash, BlobRow::from_index(row)).is_some() {
                return Err(format!("blob {} has two rows", crate::event::blob_hex(hash)));
            }
        }
        Ok(())
    }
    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("blobs", self.len());
        for row in 0..self.len() {
            hasher.fixed(&self.hash[row]);
            hasher.u64(self.size_bytes[row]);
            hasher.u32(self.announced_by[row].0);
            hasher.u64(self.announced_ms[row]);
            hasher.u8(self.replicas_wanted[row]);
            hasher.bool(self.zone_spread[row]);
            hasher.u64(self.pinned[row].len() as u64);
            for node in &self.pinned[row] {
                hasher.u32(node.0);
            }
            hasher.u64(self.intent_ms[row]);
            hasher.u32(self.placement_epoch[row]);
            hasher.u32(self.healthy_count[row]);
            hasher.u64(self.plan[row].len() as u64);
            for node in &self.plan[row] {
                hasher.u32(node.0);
            }
            hasher.bool(self.plan_valid[row]);
            hasher.u64(self.plan_floor[row].to_bits());
            hasher.u8(self.plan_len[row]);
            hasher.bool(self.waiting[row]);
            hasher.u8(self.pull_failures[row]);
            hasher.u64(self.backoff_until_ms[row]);
            hasher.u64(self.backoff_announced_ms[row]);
            hasher.u8(self.held_by[row]);
            hasher.u64(self.held_until_ms[row]);
            hasher.bool(self.dirty[row]);
        }
    }
}

#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ReplicaTable {
    pub blob: Vec<BlobRow>,
    pub node: Vec<NodeRow>,
    pub state: Vec<ReplicaState>,
    pub since_ms: Vec<u64>,
    /// An operator asked for this copy to go (reconcile keeps the last healthy one).
    pub drop_requested: Vec<bool>,
    /// The holder's incarnation when the copy was last reported healthy: a copy counts
    /// only while this equals the holder's current incarnation (rejoin fencing).
    pub verified_incarnation: Vec<u32>,
    /// When the copy was last reported healthy (anti-entropy re-verifies old ones).
    pub verified_ms: Vec<u64>,
    /// The holder is in the blob's plan (kept by reconcile with the plan).
    pub planned: Vec<bool>,
    /// The holder's inventory digest disagreed with the log: re-verify this copy.
    pub verify_requested: Vec<bool>,
    /// Rows whose state is not `Deleted`.
    pub live: u32,
    /// `(blob, node)` to row; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
    pub index: HashMap<u64, ReplicaRow>,
}

impl ReplicaTable {
    pub fn len(&self) -> usize {
        self.blob.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blob.is_empty()
    }

    #[inline]
    pub fn find(&self, blob: BlobRow, node: NodeRow) -> Option<ReplicaRow> {
        self.index.get(&pair_key(blob.0, node.0)).copied()
    }

    pub fn insert(
        &mut self,
        blob: BlobRow,
        node: NodeRow,
        state: ReplicaState,
        incarnation: u32,
        now_ms: u64,
    ) -> ReplicaRow {
        let row = ReplicaRow::from_index(self.len());
        let previous = self.index.insert(pair_key(blob.0, node.0), row);
        assert!(previous.is_none(), "replica interned twice");
        self.blob.push(blob);
        self.node.push(node);
        self.state.push(state);
        self.since_ms.push(now_ms);
        self.drop_requested.push(false);
        self.verified_incarnation.push(incarnation);
        self.verified_ms.push(if state == ReplicaState::Healthy { now_ms } else { 0 });
        self.planned.push(false);
        self.verify_requested.push(false);
        self.live += (state != ReplicaState::Deleted) as u32;
        debug_assert!(self.state.len() == self.len() && self.index.len() == self.len());
        row
    }

    /// Every column has the table's length (the error names the first that has not).
    /// A new column must be listed here.
    pub fn check_columns(&self) -> Result<(), String> {
        check_columns!(
            self,
            "replicas",
            node,
            state,
            since_ms,
            drop_requested,
            verified_incarnation,
            verified_ms,
            planned,
            verify_requested
        )
    }

    /// Rebuilds `index` from `blob` and `node` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.len());
        for row in 0..self.len() {
            let (blob, node) = (self.blob[row], self.node[row]);
            if self.index.insert(pair_key(blob.0, node.0), ReplicaRow::from_index(row)).is_some() {
                return Err(format!("replica of blob row {} on node row {} has two rows", blob.0, node.0));
            }
        }
        Ok(())
    }
    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("replicas", self.len());
        hasher.u32(self.live);
        for row in 0..self.len() {
            hasher.u32(self.blob[row].0);
            hasher.u32(self.node[row].0);
            hasher.u8(self.state[row] as u8);
            hasher.u64(self.since_ms[row]);
            hasher.bool(self.drop_requested[row]);
            hasher.u32(self.verified_incarnation[row]);
            hasher.u64(self.verified_ms[row]);
            hasher.bool(self.planned[row]);
            hasher.bool(self.verify_requested[row]);
        }
    }
}
