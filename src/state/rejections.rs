//! Rejected events: counted by reason, the latest kept in a bounded ring.
//!
//! Invariants: every event fold refuses lands here exactly once; `total` equals the
//! sum of `by_reason`; the ring never holds more than `kept_max` entries (oldest
//! dropped first, still counted). Rejections are part of the state and its hash.

use std::collections::VecDeque;
use std::fmt;

use super::checkpoint::StaticText;
use super::hash::StateHasher;
use crate::event::{blob_hex, ActionId, BlobHash};

/// Why fold refused an event. Each names the thing that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum RejectReason {
    /// The record's payload is not a valid archived `EventBatch`; no event of it was
    /// applied. Carries only the payload size: validator messages hold memory
    /// addresses, which would make the state hash differ between replays.
    BadPayload {
        payload_bytes: u32,
    },
    /// The origin node has never announced itself (heartbeat or capability).
    UnknownOrigin(Box<str>),
    /// The origin sequence number is not above the last one applied from that origin.
    StaleOriginSeq {
        last: u64,
        got: u64,
    },
    UnknownNode(Box<str>),
    UnknownBlob(BlobHash),
    UnknownDaemon(Box<str>),
    UnknownAction(ActionId),
    /// A replica update for a copy the node was never known to have.
    UnknownReplica {
        blob: BlobHash,
    },
    BlobSizeMismatch {
        blob: BlobHash,
        known_bytes: u64,
        announced_bytes: u64,
    },
    /// A capability version that does not fork from the node's current version.
    CapabilityForkMismatch {
        current: u64,
        fork_of: u64,
        version: u64,
    },
    DaemonNotRunning(Box<str>),
    DaemonAlreadyRunning(Box<str>),
    PidMismatch {
        daemon: Box<str>,
        running: u32,
        reported: u32,
    },
    NotInMaintenance(Box<str>),
    RttToSelf,
    /// A name longer than `name_bytes_max` or empty.
    BadName {
        bytes: u32,
        max: u32,
    },
    InvalidIntent(#[rkyv(with = StaticText)] &'static str),
    /// A table reached its configured row limit.
    TableFull(#[rkyv(with = StaticText)] &'static str),
    /// A section whose signature does not verify for its key in this cluster
    /// (tampered, signed for another cluster, or forged); signer and key prefix.
    BadSignature {
        signer: Box<str>,
        key: Box<str>,
    },
    /// An operator section while the state has no genesis (no key is trusted).
    NoGenesis,
    /// An operator section signed by a key that is not in the current keyring.
    UnknownAdminKey(Box<str>),
    /// An operator section already applied (same expiry and nonce): a replay.
    OperatorReplayed {
        expires_ms: u64,
    },
    /// A key rotation whose version is not the current version plus one.
    StaleKeyringVersion {
        current: u64,
        got: u64,
    },
    /// A key rotation with an empty, duplicated, oversized or malformed key list.
    InvalidKeyring(#[rkyv(with = StaticText)] &'static str),
    /// An explicit drop of a blob's only healthy copy.
    WouldDropLastCopy {
        blob: BlobHash,
    },
    /// A state commitment that does not move forward, names a position the log has
    /// not reached, or claims to need a position past it.
    BadCommitment {
        position: u64,
        last: u64,
        log_position: u64,
    },
    /// A payload that is not well-formed signed sections (`trust::SectionError`'s code
    /// and the byte offset of the bad section); nothing after it is folded.
    BadSection {
        #[rkyv(with = StaticText)]
        code: &'static str,
        offset: u32,
    },
    /// An unsigned section in the log (only a node's Unix socket may send one, and the
    /// node signs it before it is appended).
    UnsignedSection,
    /// A node section from a name no operator admitted.
    NodeNotAdmitted(Box<str>),
    /// A node section from a node an operator removed.
    NodeRevoked(Box<str>),
    /// A node section signed by a key other than the one admitted for the node.
    WrongNodeKey {
        node: Box<str>,
        key: Box<str>,
    },
    /// An operator section folded after its expiry.
    OperatorExpired {
        expires_ms: u64,
        now_ms: u64,
    },
    /// An operator section claiming validity past `operator_validity_max_ms`.
    OperatorValidityTooLong {
        expires_ms: u64,
        now_ms: u64,
    },
    /// A node fact in a node section whose event names another origin.
    OriginNotSigner {
        origin: Box<str>,
        signer: Box<str>,
    },
    /// An operator intent (the event kind) in a node's section.
    OperatorOnly(#[rkyv(with = StaticText)] &'static str),
    /// A node fact (the event kind) in an operator's section.
    NodeOnly(#[rkyv(with = StaticText)] &'static str),
    /// An origin sequence number more than `origin_seq_step_max` past the last one.
    OriginSeqJump {
        last: u64,
        got: u64,
        step_max: u64,
    },
    /// An outcome of an action addressed to another node.
    NotYourAction(ActionId),
    /// A node reporting another node's status.
    StatusOfAnotherNode(Box<str>),
    /// An admission of a name outside the node name rule (`trust::check_node_name`).
    BadNodeName(Box<str>),
}

/// Stable names of the reasons, indexed by `RejectReason::code`.
pub const REJECT_REASON_NAMES: [&str; 40] = [
    "bad_payload",
    "unknown_origin",
    "stale_origin_seq",
    "unknown_node",
    "unknown_blob",
    "unknown_daemon",
    "unknown_action",
    "unknown_replica",
    "blob_size_mismatch",
    "capability_fork_mismatch",
    "daemon_not_running",
    "daemon_already_running",
    "pid_mismatch",
    "not_in_maintenance",
    "rtt_to_self",
    "bad_name",
    "invalid_intent",
    "table_full",
    "bad_signature",
    "no_genesis",
    "unknown_admin_key",
    "operator_replayed",
    "stale_keyring_version",
    "invalid_keyring",
    "would_drop_last_copy",
    "bad_commitment",
    "bad_section",
    "unsigned_section",
    "node_not_admitted",
    "node_revoked",
    "wrong_node_key",
    "operator_expired",
    "operator_validity_too_long",
    "origin_not_signer",
    "operator_only",
    "node_only",
    "origin_seq_jump",
    "not_your_action",
    "status_of_another_node",
    "bad_node_name",
];

impl RejectReason {
    pub fn code(&self) -> usize {
        match self {
            RejectReason::BadPayload { .. } => 0,
            RejectReason::UnknownOrigin(_) => 1,
            RejectReason::StaleOriginSeq { .. } => 2,
            RejectReason::UnknownNode(_) => 3,
            RejectReason::UnknownBlob(_) => 4,
            RejectReason::UnknownDaemon(_) => 5,
            RejectReason::UnknownAction(_) => 6,
            RejectReason::UnknownReplica { .. } => 7,
            RejectReason::BlobSizeMismatch { .. } => 8,
            RejectReason::CapabilityForkMismatch { .. } => 9,
            RejectReason::DaemonNotRunning(_) => 10,
            RejectReason::DaemonAlreadyRunning(_) => 11,
            RejectReason::PidMismatch { .. } => 12,
            RejectReason::NotInMaintenance(_) => 13,
            RejectReason::RttToSelf => 14,
            RejectReason::BadName { .. } => 15,
            RejectReason::InvalidIntent(_) => 16,
            RejectReason::TableFull(_) => 17,
            RejectReason::BadSignature { .. } => 18,
            RejectReason::NoGenesis => 19,
            RejectReason::UnknownAdminKey(_) => 20,
            RejectReason::OperatorReplayed { .. } => 21,
            RejectReason::StaleKeyringVersion { .. } => 22,
            RejectReason::InvalidKeyring(_) => 23,
            RejectReason::WouldDropLastCopy { .. } => 24,
            RejectReason::BadCommitment { .. } => 25,
            RejectReason::BadSection { .. } => 26,
            RejectReason::UnsignedSection => 27,
            RejectReason::NodeNotAdmitted(_) => 28,
            RejectReason::NodeRevoked(_) => 29,
            RejectReason::WrongNodeKey { .. } => 30,
            RejectReason::OperatorExpired { .. } => 31,
            RejectReason::OperatorValidityTooLong { .. } => 32,
            RejectReason::OriginNotSigner { .. } => 33,
            RejectReason::OperatorOnly(_) => 34,
            RejectReason::NodeOnly(_) => 35,
            RejectReason::OriginSeqJump { .. } => 36,
            RejectReason::NotYourAction(_) => 37,
            RejectReason::StatusOfAnotherNode(_) => 38,
            RejectReason::BadNodeName(_) => 39,
        }
    }

    pub fn name(&self) -> &'static str {
        REJECT_REASON_NAMES[self.code()]
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::BadPayload { payload_bytes } => {
                write!(f, "record payload ({payload_bytes} bytes) is not a valid archived event batch")
            }
            RejectReason::UnknownOrigin(name) => {
                write!(f, "origin node `{name}` has not joined (no heartbeat or capability yet)")
            }
            RejectReason::StaleOriginSeq { last, got } => {
                write!(f, "origin sequence {got} is not above the last applied {last} (duplicate or reordered)")
            }
            RejectReason::UnknownNode(name) => write!(f, "unknown node `{name}`"),
            RejectReason::UnknownBlob(blob) => write!(f, "unknown blob {}", blob_hex(blob)),
            RejectReason::UnknownDaemon(name) => write!(f, "unknown daemon `{name}` (no daemon intent)"),
            RejectReason::UnknownAction(id) => write!(f, "no in-flight action {}:{}", id.position, id.index),
            RejectReason::UnknownReplica { blob } => write!(f, "node holds no replica of blob {}", blob_hex(blob)),
            RejectReason::BlobSizeMismatch { blob, known_bytes, announced_bytes } => {
                write!(f, "blob {} announced with {announced_bytes} bytes but known with {known_bytes}", blob_hex(blob))
            }
            RejectReason::CapabilityForkMismatch { current, fork_of, version } => {
                write!(f, "capability version {version} forks from {fork_of} but the node is at version {current}")
            }
            RejectReason::DaemonNotRunning(name) => write!(f, "daemon `{name}` is not running"),
            RejectReason::DaemonAlreadyRunning(name) => write!(f, "daemon `{name}` is already running"),
            RejectReason::PidMismatch { daemon, running, reported } => {
                write!(f, "daemon `{daemon}` runs as pid {running}, event names pid {reported}")
            }
            RejectReason::NotInMaintenance(name) => write!(f, "node `{name}` is not in maintenance"),
            RejectReason::RttToSelf => write!(f, "RTT sample from a node to itself"),
            RejectReason::BadName { bytes, max } => write!(f, "name of {bytes} bytes (must be 1..={max})"),
            RejectReason::InvalidIntent(what) => write!(f, "invalid intent: {what}"),
            RejectReason::TableFull(table) => write!(f, "{table} table is full (raise its limit in the config)"),
            RejectReason::BadSignature { signer, key } => write!(
                f,
                "signature of `{signer}` (key {key}...) does not verify for this cluster (tampered, forged or signed \
                 for another cluster)"
            ),
            RejectReason::NoGenesis => write!(f, "this state has no genesis: no operator key is trusted"),
            RejectReason::UnknownAdminKey(key) => write!(f, "operator key {key}... is not in the cluster keyring"),
            RejectReason::OperatorReplayed { expires_ms } => {
                write!(f, "this operator section (valid until {expires_ms}) was applied before: a replay")
            }
            RejectReason::StaleKeyringVersion { current, got } => {
                write!(f, "keyring version {got} is not the current version {current} plus one")
            }
            RejectReason::InvalidKeyring(what) => write!(f, "invalid keyring: {what}"),
            RejectReason::WouldDropLastCopy { blob } => {
                write!(f, "dropping this copy would remove the last healthy copy of blob {}", blob_hex(blob))
            }
            RejectReason::BadCommitment { position, last, log_position } => write!(
                f,
                "state commitment at position {position} does not follow the node's last ({last}) or lies beyond \
                 the log ({log_position})"
            ),
            RejectReason::BadSection { code, offset } => {
                write!(f, "payload is not signed sections: {code} at byte {offset} (nothing after it is folded)")
            }
            RejectReason::UnsignedSection => write!(f, "an unsigned section reached the log (only signed ones fold)"),
            RejectReason::NodeNotAdmitted(name) => {
                write!(f, "node `{name}` is not admitted: an operator admits its key first (`meshos admin admit-node`)")
            }
            RejectReason::NodeRevoked(name) => write!(f, "node `{name}` was removed: its key signs nothing any more"),
            RejectReason::WrongNodeKey { node, key } => {
                write!(f, "section signed for node `{node}` with key {key}..., not the key admitted for it")
            }
            RejectReason::OperatorExpired { expires_ms, now_ms } => write!(
                f,
                "operator section expired at {expires_ms} (log time {now_ms}): a replay, or the signer's clock is \
                 behind"
            ),
            RejectReason::OperatorValidityTooLong { expires_ms, now_ms } => write!(
                f,
                "operator section valid until {expires_ms}, too far past log time {now_ms} \
                 (fold.operator_validity_max_ms; is the signer's clock ahead?)"
            ),
            RejectReason::OriginNotSigner { origin, signer } => {
                write!(f, "event of node `{origin}` in a section signed by `{signer}`: a node speaks only for itself")
            }
            RejectReason::OperatorOnly(kind) => write!(f, "{kind} is an operator intent: a node's key cannot send it"),
            RejectReason::NodeOnly(kind) => {
                write!(f, "{kind} is a node's own fact: an operator section cannot carry it")
            }
            RejectReason::OriginSeqJump { last, got, step_max } => {
                write!(f, "origin sequence {got} jumps more than {step_max} past the last applied {last}")
            }
            RejectReason::NotYourAction(id) => {
                write!(f, "action {}:{} is addressed to another node: only its node reports it", id.position, id.index)
            }
            RejectReason::StatusOfAnotherNode(name) => {
                write!(f, "status of node `{name}` from another node: a node reports only its own")
            }
            RejectReason::BadNodeName(name) => write!(
                f,
                "`{name}` is not a node name (1..=64 bytes of a-z, 0-9, '-', '_', '.'; not starting with '-' or '.')"
            ),
        }
    }
}

/// One refused event, where it was, and why.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Rejection {
    pub position: u64,
    /// Index of the event in its record (u32::MAX for a whole-record rejection).
    pub event_index: u32,
    pub origin: Box<str>,
    pub origin_seq: u64,
    #[rkyv(with = StaticText)]
    pub kind: &'static str,
    pub reason: RejectReason,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.event_index == u32::MAX {
            write!(f, "record {}: {}", self.position, self.reason)
        } else {
            write!(
                f,
                "record {} event {} ({} from `{}` seq {}): {}",
                self.position, self.event_index, self.kind, self.origin, self.origin_seq, self.reason
            )
        }
    }
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Rejections {
    pub total: u64,
    pub by_reason: [u64; REJECT_REASON_NAMES.len()],
    pub kept: VecDeque<Rejection>,
    pub kept_max: usize,
}

impl Rejections {
    pub fn new(kept_max: u32) -> Rejections {
        assert!(kept_max > 0);
        Rejections {
            total: 0,
            by_reason: [0; REJECT_REASON_NAMES.len()],
            kept: VecDeque::new(),
            kept_max: kept_max as usize,
        }
    }

    pub fn push(&mut self, rejection: Rejection) {
        self.total += 1;
        self.by_reason[rejection.reason.code()] += 1;
        if self.kept.len() == self.kept_max {
            self.kept.pop_front();
        }
        self.kept.push_back(rejection);
        debug_assert!(self.kept.len() <= self.kept_max);
        debug_assert_eq!(self.total, self.by_reason.iter().sum::<u64>());
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("rejections", self.kept.len());
        hasher.u64(self.total);
        for &count in &self.by_reason {
            hasher.u64(count);
        }
        for rejection in &self.kept {
            hasher.u64(rejection.position);
            hasher.u32(rejection.event_index);
            hasher.str(&rejection.origin);
            hasher.u64(rejection.origin_seq);
            hasher.str(rejection.kind);
            hasher.u64(rejection.reason.code() as u64);
            hasher.str(&rejection.reason.to_string());
        }
    }
}
