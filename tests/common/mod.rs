//! Shared test helpers: build events tersely, fold records in memory.
#![allow(dead_code)]

pub mod nats;

use meshos::admin::OperatorKey;
use meshos::config::Config;
use meshos::event::{
    AdminCommand, Capability, DaemonPlacement, DaemonSignal, DaemonSpec, Event, EventBatch, EventKind, NodeHealth,
    PlacementIntent, ReplicaState,
};
use meshos::fold::fold_payload;
use meshos::sim::gen::{GenOptions, Generator};
use meshos::state::State;
use meshos::wire;

/// An event from `origin` with origin sequence `seq`.
pub fn event(origin: &str, seq: u64, kind: EventKind) -> Event {
    Event { origin: origin.to_string(), origin_seq: seq, kind }
}

/// The operator key tests sign with (the simulator's fixed test key).
pub fn operator_key() -> OperatorKey {
    meshos::admin::test_key()
}

/// An admin command (the sealer puts it in a section signed by the test operator
/// key; `origin` and `seq` are only where it stands in a test's list).
pub fn admin(origin: &str, seq: u64, command: AdminCommand) -> Event {
    event(origin, seq, EventKind::Admin(Box::new(command)))
}

/// Where a test's log once installed the keyring's genesis: the genesis now comes from
/// the config (`Config::for_tests`), so this is a harmless event of `origin` that keeps
/// its numbering (backpressure stays lowered).
pub fn genesis(origin: &str, seq: u64) -> Event {
    event(origin, seq, EventKind::Backpressure { raised: false })
}

pub fn heartbeat(origin: &str, seq: u64) -> Event {
    event(origin, seq, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 10 }))
}

pub fn capability(origin: &str, seq: u64, version: u64, fork_of: u64, zone: &str) -> Event {
    let capability = Capability {
        version,
        fork_of,
        zone: zone.to_string(),
        capacity_bytes: 1 << 40,
        labels: vec!["storage".into()],
        endpoint: String::new(),
    };
    event(origin, seq, EventKind::Capability(Box::new(capability)))
}

/// Folds each batch as one record, log time advancing 100 ms per record.
pub fn fold_batches(state: &mut State, batches: &[Vec<Event>]) {
    for events in batches {
        let position = state.position + 1;
        let time_ms = 1_000 + position * 100;
        let payload = meshos::trust::testing::seal_for(state, events, time_ms);
        fold_payload(state, position, time_ms, &payload);
    }
}

/// Folds `events` as one record into a fresh state.
pub fn fold_events(events: &[Event]) -> State {
    let mut state = State::new(&Config::for_tests());
    fold_batches(&mut state, &[events.to_vec()]);
    state
}

/// The names of the reasons of every rejection, in order.
pub fn rejection_names(state: &State) -> Vec<&'static str> {
    state.rejections.kept.iter().map(|rejection| rejection.reason.name()).collect()
}

/// Generates a log in memory: the archived payloads and their log times.
pub fn generate(options: GenOptions) -> Vec<(u64, rkyv::util::AlignedVec<16>)> {
    let mut generator = Generator::new(options, &Config::for_tests().fold).expect("valid options");
    let mut batch = EventBatch::default();
    let mut records = Vec::new();
    let mut sealer = meshos::trust::testing::MixedSealer::new(Config::for_tests().genesis.cluster_id());
    while let Some(time_ms) = generator.next_batch(&mut batch) {
        records.push((time_ms, sealer.seal(&batch.events, time_ms)));
    }
    records
}

pub fn small_options(seed: u64) -> GenOptions {
    GenOptions { seed, nodes: 12, blobs: 200, replicas: 3, events: 20_000, record_events: 128 }
}

/// Folds generated records into a fresh state.
pub fn fold_generated(records: &[(u64, rkyv::util::AlignedVec<16>)]) -> State {
    let mut state = State::new(&Config::for_tests());
    for (index, (time_ms, payload)) in records.iter().enumerate() {
        fold_payload(&mut state, index as u64 + 1, *time_ms, payload);
    }
    state
}

