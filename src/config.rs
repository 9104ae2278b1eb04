//! Every limit and default of MeshOS, in one place.
//!
//! Invariants: every field has a documented default and a bound; `Config::validate`
//! names the offending field when a value is out of bounds; relations between
//! limits that must always hold are `const` assertions below, so a change that
//! breaks them does not compile. Nothing else in the crate hard-codes a limit.

use crate::wire;

/// When the embedded log calls `fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every appended record: each append is durable when it returns.
    Always,
    /// Group commit: after `records` appended records or `bytes` appended bytes,
    /// whichever comes first, and whenever the caller asks with `sync()`.
    Group { records: u32, bytes: u64 },
    /// Only when the caller asks with `sync()` (the sequencer's group commit).
    Manual,
    /// Never: the OS writes back when it likes. For throwaway logs and benches only;
    /// `durable_position` then only advances on an explicit `sync()`.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = ConfigError;

    /// Parses `always`, `manual`, `never` or `group:<records>`.
    fn from_str(text: &str) -> Result<Self, ConfigError> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "manual" => Ok(FsyncPolicy::Manual),
            "never" => Ok(FsyncPolicy::Never),
            _ => match text.strip_prefix("group:").map(str::parse::<u32>) {
                Some(Ok(records)) if records > 0 => Ok(FsyncPolicy::Group { records, bytes: LOG_GROUP_BYTES_DEFAULT }),
                _ => Err(ConfigError::Invalid {
                    field: "fsync",
                    reason: format!("`{text}` is not one of always, manual, never, group:<records>"),
                }),
            },
        }
    }
}

/// A config value that is out of bounds, naming the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Bytes of a node's name at most (`check_node_name`). A name is also JetStream's
/// client name and part of consumer names, which allow 64.
pub const NODE_NAME_BYTES_MAX: usize = 64;

/// Why a node name is not acceptable (`check_node_name`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeNameError {
    #[error("a node name must not be empty")]
    Empty,
    #[error("a node name has at most {NODE_NAME_BYTES_MAX} bytes, this one {bytes}")]
    TooLong { bytes: usize },
    #[error(
        "character {character:?} at byte {position} is not allowed in a node name (only a-z, 0-9, '-', '_' and '.')"
    )]
    BadCharacter { character: char, position: usize },
    #[error("a node name must not start with {character:?}")]
    BadStart { character: char },
}

