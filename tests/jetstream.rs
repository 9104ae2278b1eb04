//! The JetStream client against real nats-server processes (skipped when nats-server
//! is not installed): pipelined publish and read-back on one server, the stream
//! leader killed while publishing on three, the client's own server killed, purge
//! and BeforeStart, pins, a slow reader, the consumer's host killed, the only server
//! restarted. One test uses a scripted peer instead, to send malformed input. The
//! tests run one at a time (each starts its own servers) so their timing does not
//! depend on each other.

mod common;

use common::nats::NatsCluster;
use meshos::ingest::park::Signal;
use meshos::redex::jetstream::{
    Delivered, JetStream, JetStreamConfig, JetStreamError, PublishError, PublishOutcome, Stored,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A record read back: (position, timestamp ns, msg id, payload).
type Record = (u64, u64, Option<[u8; 16]>, Vec<u8>);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn config(cluster: &NatsCluster, name: &str, replicas: u32) -> JetStreamConfig {
    let mut config = JetStreamConfig::new(cluster.client_urls(), name);
    config.stream_replicas = replicas;
    config
}

/// A msg id unique to this test run and record.
fn msg_id(run: u64, index: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&run.to_le_bytes());
    id[8..].copy_from_slice(&index.to_le_bytes());
    id
}

fn payload(index: u64) -> Vec<u8> {
    let mut payload = format!("record {index} ").into_bytes();
    payload.resize(200, b'.');
    payload
}

fn run_id() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

struct Client {
    js: JetStream,
    signal: Arc<Signal>,
    outcomes: BTreeMap<u64, Result<Stored, String>>,
}

impl Client {
    fn start(config: JetStreamConfig, next_position: u64) -> Client {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let signal = Signal::new();
        let js = JetStream::start(config, next_position, Arc::clone(&signal)).expect("start the client");
        Client { js, signal, outcomes: BTreeMap::new() }
    }

    fn take_acks(&mut self) {
        let mut out: Vec<PublishOutcome> = Vec::new();
        self.js.poll_acks(&mut out);
        for outcome in out {
            let previous = self.outcomes.insert(outcome.ticket, outcome.result);
            assert!(previous.is_none(), "ticket {} has two outcomes", outcome.ticket);
        }
    }

    /// Publishes records `range` (backpressure: waits on Full); `during` runs after each
    /// round of acks with the number of outcomes so far.
    fn publish_range(&mut self, run: u64, range: std::ops::Range<u64>, during: &mut dyn FnMut(&mut Client, usize)) {
        for index in range {
            let body = payload(index);
            loop {
                match self.js.publish(msg_id(run, index), &body) {
                    Ok(ticket) => {
                        assert!(ticket > 0);
                        break;
                    }
                    Err(PublishError::Full { .. }) => {
                        self.signal.wait(Some(50));
                        self.take_acks();
                        let done = self.outcomes.len();
                        during(self, done);
                    }
                    Err(error) => panic!("publish {index}: {error}"),
                }
            }
        }
    }

    fn wait_outcomes(&mut self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.outcomes.len() < count {
            assert!(Instant::now() < deadline, "{} of {count} outcomes after {timeout:?}", self.outcomes.len());
            self.signal.wait(Some(50));
            self.take_acks();
        }
    }

    /// Reads records until `count` arrived: (position, timestamp, msg id, payload).
    fn read(&mut self, count: usize, timeout: Duration) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        while records.len() < count {
            assert!(Instant::now() < deadline, "{} of {count} records after {timeout:?}", records.len());
            let mut visit = |record: Delivered<'_>| {
                records.push((record.position, record.timestamp_ns, record.msg_id, record.payload.to_vec()))
            };
            let got = self.js.poll_records(1024, &mut visit).expect("records");
            if got == 0 {
                self.signal.wait(Some(50));
            }
        }
        records
    }
}

/// Dense positions from `first`, each record exactly once.
fn assert_dense(records: &[Record], first: u64) {
    for (offset, record) in records.iter().enumerate() {
        assert_eq!(record.0, first + offset as u64, "positions are dense and in order");
    }
}

