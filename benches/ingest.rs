//! Ingest end to end: events per second from 1, 16 and 256 loopback connections into
//! a real node (reactor, sequencer, embedded log with one fsync per group, fold and
//! reconcile), each iteration sending `EVENTS_PER_ITERATION` small events and waiting
//! until every one is acknowledged (acknowledged means durable and folded); beside it,
//! `raw_loopback` pushes the same bytes through plain sockets into a discarding reader.
//!
//! Every connection is what a real client is: it completes the secure channel's
//! handshake as an admitted node identity, every byte after is encrypted (AES-GCM),
//! and every frame is a record signed with the client's key, which fold verifies.
//! Signing and verifying cost per frame, not per event, so `ingest/node/*` sends
//! frames of `EVENTS_PER_FRAME` (2,048 events, about 140 KB: what a bulk client
//! batches), and `ingest/node_small_frames/16` the same load in frames of 64 events,
//! where the two signatures per frame dominate.
//! Commit latency percentiles and the hostile-client comparison come from the load
//! tool (`perf/load.rs`), recorded in `perf/ingest.md`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshos::loadgen::{self, FrameTemplate, LoadOptions};
use meshos::node::config::NodeConfig;

const EVENTS_PER_ITERATION: u64 = 1 << 20;
const EVENTS_PER_FRAME: u32 = 2048;
const SMALL_EVENTS_PER_FRAME: u32 = 64;
const FRAMES_PER_WRITE: u32 = 8;

/// The node's genesis admits the load clients `load-0`.. (their test keys).
fn start_node(dir: &std::path::Path) -> meshos::node::run::Background {
    let clients: Vec<String> = (0..256).map(loadgen::load_origin).collect();
    meshos::sim::fixtures::trust_test_node_dir(dir, "bench-node", &clients);
    let text = format!(
        "name = \"bench-node\"\ndata_dir = \"{}\"\nlog_level = \"warn\"\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\nconnections_per_address_max = 1024\n\
         handshake_per_address_max = 1024\nhandshake_connections_max = 1024\n",
        dir.display()
    );
    meshos::node::run::spawn(NodeConfig::parse(&text).unwrap()).expect("the node starts")
}

fn cluster_id() -> [u8; 16] {
    let mut names = vec!["bench-node".to_string()];
    names.extend((0..256).map(loadgen::load_origin));
    meshos::trust::Genesis::for_tests(&names).cluster_id()
}

fn node_end_to_end(c: &mut Criterion) {
    for (name, events_per_frame, connection_counts) in [
        ("ingest/node", EVENTS_PER_FRAME, &[1u32, 16, 256][..]),
        ("ingest/node_small_frames", SMALL_EVENTS_PER_FRAME, &[16u32][..]),
    ] {
        bench_node(c, name, events_per_frame, connection_counts);
    }
}

fn bench_node(c: &mut Criterion, name: &str, events_per_frame: u32, connection_counts: &[u32]) {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(EVENTS_PER_ITERATION));
    for &connections in connection_counts {
        group.bench_function(format!("{connections}"), |b| {
            b.iter_custom(|iterations| {
                // A fresh node per sample (not timed), so the log of earlier samples
                // does not pile up in the page cache and skew later ones.
                let dir = tempfile::tempdir().unwrap();
                let node = start_node(dir.path());
                let addr = node.addr;
                // The same origins every iteration (a fixed set of clients), their
                // sequence numbers continuing.
                let mut sent_per_origin = 0u64;
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let options = LoadOptions {
                        connections,
                        first_index: 0,
                        events_per_frame,
                        frames_per_connection: EVENTS_PER_ITERATION / events_per_frame as u64 / connections as u64,
                        frames_per_write: FRAMES_PER_WRITE,
                        peer: "bench-node".to_string(),
                        resume_after: sent_per_origin,
                        cluster_id: cluster_id(),
                    };
                    let started = Instant::now();
                    let results = loadgen::run(addr, &options, Duration::from_secs(60));
                    total += started.elapsed();
                    for result in &results {
                        assert_eq!(result.error, None);
                        assert_eq!(result.events_acked, result.events_sent);
                    }
                    sent_per_origin += results[0].events_sent;
                }
                node.stop().expect("the node stops cleanly");
                total
            })
        });
    }
    group.finish();
}

fn raw_loopback(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest/raw_loopback");
    group.sample_size(10).throughput(Throughput::Elements(EVENTS_PER_ITERATION));
    let frame = FrameTemplate::steady(0, EVENTS_PER_FRAME, "bench-node", cluster_id()).fill(2, 4, true).to_vec();
    let chunk: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * FRAMES_PER_WRITE as usize).collect();
    for connections in [1u32, 16, 256] {
        let frames_per_connection = EVENTS_PER_ITERATION / EVENTS_PER_FRAME as u64 / connections as u64;
        group.bench_function(format!("{connections}"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                    let addr = listener.local_addr().unwrap();
                    let readers = std::thread::spawn(move || {
                        let handles: Vec<_> = (0..connections)
                            .map(|_| {
                                let (mut stream, _) = listener.accept().unwrap();
                                std::thread::spawn(move || {
                                    let mut buffer = vec![0u8; 64 << 10];
                                    while matches!(stream.read(&mut buffer), Ok(count) if count > 0) {}
                                })
                            })
                            .collect();
                        handles.into_iter().for_each(|handle| handle.join().unwrap());
                    });
                    let streams: Vec<TcpStream> = (0..connections).map(|_| TcpStream::connect(addr).unwrap()).collect();
                    let started = Instant::now();
                    let writers: Vec<_> = streams
                        .into_iter()
                        .map(|mut stream| {
                            let chunk = chunk.clone();
                            std::thread::spawn(move || {
                                let mut sent = 0;
                                while sent < frames_per_connection {
                                    stream.write_all(&chunk).unwrap();
                                    sent += FRAMES_PER_WRITE as u64;
                                }
                            })
                        })
                        .collect();
                    writers.into_iter().for_each(|writer| writer.join().unwrap());
                    readers.join().unwrap();
                    total += started.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, node_end_to_end, raw_loopback);
criterion_main!(benches);