/// The one rule for node names: 1..=`NODE_NAME_BYTES_MAX` bytes of `[a-z0-9_.-]`,
/// not starting with '-' or '.'. The error names the first bad character and its
/// byte position. (The node's own name is checked by its config; fold may use the
/// same function for names arriving in events.)
pub fn check_node_name(name: &str) -> Result<(), NodeNameError> {
    if name.is_empty() {
        return Err(NodeNameError::Empty);
    }
    if let Some((position, character)) =
        name.char_indices().find(|(_, character)| !matches!(character, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
    {
        return Err(NodeNameError::BadCharacter { character, position });
    }
    if name.len() > NODE_NAME_BYTES_MAX {
        return Err(NodeNameError::TooLong { bytes: name.len() });
    }
    match name.as_bytes()[0] {
        first @ (b'-' | b'.') => Err(NodeNameError::BadStart { character: first as char }),
        _ => Ok(()),
    }
}

pub const FRAME_BYTES_MAX_DEFAULT: u32 = 4 << 20;
pub const FRAME_BYTES_MAX_LIMIT: u32 = 64 << 20;
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 << 20;
pub const LOG_GROUP_BYTES_DEFAULT: u64 = 1 << 20;
pub const REJECTIONS_KEPT_MAX_DEFAULT: u32 = 1024;
pub const RECORD_EVENTS_MAX_DEFAULT: u32 = 512;
pub const RTT_EWMA_SHIFT_DEFAULT: u8 = 3;
pub const NAME_BYTES_MAX_DEFAULT: u32 = 253;
pub const KEYRING_KEYS_MAX_DEFAULT: u32 = 16;
/// Upper bound of `keyring_keys_max` (the keys are scanned linearly).
pub const KEYRING_KEYS_MAX_LIMIT: u32 = 256;
/// Operator sections remembered while valid (the replay window).
pub const OPERATOR_NONCES_MAX_DEFAULT: u32 = 1 << 16;
/// Longest an operator section may stay valid: one hour of log time.
pub const OPERATOR_VALIDITY_MAX_MS_DEFAULT: u64 = 3_600_000;
/// Largest step of a node's origin sequence numbers between two applied events.
pub const ORIGIN_SEQ_STEP_MAX_DEFAULT: u64 = 1 << 32;
/// Row ids are `u32`; the largest value is reserved as "none".
pub const ROWS_MAX_LIMIT: u32 = u32::MAX - 1;

// A default segment holds at least one frame of the default largest size, plus its header.
const _: () = assert!(SEGMENT_BYTES_MAX_DEFAULT >= FRAME_BYTES_MAX_DEFAULT as u64 + wire::SEGMENT_HEADER_BYTES as u64);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT <= FRAME_BYTES_MAX_LIMIT);
// A keyring holds at least one key, and is scanned linearly (short).
const _: () = assert!(KEYRING_KEYS_MAX_DEFAULT >= 1 && KEYRING_KEYS_MAX_DEFAULT <= KEYRING_KEYS_MAX_LIMIT);
const _: () = assert!(OPERATOR_NONCES_MAX_DEFAULT >= 1 && OPERATOR_VALIDITY_MAX_MS_DEFAULT >= 60_000);
const _: () = assert!(FRAME_BYTES_MAX_LIMIT as u64 <= u32::MAX as u64);
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT as usize >= wire::HEADER_BYTES + wire::ALIGN_BYTES);

/// All limits of one MeshOS process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest frame (header, payload and padding) accepted from a socket or the log.
    pub frame_bytes_max: u32,
    /// A log segment is closed and a new one started once it would exceed this size.
    pub segment_bytes_max: u64,
    /// When the embedded log fsyncs.
    pub fsync: FsyncPolicy,
    /// Most events one log record (one committed batch) may carry: the batch size of
    /// whoever appends (the generator now, the sequencer later).
    pub record_events_max: u32,
    /// The limits fold applies to the state.
    pub fold: FoldLimits,
    /// Reconcile's budgets, gates and timers.
    pub reconcile: ReconcileConfig,
    /// Where trust starts: the cluster's operator keys, first nodes and id. Like the
    /// limits it must be equal on every node (it is in the state and its hash); the
    /// default trusts nothing (every record is refused), a node always loads one.
    pub genesis: crate::trust::Genesis,
}