#[test]
fn one_server_pipelined_publish_reads_back_in_order_and_dedups() {
    let _serial = serial();
    let Some(cluster) = NatsCluster::start(1) else { return };
    let total = 20_000u64;
    let run = run_id();
    let wall_before_ns = run as u128;
    let mut client = Client::start(config(&cluster, "node-1", 1), 1);
    let started = Instant::now();
    client.publish_range(run, 0..total, &mut |_, _| {});
    client.wait_outcomes(total as usize, Duration::from_secs(30));
    let elapsed = started.elapsed();
    println!(
        "1 server R1: {total} records stored in {elapsed:?} ({:.0} records/s)",
        total as f64 / elapsed.as_secs_f64()
    );
    for (ticket, result) in &client.outcomes {
        let stored = result.as_ref().expect("stored");
        assert!(!stored.duplicate);
        assert_eq!(stored.position, *ticket, "one publisher, no fault: stored in ticket order");
    }

    let records = client.read(total as usize, Duration::from_secs(30));
    assert_dense(&records, 1);
    let wall_after_ns = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let mut time_ns = 0u64;
    let mut regressions = 0;
    for (index, (_, timestamp_ns, id, body)) in records.iter().enumerate() {
        assert_eq!(*id, Some(msg_id(run, index as u64)));
        assert_eq!(body, &payload(index as u64));
        assert!((wall_before_ns..=wall_after_ns).contains(&u128::from(*timestamp_ns)), "a server timestamp of now");
        regressions += usize::from(*timestamp_ns < time_ns);
        let stamped = time_ns.max(*timestamp_ns);
        assert!(stamped >= time_ns);
        time_ns = stamped;
    }
    println!("timestamp regressions: {regressions}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.js.caught_up() {
        assert!(Instant::now() < deadline, "caught up after reading everything");
        client.read(0, Duration::from_secs(1));
        client.signal.wait(Some(50));
    }

    // The same msg id again: a duplicate at the original position.
    let ticket = client.js.publish(msg_id(run, 4), &payload(4)).unwrap();
    client.wait_outcomes(total as usize + 1, Duration::from_secs(10));
    assert_eq!(client.outcomes[&ticket], Ok(Stored { position: 5, duplicate: true }));
    let stats = client.js.stats();
    assert_eq!((stats.stored, stats.duplicates, stats.failed, stats.delivered), (total + 1, 1, 0, total));
    assert!(stats.connected && stats.connects == 1 && stats.protocol_errors == 0, "{stats:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.js.stream_bounds() != Some((1, total)) {
        assert!(Instant::now() < deadline, "stream bounds {:?}", client.js.stream_bounds());
        std::thread::sleep(Duration::from_millis(50));
    }
    client.js.stop();
}

/// Reads everything from position 1 with a fresh client and checks each msg id of
/// `run` in `0..total` is stored exactly once.
fn assert_stored_exactly_once(cluster: &NatsCluster, replicas: u32, run: u64, total: u64) {
    let mut reader = Client::start(config(cluster, "reader", replicas), 1);
    let records = reader.read(total as usize, Duration::from_secs(30));
    assert_dense(&records, 1);
    let ids: HashSet<[u8; 16]> = records.iter().map(|record| record.2.expect("a msg id")).collect();
    assert_eq!(ids.len() as u64, total, "every record stored exactly once");
    for index in 0..total {
        assert!(ids.contains(&msg_id(run, index)), "record {index} is stored");
    }
    // Nothing beyond: the stream holds exactly `total` records.
    std::thread::sleep(Duration::from_millis(300));
    let more = reader.js.poll_records(10, &mut |record| panic!("an extra record at {}", record.position)).unwrap();
    assert_eq!(more, 0);
    reader.js.stop();
}

fn assert_every_ticket_stored(client: &Client, total: u64) {
    assert_eq!(client.outcomes.len() as u64, total);
    let mut positions = HashSet::new();
    for (ticket, result) in &client.outcomes {
        let stored = result.as_ref().unwrap_or_else(|reason| panic!("ticket {ticket} failed: {reason}"));
        assert!(positions.insert(stored.position), "two tickets at position {}", stored.position);
    }
}

