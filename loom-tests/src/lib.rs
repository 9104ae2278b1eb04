//! loom models of MeshOS's custom atomic protocols.
//!
//! Build and run with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`
//! (`scripts/test.sh` does, with `LOOM_MAX_PREEMPTIONS=3`). Models live in `tests/`,
//! each file behind `#![cfg(loom)]`, and drive the real code through `meshos::sync`,
//! which switches to loom's atomics, fences, cells, locks and threads under
//! `cfg(loom)`. Each model asserts that nothing is lost or duplicated, that order is
//! kept and that no wake-up is missed (a missed one deadlocks, which loom reports).
//!
//! - `tests/ring.rs`: `meshos::ingest::ring` (push/pop handoff, producer gone,
//!   consumer gone with items left, the blocked/unblocked flag).
//! - `tests/park.rs`: `meshos::ingest::park::Signal` with the rings (park/wake, two
//!   producers, shutdown while a producer is active, the timeout path).

/// A loom model builder with the preemption bound from `LOOM_MAX_PREEMPTIONS`, or 3
/// if it is unset (unbounded exploration of these models takes hours).
#[cfg(loom)]
pub fn builder() -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder
}
