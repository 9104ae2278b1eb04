//! The node's config file: TOML, every field optional with a documented default
//! (`example.toml` is the reference and is what `--print-default-config` prints),
//! unknown fields refused, every value checked at start. The node's identity on the
//! secure channel (`sys::secure`: its name, signing key, cluster id and the admitted
//! keys) comes from `node_identity` and is handed to the peer port, the blob executor
//! and the prober through their config builders; key bytes never appear in their
//! `Debug` output.
//!
//! Invariants: `NodeConfig::load` either returns a config whose `to_config()` passes
//! `Config::validate` and whose ingest values are in bounds, or an error that names
//! the file, the field and why; the example file parses to exactly the defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::SigningKey;

use serde::Deserialize;

use crate::config::{Config, FoldLimits, FsyncPolicy, ReconcileConfig, SnapshotLimits};
use crate::sequencer::SequencerConfig;
use crate::sys::reactor::ReactorConfig;
use crate::sys::secure::{ClusterId, LocalIdentity, PeerKeys, SecureConfig};

/// The documented example, with every default.
pub const EXAMPLE_TOML: &str = include_str!("example.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name, unique in the cluster: the origin of its events.
    pub name: String,
    /// Where the node keeps its log, blobs and local sockets.
    pub data_dir: PathBuf,
    /// error, warn, info, debug or trace (RUST_LOG overrides it).
    pub log_level: String,
    /// How often the node appends its own heartbeat (keeps log time moving).
    pub heartbeat_ms: u32,
    pub ingest: IngestConfig,
    pub log: LogConfig,
    pub fold: FoldLimits,
    pub reconcile: ReconcileConfig,
    pub daemons: DaemonsConfig,
    pub capability: CapabilityConfig,
    pub blobs: BlobsConfig,
    pub probes: ProbesConfig,
    pub snapshot: SnapshotConfig,
    pub cluster: ClusterConfig,
}

/// Running as one node of many: the shared log on NATS JetStream, the node's identity
/// (its key, the cluster's genesis), checkpoints and state commitments. With `nats` empty the node runs on
/// its embedded log alone (one machine).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers (`host:port`) of the cluster's JetStream, tried in turn; empty:
    /// the embedded log on this machine.
    pub nats: Vec<String>,
    /// The JetStream stream holding the cluster's log, and its subject.
    pub stream: String,
    pub subject: String,
    /// Copies the stream keeps (1 for a single NATS server, 3 for three).
    pub stream_replicas: u32,
    /// The cluster's genesis (`meshos cluster init` writes it; the same file on every
    /// node), relative to `data_dir` unless absolute. A single machine's first start
    /// writes one for itself when it is missing.
    pub genesis_file: PathBuf,
    /// This node's own ed25519 key (created with mode 0600 at the first start),
    /// relative to `data_dir` unless absolute. Secret: whoever holds it is this node.
    pub node_key_file: PathBuf,
    /// A file holding the NATS auth token, if the servers require one ("" for none).
    pub nats_token_file: PathBuf,
    /// Publishes in flight to JetStream at once (acks are awaited in a window).
    pub publish_window_max: u32,
    /// Records queued for publishing beyond the window; full pushes back on the sockets.
    pub publish_queue_max: u32,
    /// Every node publishes its state hash at each position that is a multiple of this.
    pub commitment_interval_records: u32,
    /// A checkpoint of the state is written every this many records (and at a clean stop).
    pub checkpoint_interval_records: u32,
    /// Checkpoints kept in `data_dir/checkpoints`.
    pub checkpoints_kept: u32,
    /// A checkpoint file (from another node) a new node starts from when it has none of
    /// its own ("" : start from position 1).
    pub checkpoint_from: PathBuf,
    /// Trim the stream below the oldest checkpoint any live node still needs.
    pub trim: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: Vec::new(),
            stream: "MESHOS".to_string(),
            subject: "meshos.log".to_string(),
            stream_replicas: 3,
            genesis_file: PathBuf::from("genesis.toml"),
            node_key_file: PathBuf::from("node.key"),
            nats_token_file: PathBuf::new(),
            publish_window_max: 256,
            publish_queue_max: 4096,
            commitment_interval_records: 1000,
            checkpoint_interval_records: 20_000,
            checkpoints_kept: 2,
            checkpoint_from: PathBuf::new(),
            trim: true,
        }
    }
}

/// The behaviour snapshot for Deck (`crate::snapshot`): where, how often, and how much
/// of each picked list it holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// The snapshot file, relative to `data_dir` unless absolute.
    pub path: PathBuf,
    /// At most one snapshot per this many ms, and none while the log has not moved
    /// (0: no snapshot).
    pub interval_ms: u32,
    pub failures_listed_max: u32,
    pub drift_listed_max: u32,
    pub pending_listed_max: u32,
    pub rtt_pairs_listed_max: u32,
    pub drain_blockers_listed_max: u32,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        let limits = SnapshotLimits::default();
        SnapshotConfig {
            path: PathBuf::from("snapshot.rkyv"),
            interval_ms: 1000,
            failures_listed_max: limits.failures_listed_max,
            drift_listed_max: limits.drift_listed_max,
            pending_listed_max: limits.pending_listed_max,
            rtt_pairs_listed_max: limits.rtt_pairs_listed_max,
            drain_blockers_listed_max: limits.drain_blockers_listed_max,
        }
    }
}

