//! Blob safety against races, lost files and hostile peers. Each test names a defect
//! the review of the first blob executor found: a verify racing a drop brought a
//! deleted copy back, a missing file was never noticed, the CLI deleted the node's
//! transfers in progress, a peer could hold the port or a transfer slot for ever,
//! and `meshos get` followed a planted symlink.
mod common;

use std::io::Read;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshos::action::{Action, ActionKind};
use meshos::event::*;
use meshos::exec::blobs::{BlobExecConfig, BlobExecutor};
use meshos::exec::blobstore::BlobStore;
use meshos::state::State;
use meshos::sys::secure::SecureStream;

fn cap(name: &str, endpoint: String) -> Event {
    let c = Capability { version: 1, fork_of: 0, zone: "z".into(), capacity_bytes: 1 << 30, labels: vec![], endpoint };
    event(name, 1, EventKind::Capability(Box::new(c)))
}

fn state_with(blob: BlobHash, size: u64, holders: &[&str]) -> State {
    let mut state = State::new(&meshos::config::Config::for_tests());
    let mut setup = Vec::new();
    for name in ["a", "b"] {
        setup.push(cap(name, "127.0.0.1:1".into()));
        setup.push(heartbeat(name, 2));
    }
    setup.push(event("a", 3, EventKind::BlobAnnounce { blob, size_bytes: size }));
    for (i, h) in holders.iter().enumerate() {
        setup.push(event(h, 4 + i as u64, EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy }));
    }
    fold_batches(&mut state, &[setup]);
    assert_eq!(state.rejections.total, 0);
    state
}

fn config(rate: u64, verify_rate: u64) -> BlobExecConfig {
    BlobExecConfig {
        transfers_max: 2,
        fetch_timeout_ms: 5_000,
        blob_bytes_max: 1 << 30,
        receive_bytes_per_s: rate,
        verify_bytes_per_s: verify_rate,
        verify_pass_ms: 1_000,
        secure: node_secure("b"),
    }
}

/// A verification running while a drop of the same copy is dispatched must not report
/// the deleted copy healthy afterwards: the drop is the last word.
#[test]
fn a_drop_during_a_verify_is_the_last_word() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    let bytes = vec![5u8; 1 << 20];
    let (blob, size) = store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
    let state = state_with(blob, size, &["b"]);
    let b = state.nodes.find("b").unwrap();
    let mut exec = BlobExecutor::new(config(2 << 20, 0), Arc::clone(&store));
    let mut out = Vec::new();
    let verify = Action {
        id: ActionId { position: 50, index: 0 },
        node: b,
        kind: ActionKind::VerifyReplica { blob: state.blobs.find(&blob).unwrap() },
    };
    let drop = Action {
        id: ActionId { position: 51, index: 0 },
        node: b,
        kind: ActionKind::DropReplica { blob: state.blobs.find(&blob).unwrap() },
    };
    exec.dispatch(&state, &verify, &mut out);
    std::thread::sleep(Duration::from_millis(100));
    exec.dispatch(&state, &drop, &mut out);
    let started = Instant::now();
    while exec.busy() > 0 {
        assert!(started.elapsed() < Duration::from_secs(30));
        exec.poll(&state, Some(b), &mut out);
        std::thread::sleep(Duration::from_millis(5));
    }
    let updates: Vec<_> = out
        .iter()
        .filter_map(|e| match e {
            EventKind::ReplicaUpdate { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    assert!(!store.contains(&blob));
    assert_eq!(
        updates.last(),
        Some(&ReplicaState::Deleted),
        "last word on a deleted copy must be Deleted: {updates:?}"
    );
}

/// Attaching to a store (what `meshos put` / `get` and the demo seeder do next to a
/// running node) leaves the node's transfers in progress alone.
#[test]
fn attaching_to_the_store_leaves_transfers_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    struct Slow(u32);
    impl Read for Slow {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Ok(0);
            }
            self.0 -= 1;
            std::thread::sleep(Duration::from_millis(100));
            buf[0] = 1;
            Ok(1)
        }
    }
    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.put(&mut Slow(10), None, u64::MAX, &mut |_| {}))
    };
    std::thread::sleep(Duration::from_millis(300));
    let _cli = BlobStore::attach(dir.path()).unwrap(); // `meshos put` on the same node
    let result = writer.join().unwrap();
    assert!(result.is_ok(), "a concurrent open broke the running transfer: {}", result.unwrap_err());
}

