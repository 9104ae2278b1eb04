//! Peer traffic carries the cluster credential: blob pulls between nodes holding the
//! same key work; a client with another key or none gets nothing (refused, counted on
//! both sides) and the pull moves on to the next holder; a recorded request replayed
//! on a new connection is refused; a process on a peer's port that does not hold the
//! key cannot make the prober record a round trip.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
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
use meshos::sys::peer_server;

const KEY: [u8; 32] = [0x11; 32];
const OTHER_KEY: [u8; 32] = [0x22; 32];

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

fn executor(store: Arc<BlobStore>, key: Option<[u8; 32]>) -> BlobExecutor {
    let config = BlobExecConfig {
        transfers_max: 1,
        fetch_timeout_ms: 5_000,
        blob_bytes_max: 1 << 30,
        receive_bytes_per_s: 0,
        verify_bytes_per_s: 0,
        verify_pass_ms: 1_000,
        node_name: "b".into(),
        key,
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

#[test]
fn a_pull_between_nodes_with_the_same_key_works() {
    let (a, b) = (peer(Some(KEY)), peer(Some(KEY)));
    let (blob, size) = some_blob(&a.store);
    let nodes = [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a"]);
    let mut pulls = executor(Arc::clone(&b.store), Some(KEY));
    let out = pull(&mut pulls, &state, &blob, "a");
    assert!(matches!(out.last(), Some(EventKind::ActionOutcome { outcome: Outcome::Success, .. })), "{out:?}");
    assert!(b.store.verify(&blob, &mut |_| {}).unwrap());
    assert_eq!(a.server.stats().blobs_served, 1);
    assert_eq!(a.server.stats().credential_rejections, 0);
    assert_eq!(pulls.stats.credential_failures, 0);
}

/// A client with another key, or none, gets no bytes: the pull fails naming the
/// holder and the refusal, both sides count it, and nothing is stored.
#[test]
fn a_client_with_a_wrong_key_or_none_cannot_fetch() {
    let (a, b) = (peer(Some(KEY)), peer(None));
    let (blob, size) = some_blob(&a.store);
    let nodes = [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a"]);
    for (rejections, key, expected) in
        [(1, Some(OTHER_KEY), peer_server::CREDENTIAL_REJECTED), (2, None, peer_server::CREDENTIAL_MISSING)]
    {
        let mut pulls = executor(Arc::clone(&b.store), key);
        let out = pull(&mut pulls, &state, &blob, "a");
        let [EventKind::ActionOutcome { outcome: Outcome::Failure { reason }, .. }] = out.as_slice() else {
            panic!("one failed outcome, no announcement: {out:?}")
        };
        assert!(reason.starts_with("a: ") && reason.contains(expected), "{reason}");
        assert_eq!(pulls.stats.credential_failures, 1);
        assert_eq!(pulls.stats.fetch_failures, 1);
        assert_eq!(a.server.stats().credential_rejections, rejections);
        assert_eq!(a.server.stats().blobs_served, 0, "no bytes served");
        assert!(!b.store.contains(&blob));
    }
    // A keyed client against a keyless port: refused the other way round.
    let keyless = peer(None);
    some_blob(&keyless.store);
    let client = peer_server::Client { name: "b", key: Some(&KEY) };
    let error = peer_server::fetch(&keyless.server.addr().to_string(), &blob, &client, Duration::from_secs(5))
        .err()
        .expect("refused");
    assert!(error.is_credential() && error.to_string().contains(peer_server::CREDENTIAL_UNEXPECTED), "{error}");
    assert_eq!(keyless.server.stats().credential_rejections, 1);
    assert_eq!(keyless.server.stats().blobs_served, 0);
}

/// A holder whose credential differs is a failed source: the pull goes on to the next
/// holder, which holds the right key.
#[test]
fn a_holder_with_another_key_is_skipped_for_the_next() {
    let (a, b, c) = (peer(Some(OTHER_KEY)), peer(Some(KEY)), peer(Some(KEY)));
    let (blob, size) = some_blob(&a.store);
    some_blob(&c.store);
    let nodes =
        [("a", a.server.addr().to_string()), ("b", b.server.addr().to_string()), ("c", c.server.addr().to_string())];
    let state = cluster(&nodes, Some((blob, size)), &["a", "c"]);
    let mut pulls = executor(Arc::clone(&b.store), Some(KEY));
    let out = pull(&mut pulls, &state, &blob, "a");
    assert!(matches!(out.last(), Some(EventKind::ActionOutcome { outcome: Outcome::Success, .. })), "{out:?}");
    assert!(b.store.verify(&blob, &mut |_| {}).unwrap());
    assert_eq!(pulls.stats.credential_failures, 1);
    assert_eq!((a.server.stats().credential_rejections, a.server.stats().blobs_served), (1, 0));
    assert_eq!((c.server.stats().credential_rejections, c.server.stats().blobs_served), (0, 1));
}

/// Connects and reads the greeting: the stream, its reader and the nonce.
fn open(addr: std::net::SocketAddr) -> (TcpStream, BufReader<TcpStream>, [u8; 32]) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let nonce = greeting.trim_end().strip_prefix("MESHOS-PEER 1 ").expect("the greeting");
    (stream, reader, meshos::exec::blobstore::parse_hex(nonce).expect("a nonce"))
}

/// A request recorded on one connection is refused on another (another nonce) and
/// repeated on its own (another request number); what is refused gets only the
/// refusal line, then the connection closes.
#[test]
fn a_replayed_request_is_refused() {
    let a = peer(Some(KEY));
    let (blob, size) = some_blob(&a.store);
    let request = format!("BLOB {}", meshos::exec::blobstore::hex(&blob));
    let (mut stream, mut reader, nonce) = open(a.server.addr());
    let mac = peer_server::request_mac(&KEY, &nonce, 0, "b", &request);
    let recorded = format!("{request} {} b\n", mac.to_hex());
    stream.write_all(recorded.as_bytes()).unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    assert_eq!(answer, format!("OK {size}\n"));
    let mut bytes = vec![0u8; size as usize];
    reader.read_exact(&mut bytes).unwrap();
    assert_eq!(blake3::hash(&bytes).as_bytes(), &blob);
    // The same line again on the same connection: request number 1, refused.
    stream.write_all(recorded.as_bytes()).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, format!("NO {}\n", peer_server::CREDENTIAL_REJECTED));
    // On a new connection (a new nonce): refused, nothing but the refusal, closed.
    let (mut stream, mut reader, new_nonce) = open(a.server.addr());
    assert_ne!(nonce, new_nonce, "every connection has a fresh nonce");
    stream.write_all(recorded.as_bytes()).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, format!("NO {}\n", peer_server::CREDENTIAL_REJECTED));
    assert_eq!(a.server.stats().credential_rejections, 2);
    assert_eq!(a.server.stats().blobs_served, 1);
}

/// How a fake peer port answers a PING.
#[derive(Clone, Copy)]
enum Fake {
    /// `PONG <token> -`: no credential.
    Unsigned,
    /// A MAC under another key.
    OtherKey,
}

/// A process on a peer port that does not hold the cluster key, answering every PING
/// at once.
fn fake_port(mode: Fake) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let nonce = [0x33u8; 32];
            let greeting = format!("MESHOS-PEER 1 {}\n", meshos::event::hex(&nonce));
            if stream.write_all(greeting.as_bytes()).is_err() {
                continue;
            }
            let mut line = String::new();
            if BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).is_err() {
                continue;
            }
            let Some(token) = line.split(' ').nth(1) else { continue };
            let mac = match mode {
                Fake::Unsigned => "-".to_string(),
                Fake::OtherKey => {
                    let token = meshos::exec::blobstore::parse_hex(token).unwrap_or_default();
                    peer_server::pong_mac(&OTHER_KEY, &nonce, &token).to_hex().to_string()
                }
            };
            let _ = stream.write_all(format!("PONG {token} {mac}\n").as_bytes());
        }
    });
    addr
}

