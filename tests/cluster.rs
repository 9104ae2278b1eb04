//! Clusters of real processes: a three-server NATS JetStream cluster and three to five
//! `meshos node` processes on loopback ports, each with its own data directory, all on
//! one stream. Scenarios: blobs put, one node SIGKILLed and re-replicated around after
//! the down interval, then restarted (a new incarnation fences its old copies; its
//! records are not applied twice); a node drained across the cluster; a NATS server
//! killed under load with nothing lost; checkpoints, trimming and a new node started
//! from another's checkpoint. After each: every live node folds the same hash at the
//! same position (their mirrors replayed to a common position, and the commitments
//! they published), and no blob has fewer healthy copies than its intent.
//!
//! Skips with a message when nats-server is not installed, unless MESHOS_NATS_SERVER is
//! set (CI sets it, so CI never skips).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use meshos::event::{AdminCommand, EventKind, PlacementIntent, ReplicaState};
use meshos::node::config::NodeConfig;
use meshos::state::nodes::MaintenanceState;
use meshos::state::State;
use meshos::trust::Sealer;

const WAIT_LIMIT: Duration = Duration::from_secs(90);
/// One cluster at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());
/// Blobs made so far: each gets distinct bytes.
static BLOBS_MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// One `meshos node` process and its directory.
struct NodeProcess {
    name: String,
    dir: PathBuf,
    config_path: PathBuf,
    child: Option<Child>,
}

impl NodeProcess {
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let _ = std::fs::remove_file(self.dir.join("node.addr"));
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("stderr")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_meshos"))
            .args(["node", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "meshos=info,warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) takes plain integers and reads no memory.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().unwrap();
            assert!(status.success(), "{} exited with {status} after SIGTERM; see {}", self.name, self.stderr_path());
        }
    }

    fn stderr_path(&self) -> String {
        self.dir.with_extension("stderr").display().to_string()
    }

    /// The node's ingest TCP address (`DATA_DIR/node.addr`).
    fn tcp_addr(&self) -> std::net::SocketAddr {
        std::fs::read_to_string(self.dir.join("node.addr")).unwrap().trim().parse().unwrap()
    }

    fn listening(&self) -> bool {
        std::fs::read_to_string(self.dir.join("node.addr")).is_ok_and(|text| !text.trim().is_empty())
    }

    fn config(&self) -> NodeConfig {
        NodeConfig::load(&self.config_path).unwrap()
    }

    /// The node's state, folded from its mirror (read-only, while it runs) up to `up_to`.
    fn state(&self, up_to: u64) -> State {
        let config = self.config().engine_config().unwrap();
        let (engine, _) =
            meshos::admin::preview::replay_read_only(&self.dir.join("log"), &config, up_to).expect("mirror replays");
        engine.state
    }

    fn mirrored(&self) -> u64 {
        self.state(u64::MAX).position
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Mesh {
    nats: NatsCluster,
    root: Option<tempfile::TempDir>,
    nodes: Vec<NodeProcess>,
}

impl Drop for Mesh {
    /// Kills the nodes; keeps their directories (configs, mirrors, logs) when the test failed.
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let root = self.root.take().expect("dropped once");
        if std::thread::panicking() {
            eprintln!("node directories kept in {}", root.keep().display());
        }
    }
}

/// Extra config lines for every node of a scenario.
#[derive(Default, Clone)]
struct Tuning {
    cluster: &'static str,
}

/// Every name the scenarios' genesis admits: the nodes and the outside clients.
fn genesis_names() -> Vec<String> {
    let mut names: Vec<String> = (1..=8).map(|index| format!("node-{index}")).collect();
    names.extend(["extra", "loader", "big", "small"].map(String::from));
    names.extend((0..3).map(|index| format!("loader-{index}")));
    names
}

/// The genesis of the scenarios' cluster.
fn genesis() -> meshos::trust::Genesis {
    meshos::trust::Genesis::for_tests(&genesis_names())
}

/// What an outside client of the scenarios signs its frames with.
fn client_sealer(name: &str) -> meshos::trust::Sealer {
    let cluster_id = genesis().cluster_id();
    meshos::trust::Sealer::node(name, meshos::trust::test_key_of(name), cluster_id)
}

impl Mesh {
    /// Starts NATS and `count` nodes; None when nats-server is absent (and not required).
    fn start(count: usize, tuning: Tuning) -> Option<Mesh> {
        let nats = NatsCluster::start(3)?;
        let root = tempfile::tempdir().unwrap();
        // The genesis (`meshos cluster init` in a real cluster): the test operator key,
        // the nodes any scenario starts and the outside clients, each with its test key.
        common::write_operator_key(&root.path().join("operator.key"));
        meshos::trust::Genesis::for_tests(&genesis_names()).write_new(&root.path().join("genesis.toml")).unwrap();
        let mut mesh = Mesh { nats, root: Some(root), nodes: Vec::new() };
        for _ in 0..count {
            mesh.add_node(&tuning, "");
        }
        mesh.wait_all_listening();
        // Placement sees every node: a blob put before a node's capability is folded
        // is placed without it (and a scenario about that node's copies finds none).
        let names: Vec<String> = (1..=count).map(|index| format!("node-{index}")).collect();
        wait_for("every node live with its capability in node-1's state", || {
            let state = mesh.nodes[0].state(u64::MAX);
            names.iter().all(|name| {
                state
                    .nodes
                    .find(name)
                    .is_some_and(|row| state.nodes.live[row.index()] && state.nodes.capability_version[row.index()] > 0)
            })
        });
        Some(mesh)
    }

    fn root(&self) -> &std::path::Path {
        self.root.as_ref().expect("until dropped").path()
    }