/// Reconcile's budgets, gates and timers. Like `FoldLimits` they shape the state
/// (the in-flight table, gate holds), so every node of a cluster uses the same values.
/// Defaults follow the anchors: Nomad's min_healthy_time (10 s) for stabilisation,
/// Ceph's one backfill per disk (a small per-node pull budget), Kubernetes' backoff
/// doubling to 5 minutes, and a mass-failure brake like Ceph's auto-out floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Pulls and migrations in flight across the cluster.
    pub pull_inflight_max: u32,
    /// Pulls and migrations in flight into (or out of) one node.
    pub pull_inflight_per_node_max: u32,
    /// An action without an outcome after this long is timed out and retried with backoff.
    pub action_timeout_ms: u64,
    /// Backoff after a failed or timed-out pull of a blob: base, doubling to max.
    pub pull_backoff_base_ms: u64,
    pub pull_backoff_max_ms: u64,
    /// Throttle window: at most `throttle_moves_max` pulls and migrations start per window.
    pub throttle_window_ms: u64,
    pub throttle_moves_max: u32,
    /// A new copy must be healthy this long before a surplus copy is dropped.
    pub stabilisation_ms: u64,
    /// A node silent for this long (no heartbeat) counts as down; its copies stop counting.
    pub node_down_ms: u64,
    /// Mass-failure brake: when more than this share (permille) of nodes went down
    /// within `mass_failure_window_ms`, repairs of their copies wait.
    pub mass_failure_share_permille: u32,
    pub mass_failure_window_ms: u64,
    /// Anti-entropy: replicas examined per pass, and how often each is re-verified.
    pub verify_slice_replicas: u32,
    pub verify_interval_ms: u64,
    /// Verifications in flight across the cluster.
    pub verify_inflight_max: u32,
    /// Drops of surplus or corrupt copies in flight across the cluster.
    pub drop_inflight_max: u32,
    /// Daemon starts and stops in flight across the cluster.
    pub daemon_inflight_max: u32,
    /// Locality: a node whose average RTT exceeds the cluster median by this factor
    /// (permille) is marked avoid; it is cleared below the exit factor (hysteresis).
    pub avoid_enter_permille: u32,
    pub avoid_exit_permille: u32,
    /// Most actions one pass may emit (the arena's bound).
    pub actions_per_pass_max: u32,
    /// A node entering maintenance that is not drained this long after the command
    /// goes to DrainFailed, with what blocks it (Nomad's drain deadline: 1 h).
    pub drain_deadline_ms: u64,
    /// A node back from maintenance stays in Recovery this long (its ramp-up window)
    /// before new copies are placed on it again.
    pub recovery_ms: u64,
    /// A node exiting maintenance takes copies again only once its round trips are
    /// measured again: fresh RTT samples on this many pairs that involve it (fewer
    /// when fewer peers are live; 0 waives the rule).
    pub rtt_stable_pairs: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            pull_inflight_max: 64,
            pull_inflight_per_node_max: 2,
            action_timeout_ms: 120_000,
            pull_backoff_base_ms: 1_000,
            pull_backoff_max_ms: 300_000,
            throttle_window_ms: 10_000,
            throttle_moves_max: 512,
            stabilisation_ms: 10_000,
            node_down_ms: 60_000,
            mass_failure_share_permille: 250,
            mass_failure_window_ms: 60_000,
            verify_slice_replicas: 256,
            verify_interval_ms: 24 * 3600 * 1000,
            verify_inflight_max: 32,
            drop_inflight_max: 64,
            daemon_inflight_max: 256,
            avoid_enter_permille: 3_000,
            avoid_exit_permille: 2_000,
            actions_per_pass_max: 4_096,
            drain_deadline_ms: 3_600_000,
            recovery_ms: 60_000,
            rtt_stable_pairs: 3,
        }
    }
}

impl ReconcileConfig {
    /// The most tracked actions that can be in flight at once: the sum of the budgets.
    pub fn tracked_inflight_max(&self) -> usize {
        self.pull_inflight_max as usize
            + self.verify_inflight_max as usize
            + self.drop_inflight_max as usize
            + self.daemon_inflight_max as usize
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let positive = [
            ("reconcile.pull_inflight_max", self.pull_inflight_max as u64),
            ("reconcile.pull_inflight_per_node_max", self.pull_inflight_per_node_max as u64),
            ("reconcile.action_timeout_ms", self.action_timeout_ms),
            ("reconcile.pull_backoff_base_ms", self.pull_backoff_base_ms),
            ("reconcile.throttle_window_ms", self.throttle_window_ms),
            ("reconcile.throttle_moves_max", self.throttle_moves_max as u64),
            ("reconcile.node_down_ms", self.node_down_ms),
            ("reconcile.drain_deadline_ms", self.drain_deadline_ms),
            ("reconcile.mass_failure_window_ms", self.mass_failure_window_ms),
            ("reconcile.verify_interval_ms", self.verify_interval_ms),
            ("reconcile.actions_per_pass_max", self.actions_per_pass_max as u64),
            ("reconcile.verify_inflight_max", self.verify_inflight_max as u64),
            ("reconcile.drop_inflight_max", self.drop_inflight_max as u64),
            ("reconcile.daemon_inflight_max", self.daemon_inflight_max as u64),
        ];
        if self.tracked_inflight_max() > 1 << 16 {
            return invalid("reconcile.pull_inflight_max", "in-flight budgets add up to more than 65536".to_string());
        }
        for (field, value) in positive {
            if value == 0 {
                return invalid(field, "must be above 0".to_string());
            }
        }
        if self.pull_backoff_max_ms < self.pull_backoff_base_ms {
            return invalid("reconcile.pull_backoff_max_ms", "must be at least pull_backoff_base_ms".to_string());
        }
        if self.mass_failure_share_permille == 0 || self.mass_failure_share_permille > 1000 {
            return invalid("reconcile.mass_failure_share_permille", "must be in 1..=1000".to_string());
        }
        if self.avoid_exit_permille < 1000 || self.avoid_enter_permille <= self.avoid_exit_permille {
            return invalid("reconcile.avoid_enter_permille", "needs enter > exit >= 1000 (hysteresis)".to_string());
        }
        if self.actions_per_pass_max > 1 << 20 {
            return invalid("reconcile.actions_per_pass_max", "must be at most 1048576".to_string());
        }
        Ok(())
    }
}

