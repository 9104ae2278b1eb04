//! The one switch between std atomics and loom's model-checked ones.
//!
//! Invariant: every custom atomic protocol in MeshOS imports its atomics, `Arc`,
//! `Mutex`, `Condvar` and thread spawning from here and never from `std` directly,
//! so that `RUSTFLAGS="--cfg loom"` model-checks the real code (see `loom-tests/`).
//! Code outside such protocols (plain single-threaded state) does not use this module.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Arc, Condvar, Mutex};
#[cfg(loom)]
pub use loom::thread;

#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::{Arc, Condvar, Mutex};
#[cfg(not(loom))]
pub use std::thread;
