//! The RTT table: one row per measured directed node pair, with an integer moving
//! average (network coordinates for unmeasured pairs arrive with reconcile).
//!
//! Invariants: every column has the table's length; `index` maps `(from, to)` to its
//! row; `from != to`; averages are integers (microseconds), so every platform
//! computes the same value.

use hashbrown::HashMap;

use super::hash::StateHasher;
use super::ids::{check_columns, pair_key, NodeRow, RttRow};

#[derive(Debug, Default, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RttTable {
    pub from: Vec<NodeRow>,
    pub to: Vec<NodeRow>,
    /// Exponentially weighted moving average of the samples, in microseconds.
    pub average_us: Vec<u32>,
    pub last_us: Vec<u32>,
    pub samples: Vec<u32>,
    pub last_ms: Vec<u64>,
    /// `(from, to)` to row; not checkpointed (`rebuild_index` after a load).
    #[rkyv(with = rkyv::with::Skip)]
    pub index: HashMap<u64, RttRow>,
}

impl RttTable {
    pub fn len(&self) -> usize {
        self.from.len()
    }

    pub fn is_empty(&self) -> bool {
        self.from.is_empty()
    }

    #[inline]
    pub fn find(&self, from: NodeRow, to: NodeRow) -> Option<RttRow> {
        self.index.get(&pair_key(from.0, to.0)).copied()
    }

    pub fn insert(&mut self, from: NodeRow, to: NodeRow, sample_us: u32, now_ms: u64) -> RttRow {
        assert!(from != to, "rtt pair to itself");
        let row = RttRow::from_index(self.len());
        let previous = self.index.insert(pair_key(from.0, to.0), row);
        assert!(previous.is_none(), "rtt pair interned twice");
        self.from.push(from);
        self.to.push(to);
        self.average_us.push(sample_us);
        self.last_us.push(sample_us);
        self.samples.push(1);
        self.last_ms.push(now_ms);
        row
    }

    /// Folds one sample into the pair's moving average: `avg += (sample - avg) / 2^shift`.
    #[inline]
    pub fn record(&mut self, row: RttRow, sample_us: u32, shift: u8, now_ms: u64) {
        let index = row.index();
        let average = self.average_us[index] as i64;
        let next = average + ((sample_us as i64 - average) >> shift);
        debug_assert!((0..=u32::MAX as i64).contains(&next));
        self.average_us[index] = next as u32;
        self.last_us[index] = sample_us;
        self.samples[index] = self.samples[index].saturating_add(1);
        self.last_ms[index] = now_ms;
    }

    /// Every column has the table's length (the error names the first that has not).
    /// A new column must be listed here.
    pub fn check_columns(&self) -> Result<(), String> {
        check_columns!(self, "rtt", to, average_us, last_us, samples, last_ms)
    }

    /// Rebuilds `index` from `from` and `to` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.index = HashMap::with_capacity(self.len());
        for row in 0..self.len() {
            let (from, to) = (self.from[row], self.to[row]);
            if self.index.insert(pair_key(from.0, to.0), RttRow::from_index(row)).is_some() {
                return Err(format!("rtt pair of node rows {} and {} has two rows", from.0, to.0));
            }
        }
        Ok(())
    }
    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("rtt", self.len());
        for row in 0..self.len() {
            hasher.u32(self.from[row].0);
            hasher.u32(self.to[row].0);
            hasher.u32(self.average_us[row]);
            hasher.u32(self.last_us[row]);
            hasher.u32(self.samples[row]);
            hasher.u64(self.last_ms[row]);
        }
    }
}