/// The limits fold applies. They shape the state (a full table rejects), so every
/// node of a cluster must fold with the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FoldLimits {
    /// How many rejected events the state keeps in its ring (all are counted).
    pub rejections_kept_max: u32,
    /// Row limits of the state tables; an event that would grow a full table is rejected.
    pub nodes_max: u32,
    pub blobs_max: u32,
    pub replicas_max: u32,
    pub daemon_specs_max: u32,
    pub daemons_max: u32,
    pub rtt_pairs_max: u32,
    /// Distinct zone and label names the state interns.
    pub symbols_max: u32,
    /// Labels one node's capability may carry.
    pub labels_per_node_max: u32,
    /// Largest daemon spec (command, args, env, working directory), in bytes.
    pub daemon_spec_bytes_max: u32,
    /// Longest external name (node, daemon, zone, label) accepted, in bytes.
    pub name_bytes_max: u32,
    /// RTT moving average weight: each sample moves the average by 1/2^shift.
    pub rtt_ewma_shift: u8,
    /// Most operator keys one keyring version may hold.
    pub keyring_keys_max: u32,
    /// Operator sections remembered while they are valid (the replay window); one
    /// more while it is full is refused (`table_full`, the operator replay window).
    pub operator_nonces_max: u32,
    /// Longest validity an operator section may claim past the log time it is folded
    /// at; a section claiming more is refused (a leaked section must expire).
    pub operator_validity_max_ms: u64,
    /// Largest step of one node's origin sequence numbers between applied events.
    pub origin_seq_step_max: u64,
}

impl Default for FoldLimits {
    fn default() -> Self {
        FoldLimits {
            rejections_kept_max: REJECTIONS_KEPT_MAX_DEFAULT,
            nodes_max: 1 << 16,
            blobs_max: 1 << 24,
            replicas_max: 1 << 26,
            daemon_specs_max: 1 << 12,
            daemons_max: 1 << 22,
            rtt_pairs_max: 1 << 22,
            symbols_max: 1 << 16,
            labels_per_node_max: 32,
            daemon_spec_bytes_max: 64 << 10,
            name_bytes_max: NAME_BYTES_MAX_DEFAULT,
            rtt_ewma_shift: RTT_EWMA_SHIFT_DEFAULT,
            keyring_keys_max: KEYRING_KEYS_MAX_DEFAULT,
            operator_nonces_max: OPERATOR_NONCES_MAX_DEFAULT,
            operator_validity_max_ms: OPERATOR_VALIDITY_MAX_MS_DEFAULT,
            origin_seq_step_max: ORIGIN_SEQ_STEP_MAX_DEFAULT,
        }
    }
}

