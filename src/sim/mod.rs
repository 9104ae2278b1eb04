//! Deterministic simulation: the seeded PRNG, the synthetic cluster-life generator,
//! and the cluster simulator that drives fold and reconcile as every node's executor.
//!
//! Invariant: everything here is a pure function of its seed and options; it is a
//! source of inputs for tests, benches, `meshos log gen` and `meshos sim`, never part
//! of fold or reconcile, and it never writes into a `State` except through fold.

pub mod cluster;
pub mod fixtures;
pub mod gen;
pub mod rng;
