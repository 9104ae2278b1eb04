//! MeshOS: the behaviour layer of a cluster.
//!
//! One totally ordered event log is folded into struct-of-arrays state; see
//! `ARCHITECTURE.md` for the map. Fold does no I/O, reads no clock and returns
//! no `Result`: the same log gives the same state on every node and every replay.

pub mod config;
pub mod event;
pub mod fold;
pub mod logtool;
pub mod redex;
pub mod sim;
pub mod state;
pub mod sync;
pub mod wire;
