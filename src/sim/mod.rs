//! Deterministic simulation: the seeded PRNG and the synthetic cluster-life generator.
//!
//! Invariant: everything here is a pure function of its seed and options; it is a
//! source of inputs for tests, benches and `meshos log gen`, never part of fold.

pub mod fixtures;
pub mod gen;
pub mod rng;