    fn add_node(&mut self, tuning: &Tuning, extra_cluster: &str) -> usize {
        let index = self.nodes.len() + 1;
        let name = format!("node-{index}");
        let dir = self.root().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        if !dir.join("node.key").exists() {
            meshos::trust::test_key_of(&name).write_new(&dir.join("node.key")).unwrap();
        }
        let servers: Vec<String> = self.nats.client_urls().iter().map(|url| format!("\"{url}\"")).collect();
        let text = format!(
            "name = \"{name}\"\ndata_dir = \"{dir}\"\nheartbeat_ms = 200\n\n\
             [ingest]\nlisten_tcp = \"127.0.0.1:0\"\n\n\
             [reconcile]\nnode_down_ms = 3000\nstabilisation_ms = 2000\nrecovery_ms = 2000\n\
             action_timeout_ms = 10000\nmass_failure_share_permille = 500\n\n\
             [capability]\nzone = \"z{zone}\"\ncapacity_bytes = 10737418240\n\n\
             [snapshot]\ninterval_ms = 200\n\n\
             [cluster]\nnats = [{servers}]\nstream_replicas = 3\n\
             {genesis_line}commitment_interval_records = 100\n{tuning}\n{extra_cluster}\n",
            dir = dir.display(),
            zone = (index - 1) % 3 + 1,
            servers = servers.join(", "),
            // A scenario may name another genesis (a node of another cluster).
            genesis_line = if extra_cluster.contains("genesis_file") {
                String::new()
            } else {
                format!("genesis_file = \"{}\"\n", self.root().join("genesis.toml").display())
            },
            tuning = tuning.cluster,
        );
        let config_path = dir.join("node.toml");
        std::fs::write(&config_path, text).unwrap();
        let mut node = NodeProcess { name, dir, config_path, child: None };
        node.start();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn wait_all_listening(&self) {
        for node in &self.nodes {
            wait_for(&format!("{} to catch up and listen (see {})", node.name, node.stderr_path()), || {
                node.listening()
            });
        }
    }

    /// An operator's command through node `through`.
    fn admin(&self, through: usize, _seq: u64, command: AdminCommand) {
        self.send(through, vec![EventKind::Admin(Box::new(command))]);
    }

    /// Sends events as node `through`'s own (its local socket); returns once read back.
    fn send(&self, through: usize, kinds: Vec<EventKind>) -> u64 {
        let node = &self.nodes[through];
        let config = node.config();
        let payload = common::local_payload(
            &self.root().join("genesis.toml"),
            &self.root().join("operator.key"),
            &config.name,
            kinds,
        );
        let ack = meshos::admin::submit::send_payload(&config.local_socket_path(), &payload, Duration::from_secs(30))
            .unwrap_or_else(|error| panic!("sending through {}: {error}", node.name));
        ack.position
    }

    /// Stores `count` blobs on node `through` and declares them with `replicas` copies.
    fn put_blobs(&self, through: usize, count: u32, replicas: u8) -> Vec<[u8; 32]> {
        let config = self.nodes[through].config();
        let store = meshos::exec::blobstore::BlobStore::attach(&config.blobs_dir()).unwrap();
        let mut blobs = Vec::new();
        for _ in 0..count {
            // Distinct bytes for every blob of the test run.
            let index = BLOBS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let bytes: Vec<u8> = (0..32 * 1024u32)
                .map(|at| (at.wrapping_mul(31) ^ index.wrapping_mul(7919) ^ (at >> 8).wrapping_mul(index + 1)) as u8)
                .collect();
            let (blob, size_bytes) = store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
            self.send(
                through,
                vec![
                    EventKind::BlobAnnounce { blob, size_bytes },
                    EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
                    EventKind::PlacementIntent(PlacementIntent {
                        blob,
                        replicas,
                        zone_spread: false,
                        pinned: Vec::new(),
                    }),
                ],
            );
            blobs.push(blob);
        }
        blobs
    }

    /// SIGTERM to every running node; each must exit 0.
    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    fn live(&self) -> impl Iterator<Item = &NodeProcess> {
        self.nodes.iter().filter(|node| node.child.is_some())
    }

    /// Every live node folds the same hash at a common position (mirrors replayed),
    /// no node is fenced, and the commitments in the log agree position by position.
    fn assert_agreement(&self) {
        let live: Vec<&NodeProcess> = self.live().collect();
        wait_for("a state commitment of every live node at one position", || {
            let state = live[0].state(u64::MAX);
            let nodes = &state.nodes;
            let positions: Vec<u64> = live
                .iter()
                .map(|node| nodes.find(&node.name).map_or(0, |row| nodes.commitment_position[row.index()]))
                .collect();
            positions[0] > 0 && positions.iter().all(|position| *position == positions[0])
        });
        let common = live.iter().map(|node| node.mirrored()).min().unwrap();
        assert!(common > 0);
        let hashes: Vec<(String, u128)> =
            live.iter().map(|node| (node.name.clone(), node.state(common).state_hash())).collect();
        assert!(hashes.iter().all(|(_, hash)| *hash == hashes[0].1), "hashes at position {common} differ: {hashes:x?}");
        let state = live[0].state(common);
        let nodes = &state.nodes;
        let mut compared = 0;
        for row in 0..nodes.len() {
            for other in 0..nodes.len() {
                if row != other
                    && nodes.commitment_position[row] != 0
                    && nodes.commitment_position[row] == nodes.commitment_position[other]
                {
                    assert_eq!(
                        nodes.commitment_hash[row], nodes.commitment_hash[other],
                        "{} and {} committed different hashes at {}",
                        nodes.name[row], nodes.name[other], nodes.commitment_position[row]
                    );
                    compared += 1;
                }
            }
        }
        for node in &live {
            let text = std::fs::read_to_string(node.dir.with_extension("stderr")).unwrap_or_default();
            assert!(!text.contains("stops acting"), "{} fenced itself; see {}", node.name, node.stderr_path());
        }
        eprintln!("agreement: {} live nodes at position {common}, {compared} commitment pairs equal", live.len());
    }

    /// Waits until every blob has exactly `replicas` healthy copies on live nodes.
    fn wait_settled(&self, what: &str, blobs: &[[u8; 32]], replicas: usize) {
        wait_for(what, || {
            let state = self.live().next().unwrap().state(u64::MAX);
            blobs.iter().all(|blob| healthy_holders(&state, blob).len() == replicas)
        });
    }

    /// Waits until every blob has at least its intended healthy copies on live nodes (a
    /// node is live while its heartbeats arrive within `node_down_ms` of log time).
    fn wait_replicated(&self, what: &str, blobs: &[[u8; 32]], replicas: usize, avoid: &[&str]) {
        wait_for(what, || {
            let state = self.live().next().unwrap().state(u64::MAX);
            blobs.iter().all(|blob| {
                let holders = healthy_holders(&state, blob);
                holders.len() >= replicas && holders.iter().all(|name| !avoid.contains(&name.as_str()))
            })
        });
    }
}

/// `count` heartbeats of `origin` numbered from `*seq + 1` (an outside client speaking
/// for a pseudo-node of its own), as one frame.
fn heartbeats(origin: &str, seq: &mut u64, count: u64) -> meshos::event::EventBatch {
    let events = (0..count)
        .map(|_| {
            *seq += 1;
            meshos::event::Event {
                origin: origin.into(),
                origin_seq: *seq,
                kind: EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 1 }),
            }
        })
        .collect();
    meshos::event::EventBatch { events }
}

