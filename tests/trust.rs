//! The attacks against a real `meshos node` process, as an attacker would run
//! them (loopback clients written from the wire format, a key of their own, a stolen
//! node key), each asserting that it fails and is counted with its reason: no command
//! runs, no copy is dropped, no keyring changes, no node is silenced or invented, and
//! the operator and the node itself are still served.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use meshos::event::{
    AdminCommand, DaemonPlacement, DaemonSpec, Event, EventBatch, EventKind, NodeHealth, NodeStatus, ReplicaState,
};
use meshos::node::config::NodeConfig;
use meshos::state::State;
use meshos::sys::client::{Client, ClientError};
use meshos::sys::secure::LocalIdentity;
use meshos::trust::{KeyPair, Sealer};

const WAIT_LIMIT: Duration = Duration::from_secs(30);

struct Node {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

impl Node {
    /// A single node on a fresh directory: its first start writes its own genesis and
    /// operator key (`DATA_DIR/admin.key`).
    fn start(dir: &Path) -> Node {
        let config = dir.join("node.toml");
        let text = format!(
            "name = \"node-1\"\ndata_dir = \"{}\"\nheartbeat_ms = 100\n\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\n",
            dir.display()
        );
        std::fs::write(&config, text).unwrap();
        let child = common::spawn_node(&config, &dir.join("stderr.log"));
        let node = Node { child, dir: dir.to_path_buf() };
        wait_for("the node to listen", || dir.join("node.addr").exists());
        node
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::fs::read_to_string(self.dir.join("node.addr")).unwrap().trim().parse().unwrap()
    }

    fn config(&self) -> NodeConfig {
        NodeConfig::load(&self.dir.join("node.toml")).unwrap()
    }

    fn cluster_id(&self) -> [u8; 16] {
        meshos::trust::Genesis::load(&self.dir.join("genesis.toml")).unwrap().cluster_id()
    }

    /// The node's state: its log replayed read-only up to what is there.
    fn state(&self) -> State {
        let config = self.config().engine_config().unwrap();
        meshos::admin::preview::replay_read_only(&self.dir.join("log"), &config, u64::MAX).unwrap().0.state
    }

    /// Runs the CLI against this node (its directory).
    /// `meshos put` of 10,000 bytes of `byte` at one copy; waits until that copy
    /// (node-1's) counts. Returns the blob.
    fn put_one_copy(&self, byte: u8) -> [u8; 32] {
        let file = self.dir.join(format!("data-{byte}.bin"));
        std::fs::write(&file, vec![byte; 10_000]).unwrap();
        let put = self.cli(&["put", file.to_str().unwrap(), "--replicas", "1"]);
        assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
        let blob = meshos::admin::parse_blob(String::from_utf8_lossy(&put.stdout).trim()).unwrap();
        wait_for("the copy to count", || blob_holders(&self.state(), &blob) == 1);
        blob
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_meshos")).args(args).env("MESHOS_DIR", &self.dir).output().unwrap()
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < WAIT_LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn event(origin: &str, origin_seq: u64, kind: EventKind) -> Event {
    Event { origin: origin.into(), origin_seq, kind }
}

fn heartbeat(origin: &str, origin_seq: u64) -> Event {
    event(origin, origin_seq, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 1 }))
}

fn worm() -> EventKind {
    EventKind::DaemonIntent {
        spec: Box::new(DaemonSpec::new("worm", "/bin/touch")),
        runs_on: DaemonPlacement::AllNodes,
    }
}

/// Sends one payload over the ingest port's secure channel as `local` and waits for
/// its acknowledgement (or the node's refusal).
fn send_tcp_as(node: &Node, local: LocalIdentity, payload: &[u8]) -> Result<u64, ClientError> {
    let (mut client, mut replies) = connect(node, local)?;
    let seq = client.send_payload(payload, true)?;
    replies.wait_acked(seq, WAIT_LIMIT).map(|ack| ack.position)
}

fn connect(node: &Node, local: LocalIdentity) -> Result<(Client, meshos::sys::client::Replies), ClientError> {
    let genesis = meshos::trust::Genesis::load(&node.dir.join("genesis.toml")).unwrap();
    Client::connect_tcp(node.addr(), genesis.client_secure(local), Some("node-1"))
}

/// Sends one payload through a connection the transport admits (the operator's, as a
/// relay): what fold decides about records that reach the log whatever their way.
fn send_tcp(node: &Node, payload: &[u8]) -> Result<u64, ClientError> {
    let operator = KeyPair::load(&node.dir.join("admin.key")).unwrap();
    send_tcp_as(node, LocalIdentity::operator(&operator), payload)
}

/// Waits until the node has folded past `position`; returns the rejections recorded
/// at `position`, by reason name.
fn rejections_at(node: &Node, position: u64) -> Vec<&'static str> {
    wait_for("the record to be folded", || node.state().position >= position);
    let state = node.state();
    state.rejections.kept.iter().filter(|rejection| rejection.position == position).map(|r| r.reason.name()).collect()
}