/// A small converged cluster as log records: four nodes, the genesis, a daemon on
/// every node, two blobs with two copies each (b1 on n1 and n2, b2 on n2 and n3).
pub fn small_cluster_records() -> Vec<Vec<Event>> {
    let nodes = ["n1", "n2", "n3", "n4"];
    let mut seq = std::collections::BTreeMap::<&str, u64>::new();
    let mut next = |node: &'static str| {
        let value = seq.entry(node).or_insert(0);
        *value += 1;
        *value
    };
    let mut join = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        join.push(capability(node, next(node), 1, 0, &format!("z{index}")));
        join.push(event(node, next(node), EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })));
    }
    join.push(genesis("n1", next("n1")));
    let spec = DaemonSpec { working_dir: "/".into(), stop_grace_ms: 100, ..DaemonSpec::new("web", "/bin/web") };
    let mut intents = vec![event(
        "n1",
        next("n1"),
        EventKind::DaemonIntent { spec: Box::new(spec), runs_on: DaemonPlacement::AllNodes },
    )];
    let blobs = [([0xb1; 32], ["n1", "n2"]), ([0xb2; 32], ["n2", "n3"])];
    for (blob, holders) in blobs {
        intents.push(event("n1", next("n1"), EventKind::BlobAnnounce { blob, size_bytes: 1 << 20 }));
        let pinned = holders.iter().map(|node| node.to_string()).collect();
        let intent = PlacementIntent { blob, replicas: 2, zone_spread: false, pinned };
        intents.push(event("n1", next("n1"), EventKind::PlacementIntent(intent)));
    }
    let mut running = Vec::new();
    for (pid, node) in nodes.iter().enumerate() {
        let pid = 100 + pid as u32;
        running.push(event(
            node,
            next(node),
            EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Started { pid } },
        ));
        running.push(event(
            node,
            next(node),
            EventKind::Daemon { daemon: "web".into(), signal: DaemonSignal::Registered { pid } },
        ));
    }
    for (blob, holders) in blobs {
        for node in holders {
            running.push(event(node, next(node), EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy }));
        }
    }
    let beats = nodes
        .iter()
        .map(|node| event(node, next(node), EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 })))
        .collect();
    vec![join, intents, running, beats]
}

/// Writes `small_cluster_records` as a log in `dir` (records 1 s apart); returns the
/// last position.
pub fn write_small_cluster_log(dir: &std::path::Path) -> u64 {
    use meshos::redex::Redex;
    let config = Config { fsync: meshos::config::FsyncPolicy::Manual, ..Config::for_tests() };
    let (mut log, _) = meshos::redex::embedded::EmbeddedLog::open(dir, &config).expect("open a new log");
    let mut sealer = meshos::trust::testing::MixedSealer::new(config.genesis.cluster_id());
    for (index, events) in small_cluster_records().iter().enumerate() {
        let time_ms = 1_000_000 + index as u64 * 1_000;
        log.append_at(&sealer.seal(events, time_ms), time_ms).expect("append");
    }
    log.sync().expect("sync")
}

/// The test cluster's id.
pub const TEST_CLUSTER_ID: [u8; 16] = [0x7e; 16];

/// Node `name`'s signing key in tests: a fixed seed from the name.
pub fn node_signing_key(name: &str) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(blake3::hash(name.as_bytes()).as_bytes())
}

/// Every name is admitted, with its `node_signing_key`.
pub struct AnyTestNode;

impl meshos::sys::secure::PeerKeys for AnyTestNode {
    fn node_key(&self, name: &str) -> Option<[u8; 32]> {
        Some(node_signing_key(name).verifying_key().to_bytes())
    }
}

/// Node `name`'s secure-channel config in the test cluster (every node admitted).
pub fn node_secure(name: &str) -> std::sync::Arc<meshos::sys::secure::SecureConfig> {
    std::sync::Arc::new(meshos::sys::secure::SecureConfig {
        cluster_id: TEST_CLUSTER_ID,
        local: meshos::sys::secure::LocalIdentity::Node { name: name.to_string(), key: node_signing_key(name) },
        keys: std::sync::Arc::new(AnyTestNode),
        accept_operators: false,
        message_bytes_max: meshos::sys::peer_server::MESSAGE_BYTES_MAX,
    })
}

/// A node's blob store behind a running peer port.
pub struct Peer {
    pub _dir: tempfile::TempDir,
    pub store: std::sync::Arc<meshos::exec::blobstore::BlobStore>,
    pub server: meshos::sys::peer_server::PeerServer,
}

/// The peer port of node `name` in the test cluster.
pub fn peer(name: &str) -> Peer {
    peer_with(node_secure(name), |_| {})
}

/// A peer port with this identity and its config as `change` leaves it.
pub fn peer_with(
    secure: std::sync::Arc<meshos::sys::secure::SecureConfig>,
    change: impl FnOnce(&mut meshos::sys::peer_server::PeerServerConfig),
) -> Peer {
    use meshos::sys::peer_server::*;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(meshos::exec::blobstore::BlobStore::open(dir.path()).unwrap());
    let mut config = PeerServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        blobs_dir: dir.path().to_path_buf(),
        connections_max: 8,
        bytes_per_s: 0,
        io_timeout_ms: 5_000,
        handshake_connections_max: HANDSHAKE_CONNECTIONS_MAX_DEFAULT,
        handshake_per_address_max: HANDSHAKE_PER_ADDRESS_MAX_DEFAULT,
        handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
        secure,
    };
    change(&mut config);
    Peer { _dir: dir, store, server: PeerServer::start(config).unwrap() }
}

