//! Trust: who may put what into the log. Operators and nodes each hold an ed25519
//! key (`keys`); a cluster starts from a genesis the operator gives it (`genesis`:
//! first operator keys, nodes admitted from the start, the cluster id); every record
//! is made of signed sections (`record`), and fold applies a section's events only
//! when its signature verifies for the cluster, its key is the one the state admits
//! for its signer, and that signer may send each event's kind (`may_send`).
//!
//! Invariants: nothing here reads the state or a clock; `record::verify` and
//! `may_send` are pure functions of their arguments, so fold (and a verifier running
//! ahead of it) decides the same on every node and every replay.

pub mod genesis;
pub mod keys;
pub mod record;
pub mod testing;

use std::path::PathBuf;

pub use genesis::{test_operator_key, Genesis};
pub use keys::{is_public_key, test_key_of, verify_bytes, KeyPair, PublicKey};
pub use record::{sections, ClusterId, Sealer, Section, SectionError, SignerKind};

use crate::event::ArchivedEventKind;

/// Key files and genesis files.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists: refusing to overwrite a key file (move it away or pick another path)")]
    KeyFileExists { path: PathBuf },
    #[error(
        "{path} has mode {mode:04o}: a key file must be readable by its owner only; fix it with `chmod 600 {path}` \
         (and consider the key leaked if others could read it)"
    )]
    KeyFileMode { path: PathBuf, mode: u32 },
    #[error("{path}: not a key file: {reason} (expected 64 hex characters of the secret seed and a newline)")]
    KeyFileFormat { path: PathBuf, reason: String },
    #[error("{path}: not a usable genesis: {reason}")]
    Genesis { path: PathBuf, reason: String },
}

/// The node name rule lives with the config (`config::check_node_name`): a name is a
/// file name, a NATS client name, a log field and a signed section's signer.
pub use crate::config::{check_node_name, NodeNameError, NODE_NAME_BYTES_MAX};

const _: () = assert!(NODE_NAME_BYTES_MAX == record::SIGNER_NAME_BYTES_MAX);

/// What a signer may send: node facts only from that node, operator intents only
/// under an operator signature (ARCHITECTURE.md, "Trust model", has the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A node's own facts: its heartbeat and status, its copies and inventory, its
    /// daemons, capabilities, RTT samples it measured, outcomes of its actions,
    /// backpressure, commitments, blobs it stored first.
    Node,
    /// Operator intents: admin commands (keyring, admission, maintenance, ...), daemon
    /// specs, placement intents.
    Operator,
}

/// Who may send an event of this kind.
pub fn sender_of(kind: &ArchivedEventKind) -> Sender {
    match kind {
        ArchivedEventKind::Admin(_)
        | ArchivedEventKind::DaemonIntent { .. }
        | ArchivedEventKind::PlacementIntent(_) => Sender::Operator,
        ArchivedEventKind::ReplicaUpdate { .. }
        | ArchivedEventKind::Daemon { .. }
        | ArchivedEventKind::Rtt { .. }
        | ArchivedEventKind::NodeHealth(_)
        | ArchivedEventKind::BlobAnnounce { .. }
        | ArchivedEventKind::Capability(_)
        | ArchivedEventKind::ActionOutcome { .. }
        | ArchivedEventKind::InventoryDigest { .. }
        | ArchivedEventKind::Backpressure { .. }
        | ArchivedEventKind::Commitment { .. } => Sender::Node,
    }
}

/// The same for a native event kind (senders building records).
pub fn native_sender_of(kind: &crate::event::EventKind) -> Sender {
    use crate::event::EventKind;
    match kind {
        EventKind::Admin(_) | EventKind::DaemonIntent { .. } | EventKind::PlacementIntent(_) => Sender::Operator,
        _ => Sender::Node,
    }
}
