//! loom models of MeshOS's custom atomic protocols.
//!
//! Build and run with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`
//! (the README's test command does). Models live in `tests/`, each behind
//! `#![cfg(loom)]`, and drive the real code through `meshos::sync`, which switches to
//! loom's atomics under `cfg(loom)`. Each model asserts that nothing is lost or
//! duplicated and that no wake-up is missed.
//!
//! The foundation has no cross-thread protocol yet (fold, reconcile and the embedded
//! log are single-threaded); the first models arrive with the ingest queues and the
//! reactor/sequencer handoff.
