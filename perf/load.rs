//! The ingest load tool: events per second from N client connections over loopback
//! into a real node (embedded log, group commit with one fsync per group, fold and
//! reconcile), beside the raw loopback rate of the same bytes in the same run.
//!
//! ```text
//! cargo run --release --example load -- --connections 16 --events 4000000
//! cargo run --release --example load -- --connections 16 --events 4000000 --hostile
//! ```
//!
//! `--hostile` adds, for the whole run, a client that sends garbage, one that sends
//! and never reads its acknowledgements, one that disconnects mid-frame, and 1,000
//! idle connections. The node runs in this process on its own threads (reactor,
//! main loop) in a temporary directory; the clients are threads too. Output: one line
//! per measurement, then `--json` for scripts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use meshos::loadgen::{self, FrameTemplate, LoadOptions};
use meshos::node::config::NodeConfig;
use meshos::sys::client::{Client, ClientError, Replies};

struct Flags {
    connections: u32,
    events: u64,
    events_per_frame: u32,
    frames_per_write: u32,
    hostile: bool,
    idle: u32,
    json: bool,
}

fn parse_flags() -> Flags {
    let mut flags = Flags {
        connections: 16,
        events: 4_000_000,
        events_per_frame: 64,
        frames_per_write: 8,
        hostile: false,
        idle: 1000,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value =
            || args.next().unwrap_or_else(|| panic!("{arg} needs a value")).parse::<u64>().expect("a number");
        match arg.as_str() {
            "--connections" => flags.connections = value() as u32,
            "--events" => flags.events = value(),
            "--events-per-frame" => flags.events_per_frame = value() as u32,
            "--frames-per-write" => flags.frames_per_write = value() as u32,
            "--idle" => flags.idle = value() as u32,
            "--hostile" => flags.hostile = true,
            "--json" => flags.json = true,
            "--help" | "-h" => {
                println!(
                    "load [--connections N] [--events TOTAL] [--events-per-frame K] [--frames-per-write W] \
                     [--hostile [--idle N]] [--json]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown flag {other} (try --help)"),
        }
    }
    flags
}

/// The same bytes through plain loopback sockets into a reader that discards them.
fn raw_loopback(connections: u32, frames_per_connection: u64, frame: &[u8], frames_per_write: u32) -> (f64, u64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let readers = std::thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().unwrap();
            handles.push(std::thread::spawn(move || {
                let mut buffer = vec![0u8; 64 << 10];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => return total,
                        Ok(count) => total += count as u64,
                    }
                }
            }));
        }
        handles.into_iter().map(|handle| handle.join().unwrap()).sum::<u64>()
    });
    let chunk: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * frames_per_write as usize).collect();
    let started = Instant::now();
    let writers: Vec<_> = (0..connections)
        .map(|_| {
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                let mut sent = 0;
                while sent < frames_per_connection {
                    stream.write_all(&chunk).unwrap();
                    sent += frames_per_write as u64;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let bytes = readers.join().unwrap();
    (started.elapsed().as_secs_f64(), bytes)
}

struct Hostile {
    /// Strangers that connect and never start their handshake (each closed at the
    /// handshake deadline).
    _idle: Vec<TcpStream>,
    _deaf: (Client, Replies),
    garbage: Replies,
}

/// Load connection `index`'s secure channel towards the node under load.
fn connect(addr: SocketAddr, index: u32) -> (Client, Replies) {
    Client::connect_tcp(addr, loadgen::client_secure(index, "load-node", cluster_id()), Some("load-node")).unwrap()
}

fn hostile_clients(addr: SocketAddr, idle: u32) -> Hostile {
    let idle = (0..idle).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (mut garbage, garbage_replies) = connect(addr, 902);
    garbage.send_raw(&[0x5a; 4096]).unwrap();
    let (mut cut, _) = connect(addr, 900);
    let frame = FrameTemplate::setup(900, cluster_id()).fill(1, 1, true).to_vec();
    cut.send_raw(&frame[..frame.len() / 2]).unwrap();
    drop(cut);
    let (mut deaf, deaf_replies) = connect(addr, 901);
    deaf.send_raw(FrameTemplate::setup(901, cluster_id()).fill(1, 1, true)).unwrap();
    let mut steady = FrameTemplate::steady(901, 64, "load-node", cluster_id());
    for seq in 2..=2000u64 {
        deaf.send_raw(steady.fill(seq, 4 + (seq - 2) * 64, true)).unwrap();
    }
    Hostile { _idle: idle, _deaf: (deaf, deaf_replies), garbage: garbage_replies }
}

/// The load clients the node's genesis admits (their test keys; 900 and 901 are the
/// hostile ones).
fn clients() -> Vec<String> {
    (0..1024).map(loadgen::load_origin).collect()
}

fn cluster_id() -> [u8; 16] {
    let mut names = vec!["load-node".to_string()];
    names.extend(clients());
    meshos::trust::Genesis::for_tests(&names).cluster_id()
}

fn start_node(dir: &Path, connections_max: u32) -> meshos::node::run::Background {
    meshos::sim::fixtures::trust_test_node_dir(dir, "load-node", &clients());
    let text = format!(
        "name = \"load-node\"\ndata_dir = \"{}\"\nlog_level = \"warn\"\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\nconnections_max = {connections_max}\nconnections_per_address_max = {connections_max}\n\
         handshake_connections_max = {connections_max}\nhandshake_per_address_max = {connections_max}\n",
        dir.display()
    );
    meshos::node::run::spawn(NodeConfig::parse(&text).unwrap()).expect("the node starts")
}

fn main() {
    let flags = parse_flags();
    let frames_per_connection = (flags.events / flags.events_per_frame as u64 / flags.connections as u64).max(1);
    let mut template = FrameTemplate::steady(0, flags.events_per_frame, "load-node", cluster_id());
    let frame = template.fill(2, 4, true).to_vec();
    let bytes_per_event = frame.len() as f64 / flags.events_per_frame as f64;

    let (raw_seconds, raw_bytes) =
        raw_loopback(flags.connections, frames_per_connection, &frame, flags.frames_per_write);
    let raw_events_per_second = raw_bytes as f64 / bytes_per_event / raw_seconds;

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), flags.idle + flags.connections + 64);
    let addr = node.addr;
    let hostile = flags.hostile.then(|| hostile_clients(addr, flags.idle));
    let options = LoadOptions {
        connections: flags.connections,
        first_index: 0,
        events_per_frame: flags.events_per_frame,
        frames_per_connection,
        frames_per_write: flags.frames_per_write,
        peer: "load-node".to_string(),
        resume_after: 0,
        cluster_id: cluster_id(),
    };
    let started = Instant::now();
    let results = loadgen::run(addr, &options, Duration::from_secs(120));
    let seconds = started.elapsed().as_secs_f64();
    let garbage_answered = hostile.map(|mut hostile| {
        matches!(hostile.garbage.next_ack(Some(Duration::from_secs(10))), Err(ClientError::Rejected(_)))
    });
    let report = node.stop().expect("the node stops cleanly");

    let sent: u64 = results.iter().map(|result| result.events_sent).sum();
    let acked: u64 = results.iter().map(|result| result.events_acked).sum();
    let errors: Vec<&String> = results.iter().filter_map(|result| result.error.as_ref()).collect();
    let mut latencies: Vec<u32> = results.iter().flat_map(|result| result.ack_latency_us.iter().copied()).collect();
    latencies.sort_unstable();
    let events_per_second = acked as f64 / seconds;
    let (p50, p99, p999) = (
        loadgen::percentile(&latencies, 500),
        loadgen::percentile(&latencies, 990),
        loadgen::percentile(&latencies, 999),
    );
    let commits = report.sequencer.commits.max(1);
    let mut commit_us = report.sequencer.commit_us_samples.clone();
    commit_us.sort_unstable();
    let (commit_p50, commit_p99, commit_p999) = (
        loadgen::percentile(&commit_us, 500),
        loadgen::percentile(&commit_us, 990),
        loadgen::percentile(&commit_us, 999),
    );
    println!(
        "raw loopback: {} connections, {:.1} M events/s equivalent ({:.0} MB/s, {:.1} bytes/event)",
        flags.connections,
        raw_events_per_second / 1e6,
        raw_bytes as f64 / raw_seconds / 1e6,
        bytes_per_event
    );
    println!(
        "node: {} connections{}: {:.2} M events/s end to end ({} sent, {} acknowledged in {:.2} s), {:.0}% of raw loopback",
        flags.connections,
        if flags.hostile { " + hostile clients" } else { "" },
        events_per_second / 1e6,
        sent,
        acked,
        seconds,
        100.0 * events_per_second / raw_events_per_second
    );
    println!(
        "ack latency (send to durable ack): p50 {} us, p99 {} us, p999 {} us; {} commits ({:.1} records each), slowest {} us",
        p50,
        p99,
        p999,
        commits,
        report.sequencer.records as f64 / commits as f64,
        report.sequencer.commit_us_max
    );
    println!("commit latency (appends + one fsync per group): p50 {commit_p50} us, p99 {commit_p99} us, p999 {commit_p999} us");
    println!(
        "node report: position {} events applied {} rejected {} backpressure raised {} lowered {}; reactor errors {:?}, mid-frame {}",
        report.position,
        report.events_applied,
        report.rejected,
        report.sequencer.backpressure_raised,
        report.sequencer.backpressure_lowered,
        report.reactor.errors_by_reason,
        report.reactor.disconnected_mid_frame
    );
    if let Some(answered) = garbage_answered {
        println!("hostile: garbage client answered with an error frame: {answered}");
    }
    if !errors.is_empty() {
        println!("client errors: {errors:?}");
    }
    if flags.json {
        println!(
            "{{\"connections\":{},\"hostile\":{},\"events_per_second\":{:.0},\"raw_events_per_second\":{:.0},\"ack_p50_us\":{p50},\"ack_p99_us\":{p99},\"ack_p999_us\":{p999},\"commit_p50_us\":{commit_p50},\"commit_p99_us\":{commit_p99},\"commit_p999_us\":{commit_p999},\"sent\":{sent},\"acked\":{acked},\"commits\":{commits}}}",
            flags.connections, flags.hostile, events_per_second, raw_events_per_second
        );
    }
    assert_eq!(sent, acked, "every event sent was acknowledged");
}