fn blob_holders(state: &State, blob: &[u8; 32]) -> usize {
    let Some(row) = state.blobs.find(blob) else { return 0 };
    state.blobs.healthy_count[row.index()] as usize
}

#[test]
fn network_attackers_run_nothing_drop_nothing_and_take_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let addr = node.addr();
    let cluster_id = node.cluster_id();
    // A blob the operator stores (its only copy is node-1's).
    let blob = node.put_one_copy(7);

    // 0. Strangers do not get past the ingest port's secure handshake: an unknown
    //    node, a known node's name with another key, an unknown operator key, and
    //    bytes that are no handshake at all. Each refusal is counted by reason.
    let mallory = KeyPair::from_seed([0x66; 32]);
    let strangers = [
        (LocalIdentity::node("mallory", &mallory), "unknown node"),
        (LocalIdentity::node("node-1", &mallory), "key mismatch"),
        (LocalIdentity::operator(&mallory), "operator identity not accepted"),
    ];
    for (stranger, why) in strangers {
        let refused = connect(&node, stranger).err().expect("a stranger is refused").to_string();
        assert!(refused.contains(why), "{refused}");
    }
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut raw, &[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut rest);
    wait_for("the refusals in `meshos status`", || {
        let status = node.cli(&["status", "-o", "json"]);
        let text = String::from_utf8_lossy(&status.stdout);
        ["auth_unknown_node", "auth_key_mismatch", "auth_unknown_operator", "auth_bad_handshake"]
            .iter()
            .all(|reason| text.contains(&format!("\"{reason}\":1")))
    });

    // 1. Through an authenticated connection, an unsigned daemon intent: refused
    //    before the log.
    let unsigned = meshos::trust::record::unsigned_batch(&EventBatch { events: vec![event("node-1", 0, worm())] });
    let refused = send_tcp(&node, &unsigned).unwrap_err().to_string();
    assert!(refused.contains("unsigned events over TCP"), "{refused}");

    // 2. The same, signed by the attacker's own operator key (not in the keyring), and
    //    by an attacker claiming to be the node itself (refused before the log).
    let intent = meshos::admin::sign_now(&mallory, "mallory", cluster_id, vec![worm()]).unwrap();
    let position = send_tcp(&node, &intent).unwrap();
    assert_eq!(rejections_at(&node, position), ["unknown_admin_key"]);
    let as_node = Sealer::node("node-1", mallory.clone(), cluster_id)
        .seal_batch(&EventBatch { events: vec![heartbeat("node-1", u64::MAX)] });
    let refused = send_tcp(&node, &as_node).unwrap_err().to_string();
    assert!(refused.contains("only the node itself"), "{refused}");

    // 3. A keyring genesis sent first over TCP (the old trust-on-first-use hole).
    let genesis = meshos::admin::sign_now(
        &mallory,
        "mallory",
        cluster_id,
        vec![meshos::admin::command_kind(AdminCommand::SetKeyring { version: 2, keys: vec![mallory.public_key()] })],
    )
    .unwrap();
    let position = send_tcp(&node, &genesis).unwrap();
    assert_eq!(rejections_at(&node, position), ["unknown_admin_key"]);

    // 4. Invented nodes: heartbeats, a capability and healthy copies of every blob.
    for ghost in ["ghost-1", "ghost-2", "ghost-3"] {
        let events = vec![
            heartbeat(ghost, 1),
            event(ghost, 2, EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy }),
            event(
                ghost,
                3,
                EventKind::NodeHealth(NodeHealth::Status { node: "node-1".into(), status: NodeStatus::Left }),
            ),
        ];
        let forged = Sealer::node(ghost, mallory.clone(), cluster_id).seal_batch(&EventBatch { events });
        let position = send_tcp(&node, &forged).unwrap();
        assert_eq!(rejections_at(&node, position), ["node_not_admitted"]);
    }

    // 5. A signed operator section of another cluster run by the same operator key:
    //    `meshos cluster init` with this node's operator key makes that other cluster.
    let other = tempfile::tempdir().unwrap();
    let init = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["cluster", "init", "-o"])
        .arg(other.path())
        .args(["--nodes", "node-1", "--operator-key"])
        .arg(dir.path().join("admin.key"))
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let other_id = meshos::trust::Genesis::load(&other.path().join("genesis.toml")).unwrap().cluster_id();
    assert_ne!(other_id, cluster_id);
    let operator = KeyPair::load(&dir.path().join("admin.key")).unwrap();
    let cordon = || vec![meshos::admin::command_kind(AdminCommand::Cordon { node: "node-1".into() })];
    let elsewhere = meshos::admin::sign_now(&operator, "ops", other_id, cordon()).unwrap();
    let position = send_tcp(&node, &elsewhere).unwrap();
    assert_eq!(rejections_at(&node, position), ["bad_signature"]);

    // 6. A genuine operator section, then the same bytes again (a replay).
    let genuine = meshos::admin::sign_now(&operator, "ops", cluster_id, cordon()).unwrap();
    let position = send_tcp(&node, &genuine).unwrap();
    assert_eq!(rejections_at(&node, position), Vec::<&str>::new());
    let position = send_tcp(&node, &genuine).unwrap();
    assert_eq!(rejections_at(&node, position), ["operator_replayed"]);

    // Nothing ran, nothing was dropped, nothing was invented, and the operator and the
    // node are still in charge.
    std::thread::sleep(Duration::from_millis(500));
    let state = node.state();
    assert!(!dir.path().join("daemons").join("worm").exists(), "no daemon was started");
    assert_eq!(state.specs.len(), 0, "no daemon intent was applied");
    assert_eq!(state.nodes.len(), 1, "no node was invented");
    assert_eq!(state.keyring.version, 1, "the keyring is the genesis'");
    assert_eq!(state.keyring.keys, vec![operator.public_key()]);
    assert_eq!(blob_holders(&state, &blob), 1, "the only copy is still counted");
    assert_eq!(state.nodes.status[0], NodeStatus::Up);
    assert!(state.nodes.cordoned[0], "the operator's own command applied");
    let uncordon = node.cli(&["admin", "uncordon", "node-1"]);
    assert!(uncordon.status.success(), "{}", String::from_utf8_lossy(&uncordon.stdout));
    // Every refusal is counted by reason, in the state and in `meshos status`.
    for reason in ["unknown_admin_key", "node_not_admitted", "bad_signature", "operator_replayed"] {
        let code = meshos::state::rejections::REJECT_REASON_NAMES.iter().position(|name| *name == reason).unwrap();
        assert!(state.rejections.by_reason[code] >= 1, "{reason} counted");
    }
}

