//! The one switch between std atomics and loom's model-checked ones.
//!
//! Invariant: every custom atomic protocol in MeshOS imports its atomics, `fence`,
//! `Arc`, `Mutex`, `Condvar`, `UnsafeCell` and thread spawning from here and never
//! from `std` directly, so that `RUSTFLAGS="--cfg loom"` model-checks the real code
//! (see `loom-tests/`). Code outside such protocols (plain single-threaded state) does
//! not use this module. The first users are `ingest::ring` and `ingest::park`.
//!
//! `UnsafeCell` has loom's closure API (`with`, `with_mut`) in both builds, so every
//! access to shared non-atomic memory is visible to loom's data-race checker; the std
//! version is a zero-cost wrapper around `std::cell::UnsafeCell`.

#[cfg(loom)]
pub use loom::cell::UnsafeCell;
#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(loom)]
pub use loom::thread;

#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub use std::thread;

/// `std::cell::UnsafeCell` behind loom's access API: the pointer is only handed to a
/// closure, so the same code compiles against `loom::cell::UnsafeCell`, which checks
/// each access for data races.
#[cfg(not(loom))]
#[repr(transparent)]
pub struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    /// Wraps `data`.
    #[inline(always)]
    pub const fn new(data: T) -> UnsafeCell<T> {
        UnsafeCell(std::cell::UnsafeCell::new(data))
    }

    /// Unwraps the value.
    #[inline(always)]
    pub fn into_inner(self) -> T {
        self.0.into_inner()
    }

    /// Calls `f` with a shared pointer to the value. The caller's protocol must
    /// exclude a concurrent `with_mut` (loom checks this under `--cfg loom`).
    #[inline(always)]
    pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    /// Calls `f` with an exclusive pointer to the value. The caller's protocol must
    /// exclude any concurrent access (loom checks this under `--cfg loom`).
    #[inline(always)]
    pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