fn healthy_holders(state: &State, blob: &[u8; 32]) -> Vec<String> {
    let Some(row) = state.blobs.find(blob) else { return Vec::new() };
    state.blobs.replica_rows[row.index()]
        .iter()
        .filter(|replica| state.replicas.state[replica.index()] == ReplicaState::Healthy)
        .map(|replica| state.replicas.node[replica.index()])
        .filter(|node| state.nodes.live[node.index()])
        .map(|node| state.nodes.name[node.index()].to_string())
        .collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < WAIT_LIMIT, "timed out after {WAIT_LIMIT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn node_row(state: &State, name: &str) -> usize {
    state.nodes.find(name).unwrap().index()
}

#[test]
fn sigkill_a_node_rereplicate_then_rejoin() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(4, Tuning::default()) else { return };
    let blobs = mesh.put_blobs(0, 6, 3);
    mesh.wait_settled("6 blobs at exactly 3 copies (surplus dropped)", &blobs, 3);
    mesh.assert_agreement();
    let before = mesh.nodes[0].state(u64::MAX);
    let on_node_2 = blobs.iter().filter(|blob| healthy_holders(&before, blob).contains(&"node-2".to_string())).count();
    assert!(on_node_2 > 0, "node-2 holds copies to lose");

    // node-2 dies hard: after node_down_ms the others copy its blobs elsewhere.
    let incarnation = before.nodes.incarnation[node_row(&before, "node-2")];
    mesh.nodes[1].kill();
    mesh.wait_replicated("3 copies again, none on the dead node-2", &blobs, 3, &["node-2"]);
    eprintln!("{on_node_2} blobs had a copy on node-2 and were copied elsewhere");
    mesh.assert_agreement();

    // It comes back: a new incarnation (its old copies fenced until re-verified), and
    // none of its records applied twice.
    mesh.nodes[1].start();
    wait_for("node-2 to catch up and listen", || mesh.nodes[1].listening());
    wait_for("node-2 live again with a new incarnation", || {
        let state = mesh.nodes[0].state(u64::MAX);
        let row = node_row(&state, "node-2");
        state.nodes.live[row] && state.nodes.incarnation[row] > incarnation
    });
    mesh.wait_replicated("every blob at 3 copies after the rejoin", &blobs, 3, &[]);
    let state = mesh.nodes[0].state(u64::MAX);
    let stale = state.rejections.kept.iter().filter(|rejection| rejection.reason.name() == "stale_origin_seq").count();
    assert_eq!(stale, 0, "a record was applied twice: {:?}", state.rejections.kept);
    mesh.assert_agreement();
    mesh.stop_all();
}

#[test]
fn drain_a_node_across_the_cluster() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(4, Tuning::default()) else { return };
    let blobs = mesh.put_blobs(1, 6, 2);
    mesh.wait_settled("6 blobs at exactly 2 copies", &blobs, 2);
    // Drain the node (not node-1, which asks) holding the most copies.
    let state = mesh.nodes[0].state(u64::MAX);
    let held = |name: &str| blobs.iter().filter(|blob| healthy_holders(&state, blob).iter().any(|n| n == name)).count();
    let drained = ["node-2", "node-3", "node-4"].into_iter().max_by_key(|name| held(name)).unwrap();
    assert!(held(drained) > 0);
    eprintln!("draining {drained}, which holds {} copies", held(drained));
    // The drain is asked through node-1 and carried out by the drained node and the others.
    mesh.admin(0, 2, AdminCommand::EnterMaintenance { node: drained.into() });
    wait_for(&format!("{drained} drained: in Maintenance and holding no copy"), || {
        let state = mesh.nodes[0].state(u64::MAX);
        let row = node_row(&state, drained);
        state.nodes.maintenance[row] == MaintenanceState::Maintenance
            && blobs.iter().all(|blob| !healthy_holders(&state, blob).iter().any(|name| name == drained))
    });
    mesh.wait_replicated("2 copies of every blob off the drained node", &blobs, 2, &[drained]);
    mesh.assert_agreement();
    mesh.stop_all();
}

