//! System boundary: the one place that touches the operating system's sockets.
//!
//! [`reactor`] owns every listener and connection (TCP and Unix), turns the bytes
//! clients send into whole, checked wire frames and hands them to the sequencer
//! through the `ingest` rings. Invariants: no other module imports `mio` or opens a
//! socket; nothing here panics on what a peer sends; every limit (connections, frame
//! size, per-connection buffer, ring length) comes from the configuration.

pub mod reactor;