#[test]
fn three_servers_stream_leader_killed_while_publishing() {
    let _serial = serial();
    let Some(mut cluster) = NatsCluster::start(3) else { return };
    let total = 20_000u64;
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-1", 3), 1);
    // A clean pipelined phase first, for the throughput figure (after one record:
    // connected, stream created).
    client.publish_range(run, 0..1, &mut |_, _| {});
    client.wait_outcomes(1, Duration::from_secs(30));
    let clean = 8_000u64;
    let started = Instant::now();
    client.publish_range(run, 1..clean, &mut |_, _| {});
    client.wait_outcomes(clean as usize, Duration::from_secs(30));
    let elapsed = started.elapsed();
    println!(
        "3 servers R3: {clean} records stored in {elapsed:?} ({:.0} records/s)",
        clean as f64 / elapsed.as_secs_f64()
    );

    let mut killed = None;
    let started = Instant::now();
    client.publish_range(run, clean..total, &mut |client, done| {
        if killed.is_none() && done >= 11_000 {
            let leader = cluster.stream_leader("MESHOS").expect("a stream leader");
            println!("killing the stream leader {} at {done} outcomes", cluster.name(leader));
            cluster.kill(leader);
            killed = Some(leader);
            let _ = client;
        }
    });
    client.wait_outcomes(total as usize, Duration::from_secs(40));
    let elapsed = started.elapsed();
    assert!(killed.is_some(), "the leader was killed");
    let stats = client.js.stats();
    println!(
        "3 servers R3, leader killed: {} records resolved in {elapsed:?} ({:.0} records/s); {stats:?}",
        total - clean,
        (total - clean) as f64 / elapsed.as_secs_f64()
    );
    assert_every_ticket_stored(&client, total);
    assert_eq!(stats.failed, 0);
    // Informational: how far the stream's order departs from ticket order after the kill.
    let positions: Vec<u64> = client.outcomes.values().map(|result| result.as_ref().unwrap().position).collect();
    let inversions = positions.windows(2).filter(|pair| pair[1] < pair[0]).count();
    println!("ticket order inversions in the stream: {inversions}");
    client.js.stop();
    assert_stored_exactly_once(&cluster, 3, run, total);
}

#[test]
fn three_servers_own_server_killed_reconnects_and_continues() {
    let _serial = serial();
    let Some(mut cluster) = NatsCluster::start(3) else { return };
    let total = 10_000u64;
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-1", 3), 1);
    let urls = cluster.client_urls();
    let mut killed = None;
    client.publish_range(run, 0..total, &mut |client, done| {
        if killed.is_none() && done >= 3_000 {
            let server = client.js.stats().server;
            let index = urls.iter().position(|url| *url == server).expect("connected to one of ours");
            println!("killing {} (the client's server) at {done} outcomes", cluster.name(index));
            cluster.kill(index);
            killed = Some(index);
        }
    });
    client.wait_outcomes(total as usize, Duration::from_secs(40));
    assert!(killed.is_some());
    assert_every_ticket_stored(&client, total);
    // The same client keeps reading across the reconnect: no gap, no duplicate.
    let records = client.read(total as usize, Duration::from_secs(30));
    assert_dense(&records, 1);
    let ids: HashSet<[u8; 16]> = records.iter().filter_map(|record| record.2).collect();
    assert_eq!(ids.len() as u64, total);
    let stats = client.js.stats();
    println!("{stats:?}");
    assert!(stats.connects >= 2 && stats.connected, "reconnected: {stats:?}");
    assert_ne!(stats.server, urls[killed.unwrap()]);
    client.js.stop();
}

fn wait_before_start(client: &mut Client, timeout: Duration) -> (u64, u64, usize) {
    let deadline = Instant::now() + timeout;
    let mut delivered = 0;
    loop {
        assert!(Instant::now() < deadline, "no BeforeStart after {timeout:?}");
        match client.js.poll_records(1024, &mut |_| delivered += 1) {
            Err(JetStreamError::BeforeStart { requested, first }) => return (requested, first, delivered),
            Err(error) => panic!("{error}"),
            Ok(_) => {
                client.signal.wait(Some(50));
            }
        }
    }
}

