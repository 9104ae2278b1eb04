//! The node table: one row per node, in order of first appearance in the log.
//!
//! Invariants: every column has exactly `len()` entries; `index` maps each name to
//! its row and nothing else; a row is never removed (a node that leaves keeps its
//! row with status `Left`). Only fold mutates it.

use hashbrown::HashMap;
use smallvec::SmallVec;

use super::hash::StateHasher;
use super::ids::{check_columns, NodeRow, ReplicaRow, SymbolId};
use crate::locality::Coordinate;

/// A stable 64-bit key for a node name: the first 8 bytes (LE) of its blake3 hash.
pub fn node_key(name: &str) -> u64 {
    u64::from_le_bytes(blake3::hash(name.as_bytes()).as_bytes()[..8].try_into().expect("8 bytes"))
}
use crate::event::NodeStatus;

/// The maintenance lifecycle of the seed's section 12.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[repr(u8)]
pub enum MaintenanceState {
    Active = 0,
    EnteringMaintenance = 1,
    Maintenance = 2,
    ExitingMaintenance = 3,
    DrainFailed = 4,
    Recovery = 5,
}

impl MaintenanceState {
    /// Being drained or in maintenance: no new copies, non-essential daemons stopped.
    pub fn is_away(self) -> bool {
        matches!(
            self,
            MaintenanceState::EnteringMaintenance | MaintenanceState::Maintenance | MaintenanceState::DrainFailed
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            MaintenanceState::Active => "active",
            MaintenanceState::EnteringMaintenance => "entering_maintenance",
            MaintenanceState::Maintenance => "maintenance",
            MaintenanceState::ExitingMaintenance => "exiting_maintenance",
            MaintenanceState::DrainFailed => "drain_failed",
            MaintenanceState::Recovery => "recovery",
        }
    }

    /// True while the node is in, or on its way into or out of, maintenance.
    pub fn in_maintenance(self) -> bool {
        !matches!(self, MaintenanceState::Active)
    }
}

/// Struct-of-arrays node table.
#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodeTable {
    pub name: Vec<Box<str>>,
    pub status: Vec<NodeStatus>,
    pub joined_ms: Vec<u64>,
    pub last_heartbeat_ms: Vec<u64>,
    pub load_permille: Vec<u16>,
    /// Highest origin sequence number applied from this node.
    pub origin_seq_last: Vec<u64>,
    /// Bumped each time the node comes back after Down or Left.
    pub incarnation: Vec<u32>,
    pub cordoned: Vec<bool>,
    pub draining: Vec<bool>,
    pub maintenance: Vec<MaintenanceState>,
    pub avoid: Vec<bool>,
    /// The node's sequencer has raised global backpressure (a `Backpressure` event).
    pub backpressure: Vec<bool>,
    /// When the node entered its current maintenance state.
    pub maintenance_since_ms: Vec<u64>,
    /// Entering maintenance: not drained by then means DrainFailed.
    pub drain_deadline_ms: Vec<u64>,
    /// The capability version when maintenance began: exiting needs a newer one.
    pub capability_version_at_enter: Vec<u64>,
    /// Drain progress, recomputed every pass while draining: copies on the node that
    /// are not yet safe elsewhere, how many of those have a move in flight, and
    /// non-essential daemons still running.
    pub drain_unsafe_copies: Vec<u32>,
    pub drain_moving_copies: Vec<u32>,
    pub drain_daemons_left: Vec<u32>,
    /// Bytes of the unsafe copies, and the expected time until they are safe from the
    /// measured transfer rate (u64::MAX: no rate measured yet).
    pub drain_unsafe_bytes: Vec<u64>,
    pub drain_eta_ms: Vec<u64>,
    /// Bumped (wrapping; compare for equality only) by each "restart all daemons" aimed at the node.
    pub restart_generation: Vec<u32>,
    pub capability_version: Vec<u64>,
    pub zone: Vec<SymbolId>,
    pub capacity_bytes: Vec<u64>,
    pub labels: Vec<SmallVec<[SymbolId; 4]>>,
    /// The node's peer port from its capability (`host:port`; empty: none announced).
    pub endpoint: Vec<Box<str>>,
    pub inventory_blob_count: Vec<u32>,
    pub inventory_digest: Vec<[u8; 16]>,
    pub inventory_reported_ms: Vec<u64>,
    /// Stable 64-bit key of the name (placement hashes names, not rows).
    pub key: Vec<u64>,
    /// When the status last changed.
    pub status_since_ms: Vec<u64>,
    /// Replica rows held by the node, in row order (an index kept by fold).
    pub replica_rows: Vec<Vec<ReplicaRow>>,
    /// Reconcile's memo of the last pass: alive (up and heard from within
    /// `node_down_ms`) and eligible for new copies. Changes drive re-planning.
    pub live: Vec<bool>,
    pub eligible: Vec<bool>,
    /// Moving average of every RTT sample the node took part in (either end), in µs.
    pub rtt_average_us: Vec<u32>,
    /// A daemon on the node reported saturation; reduce_heat was sent (hysteresis).
    pub hot: Vec<bool>,
    /// The node's Vivaldi network coordinate, moved by the RTT samples it takes.
    pub coordinate: Vec<Coordinate>,
    /// The log's view of the node's inventory, kept by fold: healthy copies and the
    /// wrapping sum of the first 16 bytes (LE) of their hashes.
    pub healthy_copies: Vec<u32>,
    pub healthy_digest: Vec<u128>,
    /// The node's latest state commitment: the log position and the state hash it
    /// computed there (`Commitment` events; 0 and zeros before the first).
    pub commitment_position: Vec<u64>,
    pub commitment_hash: Vec<[u8; 16]>,
    /// The lowest log position the node still needs to restart (the first after its
    /// oldest kept checkpoint; 0: it needs the whole log).
    pub needs_position: Vec<u64>,
    /// Name to row; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
    pub index: HashMap<Box<str>, NodeRow>,
}