/// Runs one probe round from node "a" over `peers`; the events and the prober.
fn probe_round(peers: &[(&str, String)], key: Option<[u8; 32]>) -> (Vec<EventKind>, Prober) {
    let mut nodes = vec![("a", "127.0.0.1:1".to_string())];
    nodes.extend(peers.iter().cloned());
    let mut state = cluster(&nodes, None, &[]);
    // Liveness is reconcile's memo; the prober probes only live nodes.
    state.nodes.live.iter_mut().for_each(|live| *live = true);
    let mut prober = Prober::new(ProbeConfig { interval_ms: 60_000, peers_per_round: 8, timeout_ms: 2_000, key });
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
fn a_fake_peer_port_without_the_key_gives_the_prober_no_sample() {
    let real = peer(Some(KEY));
    let peers = [
        ("real", real.server.addr().to_string()),
        ("unsigned", fake_port(Fake::Unsigned)),
        ("forged", fake_port(Fake::OtherKey)),
    ];
    let (out, prober) = probe_round(&peers, Some(KEY));
    let [EventKind::Rtt { peer: sampled, rtt_us }] = out.as_slice() else {
        panic!("one sample, the real peer's: {out:?}")
    };
    assert_eq!((sampled.as_str(), *rtt_us > 0), ("real", true));
    assert_eq!((prober.samples, prober.misses, prober.credential_failures), (1, 2, 2));
    assert_eq!(real.server.stats().pings, 1);

    // Keyless on both sides (one machine): samples as before; a keyed peer refuses a
    // keyless prober.
    let keyless = peer(None);
    let peers = [("keyless", keyless.server.addr().to_string()), ("keyed", real.server.addr().to_string())];
    let (out, prober) = probe_round(&peers, None);
    assert!(matches!(out.as_slice(), [EventKind::Rtt { peer: sampled, .. }] if sampled == "keyless"), "{out:?}");
    assert_eq!(prober.credential_failures, 1);
    assert_eq!(real.server.stats().credential_rejections, 1);
}
