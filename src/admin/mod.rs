//! Operator commands: signing them into an operator section, the command names, key
//! and hex parsing; `preview` (what a command would do, for `--dry-run`) and `submit`
//! (send one to the local node and confirm it was applied).
//!
//! Admin commands reach the cluster only through the log, in a section signed with
//! an operator's ed25519 key (`trust::record`): the signature binds the cluster id,
//! an expiry (`OPERATOR_VALIDITY_MS` after signing) and a random nonce, so a copied
//! section is refused by the replay window while valid and by its expiry after (no
//! dependence on the signer's clock being monotonic, or on one signer at a time: two
//! terminals may sign with one key at once). Fold applies the section only when its
//! key is in the cluster keyring; the keyring changes only by a signed `SetKeyring`,
//! and it starts from the genesis (`trust::genesis`), never from the log.
//!
//! Command codes (names for people and JSON): 0 enter_maintenance, 1
//! exit_maintenance, 2 drain, 3 cordon, 4 uncordon, 5 restart_all_daemons, 6
//! clear_avoid, 7 drop_replicas, 8 invalidate_placement, 9 set_keyring, 10
//! admit_node, 11 remove_node.
//!
//! Invariants: a nonce comes from `/dev/urandom`; nothing here is called by fold.
//! Errors are typed (`AdminError`).

pub mod preview;
pub mod submit;

use std::path::PathBuf;

use rkyv::util::AlignedVec;

use crate::event::{AdminCommand, BlobHash, Event, EventBatch, EventKind};
use crate::trust::{ClusterId, KeyPair, Sealer};
use crate::wire::{self, ALIGN_BYTES};

pub use crate::trust::keys::is_public_key;
pub use crate::trust::PublicKey;

/// An operator's signing key.
pub type OperatorKey = KeyPair;

/// How long a signed operator section stays valid after signing: enough for a slow
/// path to the log, short enough that a leaked section soon expires.
pub const OPERATOR_VALIDITY_MS: u64 = 600_000;

/// Everything that can go wrong signing and talking to the node (key files:
/// `TrustError`).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{text}` is not a {what}: {reason}")]
    BadHex { what: &'static str, text: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Client(#[from] crate::sys::client::ClientError),
    #[error(transparent)]
    Log(#[from] crate::redex::RedexError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
}

pub use crate::event::hex;

/// Parses 64 hex characters into 32 bytes (a public key or a blob hash).
pub fn parse_hex32(what: &'static str, text: &str) -> Result<[u8; 32], AdminError> {
    let bad = |reason: &str| AdminError::BadHex { what, text: text.to_string(), reason: reason.to_string() };
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(bad(&format!("{} characters, expected 64 hex characters", bytes.len())));
    }
    crate::trust::keys::parse_hex_bytes(bytes).ok_or_else(|| bad("not hex"))
}

/// Parses an operator's public key in hex; refuses bytes that are not an ed25519 point.
pub fn parse_public_key(text: &str) -> Result<PublicKey, AdminError> {
    let key = parse_hex32("public key", text)?;
    if !is_public_key(&key) {
        return Err(AdminError::BadHex {
            what: "public key",
            text: text.to_string(),
            reason: "not an ed25519 public key".to_string(),
        });
    }
    Ok(key)
}

/// Parses a blob hash in hex.
pub fn parse_blob(text: &str) -> Result<BlobHash, AdminError> {
    parse_hex32("blob hash", text)
}

/// The command's code: its index in `COMMAND_NAMES`.
pub fn command_code(command: &AdminCommand) -> u8 {
    match command {
        AdminCommand::EnterMaintenance { .. } => 0,
        AdminCommand::ExitMaintenance { .. } => 1,
        AdminCommand::Drain { .. } => 2,
        AdminCommand::Cordon { .. } => 3,
        AdminCommand::Uncordon { .. } => 4,
        AdminCommand::RestartAllDaemons { .. } => 5,
        AdminCommand::ClearAvoid { .. } => 6,
        AdminCommand::DropReplicas { .. } => 7,
        AdminCommand::InvalidatePlacement { .. } => 8,
        AdminCommand::SetKeyring { .. } => 9,
        AdminCommand::AdmitNode { .. } => 10,
        AdminCommand::RemoveNode { .. } => 11,
    }
}

/// Names of the commands, indexed by `command_code`.
pub const COMMAND_NAMES: [&str; 12] = [
    "enter_maintenance",
    "exit_maintenance",
    "drain",
    "cordon",
    "uncordon",
    "restart_all_daemons",
    "clear_avoid",
    "drop_replicas",
    "invalidate_placement",
    "set_keyring",
    "admit_node",
    "remove_node",
];

/// A fresh random nonce for an operator section.
pub fn random_nonce() -> Result<[u8; 16], AdminError> {
    let mut nonce = [0u8; 16];
    crate::sys::process::random_bytes(&mut nonce)
        .map_err(|source| AdminError::Io { path: PathBuf::from("/dev/urandom"), source })?;
    Ok(nonce)
}

/// Milliseconds since the Unix epoch on this machine's clock (the signer's: only
/// the expiry depends on it, and fold bounds how far ahead it may lie).
pub fn wall_clock_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// A payload of one operator section carrying `kinds` (operator intents: commands,
/// daemon specs, placement intents), signed by `key` as `operator` for `cluster_id`,
/// valid until `expires_ms`, under `nonce`.
pub fn seal_operator(
    key: &KeyPair,
    operator: &str,
    cluster_id: ClusterId,
    kinds: Vec<EventKind>,
    expires_ms: u64,
    nonce: &[u8; 16],
) -> AlignedVec<ALIGN_BYTES> {
    let events = kinds.into_iter().map(|kind| Event { origin: String::new(), origin_seq: 0, kind }).collect();
    let body = wire::encode_batch(&EventBatch { events });
    let mut out = AlignedVec::with_capacity(crate::trust::record::SECTION_HEADER_BYTES + body.len() + ALIGN_BYTES);
    Sealer::operator(operator, key.clone(), cluster_id).seal_into(&mut out, &body, expires_ms, nonce);
    out
}

/// `seal_operator` now: valid for `OPERATOR_VALIDITY_MS` from this machine's clock,
/// with a random nonce.
pub fn sign_now(
    key: &KeyPair,
    operator: &str,
    cluster_id: ClusterId,
    kinds: Vec<EventKind>,
) -> Result<AlignedVec<ALIGN_BYTES>, AdminError> {
    let expires_ms = wall_clock_ms().saturating_add(OPERATOR_VALIDITY_MS);
    Ok(seal_operator(key, operator, cluster_id, kinds, expires_ms, &random_nonce()?))
}

/// The operator name a section carries by default: `$USER@$HOSTNAME`-like, for the
/// record only (the key is what is trusted).
pub fn default_operator_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "operator".to_string());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    let name = if host.is_empty() { user } else { format!("{user}@{host}") };
    name.chars().filter(|c| c.is_ascii_graphic()).take(64).collect()
}

/// An admin command as an event kind.
pub fn command_kind(command: AdminCommand) -> EventKind {
    EventKind::Admin(Box::new(command))
}

/// The fixed key the simulator and `meshos log gen` sign their admin events with.
/// Public in the code, so never trust it in a real keyring.
pub fn test_key() -> OperatorKey {
    crate::trust::test_operator_key()
}