/// What the behaviour snapshot for Deck lists in full at most (`snapshot`). Every
/// table of the state is written whole (each is bounded by `FoldLimits`); these bound
/// the lists of a snapshot that are picked from a table, so a snapshot's size and
/// write time stay bounded whatever the state holds. Local to a node: they shape only
/// its snapshot file, never the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// The latest rejected events listed with their message (all are counted by reason).
    pub failures_listed_max: u32,
    /// Blobs away from their intent listed by row (under-replicated first; all are
    /// counted, and every blob's drift is in its column).
    pub drift_listed_max: u32,
    /// Blobs held back by a gate listed with the gate and when it opens (all are
    /// counted by gate, and every blob's gate is in its column).
    pub pending_listed_max: u32,
    /// Measured RTT pairs listed (the most recently sampled when there are more).
    pub rtt_pairs_listed_max: u32,
    /// Copies blocking a drain listed, with what they wait for (all are counted).
    pub drain_blockers_listed_max: u32,
}

/// Upper bound of every `SnapshotLimits` field.
pub const SNAPSHOT_LISTED_LIMIT: u32 = 1 << 22;

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits {
            failures_listed_max: 256,
            drift_listed_max: 1024,
            pending_listed_max: 1024,
            rtt_pairs_listed_max: 65_536,
            drain_blockers_listed_max: 1024,
        }
    }
}

impl SnapshotLimits {
    /// Checks every field; the error names the first bad field (under `snapshot.`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fields = [
            ("snapshot.failures_listed_max", self.failures_listed_max),
            ("snapshot.drift_listed_max", self.drift_listed_max),
            ("snapshot.pending_listed_max", self.pending_listed_max),
            ("snapshot.rtt_pairs_listed_max", self.rtt_pairs_listed_max),
            ("snapshot.drain_blockers_listed_max", self.drain_blockers_listed_max),
        ];
        for (field, value) in fields {
            if value > SNAPSHOT_LISTED_LIMIT {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("{value} is above {SNAPSHOT_LISTED_LIMIT}"),
                });
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            fsync: FsyncPolicy::Group { records: 64, bytes: LOG_GROUP_BYTES_DEFAULT },
            record_events_max: RECORD_EVENTS_MAX_DEFAULT,
            fold: FoldLimits::default(),
            reconcile: ReconcileConfig::default(),
            genesis: crate::trust::Genesis::none(),
        }
    }
}

impl Config {
    /// The defaults with the genesis of tests, the simulator and generated logs
    /// (`Genesis::for_tests`: the test operator key; nodes are admitted in the log by
    /// `trust::testing::MixedSealer`). Never a node's.
    pub fn for_tests() -> Config {
        Config { genesis: crate::trust::Genesis::for_tests::<&str>(&[]), ..Config::default() }
    }