/// A node whose settings differ (`[fold] nodes_max`) folds the same log into another
/// state: at the next commitment position its hash is not the others'. It says so in
/// its log and its snapshot (`FENCED`) and stops acting; the others' status names it
/// (`DIVERGED`). A second process started under an existing node's name is fenced too.
#[test]
fn a_diverged_node_and_a_duplicate_name_are_fenced() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    // node-4 takes one node fewer than the others: a fourth origin is refused there only.
    let index = mesh.add_node(&Tuning::default(), "");
    let config = std::fs::read_to_string(&mesh.nodes[index].config_path).unwrap();
    mesh.nodes[index].kill();
    std::fs::write(&mesh.nodes[index].config_path, format!("{config}\n[fold]\nnodes_max = 4\n")).unwrap();
    mesh.nodes[index].start();
    wait_for("node-4 listening", || mesh.nodes[index].listening());
    let addr = mesh.nodes[0].tcp_addr();
    let (mut client, mut replies) = common::connect_as(addr, &genesis(), "extra", "node-1").unwrap();
    client.set_sealer(client_sealer("extra"));
    let frame = client.send(&heartbeats("extra", &mut 0, 1), true).unwrap();
    replies.wait_acked(frame, Duration::from_secs(30)).unwrap();
    let status = |node: &NodeProcess| {
        let output = Command::new(env!("CARGO_BIN_EXE_meshos"))
            .args(["status", "-o", "json", "--config"])
            .arg(&node.config_path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    wait_for("node-4 to see that it diverged and fence itself", || {
        std::fs::read_to_string(mesh.nodes[index].dir.with_extension("stderr"))
            .is_ok_and(|log| log.contains("state diverged") && log.contains("stops acting"))
    });
    wait_for("node-4's status to say FENCED", || status(&mesh.nodes[index]).contains("\"fence\":\"state diverged"));
    wait_for("node-1's status to name node-4 as diverged", || {
        status(&mesh.nodes[0]).contains("\"nodes_diverged\":[\"node-4\"]")
    });
    // Fenced, node-4 no longer carries out its actions.
    let dispatched = |node: &NodeProcess| std::fs::read_to_string(node.dir.join("dispatched.log")).unwrap_or_default();
    let before = dispatched(&mesh.nodes[index]);
    let blobs = mesh.put_blobs(0, 4, 4);
    mesh.wait_replicated("every blob on the three nodes that act", &blobs, 3, &["node-4"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dispatched(&mesh.nodes[index]), before, "a fenced node ran actions");
    let state = mesh.nodes[0].state(u64::MAX);
    assert!(blobs.iter().all(|blob| !healthy_holders(&state, blob).contains(&"node-4".to_string())));

    // A second process under node-2's name, holding node-2's key (copied, as a leaked
    // key would be): both see validly signed records of their name they did not
    // publish. (One without the key only has its records refused: `tests/trust.rs`.)
    let impostor_dir = mesh.root().join("impostor");
    std::fs::create_dir_all(&impostor_dir).unwrap();
    std::fs::copy(mesh.nodes[1].dir.join("node.key"), impostor_dir.join("node.key")).unwrap();
    let text = std::fs::read_to_string(&mesh.nodes[1].config_path)
        .unwrap()
        .replace(&mesh.nodes[1].dir.display().to_string(), &impostor_dir.display().to_string());
    std::fs::write(impostor_dir.join("node.toml"), text).unwrap();
    let mut impostor = NodeProcess {
        name: "node-2".into(),
        dir: impostor_dir.clone(),
        config_path: impostor_dir.join("node.toml"),
        child: None,
    };
    impostor.start();
    wait_for("node-2 (either process) to report its name in use", || {
        [&mesh.nodes[1], &impostor].iter().any(|node| {
            std::fs::read_to_string(node.dir.with_extension("stderr"))
                .is_ok_and(|log| log.contains("another process publishes as this node"))
        })
    });
    impostor.kill();
    mesh.nodes.pop().unwrap().kill();
}

/// Every NATS server crashes twice, and at the second crash their stores go back to
/// what they held at the first: the stream loses an acknowledged tail, as a crash of
/// every server before its fsync can lose one. The nodes, which folded that tail,
/// give it back from their mirrors (each record pinned to its position) or roll back
/// to the stream; either way they agree again and the blobs put in the lost tail are
/// still known and replicated.
#[test]
fn a_tail_lost_by_every_nats_server_is_repaired() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let first = mesh.put_blobs(0, 2, 3);
    mesh.wait_settled("2 blobs at 3 copies", &first, 3);
    let saved = mesh.root().join("nats-saved");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for server in ["n1", "n2", "n3"] {
            let _ = std::fs::remove_dir_all(to.join(server));
            let status = Command::new("cp").arg("-a").arg(from.join(server)).arg(to).status().unwrap();
            assert!(status.success());
        }
    };
    mesh.nats.crash_all_with(|stores| copy(stores, &saved));
    let second = mesh.put_blobs(1, 2, 3);
    mesh.wait_settled("2 more blobs at 3 copies (the tail to be lost)", &second, 3);
    let folded = mesh.nodes.iter().map(|node| node.mirrored()).min().unwrap();
    mesh.nats.crash_all_with(|stores| copy(&saved, stores));
    eprintln!("the stream went back to what it held before position {folded}");
    wait_for("the stream to hold again what the nodes folded", || {
        mesh.nodes.iter().all(|node| {
            std::fs::read_to_string(node.dir.with_extension("stderr")).is_ok_and(|log| {
                log.contains("the stream's lost tail is restored") || log.contains("caught up again after the rollback")
            })
        }) || mesh.nodes[0].mirrored() > folded + 50
    });
    for node in &mesh.nodes {
        let log = std::fs::read_to_string(node.dir.with_extension("stderr")).unwrap_or_default();
        let restored = log.contains("the stream's lost tail is restored");
        let rolled_back = log.contains("rolling back to the stream");
        eprintln!("{}: gave the tail back: {restored}, rolled back: {rolled_back}", node.name);
    }
    mesh.wait_replicated("every blob, those of the lost tail too, at 3 copies", &second, 3, &[]);
    mesh.wait_replicated("the first blobs at 3 copies", &first, 3, &[]);
    mesh.assert_agreement();
    mesh.stop_all();
}