/// A client that asks for a blob and never reads must not hold a connection slot for
/// ever (with connections_max = 1 the port would answer `NO busy` to everyone).
#[test]
fn a_peer_that_never_reads_gives_the_port_back() {
    let a = peer_with(node_secure("a"), |config| {
        config.connections_max = 1;
        config.io_timeout_ms = 500;
    });
    let bytes = vec![3u8; 32 << 20];
    let (blob, _) = a.store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap();
    let timeout = Duration::from_secs(5);
    let mut stuck = SecureStream::connect(a.server.addr(), node_secure("stuck"), Some("a"), timeout).unwrap();
    stuck.send(format!("BLOB {}", meshos::exec::blobstore::hex(&blob)).as_bytes()).unwrap();
    let started = Instant::now();
    let ok = loop {
        std::thread::sleep(Duration::from_millis(200));
        let ok = meshos::sys::peer_server::ping(
            &a.server.addr().to_string(),
            &node_secure("b"),
            Some("a"),
            Duration::from_secs(2),
        );
        if ok.is_ok() || started.elapsed() > Duration::from_secs(20) {
            break ok;
        }
    };
    assert!(ok.is_ok(), "the port is still held by a peer that never read: {:?}", ok.err());
    drop(stuck);
}

/// A peer that trickles one byte just inside the read timeout must not keep a fetch
/// (and a transfer slot) for ever: the whole transfer has a deadline. A peer that
/// announces another size than the log knows is refused at once.
#[test]
fn a_trickling_or_lying_peer_is_cut_off() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for announced in ["OK 10", "OK 4000000000"] {
            // Node "a" itself, authenticated, but serving badly.
            let (stream, _) = listener.accept().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let Ok(mut secure) = SecureStream::accept(stream, node_secure("a"), deadline) else { continue };
            let _ = secure.receive();
            let _ = secure.send(announced.as_bytes());
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(150));
                if secure.send(b"x").is_err() {
                    break;
                }
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    let blob = [7u8; 32];
    let mut state = State::new(&meshos::config::Config::for_tests());
    let setup = vec![
        cap("a", addr.clone()),
        heartbeat("a", 2),
        cap("b", "127.0.0.1:1".into()),
        heartbeat("b", 2),
        event("a", 3, EventKind::BlobAnnounce { blob, size_bytes: 10 }),
        event("a", 4, EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy }),
    ];
    fold_batches(&mut state, &[setup]);
    let (row, a, b) =
        (state.blobs.find(&blob).unwrap(), state.nodes.find("a").unwrap(), state.nodes.find("b").unwrap());
    let mut exec = BlobExecutor::new(BlobExecConfig { fetch_timeout_ms: 300, ..config(0, 0) }, store);
    for (index, expected) in ["passed its deadline", "the log says 10"].iter().enumerate() {
        let pull = Action {
            id: ActionId { position: 60, index: index as u32 },
            node: b,
            kind: ActionKind::PullReplica { blob: row, source: a },
        };
        let mut out = Vec::new();
        exec.dispatch(&state, &pull, &mut out);
        let started = Instant::now();
        while exec.busy() > 0 {
            assert!(started.elapsed() < Duration::from_secs(30));
            exec.poll(&state, Some(b), &mut out);
            std::thread::sleep(Duration::from_millis(5));
        }
        let reason = out.iter().find_map(|event| match event {
            EventKind::ActionOutcome { outcome: Outcome::Failure { reason }, .. } => Some(reason.clone()),
            _ => None,
        });
        assert!(reason.as_deref().is_some_and(|reason| reason.contains(expected)), "{expected}: {out:?}");
    }
}