impl NodeTable {
    pub fn len(&self) -> usize {
        self.name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.name.is_empty()
    }

    #[inline]
    pub fn find(&self, name: &str) -> Option<NodeRow> {
        self.index.get(name).copied()
    }

    /// Appends a row for a node first seen at `now_ms`. The caller checked the limit.
    pub fn insert(&mut self, name: &str, origin_seq: u64, now_ms: u64) -> NodeRow {
        assert!(!self.index.contains_key(name), "node {name} interned twice");
        let row = NodeRow::from_index(self.len());
        let name: Box<str> = name.into();
        self.index.insert(name.clone(), row);
        self.name.push(name);
        self.status.push(NodeStatus::Up);
        self.joined_ms.push(now_ms);
        self.last_heartbeat_ms.push(now_ms);
        self.load_permille.push(0);
        self.origin_seq_last.push(origin_seq);
        self.incarnation.push(0);
        self.cordoned.push(false);
        self.draining.push(false);
        self.maintenance.push(MaintenanceState::Active);
        self.avoid.push(false);
        self.backpressure.push(false);
        self.maintenance_since_ms.push(now_ms);
        self.drain_deadline_ms.push(0);
        self.capability_version_at_enter.push(0);
        self.drain_unsafe_copies.push(0);
        self.drain_moving_copies.push(0);
        self.drain_daemons_left.push(0);
        self.drain_unsafe_bytes.push(0);
        self.drain_eta_ms.push(0);
        self.restart_generation.push(0);
        self.capability_version.push(0);
        self.zone.push(SymbolId::NONE);
        self.capacity_bytes.push(0);
        self.labels.push(SmallVec::new());
        self.endpoint.push("".into());
        self.inventory_blob_count.push(0);
        self.inventory_digest.push([0; 16]);
        self.inventory_reported_ms.push(0);
        self.key.push(node_key(&self.name[row.index()]));
        self.status_since_ms.push(now_ms);
        self.replica_rows.push(Vec::new());
        self.live.push(false);
        self.eligible.push(false);
        self.rtt_average_us.push(0);
        self.hot.push(false);
        self.coordinate.push(Coordinate::ORIGIN);
        self.healthy_copies.push(0);
        self.healthy_digest.push(0);
        self.commitment_position.push(0);
        self.commitment_hash.push([0; 16]);
        self.needs_position.push(0);
        self.debug_check();
        row
    }