/// Frames of events sent by an outside client (a pseudo-node "loader", over TCP) while
/// the NATS server holding the stream's leadership is killed: every frame is
/// acknowledged, every event is folded exactly once on every node.
#[test]
fn kill_a_nats_server_under_load_loses_nothing() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let addr = mesh.nodes[0].tcp_addr();
    let (mut client, mut replies) = common::connect_as(addr, &genesis(), "loader", "node-1").unwrap();
    client.set_sealer(client_sealer("loader"));
    const FRAMES: u64 = 3000;
    const EVENTS_PER_FRAME: u64 = 20;
    let started = Instant::now();
    let mut seq = 0u64;
    let mut last_frame = 0;
    for frame in 0..FRAMES {
        if frame == FRAMES / 3 {
            let leader = mesh.nats.stream_leader("MESHOS").unwrap_or(0);
            eprintln!("killing NATS server {leader} (the stream leader) after {frame} frames");
            mesh.nats.kill(leader);
        }
        last_frame = client.send(&heartbeats("loader", &mut seq, EVENTS_PER_FRAME), true).unwrap();
    }
    replies.wait_acked(last_frame, Duration::from_secs(60)).expect("every frame acknowledged");
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{} events in {FRAMES} frames acknowledged (read back) in {elapsed:.2} s: {:.0} events/s through JetStream",
        seq,
        seq as f64 / elapsed
    );
    for node in &mesh.nodes {
        wait_for(&format!("{} to fold every loader event", node.name), || {
            let state = node.state(u64::MAX);
            state.nodes.find("loader").is_some_and(|row| state.nodes.origin_seq_last[row.index()] == seq)
        });
        // Every loader event folded exactly once (its last origin sequence above, no
        // rejection of it). A node's own record stored after a later one (a publish
        // resent across the failover) is refused as stale and queued again by the node.
        let state = node.state(u64::MAX);
        for rejection in &state.rejections.kept {
            let text = rejection.to_string();
            assert!(!text.contains("loader") && rejection.reason.name() == "stale_origin_seq", "{}: {text}", node.name);
        }
    }
    mesh.assert_agreement();
    mesh.stop_all();
}