/// What one stolen node key can and cannot do: it speaks for its own node only.
#[test]
fn a_stolen_node_key_speaks_for_its_node_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path());
    let cluster_id = node.cluster_id();
    let blob = node.put_one_copy(9);
    // node-2 is admitted; its key is stolen.
    let stolen = KeyPair::from_seed([0x22; 32]);
    let admit = node.cli(&["admin", "admit-node", "node-2", "--node-key", &stolen.public_key_hex()]);
    assert!(admit.status.success(), "{}", String::from_utf8_lossy(&admit.stdout));
    let as_node_2 =
        |events: Vec<Event>| Sealer::node("node-2", stolen.clone(), cluster_id).seal_batch(&EventBatch { events });
    // The thief connects as node-2 (the transport admits the key) and sends as node-2.
    let as_thief = || LocalIdentity::node("node-2", &stolen);
    let position = send_tcp_as(&node, as_thief(), &as_node_2(vec![heartbeat("node-2", 1)])).unwrap();
    assert_eq!(rejections_at(&node, position), Vec::<&str>::new(), "it may speak for node-2");
    let attempts: Vec<(Vec<Event>, &str)> = vec![
        (vec![heartbeat("node-1", 1 << 40)], "origin_not_signer"),
        (
            vec![event(
                "node-2",
                2,
                EventKind::NodeHealth(NodeHealth::Status { node: "node-1".into(), status: NodeStatus::Down }),
            )],
            "status_of_another_node",
        ),
        (vec![event("node-2", 3, worm())], "operator_only"),
        (
            vec![event(
                "node-2",
                4,
                EventKind::Admin(Box::new(AdminCommand::DropReplicas { node: "node-1".into(), blob: None })),
            )],
            "operator_only",
        ),
        (vec![heartbeat("node-2", u64::MAX)], "origin_seq_jump"),
    ];
    for (events, reason) in attempts {
        let position = send_tcp_as(&node, as_thief(), &as_node_2(events)).unwrap();
        assert_eq!(rejections_at(&node, position), [reason]);
    }
    // Removal: the key folds nothing more, and the node is marked left.
    let remove = node.cli(&["admin", "remove-node", "node-2"]);
    assert!(remove.status.success(), "{}", String::from_utf8_lossy(&remove.stdout));
    // Removed, node-2's key no longer passes the handshake; its records relayed by
    // another connection fold nothing.
    wait_for("node-2's key to be refused at the handshake", || {
        connect(&node, as_thief()).err().is_some_and(|error| error.to_string().contains("unknown node"))
    });
    let position = send_tcp(&node, &as_node_2(vec![heartbeat("node-2", 10)])).unwrap();
    assert_eq!(rejections_at(&node, position), ["node_revoked"]);
    let state = node.state();
    let node_2 = state.nodes.find("node-2").unwrap().index();
    assert_eq!(state.nodes.status[node_2], NodeStatus::Left);
    assert_eq!(state.nodes.status[0], NodeStatus::Up, "node-1 was never silenced");
    assert_eq!(blob_holders(&state, &blob), 1);
    assert_eq!(state.specs.len(), 0);
}