#[test]
fn purge_below_then_reading_from_a_purged_position_is_before_start() {
    let _serial = serial();
    let Some(cluster) = NatsCluster::start(1) else { return };
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-1", 1), 1);
    client.publish_range(run, 0..100, &mut |_, _| {});
    client.wait_outcomes(100, Duration::from_secs(20));
    client.js.purge_below(51);
    client.js.purge_below(51); // idempotent
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.js.stats().purges < 1 {
        assert!(Instant::now() < deadline, "purged");
        std::thread::sleep(Duration::from_millis(20));
    }

    // From a purged position: BeforeStart, nothing handed out.
    let mut late = Client::start(config(&cluster, "node-2", 1), 10);
    assert_eq!(wait_before_start(&mut late, Duration::from_secs(15)), (10, 51, 0));
    late.js.stop();
    // From the first kept position: everything kept.
    let mut kept = Client::start(config(&cluster, "node-3", 1), 51);
    let records = kept.read(50, Duration::from_secs(15));
    assert_dense(&records, 51);
    assert_eq!(records[0].2, Some(msg_id(run, 50)));
    kept.js.stop();

    // Everything purged: the consumer has nothing to deliver, its heartbeat shows it started beyond.
    client.js.purge_below(101);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.js.stream_bounds().map(|(first, _)| first) != Some(101) {
        assert!(Instant::now() < deadline, "purged again: {:?}", client.js.stream_bounds());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut empty = Client::start(config(&cluster, "node-4", 1), 60);
    assert_eq!(wait_before_start(&mut empty, Duration::from_secs(15)), (60, 101, 0));
    empty.js.stop();
    client.js.stop();
}

#[test]
fn pinned_publish_with_a_wrong_expected_last_fails() {
    let _serial = serial();
    let Some(cluster) = NatsCluster::start(1) else { return };
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-1", 1), 1);
    // A fresh stream: caught up at once (the consumer has nothing to deliver).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.js.caught_up() {
        assert!(Instant::now() < deadline, "caught up on an empty stream");
        client.js.poll_records(10, &mut |record| panic!("a record at {}", record.position)).unwrap();
        client.signal.wait(Some(20));
    }
    client.publish_range(run, 0..10, &mut |_, _| {});
    client.wait_outcomes(10, Duration::from_secs(20));
    let wrong = client.js.publish_pinned(msg_id(run, 10), &payload(10), 3).unwrap();
    client.wait_outcomes(11, Duration::from_secs(10));
    let reason = client.outcomes[&wrong].clone().expect_err("a wrong pin fails");
    assert!(reason.contains("10071"), "{reason}");
    let right = client.js.publish_pinned(msg_id(run, 11), &payload(11), 10).unwrap();
    client.wait_outcomes(12, Duration::from_secs(10));
    assert_eq!(client.outcomes[&right], Ok(Stored { position: 11, duplicate: false }));
    assert_eq!(client.js.stats().failed, 1);
    // Tail repair: pins pipelined back to back all land where intended.
    let tickets: Vec<u64> =
        (0..50).map(|k| client.js.publish_pinned(msg_id(run, 100 + k), &payload(100 + k), 11 + k).unwrap()).collect();
    client.wait_outcomes(62, Duration::from_secs(10));
    for (k, ticket) in tickets.iter().enumerate() {
        assert_eq!(client.outcomes[ticket], Ok(Stored { position: 12 + k as u64, duplicate: false }));
    }
    // Too large for the cap: refused at once, nothing queued.
    let big = vec![0u8; 5 << 20];
    assert!(matches!(client.js.publish(msg_id(run, 99), &big), Err(PublishError::TooLarge { .. })));
    client.js.stop();
}

#[test]
fn a_slow_reader_stalls_delivery_without_loss() {
    let _serial = serial();
    let Some(cluster) = NatsCluster::start(1) else { return };
    let run = run_id();
    let mut config = config(&cluster, "node-1", 1);
    config.delivered_queue_max = 16;
    let mut client = Client::start(config, 1);
    let total = 3_000u64;
    let body = vec![7u8; 16 << 10];
    for index in 0..total {
        loop {
            match client.js.publish(msg_id(run, index), &body) {
                Ok(_) => break,
                Err(PublishError::Full { .. }) => {
                    client.signal.wait(Some(50));
                    client.take_acks();
                }
                Err(error) => panic!("{error}"),
            }
        }
    }
    client.wait_outcomes(total as usize, Duration::from_secs(30));
    // Nothing read for a while: the client holds what it got and withholds flow
    // control; heartbeats keep the consumer alive.
    std::thread::sleep(Duration::from_secs(4));
    let records = client.read(total as usize, Duration::from_secs(30));
    assert_dense(&records, 1);
    assert!(records.iter().all(|record| record.3 == body));
    let stats = client.js.stats();
    println!("{stats:?}");
    assert_eq!((stats.consumer_recreated, stats.protocol_errors, stats.connects), (0, 0, 1), "{stats:?}");
    client.js.stop();
}

