//! Ingest: the queues between the reactor (sockets) and the sequencer (the log).
//!
//! One bounded lock-free SPSC [`ring`](ring::ring) per connection or source carries
//! items from the reactor to the sequencer; a full ring makes the reactor stop
//! reading that socket until the sequencer has made room ([`ring::Producer::mark_blocked`],
//! [`ring::Consumer::take_unblocked`]), so TCP pushes back on the sender and nothing
//! is dropped. One [`park::Signal`] lets the sequencer sleep when every ring is empty
//! and the reactor wake it after a push, without lost wake-ups.
//!
//! Invariants: these are the only cross-thread protocols of the ingest path, and
//! both are built on `crate::sync` only, so `loom-tests/` model-checks the real code;
//! the rings are allocated once, a push or pop allocates nothing; nothing here reads
//! a clock except `Signal::wait`'s timeout. Never: drops an item, blocks a producer
//! (only the consumer sleeps), or does I/O (the reactor's mio waker lives outside).

pub mod park;
pub mod ring;