/// A copy the log calls healthy whose file is gone must be reported (the background
/// verifier only walks the files present; the log is compared with the store too).
#[test]
fn a_missing_copy_is_reported_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    let (blob, size) = store.put(&mut &b"held"[..], None, u64::MAX, &mut |_| {}).unwrap();
    store.put(&mut &b"another file"[..], None, u64::MAX, &mut |_| {}).unwrap();
    let state = state_with(blob, size, &["b"]);
    store.delete(&blob).unwrap();
    let mut exec = BlobExecutor::new(config(0, 1 << 20), Arc::clone(&store));
    let mut out = Vec::new();
    let started = Instant::now();
    while exec.stats.background_verified < 1 {
        assert!(started.elapsed() < Duration::from_secs(30));
        exec.poll(&state, state.nodes.find("b"), &mut out);
        std::thread::sleep(Duration::from_millis(10));
    }
    // At the first look and after each pass while the log still says healthy (here it
    // never learns otherwise); the file the log never heard of is ignored.
    // The inventory digest after each look counts no copy: the file the log never
    // heard of is of no known blob.
    let nothing = EventKind::InventoryDigest { blob_count: 0, digest: [0; 16] };
    assert!(out.contains(&EventKind::ReplicaUpdate { blob, state: ReplicaState::Deleted }), "{out:?}");
    assert!(
        out.iter().all(|event| *event == EventKind::ReplicaUpdate { blob, state: ReplicaState::Deleted }
            || *event == nothing),
        "{out:?}"
    );
}

/// Level-triggered inventory: a stored copy of a known blob the log has no copy of on
/// this node (its announcement was lost, say with a cluster log's tail) is announced
/// again, and the digest of the disk counts it.
#[test]
fn a_stored_copy_the_log_lost_is_announced_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    let (blob, size) = store.put(&mut &b"held"[..], None, u64::MAX, &mut |_| {}).unwrap();
    // The log knows the blob (on "a") but not this node's copy.
    let state = state_with(blob, size, &["a"]);
    let mut exec = BlobExecutor::new(config(0, 1 << 20), Arc::clone(&store));
    let mut out = Vec::new();
    exec.poll(&state, state.nodes.find("b"), &mut out);
    let digest = u128::from_le_bytes(blob[..16].try_into().unwrap()).to_le_bytes();
    assert_eq!(
        out[..2],
        [
            EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
            EventKind::InventoryDigest { blob_count: 1, digest }
        ]
    );
    // A verification pass that ends meanwhile reports the digest again, but does not
    // announce the copy twice while the log has not shown the first announcement.
    exec.poll(&state, state.nodes.find("b"), &mut out);
    assert!(out[2..].iter().all(|event| *event == EventKind::InventoryDigest { blob_count: 1, digest }), "{out:?}");
    assert_eq!(exec.stats.reannounced, 1);
    // Once the log holds the copy, nothing is announced again.
    let state = state_with(blob, size, &["a", "b"]);
    let mut exec = BlobExecutor::new(config(0, 1 << 20), Arc::clone(&store));
    let mut out = Vec::new();
    exec.poll(&state, state.nodes.find("b"), &mut out);
    assert!(out.iter().all(|event| *event == EventKind::InventoryDigest { blob_count: 1, digest }), "{out:?}");
    assert!(!out.is_empty());
}

/// `meshos get -o OUT` wrote through the predictable OUT.meshos-part: a symlink planted
/// there (say in /tmp) was followed and its target overwritten.
#[test]
fn get_never_writes_through_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = dir.path().join("node.toml");
    std::fs::write(&toml, format!("name = \"n\"\ndata_dir = \"{}\"\n", data.display())).unwrap();
    let cfg = meshos::node::config::NodeConfig::load(&toml).unwrap();
    let store = BlobStore::open(&cfg.blobs_dir()).unwrap();
    let (blob, _) = store.put(&mut &b"blob bytes"[..], None, u64::MAX, &mut |_| {}).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("readme.meshos-part")).unwrap();
    let got = std::process::Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["get", &meshos::exec::blobstore::hex(&blob), "-o"])
        .arg(dir.path().join("readme"))
        .arg("--config")
        .arg(&toml)
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "get overwrote the symlink's target");
    assert_eq!(std::fs::read(dir.path().join("readme")).unwrap(), b"blob bytes");
}