    /// Checks every field; the error names the first bad field and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let frame_min = (wire::HEADER_BYTES + wire::ALIGN_BYTES) as u32;
        if self.frame_bytes_max < frame_min || self.frame_bytes_max > FRAME_BYTES_MAX_LIMIT {
            return invalid(
                "frame_bytes_max",
                format!("{} is outside {frame_min}..={FRAME_BYTES_MAX_LIMIT}", self.frame_bytes_max),
            );
        }
        let segment_min = self.frame_bytes_max as u64 + wire::SEGMENT_HEADER_BYTES as u64;
        if self.segment_bytes_max < segment_min || self.segment_bytes_max > (1 << 40) {
            return invalid(
                "segment_bytes_max",
                format!(
                    "{} must be at least frame_bytes_max plus the segment header ({segment_min}) and at most 1 TiB",
                    self.segment_bytes_max
                ),
            );
        }
        if let FsyncPolicy::Group { records, bytes } = self.fsync {
            if records == 0 || bytes == 0 {
                return invalid("fsync", "a group commit needs records > 0 and bytes > 0".to_string());
            }
        }
        if self.record_events_max == 0 || self.record_events_max > 1 << 16 {
            return invalid("record_events_max", format!("{} is outside 1..=65536", self.record_events_max));
        }
        let fold = &self.fold;
        if fold.rejections_kept_max == 0 || fold.rejections_kept_max > 1 << 20 {
            return invalid("fold.rejections_kept_max", format!("{} is outside 1..=1048576", fold.rejections_kept_max));
        }
        let tables = [
            ("fold.nodes_max", fold.nodes_max),
            ("fold.blobs_max", fold.blobs_max),
            ("fold.replicas_max", fold.replicas_max),
            ("fold.daemon_specs_max", fold.daemon_specs_max),
            ("fold.daemons_max", fold.daemons_max),
            ("fold.rtt_pairs_max", fold.rtt_pairs_max),
            ("fold.symbols_max", fold.symbols_max),
        ];
        for (field, rows_max) in tables {
            if rows_max == 0 || rows_max > ROWS_MAX_LIMIT {
                return invalid(field, format!("{rows_max} is outside 1..={ROWS_MAX_LIMIT}"));
            }
        }
        if fold.labels_per_node_max > 1024 {
            return invalid("fold.labels_per_node_max", format!("{} is above 1024", fold.labels_per_node_max));
        }
        if fold.daemon_spec_bytes_max < 256 || fold.daemon_spec_bytes_max > FRAME_BYTES_MAX_LIMIT {
            let reason = format!("{} is outside 256..={FRAME_BYTES_MAX_LIMIT}", fold.daemon_spec_bytes_max);
            return invalid("fold.daemon_spec_bytes_max", reason);
        }
        if fold.name_bytes_max == 0 || fold.name_bytes_max > 4096 {
            return invalid("fold.name_bytes_max", format!("{} is outside 1..=4096", fold.name_bytes_max));
        }
        if fold.rtt_ewma_shift > 8 {
            return invalid("fold.rtt_ewma_shift", format!("{} is above 8", fold.rtt_ewma_shift));
        }
        if fold.keyring_keys_max == 0 || fold.keyring_keys_max > KEYRING_KEYS_MAX_LIMIT {
            let reason = format!("{} is outside 1..={KEYRING_KEYS_MAX_LIMIT}", fold.keyring_keys_max);
            return invalid("fold.keyring_keys_max", reason);
        }
        if fold.operator_nonces_max == 0 {
            return invalid("fold.operator_nonces_max", "must be at least 1".to_string());
        }
        if fold.operator_validity_max_ms < 60_000 {
            let reason =
                format!("{} ms is below one minute: operators could not sign ahead", fold.operator_validity_max_ms);
            return invalid("fold.operator_validity_max_ms", reason);
        }
        if fold.origin_seq_step_max == 0 {
            return invalid("fold.origin_seq_step_max", "must be at least 1".to_string());
        }
        self.reconcile.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn node_names_follow_one_rule() {
        for good in ["node-1", "a", "n.0_x-y", &"n".repeat(NODE_NAME_BYTES_MAX)] {
            assert_eq!(check_node_name(good), Ok(()), "{good}");
        }
        assert_eq!(check_node_name(""), Err(NodeNameError::Empty));
        assert_eq!(check_node_name(&"n".repeat(65)), Err(NodeNameError::TooLong { bytes: 65 }));
        assert_eq!(check_node_name("node\nevil"), Err(NodeNameError::BadCharacter { character: '\n', position: 4 }));
        assert_eq!(check_node_name("Node"), Err(NodeNameError::BadCharacter { character: 'N', position: 0 }));
        assert_eq!(check_node_name("n\u{e9}"), Err(NodeNameError::BadCharacter { character: '\u{e9}', position: 1 }));
        assert_eq!(check_node_name("-n"), Err(NodeNameError::BadStart { character: '-' }));
        assert_eq!(check_node_name(".n"), Err(NodeNameError::BadStart { character: '.' }));
        let text = check_node_name("a b").unwrap_err().to_string();
        assert!(text.contains("' '") && text.contains("byte 1"), "{text}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let config = Config { frame_bytes_max: 3, ..Config::default() };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("frame_bytes_max"), "{error}");

        let config = Config { segment_bytes_max: 1024, ..Config::default() };
        assert!(config.validate().unwrap_err().to_string().contains("segment_bytes_max"));

        let error = "sometimes".parse::<FsyncPolicy>().unwrap_err().to_string();
        assert!(error.contains("fsync") && error.contains("sometimes"), "{error}");
        assert_eq!(
            "group:8".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Group { records: 8, bytes: LOG_GROUP_BYTES_DEFAULT }
        );
    }
}
