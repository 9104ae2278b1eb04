//! `meshos demo`: a whole cluster in one process, in the manner of `cockroach demo`.
//!
//! N nodes (`node-1` .. `node-N`) share one embedded log (`DIR/node-1/log`, owned by
//! node-1, whose sockets the CLI talks to); each has its own data directory, blob
//! store, peer port, SDK socket and supervised daemons, and they move blob bytes
//! between their peer ports for real. Zones `z1`..`z3` are dealt round robin so
//! placement spreads copies. On first start the demo does what `meshos cluster init`
//! does: an operator key in `DIR/node-1/admin.key`, a key per node (`DIR/node-N/node.key`)
//! and a genesis admitting every node (`DIR/genesis.toml`, which every node's config
//! names); then it declares a `worker` daemon on every node (an operator section) and
//! stores a few dozen blobs on node-1 at 3 replicas; the other copies arrive by
//! pulls. Run again on the same directory, it resumes from its log.
//!
//! Each node signs its records with its own key, and its blob pulls and RTT probes
//! run on the secure channel with it, as in a real cluster.
//!
//! Invariants: the demo adds nothing the node binary does not do (same loop, same
//! executors); everything it seeds goes through node-1's local socket as events; all
//! its nodes load the same genesis.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::admin::OperatorKey;
use crate::event::{DaemonPlacement, DaemonSpec, EventKind, PlacementIntent, ReplicaState};
use crate::node::config::NodeConfig;

/// What the demo starts.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: u32,
    pub dir: PathBuf,
    /// Blobs stored at the first start.
    pub blobs: u32,
    pub replicas: u8,
    /// Bytes of each seeded blob.
    pub blob_bytes: u32,
}

/// The seeded workload is installed once; this file marks it done.
const SEEDED_FILE: &str = "seeded";
/// The operator key, where `meshos admin` and `meshos daemon` look by default for
/// node-1 (its DATA_DIR/admin.key).
pub const KEY_FILE: &str = "node-1/admin.key";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Blobs(#[from] crate::exec::blobstore::BlobStoreError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
}

/// The demo's genesis file.
pub const GENESIS_FILE: &str = "genesis.toml";

/// The node configs of the demo, written to `DIR/node-N/node.toml` (so the CLI can
/// name them); node-1 first.
pub fn configs(options: &DemoOptions) -> Result<Vec<NodeConfig>, DemoError> {
    if !(1..=16).contains(&options.nodes) {
        return Err(DemoError::Invalid(format!("--nodes must be 1..=16, not {}", options.nodes)));
    }
    std::fs::create_dir_all(&options.dir).map_err(|source| DemoError::Io { path: options.dir.clone(), source })?;
    let genesis_path = init_trust(options)?;
    let mut configs = Vec::new();
    for index in 1..=options.nodes {
        let name = format!("node-{index}");
        let data_dir = options.dir.join(&name);
        let text = format!(
            "# A node of `meshos demo` (all run in one process on node-1's log).\n\
             name = \"{name}\"\ndata_dir = \"{}\"\nheartbeat_ms = 200\n\n\
             [ingest]\nlisten_tcp = \"127.0.0.1:0\"\n\n\
             [reconcile]\nrecovery_ms = 10000\n\n\
             [capability]\nzone = \"z{}\"\ncapacity_bytes = 10737418240\n\n\
             [cluster]\ngenesis_file = \"{}\"\n",
            data_dir.display(),
            (index - 1) % 3 + 1,
            genesis_path.display()
        );
        std::fs::create_dir_all(&data_dir).map_err(|source| DemoError::Io { path: data_dir.clone(), source })?;
        let path = data_dir.join("node.toml");
        std::fs::write(&path, &text).map_err(|source| DemoError::Io { path: path.clone(), source })?;
        configs.push(NodeConfig::parse(&text).map_err(DemoError::Invalid)?);
    }
    Ok(configs)
}

/// On the first start: the operator key, every node's key and the genesis admitting
/// them all (what `meshos cluster init` does); later, checks the genesis admits every
/// node. Returns the genesis file's absolute path.
fn init_trust(options: &DemoOptions) -> Result<PathBuf, DemoError> {
    let genesis_path = std::path::absolute(options.dir.join(GENESIS_FILE))
        .map_err(|source| DemoError::Io { path: options.dir.clone(), source })?;
    let names: Vec<String> = (1..=options.nodes).map(|index| format!("node-{index}")).collect();
    let mut nodes = Vec::new();
    for name in &names {
        let data_dir = options.dir.join(name);
        std::fs::create_dir_all(&data_dir).map_err(|source| DemoError::Io { path: data_dir.clone(), source })?;
        let (key, _) = crate::trust::KeyPair::load_or_create(&data_dir.join("node.key"))?;
        nodes.push((name.clone(), key.public_key()));
    }
    if genesis_path.exists() {
        let genesis = crate::trust::Genesis::load(&genesis_path)?;
        if let Some((name, _)) = nodes.iter().find(|node| !genesis.nodes().contains(node)) {
            return Err(DemoError::Invalid(format!(
                "{name} is not in this demo's genesis ({}): the directory was made with fewer nodes; start it with \
                 the same --nodes or in a new directory",
                genesis_path.display()
            )));
        }
        return Ok(genesis_path);
    }
    let key_path = options.dir.join(KEY_FILE);
    let operator = if key_path.exists() { OperatorKey::load(&key_path)? } else { OperatorKey::generate(&key_path)? };
    let genesis = crate::trust::Genesis::generate(vec![operator.public_key()], nodes)?;
    genesis.write_new(&genesis_path)?;
    Ok(genesis_path)
}