impl SnapshotConfig {
    /// The library limits these fields set.
    pub fn limits(&self) -> SnapshotLimits {
        SnapshotLimits {
            failures_listed_max: self.failures_listed_max,
            drift_listed_max: self.drift_listed_max,
            pending_listed_max: self.pending_listed_max,
            rtt_pairs_listed_max: self.rtt_pairs_listed_max,
            drain_blockers_listed_max: self.drain_blockers_listed_max,
        }
    }
}

/// RTT probes to peers' ports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    pub interval_ms: u32,
    pub peers_per_round: u32,
    pub timeout_ms: u32,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig { interval_ms: 1000, peers_per_round: 4, timeout_ms: 500 }
    }
}

/// The blob store, the peer port and blob transfers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobsConfig {
    pub peer_listen: String,
    pub peer_connections_max: u32,
    pub peer_idle_timeout_ms: u32,
    pub peer_handshake_connections_max: u32,
    pub peer_handshake_per_address_max: u32,
    pub peer_handshake_timeout_ms: u32,
    pub transfers_max: u32,
    pub fetch_timeout_ms: u32,
    pub blob_bytes_max: u64,
    pub send_bytes_per_s: u64,
    pub receive_bytes_per_s: u64,
    pub verify_bytes_per_s: u64,
    pub verify_pass_ms: u32,
}

impl Default for BlobsConfig {
    fn default() -> Self {
        BlobsConfig {
            peer_listen: "127.0.0.1:0".to_string(),
            peer_connections_max: 64,
            peer_idle_timeout_ms: crate::sys::peer_server::IO_TIMEOUT_MS_DEFAULT,
            peer_handshake_connections_max: crate::sys::peer_server::HANDSHAKE_CONNECTIONS_MAX_DEFAULT,
            peer_handshake_per_address_max: crate::sys::peer_server::HANDSHAKE_PER_ADDRESS_MAX_DEFAULT,
            peer_handshake_timeout_ms: crate::sys::peer_server::HANDSHAKE_TIMEOUT_MS_DEFAULT,
            transfers_max: 4,
            fetch_timeout_ms: 30_000,
            blob_bytes_max: 1 << 32,
            send_bytes_per_s: 0,
            receive_bytes_per_s: 0,
            verify_bytes_per_s: 8 << 20,
            verify_pass_ms: 3_600_000,
        }
    }
}

/// The daemon executor and the SDK socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonsConfig {
    pub sdk_socket: PathBuf,
    pub sdk_connections_max: u32,
    pub log_bytes_max: u64,
    pub log_files_kept: u32,
    pub report_interval_ms: u32,
}

/// This node's attributes, published as its capability set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilityConfig {
    pub zone: String,
    pub capacity_bytes: u64,
    pub labels: Vec<String>,
}

impl Default for DaemonsConfig {
    fn default() -> Self {
        DaemonsConfig {
            sdk_socket: PathBuf::from("sdk.sock"),
            sdk_connections_max: 256,
            log_bytes_max: 10 << 20,
            log_files_kept: 3,
            report_interval_ms: 1000,
        }
    }
}

/// Sockets, queues, group commit and backpressure of the ingest path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    pub listen_tcp: String,
    pub local_socket: PathBuf,
    /// TCP connections open at once at most.
    pub connections_max: u32,
    /// Connections on the local Unix socket at once at most (apart from TCP's).
    pub local_connections_max: u32,
    /// TCP connections open at once from one remote IP address at most.
    pub connections_per_address_max: u32,
    pub connection_buffer_bytes: u32,
    /// Read-buffer bytes beyond the first 64 KiB of each connection, summed over
    /// all connections (partial frames, and whole ones waiting for queue room).
    pub partial_frame_bytes_max: u64,
    /// A connection that sends no byte for this long is closed.
    pub idle_timeout_ms: u32,
    /// A frame must arrive whole within this long of its first byte.
    pub frame_timeout_ms: u32,
    /// At most one log line per ingest rejection reason per this interval.
    pub rejection_log_interval_ms: u32,
    /// TCP connections in their secure handshake at once at most.
    pub handshake_connections_max: u32,
    /// TCP connections in their handshake at once from one IP address at most.
    pub handshake_per_address_max: u32,
    /// A TCP connection must complete its handshake within this long of its accept.
    pub handshake_timeout_ms: u32,
    pub queue_frames: u32,
    pub queue_bytes_max: u32,
    /// Bytes of frames all connections' queues hold together at most.
    pub queue_bytes_total_max: u64,
    pub frames_per_round_max: u32,
    pub records_per_commit_max: u32,
    pub commit_bytes_max: u32,
    pub backpressure_queue_high_permille: u32,
    pub backpressure_queue_low_permille: u32,
    pub backpressure_commit_high_ms: u32,
    pub backpressure_commit_low_ms: u32,
    pub backpressure_hold_ms: u32,
}