/// Checkpoints every few hundred records, the stream trimmed below what every node
/// needs, a restart from a checkpoint, and a new node started from a copied checkpoint.
#[test]
fn checkpoints_trim_and_a_new_node_from_a_checkpoint() {
    let _serial = serial();
    let tuning = Tuning { cluster: "checkpoint_interval_records = 150\ncheckpoints_kept = 2\n" };
    let Some(mut mesh) = Mesh::start(3, tuning.clone()) else { return };
    let blobs = mesh.put_blobs(0, 4, 3);
    mesh.wait_replicated("4 blobs at 3 copies", &blobs, 3, &[]);
    wait_for("the stream trimmed below the nodes' checkpoints", || {
        mesh.nats.stream_first_seq("MESHOS").is_some_and(|first| first > 150)
    });
    // A restart folds from its checkpoint and the mirror, not from position 1.
    mesh.nodes[2].stop();
    mesh.nodes[2].start();
    wait_for("node-3 back", || mesh.nodes[2].listening());
    let log = std::fs::read_to_string(mesh.nodes[2].dir.with_extension("stderr")).unwrap();
    assert!(log.contains("starting from checkpoint"), "node-3 restarted without its checkpoint: {log}");
    // A new node from node-1's newest checkpoint.
    let newest = std::fs::read_dir(mesh.nodes[0].dir.join("checkpoints"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .max()
        .unwrap();
    let copied = mesh.root().join("seed.checkpoint");
    std::fs::copy(&newest, &copied).unwrap();
    let index = mesh.add_node(&tuning, &format!("checkpoint_from = \"{}\"", copied.display()));
    wait_for("node-4 to start from the checkpoint and catch up", || mesh.nodes[index].listening());
    wait_for("node-4 commits the same hashes as the others", || {
        let state = mesh.nodes[0].state(u64::MAX);
        let row = node_row(&state, "node-4");
        let position = state.nodes.commitment_position[row];
        position > 0
            && (0..state.nodes.len()).any(|other| {
                other != row
                    && state.nodes.commitment_position[other] == position
                    && state.nodes.commitment_hash[other] == state.nodes.commitment_hash[row]
            })
    });
    mesh.wait_replicated("blobs at 3 copies", &blobs, 3, &[]);
    // node-4's mirror starts after its checkpoint: compare the others' mirrors.
    let newcomer = mesh.nodes.pop().unwrap();
    mesh.assert_agreement();
    drop(newcomer);
    mesh.stop_all();
}

/// Throughput of the cluster log: three loaders (one TCP connection to each node, as
/// outside clients) send frames of events as fast as the nodes take them; the clock
/// stops when every node has folded every event. Run by hand (release build):
/// `cargo test --release --test cluster -- --ignored --nocapture cluster_log_throughput`;
/// recorded in perf/cluster.md.
#[test]
#[ignore = "a measurement; run by hand (see perf/cluster.md)"]
fn cluster_log_throughput() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let frames: u64 = std::env::var("FRAMES").ok().and_then(|text| text.parse().ok()).unwrap_or(2000);
    let events_per_frame: u64 =
        std::env::var("EVENTS_PER_FRAME").ok().and_then(|text| text.parse().ok()).unwrap_or(256);
    let snapshot_of = |node: &NodeProcess| node.config().snapshot_path();
    let applied = |node: &NodeProcess| {
        meshos::snapshot::MappedSnapshot::open(&snapshot_of(node))
            .map_or(0, |mapped| mapped.get().events_applied.to_native())
    };
    let before: Vec<u64> = mesh.nodes.iter().map(applied).collect();
    let started = Instant::now();
    let senders: Vec<_> = mesh
        .nodes
        .iter()
        .enumerate()
        .map(|(index, node)| {
            let addr = node.tcp_addr();
            std::thread::spawn(move || {
                let origin = format!("loader-{index}");
                let server = format!("node-{}", index + 1);
                let (mut client, mut replies) = common::connect_as(addr, &genesis(), &origin, &server).unwrap();
                client.set_sealer(client_sealer(&origin));
                let mut seq = 0u64;
                let mut last = 0;
                for frame in 0..frames {
                    let batch = heartbeats(&origin, &mut seq, events_per_frame);
                    last = client.send(&batch, frame + 1 == frames).unwrap();
                }
                replies.wait_acked(last, Duration::from_secs(600)).unwrap();
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    let acked = started.elapsed().as_secs_f64();
    let total = 3 * frames * events_per_frame;
    for (index, node) in mesh.nodes.iter().enumerate() {
        wait_for(&format!("{} to fold every event", node.name), || applied(node) >= before[index] + total);
    }
    let folded = started.elapsed().as_secs_f64();
    eprintln!(
        "cluster log: {total} events in {} records of {events_per_frame}, 3 nodes: every frame acked (read back) after \
         {acked:.2} s, folded by every node after {folded:.2} s: {:.0} events/s, {:.0} records/s into every node's fold",
        3 * frames,
        total as f64 / folded,
        (3 * frames) as f64 / folded
    );
    mesh.stop_all();
}

/// Publishes raw payloads to the cluster's stream as an outsider (not a node); returns
/// the position each was stored at.
fn publish_raw(mesh: &Mesh, payloads: &[Vec<u8>]) -> Vec<u64> {
    use meshos::redex::jetstream::{JetStream, JetStreamConfig, PublishOutcome};
    let mut config = JetStreamConfig::new(mesh.nats.client_urls(), "outsider");
    config.stream_replicas = 3;
    config.record_bytes_max = 7 << 20;
    let signal = meshos::ingest::park::Signal::new();
    let mut js = JetStream::start(config, 1, std::sync::Arc::clone(&signal)).unwrap();
    let mut tickets = Vec::new();
    for (index, payload) in payloads.iter().enumerate() {
        let mut id = [0xa5u8; 16];
        id[..8].copy_from_slice(&(index as u64).to_le_bytes());
        tickets.push(js.publish(id, payload).unwrap());
    }
    let mut positions = vec![0u64; payloads.len()];
    let mut outcomes: Vec<PublishOutcome> = Vec::new();
    wait_for("the outsider's records stored", || {
        js.poll_acks(&mut outcomes);
        signal.wait(Some(50));
        outcomes.len() == payloads.len()
    });
    for outcome in &outcomes {
        let index = tickets.iter().position(|ticket| *ticket == outcome.ticket).unwrap();
        positions[index] = outcome.result.as_ref().expect("stored").position;
    }
    js.stop();
    positions
}

/// A record on the stream that is no event batch, or too large for a node's mirror
/// (`[log] frame_bytes_max`), is a counted rejection on every node: no node stops.
#[test]
fn malformed_and_oversized_records_from_the_stream_are_rejections() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let frame_bytes_max = mesh.nodes[0].config().log.frame_bytes_max as usize;
    // An empty message too: one rejected record (fold once recursed forever on an
    // empty payload whose pointer was not aligned, as a replay's copy of it is).
    let positions = publish_raw(&mesh, &[vec![0x5a; 100], Vec::new(), vec![0x5a; frame_bytes_max - 16]]);
    let last = *positions.iter().max().unwrap();
    mesh.send(0, vec![EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 0 })]);
    for node in &mut mesh.nodes {
        wait_for(&format!("{} past the outsider's records", node.name), || {
            let exited = node.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "{} stopped ({exited:?}); see {}", node.name, node.stderr_path());
            node.mirrored() > last
        });
        let state = node.state(u64::MAX);
        assert!(state.rejections.total >= 3, "{}: {} rejections", node.name, state.rejections.total);
    }
    mesh.assert_agreement();
}

/// A frame the node accepts but JetStream refuses (over the servers' `max_payload`)
/// is never covered by a later frame's (cumulative) ack: the client is told, or the
/// record is in the log.
#[test]
fn a_record_jetstream_refuses_is_never_acknowledged() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let node = &mut mesh.nodes[0];
    node.kill();
    let config = std::fs::read_to_string(&node.config_path)
        .unwrap()
        .replace("[ingest]\n", "[ingest]\nconnection_buffer_bytes = 33554432\nqueue_bytes_max = 33554432\n");
    std::fs::write(&node.config_path, format!("{config}\n[log]\nframe_bytes_max = 16777216\n")).unwrap();
    node.start();
    wait_for("node-1 listening again", || node.listening());
    let heartbeat = |origin: &str, origin_seq: u64| meshos::event::Event {
        origin: origin.into(),
        origin_seq,
        kind: EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 0 }),
    };
    let mut big = meshos::event::EventBatch { events: Vec::new() };
    while meshos::wire::encode_batch(&big).len() < 9_000_000 {
        let next = big.events.len() as u64 + 1;
        big.events.extend((next..next + 10_000).map(|seq| heartbeat("big", seq)));
    }
    let small = meshos::event::EventBatch { events: vec![heartbeat("small", 1)] };
    let addr = mesh.nodes[0].tcp_addr();
    let (mut client, mut replies) = common::connect_as(addr, &genesis(), "big", "node-1").unwrap();
    client.set_sealer(client_sealer("big"));
    client.send(&big, true).unwrap();
    client.set_sealer(client_sealer("small"));
    let last = client.send(&small, true).unwrap();
    match replies.wait_acked(last, Duration::from_secs(30)) {
        Ok(ack) => {
            let state = mesh.nodes[0].state(u64::MAX);
            assert!(
                state.nodes.find("big").is_some(),
                "frames up to {last} acknowledged at position {}, but the first one is not in the log",
                ack.position
            );
        }
        Err(error @ meshos::sys::client::ClientError::TimedOut { .. }) => panic!("never told: {error}"),
        Err(error) => eprintln!("the client was told: {error}"),
    }
}