/// Deterministic bytes for seeded blob `index`.
fn blob_bytes(index: u32, size: u32) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ index as u64;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Waits for node-1 to listen, then (first start only) declares the
/// worker daemon and the seeded blobs through its local socket. Returns what it did.
pub fn seed(options: &DemoOptions, first: &NodeConfig) -> Result<String, DemoError> {
    let marker = options.dir.join(SEEDED_FILE);
    let addr_file = first.data_dir.join(crate::node::run::ADDR_FILE);
    let started = Instant::now();
    while !addr_file.exists() {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Invalid("node-1 did not start listening within 60 s".to_string()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if marker.exists() {
        return Ok("resumed from the log (the workload was seeded before)".to_string());
    }
    let key_path = options.dir.join(KEY_FILE);
    let key = OperatorKey::load(&key_path)?;
    let cluster_id = crate::node::identity::load_genesis(first)?.cluster_id();
    let socket = first.local_socket_path();
    let timeout = Duration::from_secs(30);
    let send = |kinds: Vec<EventKind>| crate::admin::submit::send_events(&socket, &first.name, kinds, timeout);
    let send_signed = |kinds: Vec<EventKind>| {
        let payload = crate::admin::sign_now(&key, "demo", cluster_id, kinds)?;
        crate::admin::submit::send_payload(&socket, &payload, timeout)
    };
    // The worker is this binary's hidden `demo-worker`: a real SDK daemon (it
    // registers, reports health every second, stops on the control event).
    let program = std::env::current_exe().map_err(|source| DemoError::Io { path: PathBuf::from("<self>"), source })?;
    let worker = DaemonSpec {
        args: vec!["demo-worker".to_string()],
        health_timeout_ms: 5_000,
        stop_grace_ms: 4_000,
        ..DaemonSpec::new("worker", &program.display().to_string())
    };
    send_signed(vec![EventKind::DaemonIntent { spec: Box::new(worker), runs_on: DaemonPlacement::AllNodes }])?;
    let store = crate::exec::blobstore::BlobStore::attach(&first.blobs_dir())?;
    let replicas = options.replicas.min(options.nodes as u8).max(1);
    for index in 0..options.blobs {
        let bytes = blob_bytes(index, options.blob_bytes);
        let (blob, size_bytes) = store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {})?;
        send(vec![
            EventKind::BlobAnnounce { blob, size_bytes },
            EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
        ])?;
        send_signed(vec![EventKind::PlacementIntent(PlacementIntent {
            blob,
            replicas,
            zone_spread: true,
            pinned: Vec::new(),
        })])?;
    }
    std::fs::write(&marker, b"seeded\n").map_err(|source| DemoError::Io { path: marker.clone(), source })?;
    Ok(format!(
        "seeded: operator key {}, a `worker` daemon on every node, {} blobs of {} bytes at {replicas} replicas",
        key_path.display(),
        options.blobs,
        options.blob_bytes
    ))
}

/// What to try, printed once the demo runs.
pub fn guide(options: &DemoOptions) -> String {
    let dir = options.dir.display();
    let node = format!("{dir}/node-1");
    format!(
        "meshos demo: {nodes} nodes in this process, sharing the log in {dir}/node-1/log\n\
         \x20 node data: {dir}/node-N/ (blobs/, daemons/NAME/stdout.log, dispatched.log)\n\
         \x20 talk to it through node-1: export MESHOS_DIR={node}   (or --dir {node} on each command)\n\
         \x20 operator key: {dir}/{KEY_FILE} (secret; `meshos admin --key`); the cluster's genesis: {dir}/{GENESIS_FILE}\n\
         Try, in another terminal:\n\
         \x20 meshos status            (meshos watch: the same, live; meshos daemon ls)\n\
         \x20 meshos put ./some-file --replicas 3\n\
         \x20 meshos get <BLOB_ID> -o ./copy\n\
         \x20 meshos admin enter-maintenance node-2 --key {dir}/{KEY_FILE} --dry-run\n\
         \x20 meshos admin enter-maintenance node-2 --key {dir}/{KEY_FILE}\n\
         \x20 kill -9 $(cat {dir}/node-3/daemons/worker/pid | cut -d' ' -f1)   # watch it come back\n\
         \x20 meshos admin exit-maintenance node-2 --key {dir}/{KEY_FILE}\n\
         \x20 meshos explain node-2     (or a blob id, or worker)\n\
         \x20 meshos log replay {dir}/node-1/log --reconcile --config {node}\n\
         Ctrl-C stops the demo; `meshos demo --dir {dir}` resumes it from its log.",
        nodes = options.nodes,
    )
}

/// The default demo directory: `$TMPDIR/meshos-demo`.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("meshos-demo")
}

/// Whether `path` looks like a demo directory (or an empty / missing one).
pub fn usable_dir(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Err(_) => true,
        Ok(mut entries) => entries.next().is_none() || path.join("node-1").exists() || path.join(SEEDED_FILE).exists(),
    }
}