/// The embedded log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub frame_bytes_max: u32,
    pub segment_bytes_max: u64,
    /// always, group:<records>, manual or never.
    pub fsync: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "node-1".to_string(),
            data_dir: PathBuf::from("/var/lib/meshos"),
            log_level: "info".to_string(),
            heartbeat_ms: 1000,
            ingest: IngestConfig::default(),
            log: LogConfig::default(),
            fold: FoldLimits::default(),
            reconcile: ReconcileConfig::default(),
            daemons: DaemonsConfig::default(),
            capability: CapabilityConfig::default(),
            blobs: BlobsConfig::default(),
            probes: ProbesConfig::default(),
            snapshot: SnapshotConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen_tcp: "127.0.0.1:7400".to_string(),
            local_socket: PathBuf::from("local.sock"),
            connections_max: 4096,
            local_connections_max: 64,
            connections_per_address_max: 64,
            connection_buffer_bytes: 8 << 20,
            partial_frame_bytes_max: 64 << 20,
            idle_timeout_ms: 60_000,
            frame_timeout_ms: 10_000,
            rejection_log_interval_ms: 10_000,
            handshake_connections_max: 256,
            handshake_per_address_max: 32,
            handshake_timeout_ms: 5_000,
            queue_frames: 64,
            queue_bytes_max: 8 << 20,
            queue_bytes_total_max: 256 << 20,
            frames_per_round_max: 8,
            records_per_commit_max: 256,
            commit_bytes_max: 16 << 20,
            backpressure_queue_high_permille: 800,
            backpressure_queue_low_permille: 500,
            backpressure_commit_high_ms: 50,
            backpressure_commit_low_ms: 20,
            backpressure_hold_ms: 1000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        let config = Config::default();
        LogConfig {
            frame_bytes_max: config.frame_bytes_max,
            segment_bytes_max: config.segment_bytes_max,
            fsync: "manual".to_string(),
        }
    }
}

/// A config file that cannot be used, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// In a node's data directory: the path of the config file it was started with.
pub const CONFIG_POINTER_FILE: &str = "config.path";

/// `sun_path` holds 108 bytes on Linux, the terminating zero included.
const SOCKET_PATH_BYTES_MAX: usize = 108;

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

