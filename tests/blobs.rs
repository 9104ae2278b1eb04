//! The blob executor with real stores and real peer ports on loopback: a pull fetches
//! from the named holder and announces the copy only once its hash checked; a holder
//! that serves bad bytes or none is skipped for the next one; drops delete; verify
//! re-hashes and says corrupt when it is.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshos::action::{Action, ActionKind};
use meshos::event::*;
use meshos::exec::blobs::{BlobExecConfig, BlobExecutor};
use meshos::exec::blobstore::BlobStore;
use meshos::state::State;

fn node_capability(name: &str, seq: u64, endpoint: String) -> Event {
    let capability =
        Capability { version: 1, fork_of: 0, zone: "z".into(), capacity_bytes: 1 << 30, labels: vec![], endpoint };
    event(name, seq, EventKind::Capability(Box::new(capability)))
}

/// Nodes a, b and c with their peer ports; `blob` announced by a and held healthy by
/// `holders`.
fn cluster(peers: &[&Peer; 3], blob: BlobHash, size_bytes: u64, holders: &[&str]) -> State {
    let mut state = State::new(&meshos::config::Config::for_tests());
    let mut setup = Vec::new();
    for (name, peer) in ["a", "b", "c"].iter().zip(peers) {
        setup.push(node_capability(name, 1, peer.server.addr().to_string()));
        setup.push(heartbeat(name, 2));
    }
    setup.push(event("a", 3, EventKind::BlobAnnounce { blob, size_bytes }));
    for (index, holder) in holders.iter().enumerate() {
        let seq = 4 + index as u64;
        setup.push(event(holder, seq, EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy }));
    }
    fold_batches(&mut state, &[setup]);
    assert_eq!(state.rejections.total, 0);
    state
}

fn executor(store: Arc<BlobStore>) -> BlobExecutor {
    let config = BlobExecConfig {
        transfers_max: 2,
        fetch_timeout_ms: 5_000,
        blob_bytes_max: 1 << 30,
        receive_bytes_per_s: 0,
        verify_bytes_per_s: 0,
        verify_pass_ms: 1_000,
        secure: node_secure("b"),
    };
    BlobExecutor::new(config, store)
}

fn run(executor: &mut BlobExecutor, state: &State, action: Action) -> Vec<EventKind> {
    run_blob_action(executor, state, &action, "b")
}

fn action(state: &State, node: &str, kind: ActionKind) -> Action {
    Action { id: ActionId { position: 99, index: 0 }, node: state.nodes.find(node).unwrap(), kind }
}

#[test]
fn a_pull_fetches_verifies_stores_then_announces() {
    let (a, b, c) = (peer("a"), peer("b"), peer("c"));
    let bytes: Vec<u8> = (0..1_000_000u32).map(|index| (index * 7 % 253) as u8).collect();
    let (blob, size) = a.store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
    let state = cluster(&[&a, &b, &c], blob, size, &["a"]);
    let (row, source) = (state.blobs.find(&blob).unwrap(), state.nodes.find("a").unwrap());
    let mut pulls = executor(Arc::clone(&b.store));
    let out = run(&mut pulls, &state, action(&state, "b", ActionKind::PullReplica { blob: row, source }));
    assert_eq!(
        out,
        vec![
            EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
            EventKind::ActionOutcome { action: ActionId { position: 99, index: 0 }, outcome: Outcome::Success },
        ]
    );
    assert!(b.store.verify(&blob, &mut |_| {}).unwrap(), "b holds the verified bytes");
    assert_eq!(pulls.stats.fetched_bytes, 1_000_000);
}

#[test]
fn a_holder_with_bad_bytes_is_skipped_for_the_next_and_a_pull_nobody_serves_fails_with_reasons() {
    let (a, b, c) = (peer("a"), peer("b"), peer("c"));
    let bytes = vec![42u8; 100_000];
    let (blob, size) = a.store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
    c.store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
    // a's copy rots on disk (the log still calls it healthy); c's is good.
    let path = a.store.path_of(&blob);
    let mut rotten = std::fs::read(&path).unwrap();
    rotten[5] ^= 1;
    std::fs::write(&path, rotten).unwrap();
    let state = cluster(&[&a, &b, &c], blob, size, &["a", "c"]);
    let (row, source) = (state.blobs.find(&blob).unwrap(), state.nodes.find("a").unwrap());
    let mut pulls = executor(Arc::clone(&b.store));
    let out = run(&mut pulls, &state, action(&state, "b", ActionKind::MigrateBlob { blob: row, from: source }));
    assert!(matches!(out.last(), Some(EventKind::ActionOutcome { outcome: Outcome::Success, .. })), "{out:?}");
    assert!(b.store.verify(&blob, &mut |_| {}).unwrap(), "fetched from c after a's bytes failed their hash");

    // Nobody holds it any more: the failure names each holder and what went wrong.
    a.store.delete(&blob).unwrap();
    c.store.delete(&blob).unwrap();
    b.store.delete(&blob).unwrap();
    let out = run(&mut pulls, &state, action(&state, "b", ActionKind::PullReplica { blob: row, source }));
    let [EventKind::ActionOutcome { outcome: Outcome::Failure { reason }, .. }] = out.as_slice() else {
        panic!("one failed outcome, no announcement: {out:?}")
    };
    assert!(reason.contains("a: ") && reason.contains("c: ") && reason.contains("not stored here"), "{reason}");
    assert!(!b.store.contains(&blob));
}

