//! This node's executors: what the node does about the actions addressed to it.
//!
//! [`daemons`] runs daemon actions with real processes and serves the SDK's
//! registrations and reports; [`output`] copies a daemon's stdout and stderr into
//! rotating files; [`capability`] publishes the node's capability set. Blob movement
//! and probes come with the blob store. Invariants: executors never decide what
//! should happen (reconcile does); everything they observe goes back into the log as
//! events, never into the state directly.

pub mod blobs;
pub mod blobstore;
pub mod capability;
pub mod daemons;
pub mod output;
pub mod probes;
