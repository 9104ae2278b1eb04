//! Dense row ids: one `u32` newtype per table.
//!
//! Invariants: a row id is an index into its table's columns, assigned in order of
//! first appearance in the log and never reused or reordered; ids never travel on
//! the wire (external ids do). `NONE` (u32::MAX) marks "no row" in a column.

macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        pub struct $name(pub u32);

        impl $name {
            /// "No row", for optional columns.
            pub const NONE: $name = $name(u32::MAX);

            #[inline]
            pub fn index(self) -> usize {
                debug_assert!(self != Self::NONE);
                self.0 as usize
            }

            #[inline]
            pub fn from_index(index: usize) -> $name {
                assert!(index < u32::MAX as usize, concat!(stringify!($name), " overflow"));
                $name(index as u32)
            }

            #[inline]
            pub fn is_none(self) -> bool {
                self == Self::NONE
            }
        }
    };
}

row_id!(
    /// A row of the node table.
    NodeRow
);
row_id!(
    /// A row of the blob table.
    BlobRow
);
row_id!(
    /// A row of the replica table (one blob on one node).
    ReplicaRow
);
row_id!(
    /// A row of the daemon spec table (one daemon intent).
    SpecRow
);
row_id!(
    /// A row of the daemon table (one spec on one node).
    DaemonRow
);
row_id!(
    /// A row of the RTT pair table (one directed node pair).
    RttRow
);
row_id!(
    /// An interned string (zone, label).
    SymbolId
);

/// Checks that every column of a table has the table's length; the error names the
/// first that does not.
pub fn columns_in_step(table: &str, rows: usize, columns: &[(&str, usize)]) -> Result<(), String> {
    match columns.iter().find(|(_, len)| *len != rows) {
        Some((name, len)) => Err(format!("column {table}.{name} has {len} rows, the table {rows}")),
        None => Ok(()),
    }
}

/// `columns_in_step` over the named `Vec` columns of `$table` (`self`).
macro_rules! check_columns {
    ($table:ident, $name:literal, $($column:ident),+ $(,)?) => {
        $crate::state::ids::columns_in_step($name, $table.len(), &[$((stringify!($column), $table.$column.len())),+])
    };
}
pub(crate) use check_columns;

/// Key of a two-row pair in a `u64`, for hashbrown lookups.
#[inline]
pub fn pair_key(high: u32, low: u32) -> u64 {
    (high as u64) << 32 | low as u64
}

/// A `Vec` whose clone keeps the original's capacity: for working lists that must
/// never grow during a reconcile pass (their room is reserved up front), so that a
/// cloned state (tests, benches, the simulator) allocates no more than the original.
#[derive(Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Reserved<T>(pub Vec<T>);

impl<T: Clone> Clone for Reserved<T> {
    fn clone(&self) -> Self {
        let mut items = Vec::with_capacity(self.0.capacity());
        items.extend_from_slice(&self.0);
        Reserved(items)
    }
}

impl<T> std::ops::Deref for Reserved<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Reserved<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}