/// Dispatches `action` to a blob executor and polls it (as node `own`) until its jobs
/// end; the events it produced, without the periodic inventory digests.
pub fn run_blob_action(
    executor: &mut meshos::exec::blobs::BlobExecutor,
    state: &State,
    action: &meshos::action::Action,
    own: &str,
) -> Vec<EventKind> {
    let mut out = Vec::new();
    executor.dispatch(state, action, &mut out);
    let started = std::time::Instant::now();
    while executor.busy() > 0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the job did not finish");
        executor.poll(state, state.nodes.find(own), &mut out);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    out.retain(|event| !matches!(event, EventKind::InventoryDigest { .. }));
    out
}

/// `sim::fixtures::trust_test_node_dir`: the node's test key and a test genesis.
pub fn trust_node_dir(dir: &std::path::Path, name: &str, others: &[String]) -> meshos::trust::Genesis {
    meshos::sim::fixtures::trust_test_node_dir(dir, name, others)
}

/// The test operator key, written to `path` (mode 0600) for the CLI's `--key`.
pub fn write_operator_key(path: &std::path::Path) {
    if !path.exists() {
        meshos::trust::test_operator_key().write_new(path).unwrap();
    }
}

/// Load clients `load-<first>`.. `load-<first + count - 1>`.
pub fn load_names(first: u32, count: u32) -> Vec<String> {
    (first..first + count).map(meshos::loadgen::load_origin).collect()
}

/// One frame's payload for a node's local socket: operator intents among `kinds` in a
/// section signed with the operator key at `key_path` for the cluster of the genesis
/// at `genesis_path`, the rest (the node's own facts) in an unsigned section the node
/// stamps and signs.
pub fn local_payload(
    genesis_path: &std::path::Path,
    key_path: &std::path::Path,
    node: &str,
    kinds: Vec<EventKind>,
) -> rkyv::util::AlignedVec<16> {
    let (intents, facts): (Vec<EventKind>, Vec<EventKind>) =
        kinds.into_iter().partition(|kind| meshos::trust::native_sender_of(kind) == meshos::trust::Sender::Operator);
    let mut payload = rkyv::util::AlignedVec::<16>::new();
    if !facts.is_empty() {
        let events = facts.into_iter().map(|kind| event(node, 0, kind)).collect();
        meshos::trust::record::unsigned_into(&mut payload, &wire::encode_batch(&EventBatch { events }));
    }
    if !intents.is_empty() {
        let genesis = meshos::trust::Genesis::load(genesis_path).unwrap();
        let key = meshos::trust::KeyPair::load(key_path).unwrap();
        let signed = meshos::admin::sign_now(&key, "tester", genesis.cluster_id(), intents).unwrap();
        payload.extend_from_slice(&signed);
    }
    payload
}

/// Sends `kinds` to the node whose data directory is `dir` (its local socket, its
/// genesis and `admin.key` there) and waits until durable; returns the position.
pub fn send_local(dir: &std::path::Path, node: &str, kinds: Vec<EventKind>) -> u64 {
    let payload = local_payload(&dir.join("genesis.toml"), &dir.join("admin.key"), node, kinds);
    let (mut client, mut replies) = meshos::sys::client::Client::connect_unix(&dir.join("local.sock")).unwrap();
    let seq = client.send_payload(&payload, true).unwrap();
    replies.wait_acked(seq, std::time::Duration::from_secs(30)).unwrap().position
}

/// Starts `meshos node --config CONFIG` as a child process, its stderr appended to
/// `stderr_log`, stdout discarded and `RUST_LOG` unset (the config's level holds).
pub fn spawn_node(config: &std::path::Path, stderr_log: &std::path::Path) -> std::process::Child {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(stderr_log).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["node", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Connects to the ingest port at `addr` over the secure channel as node `name` (with
/// its test key), trusting the nodes `genesis` names; the node must be `server`.
pub fn connect_as(
    addr: std::net::SocketAddr,
    genesis: &meshos::trust::Genesis,
    name: &str,
    server: &str,
) -> Result<(meshos::sys::client::Client, meshos::sys::client::Replies), meshos::sys::client::ClientError> {
    let local = meshos::sys::secure::LocalIdentity::node(name, &meshos::trust::test_key_of(name));
    meshos::sys::client::Client::connect_tcp(addr, genesis.client_secure(local), Some(server))
}

/// A TCP connection to `target` from the local address `source` (any 127.0.0.0/8
/// address is the loopback interface on Linux), so one test can be several remote
/// addresses. Reads time out after 10 s.
pub fn connect_from(source: std::net::Ipv4Addr, target: std::net::SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&std::net::SocketAddr::new(source.into(), 0).into()).unwrap();
    socket.connect(&target.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    stream
}
