//! Peer traffic runs over the secure channel (`sys::secure`): blob pulls between
//! identified nodes of one cluster work; a stranger (a name not admitted, another
//! cluster, an admitted name with the wrong key, or no handshake at all) gets no bytes
//! and is counted by reason; a holder that is not the node the log names is skipped
//! for the next; idle unauthenticated connections, more than the handshake pool holds,
//! do not keep a real peer from its blob (they are refused or closed at the handshake
//! deadline, and counted); a port that is not the node the log names gives the prober
//! no sample.
//!
//! No assertion here is about speed: "promptly" means the real peer's first attempt
//! succeeds while the idle connections are still open.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshos::action::{Action, ActionKind};
use meshos::event::*;
use meshos::exec::blobs::{BlobExecConfig, BlobExecutor};
use meshos::exec::blobstore::BlobStore;
use meshos::exec::probes::{ProbeConfig, Prober};
use meshos::state::State;
use meshos::sys::peer_server::{PeerServerStats, MESSAGE_BYTES_MAX};
use meshos::sys::secure::{ClusterId, LocalIdentity, Refusal, SecureConfig, StaticPeerKeys};

const CLUSTER: ClusterId = [0xab; 16];
const OTHER_CLUSTER: ClusterId = [0xee; 16];

fn signing_key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

/// The admitted nodes and their key seeds.
const ADMITTED: [(&str, u8); 4] = [("a", 1), ("b", 2), ("c", 3), ("r", 4)];

fn seed_of(name: &str) -> u8 {
    ADMITTED.iter().find(|(admitted, _)| *admitted == name).map_or(99, |(_, seed)| *seed)
}

/// Node `name` holding the key of seed `seed`, in `cluster`, checking peers against
/// the admitted table.
fn identity(name: &str, seed: u8, cluster: ClusterId) -> Arc<SecureConfig> {
    let keys = StaticPeerKeys::of_nodes(
        ADMITTED.iter().map(|(name, seed)| (*name, signing_key(*seed).verifying_key().to_bytes())),
    );
    Arc::new(SecureConfig {
        cluster_id: cluster,
        local: LocalIdentity::Node { name: name.to_string(), key: signing_key(seed) },
        keys: Arc::new(keys),
        accept_operators: false,
        message_bytes_max: MESSAGE_BYTES_MAX,
    })
}

/// Admitted node `name` with its own key.
fn node(name: &str) -> Arc<SecureConfig> {
    identity(name, seed_of(name), CLUSTER)
}

fn capability(name: &str, endpoint: String) -> Event {
    let capability =
        Capability { version: 1, fork_of: 0, zone: "z".into(), capacity_bytes: 1 << 30, labels: vec![], endpoint };
    event(name, 1, EventKind::Capability(Box::new(capability)))
}

/// Live nodes with these peer ports; `blob` (if any) announced and held healthy by
/// `holders`.
fn cluster(nodes: &[(&str, String)], blob: Option<(BlobHash, u64)>, holders: &[&str]) -> State {
    let mut state = State::new(&meshos::config::Config::for_tests());
    let mut setup = Vec::new();
    for (name, endpoint) in nodes {
        setup.push(capability(name, endpoint.clone()));
        setup.push(heartbeat(name, 2));
    }
    if let Some((blob, size_bytes)) = blob {
        setup.push(event(nodes[0].0, 3, EventKind::BlobAnnounce { blob, size_bytes }));
        for holder in holders {
            setup.push(event(holder, 4, EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy }));
        }
    }
    fold_batches(&mut state, &[setup]);
    assert_eq!(state.rejections.total, 0);
    state
}

fn executor(store: Arc<BlobStore>, secure: Arc<SecureConfig>) -> BlobExecutor {
    let config = BlobExecConfig {
        transfers_max: 1,
        fetch_timeout_ms: 5_000,
        blob_bytes_max: 1 << 30,
        receive_bytes_per_s: 0,
        verify_bytes_per_s: 0,
        verify_pass_ms: 1_000,
        secure,
    };
    BlobExecutor::new(config, store)
}

