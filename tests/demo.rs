//! `meshos demo` as a new user runs it: five nodes in one process on one log, blobs
//! replicated by real transfers between their peer ports, then two nodes drained at
//! once and a worker daemon killed with SIGKILL on each of the other three. Every blob
//! must end with 3 verified copies, none on the drained nodes, which reach
//! Maintenance; the workers come back. Then SIGKILL of the whole demo and a restart on
//! the same directory: it resumes from its log and loses no blob.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshos::event::ReplicaState;
use meshos::node::config::NodeConfig;
use meshos::state::nodes::MaintenanceState;
use meshos::state::State;

const WAIT_LIMIT: Duration = Duration::from_secs(120);
const BLOBS: usize = 12;

/// The demo process; killed (with its daemons' nodes) if the test fails midway.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill(self.0.id(), libc::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

fn start(dir: &Path) -> Demo {
    let stderr = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("stderr")).unwrap();
    Demo(
        Command::new(env!("CARGO_BIN_EXE_meshos"))
            .args(["demo", "--nodes", "5", "--blobs", &BLOBS.to_string(), "--blob-bytes", "65536", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

fn read_state(dir: &Path) -> State {
    let config = NodeConfig::load(&dir.join("node-1/node.toml")).unwrap().engine_config().unwrap();
    let (engine, _) = meshos::admin::preview::replay_read_only(&dir.join("node-1/log"), &config, u64::MAX).unwrap();
    engine.state
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < WAIT_LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn worker_pid(dir: &Path, node: u32) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(format!("node-{node}/daemons/worker/pid"))).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Nodes holding a healthy copy of each blob, by name.
fn holders(state: &State) -> Vec<Vec<String>> {
    (0..state.blobs.len())
        .map(|blob| {
            let mut names: Vec<String> = state.blobs.replica_rows[blob]
                .iter()
                .filter(|row| state.replicas.state[row.index()] == ReplicaState::Healthy)
                .map(|row| state.nodes.name[state.replicas.node[row.index()].index()].to_string())
                .collect();
            names.sort();
            names
        })
        .collect()
}

fn blob_files(dir: &Path, node: &str) -> Vec<PathBuf> {
    let store = meshos::exec::blobstore::BlobStore::attach(&dir.join(node).join("blobs")).unwrap();
    store.list().unwrap().iter().map(|hash| store.path_of(hash)).collect()
}

/// The genesis every demo node's config names (the same for all): its cluster id, and
/// checks each node's own key is the one it admits.
fn cluster_id(dir: &Path) -> [u8; 16] {
    let mut ids = Vec::new();
    for node in 1..=5 {
        let config = NodeConfig::load(&dir.join(format!("node-{node}/node.toml"))).unwrap();
        let genesis = meshos::node::identity::load_genesis(&config).unwrap();
        let own = meshos::trust::KeyPair::load(&config.node_key_path()).unwrap();
        assert!(genesis.nodes().contains(&(config.name.clone(), own.public_key())), "{} admitted", config.name);
        ids.push(genesis.cluster_id());
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "one genesis for every node");
    ids[0]
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and reads no memory.
    unsafe { libc::kill(pid as i32, signal) };
}

#[test]
fn drain_two_kill_workers_then_crash_and_resume() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("demo");
    let mut demo = start(&dir);
    wait_for("every blob at 3 copies", || {
        dir.join("seeded").exists() && {
            let state = read_state(&dir);
            state.blobs.len() == BLOBS && holders(&state).iter().all(|names| names.len() == 3)
        }
    });
    // Every node signs with its own key, admitted by the demo's genesis; the copies
    // above travelled over the secure channel between their peer ports.
    let cluster = cluster_id(&dir);
    for node in 1..=5 {
        wait_for("a worker on every node", || worker_pid(&dir, node).is_some());
    }
    wait_for("`meshos daemon ls` to list five registered workers", || {
        let listed = Command::new(env!("CARGO_BIN_EXE_meshos"))
            .args(["daemon", "ls", "-o", "json", "--config"])
            .arg(dir.join("node-1/node.toml"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&listed.stdout).matches("\"state\":\"registered\"").count() == 5
    });

    // The first attack on the demo: a client of node-1's ingest port sends a
    // daemon intent. A stranger does not get past the secure handshake; through an
    // authenticated connection (the operator's, as a relay), the intent unsigned and
    // then signed by a key of its own is refused. Nothing runs anywhere.
    let addr: std::net::SocketAddr =
        std::fs::read_to_string(dir.join("node-1/node.addr")).unwrap().trim().parse().unwrap();
    let genesis = meshos::trust::Genesis::load(&dir.join("genesis.toml")).unwrap();
    let mallory = meshos::trust::KeyPair::from_seed([0x66; 32]);
    for stranger in [
        meshos::sys::secure::LocalIdentity::node("mallory", &mallory),
        meshos::sys::secure::LocalIdentity::node("node-2", &mallory),
        meshos::sys::secure::LocalIdentity::operator(&mallory),
    ] {
        let refused = meshos::sys::client::Client::connect_tcp(addr, genesis.client_secure(stranger), Some("node-1"))
            .err()
            .expect("a stranger is refused at the handshake")
            .to_string();
        assert!(refused.contains("refused by the peer"), "{refused}");
    }
    let operator = meshos::trust::KeyPair::load(&dir.join("node-1/admin.key")).unwrap();
    let relay = || {
        let local = meshos::sys::secure::LocalIdentity::operator(&operator);
        meshos::sys::client::Client::connect_tcp(addr, genesis.client_secure(local), Some("node-1")).unwrap()
    };
    let worm = meshos::event::EventKind::DaemonIntent {
        spec: Box::new(meshos::event::DaemonSpec::new("worm", "/bin/touch")),
        runs_on: meshos::event::DaemonPlacement::AllNodes,
    };
    let unsigned = meshos::trust::record::unsigned_batch(&meshos::event::EventBatch {
        events: vec![meshos::event::Event { origin: "node-1".into(), origin_seq: 0, kind: worm.clone() }],
    });
    let (mut client, mut replies) = relay();
    let seq = client.send_payload(&unsigned, true).unwrap();
    let refused = replies.wait_acked(seq, Duration::from_secs(10)).unwrap_err().to_string();
    assert!(refused.contains("unsigned events over TCP"), "{refused}");
    let forged = meshos::admin::sign_now(&mallory, "mallory", cluster, vec![worm]).unwrap();
    let (mut client, mut replies) = relay();
    let seq = client.send_payload(&forged, true).unwrap();
    let position = replies.wait_acked(seq, Duration::from_secs(10)).unwrap().position;
    wait_for("the forged intent to be folded", || read_state(&dir).position >= position);
    let state = read_state(&dir);
    let refusal = state.rejections.kept.iter().find(|rejection| rejection.position == position).unwrap();
    assert_eq!(refusal.reason.name(), "unknown_admin_key");
    assert!(state.specs.find("worm").is_none(), "no daemon intent applied");

    // The peer-port attack, through the drain below: 64 connections from other
    // addresses to every node's peer port that never start a handshake. The pulls
    // that move the drained nodes' copies still go through (a full handshake pool
    // evicts its oldest stranger for a real peer).
    let state = read_state(&dir);
    let mut idle_strangers = Vec::new();
    for row in 0..state.nodes.len() {
        let endpoint: std::net::SocketAddr = state.nodes.endpoint[row].parse().unwrap();
        for host in 2..18u8 {
            for _ in 0..4 {
                idle_strangers.push(common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, host), endpoint));
            }
        }
    }

    // Drain node-2 and node-3 at once, and kill a worker on each other node.
    let config = dir.join("node-1/node.toml");
    let key = dir.join(meshos::node::demo::KEY_FILE);
    for node in ["node-2", "node-3"] {
        let admin = Command::new(env!("CARGO_BIN_EXE_meshos"))
            .args(["admin", "enter-maintenance", node, "--key"])
            .arg(&key)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            admin.status.success(),
            "{}{}",
            String::from_utf8_lossy(&admin.stdout),
            String::from_utf8_lossy(&admin.stderr)
        );
    }
    let killed: Vec<(u32, u32)> = [1, 4, 5].iter().map(|&node| (node, worker_pid(&dir, node).unwrap())).collect();
    for &(_, pid) in &killed {
        kill(pid, libc::SIGKILL);
    }
    wait_for("the drained nodes in Maintenance, every blob at 3 copies elsewhere", || {
        let state = read_state(&dir);
        let away = ["node-2", "node-3"].iter().all(|name| {
            let row = state.nodes.find(name).unwrap().index();
            state.nodes.maintenance[row] == MaintenanceState::Maintenance
        });
        let placed = holders(&state)
            .iter()
            .all(|names| names.len() == 3 && !names.iter().any(|name| name == "node-2" || name == "node-3"));
        away && placed
    });
    for &(node, old) in &killed {
        wait_for("the killed worker back", || worker_pid(&dir, node).is_some_and(|pid| pid != old));
    }
    drop(idle_strangers);
    // The copies on disk agree: every healthy copy verified, none left on the drained nodes.
    wait_for("the drained nodes' blob files cleaned up", || {
        blob_files(&dir, "node-2").is_empty() && blob_files(&dir, "node-3").is_empty()
    });
    // `meshos status -o json` (from node-1's snapshot) shows the same.
    wait_for("status to show both drained nodes empty and in maintenance", || {
        let status = Command::new(env!("CARGO_BIN_EXE_meshos"))
            .args(["status", "-o", "json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout);
        status.status.success()
            && ["node-2", "node-3"].iter().all(|node| {
                text.contains(&format!(
                    "\"name\":\"{node}\",\"zone\":\"z{}\",\"status\":\"up\",\"live\":true,\"maintenance\":\"maintenance\",\"load_permille\":0,\"copies\":0,\"daemons_running\":0",
                    if *node == "node-2" { 2 } else { 3 }
                ))
            })
    });
    // `meshos explain node-3` says why: in maintenance, drained, and the drops it ran.
    let explained = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["explain", "node-3", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(explained.status.success() && text.contains("maintenance: maintenance"), "{text}");
    assert!(text.contains("0 copies not yet safe elsewhere") && text.contains("drop_replica"), "{text}");
    let state = read_state(&dir);
    for (blob, names) in holders(&state).iter().enumerate() {
        let hash = state.blobs.hash[blob];
        for name in names {
            let store = meshos::exec::blobstore::BlobStore::attach(&dir.join(name).join("blobs")).unwrap();
            assert!(store.verify(&hash, &mut |_| {}).unwrap(), "{name} holds blob {blob} intact");
        }
    }

    // Probes measured the nodes' round trips; node-2 comes back from maintenance
    // (fresh capability, its worker running, round trips measured again, Recovery).
    assert!(state.rtt.len() >= 4, "RTT pairs measured by the probes: {}", state.rtt.len());
    let exit = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["admin", "exit-maintenance", "node-2", "--key"])
        .arg(&key)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(exit.status.success(), "{}", String::from_utf8_lossy(&exit.stderr));
    wait_for("node-2 active again", || {
        let state = read_state(&dir);
        let row = state.nodes.find("node-2").unwrap().index();
        state.nodes.maintenance[row] == MaintenanceState::Active
    });
    let state = read_state(&dir);

    // SIGKILL the whole demo, start it again on the same directory: it resumes, stops
    // the workers the killed run left, and every blob is back at 3 verified copies.
    let position = state.position;
    let orphans: Vec<u32> = (1..=5).filter_map(|node| worker_pid(&dir, node)).collect();
    kill(demo.0.id(), libc::SIGKILL);
    demo.0.wait().unwrap();
    let mut demo = start(&dir);
    wait_for("the demo to come back past where it was", || read_state(&dir).position > position + 10);
    wait_for("every blob at 3 healthy copies after the restart", || {
        holders(&read_state(&dir)).iter().all(|names| names.len() == 3)
    });
    assert_eq!(cluster_id(&dir), cluster, "the restart keeps the cluster's genesis");
    for node in 1..=5 {
        assert!(!dir.join(format!("node-{node}/daemons/worm")).exists(), "the forged daemon never ran on node-{node}");
    }
    for pid in orphans {
        assert!(meshos::sys::process::start_ticks(pid).is_none(), "worker {pid} of the killed run was stopped");
    }
    let state_after = read_state(&dir);
    for (blob, names) in holders(&state_after).iter().enumerate() {
        for name in names {
            let store = meshos::exec::blobstore::BlobStore::attach(&dir.join(name).join("blobs")).unwrap();
            assert!(store.verify(&state_after.blobs.hash[blob], &mut |_| {}).unwrap(), "{name}: blob {blob}");
        }
    }
    kill(demo.0.id(), libc::SIGTERM);
    assert!(demo.0.wait().unwrap().success(), "SIGTERM stops the demo cleanly");
}