#[test]
fn the_only_server_restarted_the_client_reconnects_and_continues() {
    let _serial = serial();
    let Some(mut cluster) = NatsCluster::start(1) else { return };
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-1", 1), 1);
    client.publish_range(run, 0..2_000, &mut |_, _| {});
    client.wait_outcomes(2_000, Duration::from_secs(20));
    let first = client.read(2_000, Duration::from_secs(20));
    assert_dense(&first, 1);
    cluster.restart(0);
    client.publish_range(run, 2_000..4_000, &mut |_, _| {});
    client.wait_outcomes(4_000, Duration::from_secs(30));
    assert_every_ticket_stored(&client, 4_000);
    let second = client.read(2_000, Duration::from_secs(30));
    assert_dense(&second, 2_001);
    let ids: HashSet<[u8; 16]> = first.iter().chain(&second).filter_map(|record| record.2).collect();
    assert_eq!(ids.len(), 4_000, "each record once");
    let stats = client.js.stats();
    assert!(stats.connects >= 2 && stats.connected, "{stats:?}");
    client.js.stop();
}

#[test]
fn three_servers_all_killed_and_restarted_the_client_continues() {
    let _serial = serial();
    let Some(mut cluster) = NatsCluster::start(3) else { return };
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-1", 3), 1);
    client.publish_range(run, 0..3_000, &mut |_, _| {});
    client.wait_outcomes(3_000, Duration::from_secs(20));
    let first = client.read(3_000, Duration::from_secs(20));
    assert_dense(&first, 1);
    let started = Instant::now();
    cluster.restart_all();
    println!("all three servers killed and healthy again in {:?}", started.elapsed());
    client.publish_range(run, 3_000..6_000, &mut |_, _| {});
    client.wait_outcomes(6_000, Duration::from_secs(40));
    assert_every_ticket_stored(&client, 6_000);
    let second = client.read(3_000, Duration::from_secs(40));
    assert_dense(&second, 3_001);
    let ids: HashSet<[u8; 16]> = first.iter().chain(&second).filter_map(|record| record.2).collect();
    assert_eq!(ids.len(), 6_000, "each record once");
    let stats = client.js.stats();
    println!("{stats:?}");
    assert!(stats.connects >= 2, "{stats:?}");
    client.js.stop();
}