    fn debug_check(&self) {
        debug_assert!(self.check_columns().is_ok() && self.index.len() == self.len(), "node columns out of step");
    }

    /// Every column has the table's length (the error names the first that has not).
    /// A new column must be listed here.
    pub fn check_columns(&self) -> Result<(), String> {
        check_columns!(
            self,
            "nodes",
            status,
            joined_ms,
            last_heartbeat_ms,
            load_permille,
            origin_seq_last,
            incarnation,
            cordoned,
            draining,
            maintenance,
            avoid,
            backpressure,
            maintenance_since_ms,
            drain_deadline_ms,
            capability_version_at_enter,
            drain_unsafe_copies,
            drain_moving_copies,
            drain_daemons_left,
            drain_unsafe_bytes,
            drain_eta_ms,
            restart_generation,
            capability_version,
            zone,
            capacity_bytes,
            labels,
            endpoint,
            inventory_blob_count,
            inventory_digest,
            inventory_reported_ms,
            key,
            status_since_ms,
            replica_rows,
            live,
            eligible,
            rtt_average_us,
            hot,
            coordinate,
            healthy_copies,
            healthy_digest,
            commitment_position,
            commitment_hash,
            needs_position,
        )
    }

    /// Rebuilds `index` from `name` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.len());
        for (row, name) in self.name.iter().enumerate() {
            if self.index.insert(name.clone(), NodeRow::from_index(row)).is_some() {
                return Err(format!("node `{name}` has two rows"));
            }
        }
        Ok(())
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("nodes", self.len());
        for row in 0..self.len() {
            hasher.str(&self.name[row]);
            hasher.u8(self.status[row] as u8);
            hasher.u64(self.joined_ms[row]);
            hasher.u64(self.last_heartbeat_ms[row]);
            hasher.u16(self.load_permille[row]);
            hasher.u64(self.origin_seq_last[row]);
            hasher.u32(self.incarnation[row]);
            hasher.bool(self.cordoned[row]);
            hasher.bool(self.draining[row]);
            hasher.u8(self.maintenance[row] as u8);
            hasher.bool(self.avoid[row]);
            hasher.bool(self.backpressure[row]);
            hasher.u64(self.maintenance_since_ms[row]);
            hasher.u64(self.drain_deadline_ms[row]);
            hasher.u64(self.capability_version_at_enter[row]);
            hasher.u32(self.drain_unsafe_copies[row]);
            hasher.u32(self.drain_moving_copies[row]);
            hasher.u32(self.drain_daemons_left[row]);
            hasher.u64(self.drain_unsafe_bytes[row]);
            hasher.u64(self.drain_eta_ms[row]);
            hasher.u32(self.restart_generation[row]);
            hasher.u64(self.capability_version[row]);
            hasher.u32(self.zone[row].0);
            hasher.u64(self.capacity_bytes[row]);
            hasher.str(&self.endpoint[row]);
            hasher.u64(self.labels[row].len() as u64);
            for label in &self.labels[row] {
                hasher.u32(label.0);
            }
            hasher.u32(self.inventory_blob_count[row]);
            hasher.fixed(&self.inventory_digest[row]);
            hasher.u64(self.inventory_reported_ms[row]);
            hasher.u64(self.key[row]);
            hasher.u64(self.status_since_ms[row]);
            hasher.u64(self.replica_rows[row].len() as u64);
            hasher.bool(self.live[row]);
            hasher.bool(self.eligible[row]);
            hasher.u32(self.rtt_average_us[row]);
            hasher.bool(self.hot[row]);
            let coordinate = &self.coordinate[row];
            for value in [coordinate.x_us, coordinate.y_us, coordinate.height_us, coordinate.error] {
                hasher.u64(value.to_bits());
            }
            hasher.u32(self.healthy_copies[row]);
            hasher.fixed(&self.healthy_digest[row].to_le_bytes());
            hasher.u64(self.commitment_position[row]);
            hasher.fixed(&self.commitment_hash[row]);
            hasher.u64(self.needs_position[row]);
        }
    }
}