impl NodeConfig {
    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| NodeConfigError::Read { path: path.to_path_buf(), source })?;
        NodeConfig::parse(&text).map_err(|reason| NodeConfigError::Invalid { path: path.to_path_buf(), reason })
    }

    /// Loads a node's config from its file, or from its data directory: the file the
    /// node was started with (`DIR/config.path`, written at start), else `DIR/node.toml`.
    /// This is how the CLI finds a node from `--dir` or `MESHOS_DIR`.
    pub fn load_file_or_dir(path: &Path) -> Result<NodeConfig, NodeConfigError> {
        if !path.is_dir() {
            return NodeConfig::load(path);
        }
        let pointer = path.join(CONFIG_POINTER_FILE);
        let file = match std::fs::read_to_string(&pointer) {
            Ok(text) if !text.trim().is_empty() => PathBuf::from(text.trim()),
            _ => path.join("node.toml"),
        };
        NodeConfig::load(&file)
    }

    /// Parses and checks config text; the error names the field and why.
    pub fn parse(text: &str) -> Result<NodeConfig, String> {
        let config: NodeConfig = toml::from_str(text).map_err(|error| error.to_string().trim_end().to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Checks every field beyond what parsing checks.
    pub fn check(&self) -> Result<(), String> {
        let field = |name: &str, reason: String| Err(format!("config field `{name}`: {reason}"));
        if let Err(error) = crate::trust::check_node_name(&self.name) {
            return field("name", format!("`{}`: {error}", self.name.escape_debug()));
        }
        if self.name.len() > self.fold.name_bytes_max as usize {
            return field("name", format!("must be 1..={} bytes (fold.name_bytes_max)", self.fold.name_bytes_max));
        }
        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            return field("log_level", format!("`{}` is not one of {}", self.log_level, LOG_LEVELS.join(", ")));
        }
        if self.ingest.listen_tcp.parse::<std::net::SocketAddr>().is_err() {
            return field(
                "ingest.listen_tcp",
                format!("`{}` is not an address like 127.0.0.1:7400", self.ingest.listen_tcp),
            );
        }
        let ingest = &self.ingest;
        let bounded = [
            ("heartbeat_ms", self.heartbeat_ms, 10, 3_600_000),
            ("ingest.connections_max", ingest.connections_max, 1, 1 << 20),
            ("ingest.local_connections_max", ingest.local_connections_max, 1, 1 << 16),
            ("ingest.connections_per_address_max", ingest.connections_per_address_max, 1, 1 << 20),
            ("ingest.idle_timeout_ms", ingest.idle_timeout_ms, 10, 86_400_000),
            ("ingest.frame_timeout_ms", ingest.frame_timeout_ms, 10, 3_600_000),
            ("ingest.rejection_log_interval_ms", ingest.rejection_log_interval_ms, 100, 3_600_000),
            ("ingest.handshake_connections_max", ingest.handshake_connections_max, 1, 1 << 16),
            ("ingest.handshake_per_address_max", ingest.handshake_per_address_max, 1, 1 << 16),
            ("ingest.handshake_timeout_ms", ingest.handshake_timeout_ms, 100, 600_000),
            ("ingest.queue_frames", ingest.queue_frames, 2, 1 << 16),
            ("ingest.queue_bytes_max", ingest.queue_bytes_max, 4096, u32::MAX),
            ("ingest.frames_per_round_max", ingest.frames_per_round_max, 1, 1 << 16),
            ("ingest.records_per_commit_max", ingest.records_per_commit_max, 1, 1 << 16),
            ("ingest.backpressure_queue_high_permille", ingest.backpressure_queue_high_permille, 1, 1000),
            ("ingest.backpressure_commit_high_ms", ingest.backpressure_commit_high_ms, 1, 60_000),
            ("ingest.backpressure_hold_ms", ingest.backpressure_hold_ms, 0, 600_000),
        ];
        for (name, value, low, high) in bounded {
            if value < low || value > high {
                return field(name, format!("{value} is outside {low}..={high}"));
            }
        }
        if ingest.backpressure_queue_low_permille == 0 || ingest.backpressure_commit_low_ms == 0 {
            let name = if ingest.backpressure_queue_low_permille == 0 {
                "ingest.backpressure_queue_low_permille"
            } else {
                "ingest.backpressure_commit_low_ms"
            };
            return field(name, "must be at least 1: backpressure is lowered only below the low mark".to_string());
        }
        if (self.heartbeat_ms as u64) * 2 > self.reconcile.node_down_ms {
            return field(
                "heartbeat_ms",
                format!(
                    "{} must be at most half of reconcile.node_down_ms ({}), or the node counts itself down between \
                     its own heartbeats",
                    self.heartbeat_ms, self.reconcile.node_down_ms
                ),
            );
        }
        if ingest.backpressure_queue_low_permille >= ingest.backpressure_queue_high_permille {
            return field("ingest.backpressure_queue_low_permille", "must be below the high mark".to_string());
        }
        if ingest.backpressure_commit_low_ms >= ingest.backpressure_commit_high_ms {
            return field("ingest.backpressure_commit_low_ms", "must be below the high mark".to_string());
        }
        if ingest.queue_bytes_total_max < self.log.frame_bytes_max as u64 || ingest.queue_bytes_total_max > 1 << 40 {
            return field(
                "ingest.queue_bytes_total_max",
                format!(
                    "{} is outside log.frame_bytes_max ({})..=2^40: the queues must be able to hold one frame",
                    ingest.queue_bytes_total_max, self.log.frame_bytes_max
                ),
            );
        }
        if ingest.connection_buffer_bytes < self.log.frame_bytes_max {
            return field(
                "ingest.connection_buffer_bytes",
                format!(
                    "{} must hold one frame of log.frame_bytes_max ({})",
                    ingest.connection_buffer_bytes, self.log.frame_bytes_max
                ),
            );
        }
        // A TCP connection's buffer holds one encrypted frame beside its frames.
        let buffer_bytes_max = ingest.connection_buffer_bytes as u64 + crate::sys::secure::FRAME_BYTES_MAX as u64;
        if ingest.partial_frame_bytes_max < buffer_bytes_max || ingest.partial_frame_bytes_max > 1 << 40 {
            return field(
                "ingest.partial_frame_bytes_max",
                format!(
                    "{} is outside connection_buffer_bytes + 64 KiB ({buffer_bytes_max})..=2^40: one connection must \
                     be able to fill its buffer",
                    ingest.partial_frame_bytes_max
                ),
            );
        }
        // A peer node sends at least its heartbeats; it must never look idle.
        if ingest.idle_timeout_ms <= self.heartbeat_ms {
            return field(
                "ingest.idle_timeout_ms",
                format!(
                    "{} must be above heartbeat_ms ({}): a peer that sends only its heartbeats is not idle",
                    ingest.idle_timeout_ms, self.heartbeat_ms
                ),
            );
        }
        if ingest.commit_bytes_max < self.log.frame_bytes_max {
            return field(
                "ingest.commit_bytes_max",
                format!(
                    "{} must hold one frame of log.frame_bytes_max ({})",
                    ingest.commit_bytes_max, self.log.frame_bytes_max
                ),
            );
        }
        for (name, path) in
            [("ingest.local_socket", self.local_socket_path()), ("daemons.sdk_socket", self.sdk_socket_path())]
        {
            let socket_bytes = path.as_os_str().len();
            if socket_bytes >= SOCKET_PATH_BYTES_MAX {
                return field(
                    name,
                    format!(
                        "`{}` is {socket_bytes} bytes long; a Unix socket path must be under {SOCKET_PATH_BYTES_MAX} \
                         (use a shorter data_dir or an absolute path)",
                        path.display()
                    ),
                );
            }
        }
        if self.local_socket_path() == self.sdk_socket_path() {
            return field("daemons.sdk_socket", "must differ from ingest.local_socket".to_string());
        }
        let daemons = &self.daemons;
        let bounded = [
            ("daemons.sdk_connections_max", daemons.sdk_connections_max as u64, 1, 65_536),
            ("daemons.log_bytes_max", daemons.log_bytes_max, 4096, 1 << 40),
            ("daemons.log_files_kept", daemons.log_files_kept as u64, 0, 100),
            ("daemons.report_interval_ms", daemons.report_interval_ms as u64, 1, 3_600_000),
        ];
        for (name, value, low, high) in bounded {
            if value < low || value > high {
                return field(name, format!("{value} is outside {low}..={high}"));
            }
        }
        if self.blobs.peer_listen.parse::<std::net::SocketAddr>().is_err() {
            return field(
                "blobs.peer_listen",
                format!("`{}` is not an address like 127.0.0.1:7401", self.blobs.peer_listen),
            );
        }
        let blobs = &self.blobs;
        let bounded = [
            ("blobs.peer_connections_max", blobs.peer_connections_max as u64, 1, 65_536),
            ("blobs.peer_idle_timeout_ms", blobs.peer_idle_timeout_ms as u64, 100, 3_600_000),
            ("blobs.peer_handshake_connections_max", blobs.peer_handshake_connections_max as u64, 1, 4_096),
            (
                "blobs.peer_handshake_per_address_max",
                blobs.peer_handshake_per_address_max as u64,
                1,
                blobs.peer_handshake_connections_max as u64,
            ),
            ("blobs.peer_handshake_timeout_ms", blobs.peer_handshake_timeout_ms as u64, 100, 60_000),
            ("blobs.transfers_max", blobs.transfers_max as u64, 1, 1_024),
            ("blobs.fetch_timeout_ms", blobs.fetch_timeout_ms as u64, 100, 3_600_000),
            ("blobs.blob_bytes_max", blobs.blob_bytes_max, 1, 1 << 50),
            ("blobs.verify_pass_ms", blobs.verify_pass_ms as u64, 1_000, 1 << 31),
            ("probes.interval_ms", self.probes.interval_ms as u64, 10, 3_600_000),
            ("probes.peers_per_round", self.probes.peers_per_round as u64, 0, 1_024),
            ("probes.timeout_ms", self.probes.timeout_ms as u64, 1, 60_000),
        ];
        for (name, value, low, high) in bounded {
            if value < low || value > high {
                return field(name, format!("{value} is outside {low}..={high}"));
            }
        }
        let capability = &self.capability;
        for (name, text) in std::iter::once(("capability.zone", &capability.zone))
            .chain(capability.labels.iter().map(|label| ("capability.labels", label)))
        {
            if text.len() > self.fold.name_bytes_max as usize || (name == "capability.labels" && text.is_empty()) {
                return field(name, format!("`{text}` must be 1..={} bytes", self.fold.name_bytes_max));
            }
        }
        if capability.labels.len() > self.fold.labels_per_node_max as usize {
            return field(
                "capability.labels",
                format!(
                    "{} labels, more than fold.labels_per_node_max ({})",
                    capability.labels.len(),
                    self.fold.labels_per_node_max
                ),
            );
        }
        let interval_ms = self.snapshot.interval_ms;
        if interval_ms != 0 && !(10..=3_600_000).contains(&interval_ms) {
            return field("snapshot.interval_ms", format!("{interval_ms} is neither 0 (off) nor in 10..=3600000"));
        }
        if self.snapshot.path.as_os_str().is_empty() {
            return field("snapshot.path", "must name a file".to_string());
        }
        self.snapshot.limits().validate().map_err(|error| error.to_string())?;
        self.check_cluster()?;
        let fsync =
            self.log.fsync.parse::<FsyncPolicy>().map_err(|error| format!("config field `log.fsync`: {error}"))?;
        let config = Config { fsync, ..self.to_config_unchecked() };
        config.validate().map_err(|error| error.to_string())
    }

    fn check_cluster(&self) -> Result<(), String> {
        let field = |name: &str, reason: String| Err(format!("config field `{name}`: {reason}"));
        let cluster = &self.cluster;
        for server in &cluster.nats {
            let (host, port) = server.rsplit_once(':').unwrap_or(("", ""));
            if host.is_empty() || port.parse::<u16>().is_err() {
                return field("cluster.nats", format!("`{server}` is not a server like 127.0.0.1:4222"));
            }
        }
        let subject_ok = |text: &str| {
            !text.is_empty() && text.split('.').all(|token| !token.is_empty() && !token.contains(['*', '>', ' ']))
        };
        if !subject_ok(&cluster.subject) {
            return field("cluster.subject", format!("`{}` is not a literal NATS subject", cluster.subject));
        }
        if cluster.stream.is_empty() || cluster.stream.contains(['.', '*', '>', ' ', '/', '\\']) {
            return field("cluster.stream", format!("`{}` is not a JetStream stream name", cluster.stream));
        }
        let bounded = [
            ("cluster.stream_replicas", cluster.stream_replicas as u64, 1, 5),
            ("cluster.publish_window_max", cluster.publish_window_max as u64, 1, 65_536),
            ("cluster.publish_queue_max", cluster.publish_queue_max as u64, 1, 1 << 20),
            ("cluster.commitment_interval_records", cluster.commitment_interval_records as u64, 1, 1 << 30),
            ("cluster.checkpoint_interval_records", cluster.checkpoint_interval_records as u64, 1, 1 << 30),
            ("cluster.checkpoints_kept", cluster.checkpoints_kept as u64, 1, 100),
        ];
        for (name, value, low, high) in bounded {
            if value < low || value > high {
                return field(name, format!("{value} is outside {low}..={high}"));
            }
        }
        // The loop hands a group to JetStream only when all of it fits the queue.
        if cluster.publish_queue_max < self.ingest.records_per_commit_max {
            return field(
                "cluster.publish_queue_max",
                format!(
                    "{} cannot hold one group of ingest.records_per_commit_max ({}): nothing would be published",
                    cluster.publish_queue_max, self.ingest.records_per_commit_max
                ),
            );
        }
        Ok(())
    }

    /// True when this node is one of many on NATS JetStream.
    pub fn clustered(&self) -> bool {
        !self.cluster.nats.is_empty()
    }

    /// Reads the NATS auth token (`cluster.nats_token_file`); None when unset.
    pub fn nats_token(&self) -> Result<Option<String>, NodeConfigError> {
        if self.cluster.nats_token_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let path = self.data_dir.join(&self.cluster.nats_token_file);
        let text =
            std::fs::read_to_string(&path).map_err(|source| NodeConfigError::Read { path: path.clone(), source })?;
        Ok(Some(text.trim().to_string()))
    }

    /// Where checkpoints are kept: `data_dir/checkpoints`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.data_dir.join("checkpoints")
    }

    fn to_config_unchecked(&self) -> Config {
        Config {
            frame_bytes_max: self.log.frame_bytes_max,
            segment_bytes_max: self.log.segment_bytes_max,
            fsync: FsyncPolicy::Manual,
            fold: self.fold,
            reconcile: self.reconcile,
            ..Config::default()
        }
    }

    /// The cluster's genesis file.
    pub fn genesis_path(&self) -> PathBuf {
        self.data_dir.join(&self.cluster.genesis_file)
    }

    /// This node's key file.
    pub fn node_key_path(&self) -> PathBuf {
        self.data_dir.join(&self.cluster.node_key_file)
    }

    /// The engine's config with the cluster's genesis loaded (what a node folds with
    /// and what a tool replaying its log must use).
    pub fn engine_config(&self) -> Result<Config, crate::trust::TrustError> {
        Ok(Config { genesis: crate::node::identity::load_genesis(self)?, ..self.to_config() })
    }

    /// The log directory: `data_dir/log`.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// The local ingest socket (admin CLI, local tools): `ingest.local_socket`,
    /// relative to `data_dir` unless absolute. Events sent here are this node's own.
    pub fn local_socket_path(&self) -> PathBuf {
        self.data_dir.join(&self.ingest.local_socket)
    }

    /// The daemons' SDK socket: `daemons.sdk_socket`, relative to `data_dir` unless absolute.
    pub fn sdk_socket_path(&self) -> PathBuf {
        self.data_dir.join(&self.daemons.sdk_socket)
    }

    /// This node's identity on the secure channel (peer port and its clients): its own
    /// key (`node::identity::prepare`), its cluster's id, and the keys the folded state
    /// admits (`StateKeys`, refreshed by the node loop).
    pub fn node_identity(&self, own: &crate::node::identity::NodeIdentity, keys: Arc<dyn PeerKeys>) -> PeerIdentity {
        PeerIdentity {
            name: self.name.clone(),
            signing_key: own.key.signing_key().clone(),
            cluster_id: own.genesis.cluster_id(),
            keys,
        }
    }

    /// The prober's settings (call after `check`); `secure`: this node's identity
    /// (`node_identity().secure_config()`).
    pub fn probe_config(&self, secure: &Arc<SecureConfig>) -> crate::exec::probes::ProbeConfig {
        crate::exec::probes::ProbeConfig {
            interval_ms: self.probes.interval_ms,
            peers_per_round: self.probes.peers_per_round,
            timeout_ms: self.probes.timeout_ms,
            secure: Arc::clone(secure),
        }
    }

    /// The blob executor's settings (call after `check`); `secure`: this node's
    /// identity.
    pub fn blob_exec_config(&self, secure: &Arc<SecureConfig>) -> crate::exec::blobs::BlobExecConfig {
        crate::exec::blobs::BlobExecConfig {
            transfers_max: self.blobs.transfers_max,
            fetch_timeout_ms: self.blobs.fetch_timeout_ms,
            blob_bytes_max: self.blobs.blob_bytes_max,
            receive_bytes_per_s: self.blobs.receive_bytes_per_s,
            verify_bytes_per_s: self.blobs.verify_bytes_per_s,
            verify_pass_ms: self.blobs.verify_pass_ms,
            secure: Arc::clone(secure),
        }
    }

    /// The peer port's settings (call after `check`); `secure`: this node's identity.
    pub fn peer_server_config(&self, secure: &Arc<SecureConfig>) -> crate::sys::peer_server::PeerServerConfig {
        let blobs = &self.blobs;
        crate::sys::peer_server::PeerServerConfig {
            listen: blobs.peer_listen.parse().expect("checked by NodeConfig::check"),
            blobs_dir: self.blobs_dir(),
            connections_max: blobs.peer_connections_max,
            bytes_per_s: blobs.send_bytes_per_s,
            io_timeout_ms: blobs.peer_idle_timeout_ms,
            handshake_connections_max: blobs.peer_handshake_connections_max,
            handshake_per_address_max: blobs.peer_handshake_per_address_max,
            handshake_timeout_ms: blobs.peer_handshake_timeout_ms,
            secure: Arc::clone(secure),
        }
    }

    /// The blob store: `data_dir/blobs`.
    pub fn blobs_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }

    /// The snapshot file: `snapshot.path`, relative to `data_dir` unless absolute.
    pub fn snapshot_path(&self) -> PathBuf {
        self.data_dir.join(&self.snapshot.path)
    }

    /// The node's snapshot writer (call after `check`).
    pub fn snapshot_writer(&self) -> crate::snapshot::SnapshotWriter {
        crate::snapshot::SnapshotWriter::new(
            self.snapshot_path(),
            &self.name,
            self.snapshot.interval_ms,
            self.snapshot.limits(),
        )
    }

    /// The daemon executor's settings (call after `check`).
    pub fn daemon_exec_config(&self) -> crate::exec::daemons::DaemonExecConfig {
        crate::exec::daemons::DaemonExecConfig {
            node_name: self.name.clone(),
            daemons_dir: self.data_dir.join("daemons"),
            sdk_socket: self.sdk_socket_path(),
            log_bytes_max: self.daemons.log_bytes_max,
            log_files_kept: self.daemons.log_files_kept,
            report_interval_ms: self.daemons.report_interval_ms,
            labels_max: self.fold.labels_per_node_max.saturating_sub(self.capability.labels.len() as u32),
            label_bytes_max: self.fold.name_bytes_max,
        }
    }

    /// The most memory ingest can hold, in bytes: per connection (TCP and local) its
    /// fixed part (`sys::reactor::CONNECTION_FIXED_BYTES_MAX`: the read buffer's
    /// floor, the output buffer and the secure channel); plus, once for all
    /// connections, the queues' total (`queue_bytes_total_max`) and the partial-frame
    /// budget (read buffers above their floor).
    pub fn ingest_memory_bytes_max(&self) -> u64 {
        let ingest = &self.ingest;
        let connections = ingest.connections_max as u64 + ingest.local_connections_max as u64;
        connections * crate::sys::reactor::CONNECTION_FIXED_BYTES_MAX as u64
            + ingest.queue_bytes_total_max
            + ingest.partial_frame_bytes_max
    }

    /// The reactor's listeners and limits (call after `check`).
    pub fn reactor_config(&self) -> ReactorConfig {
        ReactorConfig {
            listen_tcp: Some(self.ingest.listen_tcp.parse().expect("checked by NodeConfig::check")),
            listen_unix: Some(self.local_socket_path()),
            connections_max: self.ingest.connections_max,
            local_connections_max: self.ingest.local_connections_max,
            connections_per_address_max: self.ingest.connections_per_address_max,
            connection_buffer_bytes: self.ingest.connection_buffer_bytes,
            partial_frame_bytes_max: self.ingest.partial_frame_bytes_max,
            idle_timeout_ms: self.ingest.idle_timeout_ms,
            frame_timeout_ms: self.ingest.frame_timeout_ms,
            rejection_log_interval_ms: self.ingest.rejection_log_interval_ms,
            handshake_connections_max: self.ingest.handshake_connections_max,
            handshake_per_address_max: self.ingest.handshake_per_address_max,
            handshake_timeout_ms: self.ingest.handshake_timeout_ms,
            queue_frames: self.ingest.queue_frames,
            queue_bytes_max: self.ingest.queue_bytes_max,
            queue_bytes_total_max: self.ingest.queue_bytes_total_max,
            frame_bytes_max: self.log.frame_bytes_max,
        }
    }

    /// The sequencer's limits and marks (call after `check`).
    pub fn sequencer_config(&self) -> SequencerConfig {
        let ingest = &self.ingest;
        SequencerConfig {
            node_name: self.name.clone(),
            frame_bytes_max: self.log.frame_bytes_max,
            frames_per_round_max: ingest.frames_per_round_max,
            records_per_commit_max: ingest.records_per_commit_max,
            commit_bytes_max: ingest.commit_bytes_max,
            backpressure_queue_high_permille: ingest.backpressure_queue_high_permille,
            backpressure_queue_low_permille: ingest.backpressure_queue_low_permille,
            backpressure_commit_high_ms: ingest.backpressure_commit_high_ms,
            backpressure_commit_low_ms: ingest.backpressure_commit_low_ms,
            backpressure_hold_ms: ingest.backpressure_hold_ms,
        }
    }

    /// The library limits this file sets (call after `check`).
    pub fn to_config(&self) -> Config {
        let fsync = self.log.fsync.parse::<FsyncPolicy>().expect("checked by NodeConfig::check");
        Config { fsync, ..self.to_config_unchecked() }
    }
}

