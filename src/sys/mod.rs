//! System boundary: the one place that touches the operating system's sockets and
//! signals.
//!
//! [`reactor`] owns every listener and connection (TCP and Unix), turns the bytes
//! clients send into whole, checked wire frames and hands them to the sequencer
//! through the `ingest` rings. [`client`] is the blocking client side of the same
//! protocol (tests, the load tool, later the SDK); [`signals`] turns SIGTERM and
//! SIGINT into a flag the node's loop polls. [`sdk_server`] serves daemons on the
//! SDK socket (framing only; the executor decides); [`process`] spawns and signals
//! daemon process groups. [`secure`] is the authenticated, encrypted channel between
//! node identities (Noise and ed25519); [`peer_server`] is the peer port on it.
//! Invariants: no other module imports `mio` or opens a socket; nothing here panics on
//! what a peer sends; every limit (connections, frame size, per-connection buffer,
//! ring length) comes from the configuration.

pub mod client;
pub mod files;
pub mod peer_server;
pub mod process;
pub mod reactor;
pub mod sdk_server;
pub mod secure;
pub mod signals;