#[test]
fn drop_deletes_and_verify_says_corrupt() {
    let (a, b, c) = (peer("a"), peer("b"), peer("c"));
    let (blob, size) = b.store.put(&mut &b"some bytes"[..], None, u64::MAX, &mut |_| {}).unwrap();
    let state = cluster(&[&a, &b, &c], blob, size, &["b"]);
    let row = state.blobs.find(&blob).unwrap();
    let mut local = executor(Arc::clone(&b.store));
    let out = run(&mut local, &state, action(&state, "b", ActionKind::VerifyReplica { blob: row }));
    assert_eq!(out[0], EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy });
    std::fs::write(b.store.path_of(&blob), b"other bytes").unwrap();
    let out = run(&mut local, &state, action(&state, "b", ActionKind::VerifyReplica { blob: row }));
    assert_eq!(out[0], EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt });
    let out = run(&mut local, &state, action(&state, "b", ActionKind::DropReplica { blob: row }));
    assert_eq!(out[0], EventKind::ReplicaUpdate { blob, state: ReplicaState::Deleted });
    assert!(!b.store.contains(&blob));
}

/// `meshos put` stores a file on a running node and declares it; `meshos get` gives the
/// same bytes back; the node announced its peer port, and a second `get` from a node
/// directory without the blob fetches it from that port.
#[test]
fn put_and_get_through_a_running_node() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    let text = format!(
        "name = \"node-1\"\ndata_dir = \"{}\"\nheartbeat_ms = 50\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\n",
        dir.path().display()
    );
    std::fs::write(&config, text).unwrap();
    let mut node = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["node", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !dir.path().join("node.addr").exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "the node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let meshos = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_meshos")).args(args).output().unwrap();
    let file = dir.path().join("input.bin");
    let bytes: Vec<u8> = (0..200_000u32).map(|index| (index % 199) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();

    // The node is found from its data directory: MESHOS_DIR, then --dir.
    let put = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["put", file.to_str().unwrap(), "--replicas", "1"])
        .env("MESHOS_DIR", dir.path())
        .output()
        .unwrap();
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let id = String::from_utf8(put.stdout).unwrap().trim().to_string();
    assert_eq!(id, meshos::exec::blobstore::hex(blake3::hash(&bytes).as_bytes()));
    let copy = dir.path().join("copy.bin");
    let get = meshos(&["get", &id, "-o", copy.to_str().unwrap(), "--dir", dir.path().to_str().unwrap()]);
    assert!(get.status.success(), "{}", String::from_utf8_lossy(&get.stderr));
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);

    // Another directory, same log, no blobs: `get` finds the holder in the log and
    // fetches from its announced peer port, as node-2, once an operator admitted
    // node-2's key (the holder's port serves admitted nodes only).
    let other = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(dir.path().join("log"), other.path().join("log")).unwrap();
    std::fs::copy(dir.path().join("genesis.toml"), other.path().join("genesis.toml")).unwrap();
    let other_key = meshos::trust::KeyPair::generate(&other.path().join("node.key")).unwrap();
    let other_config = other.path().join("node.toml");
    std::fs::write(&other_config, format!("name = \"node-2\"\ndata_dir = \"{}\"\n", other.path().display())).unwrap();
    let refused = meshos(&[
        "get",
        &id,
        "-o",
        other.path().join("x").to_str().unwrap(),
        "--config",
        other_config.to_str().unwrap(),
    ]);
    assert!(!refused.status.success(), "a node not admitted gets no bytes");
    let admit = meshos(&[
        "admin",
        "admit-node",
        "node-2",
        "--node-key",
        &other_key.public_key_hex(),
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        admit.status.success(),
        "{}{}",
        String::from_utf8_lossy(&admit.stdout),
        String::from_utf8_lossy(&admit.stderr)
    );
    let fetched = other.path().join("fetched.bin");
    let get = meshos(&["get", &id, "-o", fetched.to_str().unwrap(), "--config", other_config.to_str().unwrap()]);
    assert!(get.status.success(), "{}", String::from_utf8_lossy(&get.stderr));
    assert!(String::from_utf8_lossy(&get.stderr).contains("from node-1"));
    assert_eq!(std::fs::read(&fetched).unwrap(), bytes);
    // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    assert!(node.wait().unwrap().success());
}

/// Anti-entropy: the background verifier re-hashes stored blobs and reports a copy
/// the log calls healthy whose bytes rotted; a file the log never heard of is ignored.
#[test]
fn the_background_verifier_reports_a_rotten_copy() {
    let (a, b, c) = (peer("a"), peer("b"), peer("c"));
    let (blob, size) = b.store.put(&mut &b"kept bytes"[..], None, u64::MAX, &mut |_| {}).unwrap();
    b.store.put(&mut &b"a file the log never heard of"[..], None, u64::MAX, &mut |_| {}).unwrap();
    let state = cluster(&[&a, &b, &c], blob, size, &["b"]);
    std::fs::write(b.store.path_of(&blob), b"rotten").unwrap();
    let config = BlobExecConfig {
        transfers_max: 1,
        fetch_timeout_ms: 5_000,
        blob_bytes_max: 1 << 20,
        receive_bytes_per_s: 0,
        verify_bytes_per_s: 1 << 20,
        verify_pass_ms: 1_000,
        secure: node_secure("b"),
    };
    let mut verifier = BlobExecutor::new(config, Arc::clone(&b.store));
    let own = state.nodes.find("b");
    let mut out = Vec::new();
    let started = Instant::now();
    while verifier.stats.background_verified < 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "no verification pass");
        verifier.poll(&state, own, &mut out);
        std::thread::sleep(Duration::from_millis(10));
    }
    out.retain(|event| !matches!(event, EventKind::InventoryDigest { .. }));
    assert_eq!(out, vec![EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt }]);
    assert_eq!(verifier.stats.background_corrupt, 1);
}