/// Pulls the blob to b from `source` first; the events that came of it.
fn pull(executor: &mut BlobExecutor, state: &State, blob: &BlobHash, source: &str) -> Vec<EventKind> {
    let action = Action {
        id: ActionId { position: 99, index: 0 },
        node: state.nodes.find("b").unwrap(),
        kind: ActionKind::PullReplica {
            blob: state.blobs.find(blob).unwrap(),
            source: state.nodes.find(source).unwrap(),
        },
    };
    run_blob_action(executor, state, &action, "b")
}

fn some_blob(store: &BlobStore) -> (BlobHash, u64) {
    let bytes: Vec<u8> = (0..200_000u32).map(|index| (index % 241) as u8).collect();
    store.put(&mut bytes.as_slice(), None, u64::MAX, &mut |_| {}).unwrap()
}

fn succeeded(out: &[EventKind]) -> bool {
    matches!(out.last(), Some(EventKind::ActionOutcome { outcome: Outcome::Success, .. }))
}

/// Polls the server's stats until `done` holds (generous deadline: machines are noisy).
fn wait_for(peer: &Peer, what: &str, done: impl Fn(&PeerServerStats) -> bool) -> PeerServerStats {
    let started = Instant::now();
    loop {
        let stats = peer.server.stats();
        if done(&stats) {
            return stats;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what}: {stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_pull_between_two_identified_nodes_works() {
    let (a, b) = (peer_with(node("a"), |_| {}), peer_with(node("b"), |_| {}));
    let (blob, size) = some_blob(&a.store);
    let nodes = [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a"]);
    let mut pulls = executor(Arc::clone(&b.store), node("b"));
    let out = pull(&mut pulls, &state, &blob, "a");
    assert!(succeeded(&out), "{out:?}");
    assert!(b.store.verify(&blob, &mut |_| {}).unwrap());
    let stats = wait_for(&a, "the connection ends", |stats| stats.connections == 0);
    assert_eq!((stats.blobs_served, stats.credential_rejections), (1, 0));
    assert_eq!(stats.refusals, Default::default());
    assert_eq!(pulls.stats.credential_failures, 0);
}

/// A stranger gets no bytes: the pull fails naming the holder and the refusal, both
/// sides count it (the server by reason), nothing is stored.
#[test]
fn a_stranger_gets_no_bytes_and_is_counted_by_reason() {
    let (a, b) = (peer_with(node("a"), |_| {}), peer_with(node("b"), |_| {}));
    let (blob, size) = some_blob(&a.store);
    let nodes = [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a"]);
    let strangers = [
        ("a name not admitted", identity("mallory", 7, CLUSTER), Refusal::UnknownNode),
        ("another cluster", identity("b", 2, OTHER_CLUSTER), Refusal::WrongCluster),
        ("an admitted name with the wrong key", identity("b", 8, CLUSTER), Refusal::KeyMismatch),
    ];
    for (count, (what, secure, refusal)) in strangers.into_iter().enumerate() {
        let mut pulls = executor(Arc::clone(&b.store), secure);
        let out = pull(&mut pulls, &state, &blob, "a");
        let [EventKind::ActionOutcome { outcome: Outcome::Failure { reason }, .. }] = out.as_slice() else {
            panic!("{what}: one failed outcome, no announcement: {out:?}")
        };
        assert!(reason.starts_with("a: ") && reason.contains(&refusal.to_string()), "{what}: {reason}");
        assert_eq!((pulls.stats.credential_failures, pulls.stats.fetch_failures), (1, 1), "{what}");
        let stats = a.server.stats();
        assert_eq!(stats.credential_rejections, count as u64 + 1, "{what}: {stats:?}");
        assert_eq!(stats.blobs_served, 0, "{what}: no bytes served");
        assert!(!b.store.contains(&blob));
    }
    let refusals = a.server.stats().refusals;
    assert_eq!((refusals.unknown_node, refusals.wrong_cluster, refusals.key_mismatch), (1, 1, 1));
    // No handshake at all (the old clear-text protocol): not a byte back, counted.
    let mut raw = TcpStream::connect(a.server.addr()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(format!("BLOB {} - b\n", meshos::exec::blobstore::hex(&blob)).as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(answer.is_empty(), "a stranger got {} bytes", answer.len());
    // (Read as a frame it announces 0x424c bytes: the server waits for them until its
    // handshake deadline.)
    let stats = wait_for(&a, "the raw connection is counted", |stats| {
        stats.refusals.bad_handshake + stats.refusals.handshake_deadline == 1
    });
    assert_eq!((stats.blobs_served, stats.pings), (0, 0));
}

/// A holder whose port does not prove it is the node the log names (another key
/// under its name, or another cluster) is a failed source: the pull goes on to the
/// next holder.
#[test]
fn a_holder_that_is_not_the_node_the_log_names_is_skipped_for_the_next() {
    for impostor in [identity("a", 9, CLUSTER), identity("a", 1, OTHER_CLUSTER)] {
        let a = peer_with(impostor, |_| {});
        let (b, c) = (peer_with(node("b"), |_| {}), peer_with(node("c"), |_| {}));
        let (blob, size) = some_blob(&a.store);
        some_blob(&c.store);
        let nodes = [
            ("a", a.server.addr().to_string()),
            ("b", b.server.addr().to_string()),
            ("c", c.server.addr().to_string()),
        ];
        let state = cluster(&nodes, Some((blob, size)), &["a", "c"]);
        let mut pulls = executor(Arc::clone(&b.store), node("b"));
        let out = pull(&mut pulls, &state, &blob, "a");
        assert!(succeeded(&out), "{out:?}");
        assert!(b.store.verify(&blob, &mut |_| {}).unwrap());
        assert_eq!(pulls.stats.credential_failures, 1);
        assert_eq!(a.server.stats().blobs_served, 0);
        assert_eq!(c.server.stats().blobs_served, 1);
    }
}

/// Every idle connection got not one byte before the server closed it.
fn assert_closed_without_a_byte(idle: Vec<TcpStream>) {
    for mut stream in idle {
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut bytes = Vec::new();
        match stream.read_to_end(&mut bytes) {
            Ok(_) => assert!(bytes.is_empty(), "an idle stranger got {} bytes", bytes.len()),
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "not closed: {error}"),
        }
    }
}

/// The finding: 65 idle connections without any credential made real peers get
/// `NO busy` for 70 s. Now they are held in the handshake pool (at most 4 from their
/// address, the rest refused at once), never in a served slot; the real peer's first
/// pull succeeds while they are open; they are closed at the handshake deadline.
#[test]
fn idle_strangers_from_one_address_do_not_keep_a_real_peer_from_its_blob() {
    let a = peer_with(node("a"), |config| config.connections_max = 2);
    let b = peer_with(node("b"), |_| {});
    let (blob, size) = some_blob(&a.store);
    let idle: Vec<TcpStream> =
        (0..65).map(|_| common::connect_from("127.0.0.2".parse().unwrap(), a.server.addr())).collect();
    let stats = wait_for(&a, "the idle connections are taken in", |stats| stats.refusals.address_limit == 61);
    // Four held (or, on a slow machine, already past their deadline), none served.
    assert_eq!((stats.handshaking as u64 + stats.refusals.handshake_deadline, stats.connections), (4, 0), "{stats:?}");

    let nodes = [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a"]);
    let mut pulls = executor(Arc::clone(&b.store), node("b"));
    let out = pull(&mut pulls, &state, &blob, "a");
    assert!(succeeded(&out), "the real peer is served at once: {out:?}");
    assert_eq!(a.server.stats().blobs_served, 1);

    let stats = wait_for(&a, "the idle ones are closed at the deadline", |stats| stats.handshaking == 0);
    assert_eq!((stats.refusals.handshake_deadline, stats.refusals.address_limit), (4, 61), "{stats:?}");
    assert_eq!((stats.credential_rejections, stats.refusals.busy), (0, 0), "{stats:?}");
    assert_closed_without_a_byte(idle);
}

/// Idle connections from many addresses fill the handshake pool (16); a new
/// connection closes the oldest handshake, so the real peer still gets in at once.
#[test]
fn idle_strangers_from_many_addresses_are_evicted_for_a_real_peer() {
    let a = peer_with(node("a"), |_| {});
    let b = peer_with(node("b"), |_| {});
    let (blob, size) = some_blob(&a.store);
    let idle: Vec<TcpStream> = (0..65)
        .map(|index| common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2 + (index % 17) as u8), a.server.addr()))
        .collect();
    let taken_in = |stats: &PeerServerStats| {
        let refusals = &stats.refusals;
        // Each idle connection is in the pool, or was turned away, or closed.
        stats.handshaking as u64
            + refusals.address_limit
            + refusals.handshake_evicted
            + refusals.handshake_pool_full
            + refusals.handshake_deadline
    };
    let stats = wait_for(&a, "the idle connections are taken in", |stats| taken_in(stats) == 65);
    assert!(stats.refusals.handshake_evicted > 0, "the pool filled up: {stats:?}");

    let nodes = [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a"]);
    let mut pulls = executor(Arc::clone(&b.store), node("b"));
    let out = pull(&mut pulls, &state, &blob, "a");
    assert!(succeeded(&out), "the real peer is served at once: {out:?}");
    assert_eq!(a.server.stats().blobs_served, 1);

    let stats = wait_for(&a, "the idle ones are closed at the deadline", |stats| stats.handshaking == 0);
    assert_eq!(taken_in(&stats), 65, "every idle connection counted once: {stats:?}");
    assert!(stats.refusals.handshake_evicted >= 1 && stats.refusals.handshake_deadline >= 1, "{stats:?}");
    assert_eq!(stats.credential_rejections, 0);
    assert_closed_without_a_byte(idle);
}

/// A port that answers anything at once, in clear text.
fn clear_text_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(format!("PONG {} -\n", "00".repeat(32)).as_bytes());
        }
    });
    addr
}

/// Runs one probe round from node "a" over `peers`; the events and the prober.
fn probe_round(peers: &[(&str, String)], secure: Arc<SecureConfig>) -> (Vec<EventKind>, Prober) {
    let mut nodes = vec![("a", "127.0.0.1:1".to_string())];
    nodes.extend(peers.iter().cloned());
    let mut state = cluster(&nodes, None, &[]);
    // Liveness is reconcile's memo; the prober probes only live nodes.
    state.nodes.live.iter_mut().for_each(|live| *live = true);
    let mut prober = Prober::new(ProbeConfig { interval_ms: 60_000, peers_per_round: 8, timeout_ms: 2_000, secure });
    let mut out = Vec::new();
    let started = Instant::now();
    while prober.samples + prober.misses < peers.len() as u64 {
        assert!(started.elapsed() < Duration::from_secs(30), "the round did not finish");
        prober.tick(&state, "a", Instant::now(), &mut out);
        std::thread::sleep(Duration::from_millis(5));
    }
    (out, prober)
}

#[test]
fn a_port_that_is_not_the_named_node_gives_the_prober_no_sample() {
    let real = peer_with(node("r"), |_| {});
    // "c"'s name with another key; "b"'s port served by node "r"; clear text.
    let forged = peer_with(identity("c", 9, CLUSTER), |_| {});
    let peers = [
        ("r", real.server.addr().to_string()),
        ("c", forged.server.addr().to_string()),
        ("b", real.server.addr().to_string()),
        ("x", clear_text_port()),
    ];
    let (out, prober) = probe_round(&peers, node("a"));
    let [EventKind::Rtt { peer: sampled, rtt_us }] = out.as_slice() else {
        panic!("one sample, the real peer's: {out:?}")
    };
    assert_eq!((sampled.as_str(), *rtt_us > 0), ("r", true));
    assert_eq!((prober.samples, prober.misses, prober.credential_failures), (1, 3, 2));
    assert_eq!((real.server.stats().pings, forged.server.stats().pings), (1, 0));
    // A prober of another cluster gets nothing from the real peer, which counts it.
    let (out, prober) = probe_round(&peers[..1], identity("a", 1, OTHER_CLUSTER));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(prober.credential_failures, 1);
    assert_eq!(real.server.stats().refusals.wrong_cluster, 1);
}