/// Every NATS server lost the stream (its store wiped while the nodes were stopped):
/// the first node to start publishes its whole mirror again, even when that is more
/// than its publish window and queue hold at once, so a new node folds the same log.
#[test]
fn a_lost_stream_is_published_again_beyond_the_publish_queue() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    wait_for("40 records in node-1's mirror", || mesh.nodes[0].mirrored() >= 40);
    mesh.stop_all();
    let mirrored = mesh.nodes[0].mirrored();
    for i in 0..3 {
        mesh.nats.kill(i);
        let store = mesh.nats.dir().join(mesh.nats.name(i));
        std::fs::remove_dir_all(store).unwrap();
    }
    mesh.nats.restart_all();
    // node-1 may have at most 5 publishes pending at once.
    let node = &mut mesh.nodes[0];
    let config = std::fs::read_to_string(&node.config_path)
        .unwrap()
        .replace("[ingest]\n", "[ingest]\nrecords_per_commit_max = 4\n")
        .replace("[cluster]\n", "[cluster]\npublish_window_max = 1\npublish_queue_max = 4\n");
    std::fs::write(&node.config_path, config).unwrap();
    node.start();
    wait_for("node-1 listening after the repair", || node.listening());
    let fresh = mesh.add_node(&Tuning::default(), "");
    wait_for("node-4 listening", || mesh.nodes[fresh].listening());
    wait_for("node-4 past node-1's old mirror", || mesh.nodes[fresh].mirrored() > mirrored);
    // The stream holds node-1's records again, at their positions (both mirrors start at 1).
    let payloads = |node: &NodeProcess| {
        let mut payloads = Vec::new();
        meshos::redex::embedded::read_unlocked(
            &node.dir.join("log"),
            &node.config().engine_config().unwrap(),
            &mut |record| {
                payloads.push(record.payload.to_vec());
                record.position < mirrored
            },
        )
        .unwrap();
        payloads
    };
    let (old, new) = (payloads(&mesh.nodes[0]), payloads(&mesh.nodes[fresh]));
    assert_eq!(old.len() as u64, mirrored);
    let differing: Vec<usize> = (0..old.len()).filter(|&at| old[at] != new[at]).map(|at| at + 1).collect();
    assert!(differing.is_empty(), "positions {differing:?} of {mirrored} hold other records than node-1 folded");
    // And with the times node-1 folded them at, not the servers' times of the repair.
    mesh.assert_agreement();
}

/// Every NATS server lost the stream while the nodes run (a power loss of the NATS
/// machines: an acknowledgement is replication, not fsync). Each node's client finds,
/// on reconnecting, a stream ending below what it read, and holds new records back
/// while the node gives the tail back (or rolls back to the stream): an admin command
/// sent afterwards is acknowledged only once every node can fold it.
#[test]
fn a_stream_lost_under_running_nodes_loses_no_acknowledged_command() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    wait_for("300 records in node-1's mirror", || mesh.nodes[0].mirrored() >= 300);
    for i in 0..3 {
        mesh.nats.kill(i);
        let store = mesh.nats.dir().join(mesh.nats.name(i));
        std::fs::remove_dir_all(store).unwrap();
    }
    mesh.nats.restart_all();
    mesh.admin(0, 2, AdminCommand::Cordon { node: "node-3".into() });
    std::thread::sleep(Duration::from_secs(2));
    let state = mesh.nodes[0].state(u64::MAX);
    assert!(state.nodes.cordoned[node_row(&state, "node-3")], "an acknowledged cordon was never folded");
}

/// A clean stop publishes the end of the daemons it stopped, even when the last record
/// in flight is acknowledged in the turn that reaps them (here: one record at a time).
#[test]
fn a_clean_stop_publishes_its_daemons_end() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let node = &mut mesh.nodes[0];
    node.kill();
    let config = std::fs::read_to_string(&node.config_path)
        .unwrap()
        .replace("[ingest]\n", "[ingest]\nrecords_per_commit_max = 1\n")
        .replace("[cluster]\n", "[cluster]\npublish_window_max = 1\npublish_queue_max = 1\n");
    std::fs::write(&node.config_path, config).unwrap();
    node.start();
    wait_for("node-1 listening again", || node.listening());
    let spec =
        meshos::event::DaemonSpec { stop_grace_ms: 200, ..meshos::event::DaemonSpec::new("nap", "/usr/bin/sleep") };
    let spec = meshos::event::DaemonSpec { args: vec!["1000".into()], ..spec };
    mesh.send(
        0,
        vec![EventKind::DaemonIntent {
            spec: Box::new(spec),
            runs_on: meshos::event::DaemonPlacement::Nodes(vec!["node-1".into()]),
        }],
    );
    let running_on_node_1 = |state: &State| {
        let row = node_row(state, "node-1");
        (0..state.daemons.node.len())
            .any(|daemon| state.daemons.node[daemon].index() == row && state.daemons.state[daemon].is_running())
    };
    for round in 0..3 {
        wait_for(&format!("round {round}: the daemon running on node-1"), || {
            running_on_node_1(&mesh.nodes[1].state(u64::MAX))
        });
        mesh.nodes[0].stop();
        std::thread::sleep(Duration::from_secs(1));
        let state = mesh.nodes[1].state(u64::MAX);
        assert!(!running_on_node_1(&state), "round {round}: node-1 stopped cleanly, its daemon still runs in the log");
        mesh.nodes[0].start();
    }
}