#[test]
fn three_servers_consumer_host_killed_the_consumer_is_recreated() {
    let _serial = serial();
    let Some(mut cluster) = NatsCluster::start(3) else { return };
    let run = run_id();
    let mut client = Client::start(config(&cluster, "node-9", 3), 1);
    client.publish_range(run, 0..3_000, &mut |_, _| {});
    client.wait_outcomes(3_000, Duration::from_secs(20));
    let first = client.read(3_000, Duration::from_secs(20));
    assert_dense(&first, 1);
    // The first consumer of this client: named node-9-<boot>-1; find it by prefix.
    let deadline = Instant::now() + Duration::from_secs(10);
    let host = loop {
        let names = cluster.consumer_names("MESHOS");
        if let Some(name) = names.iter().find(|name| name.starts_with("node-9-")) {
            if let Some(host) = cluster.consumer_host("MESHOS", name) {
                break host;
            }
        }
        assert!(Instant::now() < deadline, "the consumer's host is known: {names:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("killing {}, the consumer's host", cluster.name(host));
    cluster.kill(host);
    client.publish_range(run, 3_000..6_000, &mut |_, _| {});
    client.wait_outcomes(6_000, Duration::from_secs(40));
    assert_every_ticket_stored(&client, 6_000);
    let second = client.read(3_000, Duration::from_secs(40));
    assert_dense(&second, 3_001);
    let ids: HashSet<[u8; 16]> = first.iter().chain(&second).filter_map(|record| record.2).collect();
    assert_eq!(ids.len(), 6_000, "each record once");
    let stats = client.js.stats();
    println!("{stats:?}");
    assert!(stats.consumer_recreated >= 1, "{stats:?}");
    client.js.stop();
}

/// Throughput figures for the docs (run by hand, in release):
/// `cargo test --release --test jetstream -- --ignored --nocapture throughput`.
#[test]
#[ignore = "a measurement, not a check"]
fn throughput_by_window_and_replicas() {
    let _serial = serial();
    for servers in [1usize, 3] {
        let Some(cluster) = NatsCluster::start(servers) else { return };
        let mut next_position = 1;
        for (round, window) in [16u32, 64, 256, 1024].into_iter().enumerate() {
            let run = run_id();
            let mut config = config(&cluster, &format!("bench-{round}"), servers as u32);
            config.publish_window_max = window;
            // Reads from the end, as a node that is caught up does, and reads what it publishes.
            let mut client = Client::start(config, next_position);
            // Warm up: connected, stream and consumer created; skip what earlier rounds stored.
            client.publish_range(run, 0..1, &mut |_, _| {});
            client.wait_outcomes(1, Duration::from_secs(30));
            let total = 30_000u64;
            let body = vec![0x5a; 1024];
            let started = Instant::now();
            for index in 1..=total {
                loop {
                    match client.js.publish(msg_id(run, index), &body) {
                        Ok(_) => break,
                        Err(PublishError::Full { .. }) => {
                            client.signal.wait(Some(50));
                            client.take_acks();
                            client.js.poll_records(usize::MAX, &mut |_| {}).unwrap();
                        }
                        Err(error) => panic!("{error}"),
                    }
                }
            }
            client.wait_outcomes(total as usize + 1, Duration::from_secs(60));
            next_position = 1 + client.outcomes.values().map(|result| result.as_ref().unwrap().position).max().unwrap();
            let elapsed = started.elapsed();
            println!(
                "{servers} server(s) R{servers}, 1 KiB records, window {window}: {total} stored in {elapsed:?} = {:.0} records/s",
                total as f64 / elapsed.as_secs_f64()
            );
            client.js.stop();
        }
    }
}

/// Not a NATS server: a scripted peer that completes the handshake and then sends
/// one malformed operation per connection. The client counts a protocol error and
/// reconnects each time; nothing panics.
#[test]
fn malformed_server_input_is_a_counted_protocol_error_and_a_reconnect() {
    use std::io::{Read, Write};
    let _serial = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let garbage: [&[u8]; 4] =
        [b"MSG a b c d e f\r\n", b"HMSG x 1 10 5\r\n", b"WHAT\r\n", b"MSG _INBOX.x.p1 1 999999999\r\n"];
    let server = std::thread::spawn(move || {
        for bad in garbage {
            let (mut socket, _) = listener.accept().unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let info =
                b"INFO {\"server_name\":\"scripted\",\"headers\":true,\"jetstream\":true,\"max_payload\":1048576}\r\n";
            socket.write_all(info).unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(6).any(|window| window == b"PING\r\n") {
                match socket.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => seen.extend_from_slice(&buf[..read]),
                }
            }
            socket.write_all(b"PONG\r\n").unwrap();
            socket.write_all(bad).unwrap();
            // The client hangs up.
            while let Ok(read) = socket.read(&mut buf) {
                if read == 0 {
                    break;
                }
            }
        }
    });
    let mut client = Client::start(JetStreamConfig::new(vec![address], "node-x"), 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.js.stats().protocol_errors < 4 {
        assert!(Instant::now() < deadline, "{:?}", client.js.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = client.js.stats();
    assert!(stats.connects >= 4, "{stats:?}");
    // Publishing still queues (it waits for a server); nothing was lost or answered.
    let ticket = client.js.publish(msg_id(1, 1), b"x").unwrap();
    assert_eq!(ticket, 1);
    client.take_acks();
    assert!(client.outcomes.is_empty());
    client.js.stop();
    server.join().unwrap();
}
