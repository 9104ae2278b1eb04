//! SIGTERM and SIGINT as a flag: the node's main loop polls it and shuts down cleanly.
//!
//! The flag is a `std` `AtomicBool` (signal-hook's handler needs that exact type and
//! stores to it from the signal handler); it is a one-way flag with no protocol
//! around it, so it does not go through `crate::sync`. Never: does more in the
//! handler than that store.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set once SIGTERM or SIGINT arrived.
#[derive(Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag no signal sets (tests, embedded use).
    pub fn new() -> StopFlag {
        StopFlag(Arc::new(AtomicBool::new(false)))
    }

    /// A flag that SIGTERM and SIGINT set.
    pub fn on_terminate() -> io::Result<StopFlag> {
        let flag = StopFlag::new();
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, Arc::clone(&flag.0))?;
        }
        Ok(flag)
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Default for StopFlag {
    fn default() -> Self {
        StopFlag::new()
    }
}