/// The stream attacks, by anyone who can publish on the NATS subject: a
/// 72-byte garbage message, a node's own old record under a new message id, and a
/// forged node. Each is refused in fold and counted; none fences a node or invents
/// one, and the nodes still agree.
#[test]
fn records_forged_on_the_stream_fence_nobody_and_invent_nothing() {
    let _serial = serial();
    let Some(mesh) = Mesh::start(3, Tuning::default()) else { return };
    // node-1's own signed record, as the stream holds it.
    let config = mesh.nodes[0].config().engine_config().unwrap();
    let mut own = None;
    wait_for("a record of node-1's in its mirror", || {
        meshos::redex::embedded::read_unlocked(&mesh.nodes[0].dir.join("log"), &config, &mut |record| {
            let first = meshos::trust::sections(record.payload).next();
            if let Some(Ok(section)) = first {
                if section.kind == meshos::trust::SignerKind::Node && section.name == "node-1" {
                    own = Some(record.payload.to_vec());
                    return false;
                }
            }
            true
        })
        .unwrap();
        own.is_some()
    });
    let own = own.expect("found above");
    let before = mesh.nodes[0].state(u64::MAX).position;
    let mallory = meshos::trust::KeyPair::from_seed([0x66; 32]);
    let cluster_id = config.genesis.cluster_id();
    let fake = Sealer::node("fake", mallory, cluster_id).seal_batch(&heartbeats("fake", &mut 0, 3)).to_vec();
    // A new message id for each (the replay is node-1's bytes under another id).
    let positions = publish_raw(&mesh, &[vec![0x5a; 72], own, fake]);
    let last = *positions.iter().max().unwrap();
    for node in &mesh.nodes {
        wait_for(&format!("{} to fold past the attacks", node.name), || node.state(u64::MAX).position >= last);
    }
    for node in &mesh.nodes {
        let state = node.state(u64::MAX);
        let after: Vec<&str> = state
            .rejections
            .kept
            .iter()
            .filter(|rejection| rejection.position > before)
            .map(|rejection| rejection.reason.name())
            .collect();
        for reason in ["bad_section", "node_not_admitted"] {
            assert!(after.contains(&reason), "{}: {reason} in {after:?}", node.name);
        }
        assert!(state.nodes.find("fake").is_none(), "{}: no node invented", node.name);
        let log = std::fs::read_to_string(node.stderr_path()).unwrap_or_default();
        assert!(!log.contains("another process publishes as this node"), "{}: fenced by a replay", node.name);
    }
    let log = std::fs::read_to_string(mesh.nodes[0].stderr_path()).unwrap_or_default();
    assert!(log.contains("a copy of a record this node published before"), "the replay is named a duplicate");
    // The same attacker on a node's ingest port does not get past the handshake, as a
    // stranger or under a node's name; an admitted name with its own key does.
    let addr = mesh.nodes[1].tcp_addr();
    let mallory = meshos::trust::KeyPair::from_seed([0x66; 32]);
    for (name, why) in [("mallory", "unknown node"), ("node-1", "key mismatch")] {
        let local = meshos::sys::secure::LocalIdentity::node(name, &mallory);
        let refused = meshos::sys::client::Client::connect_tcp(addr, genesis().client_secure(local), Some("node-2"))
            .err()
            .expect("a stranger is refused at the handshake")
            .to_string();
        assert!(refused.contains(why), "{refused}");
    }
    common::connect_as(addr, &genesis(), "extra", "node-2").unwrap();
    mesh.assert_agreement();
}

/// A node started with another cluster's genesis (its own `meshos cluster init`) on
/// the same stream: it refuses every record the others publish and says why, and it
/// never trims the shared stream on its lonely view; the others refuse its records,
/// and go on agreeing.
#[test]
fn a_node_with_another_genesis_is_refused_and_trims_nothing() {
    let _serial = serial();
    let Some(mut mesh) = Mesh::start(3, Tuning::default()) else { return };
    let other = mesh.root().join("other-cluster");
    let init = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["cluster", "init", "-o"])
        .arg(&other)
        .args(["--nodes", "node-4"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let dir = mesh.root().join("node-4");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(other.join("node-4.key"), dir.join("node.key")).unwrap();
    let extra =
        format!("genesis_file = \"{}\"\ncheckpoint_interval_records = 50\n", other.join("genesis.toml").display());
    let index = mesh.add_node(&Tuning::default(), &extra);
    let log_of = |node: &NodeProcess| std::fs::read_to_string(node.dir.with_extension("stderr")).unwrap_or_default();
    wait_for("node-4 to say the others' records are refused", || {
        log_of(&mesh.nodes[index]).contains("none of the records other nodes published was applied here")
    });
    assert!(!log_of(&mesh.nodes[index]).contains("trimming the cluster's log"), "the lonely node trims nothing");
    for node in &mesh.nodes[..3] {
        let state = node.state(u64::MAX);
        assert!(state.nodes.find("node-4").is_none(), "{}: node-4's records are refused", node.name);
        assert!(state.rejections.kept.iter().any(|rejection| rejection.origin.as_ref() == "node-4"));
    }
    mesh.nodes.pop().unwrap().kill();
    mesh.assert_agreement();
}

/// A node that is gone holds the stream's trim back (its last commitment names the
/// oldest position it needs) until an operator removes it; removed, it is `Left`,
/// and the stream is trimmed past its last position.
#[test]
fn a_removed_node_no_longer_holds_the_trim_back() {
    let _serial = serial();
    let tuning = Tuning { cluster: "checkpoint_interval_records = 150\ncheckpoints_kept = 2\n" };
    let Some(mut mesh) = Mesh::start(3, tuning) else { return };
    let needs_of_node_3 = |mesh: &Mesh| {
        let state = mesh.nodes[0].state(u64::MAX);
        state.nodes.find("node-3").map_or(0, |row| state.nodes.needs_position[row.index()])
    };
    wait_for("node-3's first commitment", || needs_of_node_3(&mesh) > 0);
    mesh.nodes[2].kill();
    // What node-3 published before the kill is folded within moments.
    std::thread::sleep(Duration::from_secs(1));
    let held = needs_of_node_3(&mesh);
    // Many records later (the others checkpoint and commit on), node-3's commitment
    // still holds the trim back.
    let heartbeat = || EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 1 });
    let mut position = 0;
    while position < held + 700 {
        position = mesh.send(0, vec![heartbeat(); 8]);
    }
    wait_for("the others' commitments past node-3's", || {
        let state = mesh.nodes[0].state(u64::MAX);
        ["node-1", "node-2"].iter().all(|name| state.nodes.needs_position[node_row(&state, name)] > held)
    });
    assert_eq!(needs_of_node_3(&mesh), held, "node-3 is gone: its commitment stays");
    let first = mesh.nats.stream_first_seq("MESHOS").unwrap_or(1);
    assert!(first <= held, "trimmed to {first}, past what node-3 needs ({held})");
    // Removed: trimmed past its last position.
    mesh.admin(0, 0, AdminCommand::RemoveNode { name: "node-3".into() });
    wait_for("the stream trimmed past node-3's needs", || {
        mesh.nats.stream_first_seq("MESHOS").is_some_and(|first| first > held)
    });
    let state = mesh.nodes[0].state(u64::MAX);
    assert_eq!(state.nodes.status[node_row(&state, "node-3")], meshos::event::NodeStatus::Left);
    mesh.nodes.pop();
    mesh.stop_all();
}