/// Who this node is on the secure channel: the parts `sys::secure` needs.
#[derive(Clone)]
pub struct PeerIdentity {
    pub name: String,
    pub signing_key: SigningKey,
    pub cluster_id: ClusterId,
    /// The admitted keys peers are checked against.
    pub keys: Arc<dyn PeerKeys>,
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("name", &self.name)
            .field("public_key", &crate::event::hex(&self.signing_key.verifying_key().to_bytes()))
            .field("cluster_id", &crate::event::hex(&self.cluster_id))
            .finish_non_exhaustive()
    }
}

impl PeerIdentity {
    /// The secure channel of the ingest port: nodes and operators (whose records
    /// fold still checks, signature by signature), stream mode.
    pub fn ingest_secure_config(&self) -> Arc<SecureConfig> {
        self.channel_config(true, crate::sys::secure::SINGLE_FRAME_MESSAGE_BYTES_MAX as u32)
    }

    /// The secure channel's config for the peer port and its clients (nodes only, no
    /// operators; messages up to `peer_server::MESSAGE_BYTES_MAX`).
    pub fn secure_config(&self) -> Arc<SecureConfig> {
        self.channel_config(false, crate::sys::peer_server::MESSAGE_BYTES_MAX)
    }

    fn channel_config(&self, accept_operators: bool, message_bytes_max: u32) -> Arc<SecureConfig> {
        Arc::new(SecureConfig {
            cluster_id: self.cluster_id,
            local: LocalIdentity::Node { name: self.name.clone(), key: self.signing_key.clone() },
            keys: Arc::clone(&self.keys),
            accept_operators,
            message_bytes_max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_exactly_the_defaults() {
        assert_eq!(NodeConfig::parse(EXAMPLE_TOML).unwrap(), NodeConfig::default());
        assert_eq!(NodeConfig::parse("").unwrap(), NodeConfig::default(), "every field is optional");
        NodeConfig::default().to_config().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("log_level = \"loud\"", "log_level"),
            ("[ingest]\nlisten_tcp = \"nowhere\"", "ingest.listen_tcp"),
            ("[ingest]\nqueue_frames = 1", "ingest.queue_frames"),
            ("heartbeat_ms = 1", "heartbeat_ms"),
            ("heartbeat_ms = 40000", "heartbeat_ms"),
            ("[ingest]\nbackpressure_queue_low_permille = 0", "ingest.backpressure_queue_low_permille"),
            ("[ingest]\nbackpressure_commit_low_ms = 0", "ingest.backpressure_commit_low_ms"),
            ("[ingest]\ncommit_bytes_max = 1024", "ingest.commit_bytes_max"),
            (
                "data_dir = \"/tmp/a-very-long-directory-name-that-goes-on-and-on-and-on-and-on-and-on-and-on-and-on/and-deeper-and-deeper-still\"",
                "ingest.local_socket",
            ),
            ("[ingest]\nconnection_buffer_bytes = 100", "ingest.connection_buffer_bytes"),
            ("[ingest]\nlocal_connections_max = 0", "ingest.local_connections_max"),
            ("[ingest]\nconnections_per_address_max = 0", "ingest.connections_per_address_max"),
            ("[ingest]\npartial_frame_bytes_max = 1048576", "ingest.partial_frame_bytes_max"),
            ("[ingest]\nidle_timeout_ms = 1000", "ingest.idle_timeout_ms"),
            ("[ingest]\nframe_timeout_ms = 0", "ingest.frame_timeout_ms"),
            ("[ingest]\nrejection_log_interval_ms = 1", "ingest.rejection_log_interval_ms"),
            ("[log]\nfsync = \"sometimes\"", "fsync"),
            ("[log]\nframe_bytes_max = 3", "frame_bytes_max"),
            ("[reconcile]\npull_inflight_max = 0", "reconcile.pull_inflight_max"),
            ("[fold]\nsymbols_max = 0", "fold.symbols_max"),
            ("[daemons]\nreport_interval_ms = 0", "daemons.report_interval_ms"),
            ("[daemons]\nsdk_socket = \"local.sock\"", "daemons.sdk_socket"),
            ("[capability]\nlabels = [\"\"]", "capability.labels"),
            ("[blobs]\npeer_listen = \"here\"", "blobs.peer_listen"),
            ("[blobs]\ntransfers_max = 0", "blobs.transfers_max"),
            ("[blobs]\npeer_handshake_per_address_max = 17", "blobs.peer_handshake_per_address_max"),
            ("[blobs]\npeer_handshake_timeout_ms = 10", "blobs.peer_handshake_timeout_ms"),
            ("[blobs]\npeer_handshake_connections_max = 0", "blobs.peer_handshake_connections_max"),
            ("[probes]\ninterval_ms = 1", "probes.interval_ms"),
            ("[snapshot]\ninterval_ms = 5", "snapshot.interval_ms"),
            ("[snapshot]\npath = \"\"", "snapshot.path"),
            ("[snapshot]\ndrift_listed_max = 99999999", "snapshot.drift_listed_max"),
            ("colour = \"blue\"", "colour"),
            ("[cluster]\nnats = [\"nowhere\"]", "cluster.nats"),
            ("[cluster]\nsubject = \"meshos.*\"", "cluster.subject"),
            ("[cluster]\nstream_replicas = 0", "cluster.stream_replicas"),
            (
                // JetStream's client name (the node's) is at most 64 bytes: such a node could not start.
                "name = \"nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn\"\n\
                 [cluster]\nnats = [\"127.0.0.1:4222\"]",
                "name",
            ),
            (
                // A group of 256 records (the default) never fits a queue of 100: nothing is published.
                "[cluster]\nnats = [\"127.0.0.1:4222\"]\npublish_queue_max = 100",
                "cluster.publish_queue_max",
            ),
            ("[ingest]\nqueue_frames = \"many\"", "queue_frames"),
            ("name = \"node-1\\nnode-2\"", "name"),
            ("name = \"\"", "name"),
            ("name = \"-n\"", "name"),
            ("name = \"Node\"", "name"),
        ];
        for (text, field) in cases {
            let error = NodeConfig::parse(text).unwrap_err();
            assert!(error.contains(field), "`{text}` gave `{error}`, which does not name `{field}`");
        }
    }
}
