//! The reactor end to end on loopback: every event sent arrives once, in order per
//! connection, through pauses and resumes; bad input and excess connections get an
//! error frame and close alone; Unix sockets work; shutdown joins.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshos::event::{Event, EventBatch, EventKind, NodeHealth};
use meshos::ingest::park::Signal;
use meshos::sys::reactor::{Reactor, ReactorConfig, ReactorError, Resumer, Source, SourceKind, ERROR_REASONS};
use meshos::wire::{self, FrameKind};

const FRAME_BYTES_MAX: u32 = 64 << 10;
/// The reactor reads at most 16 chunks of 64 KiB per connection per round.
const READ_BUDGET_BYTES: usize = 16 * (64 << 10);
const WAIT_LIMIT: Duration = Duration::from_secs(10);

fn tcp_config(queue_frames: u32, connections_max: u32) -> ReactorConfig {
    ReactorConfig {
        listen_tcp: Some("127.0.0.1:0".parse().unwrap()),
        listen_unix: None,
        connections_max,
        connection_buffer_bytes: 256 << 10,
        queue_frames,
        frame_bytes_max: FRAME_BYTES_MAX,
    }
}

/// Frame `seq` (from 1) of client `client`: `events_per_frame` heartbeats whose
/// origin names the client and whose `origin_seq` continues across frames.
fn events_frame(client: u64, seq: u64, events_per_frame: u64) -> Vec<u8> {
    let events = (0..events_per_frame)
        .map(|index| Event {
            origin: format!("client-{client}"),
            origin_seq: (seq - 1) * events_per_frame + index + 1,
            kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 }),
        })
        .collect();
    let payload = wire::encode_batch(&EventBatch { events });
    let mut frame = Vec::new();
    wire::encode_frame(&mut frame, FrameKind::Events, seq, 0, &payload);
    frame
}

/// What the test consumer saw.
#[derive(Default)]
struct Consumed {
    /// Per source id: the frame seqs in pop order.
    seqs: HashMap<u64, Vec<u64>>,
    /// Per source id: the origin of its events (one client per connection).
    origins: HashMap<u64, String>,
    kinds: HashMap<u64, SourceKind>,
    events: u64,
    abandoned: u64,
    resumes: u64,
    /// Anything wrong in a frame (the test fails on it).
    errors: Vec<String>,
}

struct Consumer {
    consumed: Arc<Mutex<Consumed>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Consumer {
    fn spawn(signal: Arc<Signal>, new_sources: Receiver<Source>, resumer: Resumer, frame_delay: Duration) -> Consumer {
        let consumed = Arc::new(Mutex::new(Consumed::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (consumed, stop) = (Arc::clone(&consumed), Arc::clone(&stop));
            std::thread::spawn(move || consume(signal, new_sources, resumer, frame_delay, consumed, stop))
        };
        Consumer { consumed, stop, thread }
    }

    fn wait_for(&self, what: &str, done: impl Fn(&Consumed) -> bool) {
        let start = Instant::now();
        loop {
            {
                let consumed = self.consumed.lock().unwrap();
                assert!(consumed.errors.is_empty(), "consumer saw bad frames: {:?}", consumed.errors);
                if done(&consumed) {
                    return;
                }
            }
            assert!(start.elapsed() < WAIT_LIMIT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(self) -> Consumed {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap();
        Arc::try_unwrap(self.consumed).ok().unwrap().into_inner().unwrap()
    }
}

fn consume(
    signal: Arc<Signal>,
    new_sources: Receiver<Source>,
    resumer: Resumer,
    frame_delay: Duration,
    consumed: Arc<Mutex<Consumed>>,
    stop: Arc<AtomicBool>,
) {
    let mut sources: Vec<Source> = Vec::new();
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    loop {
        let mut progress = false;
        while let Ok(source) = new_sources.try_recv() {
            consumed.lock().unwrap().kinds.insert(source.id, source.kind);
            sources.push(source);
            progress = true;
        }
        for source in &mut sources {
            let mut popped = 0;
            while let Some(frame) = source.frames.pop() {
                popped += 1;
                if !frame_delay.is_zero() {
                    std::thread::sleep(frame_delay);
                }
                let mut consumed = consumed.lock().unwrap();
                match wire::decode_frame(&frame, FRAME_BYTES_MAX) {
                    Ok(decoded) => {
                        aligned.clear();
                        aligned.extend_from_slice(decoded.payload);
                        match wire::access_batch(&aligned) {
                            Ok(batch) => {
                                consumed.events += batch.events.len() as u64;
                                consumed.seqs.entry(source.id).or_default().push(decoded.header.seq);
                                if let Some(first) = batch.events.first() {
                                    let origin = first.origin.as_str().to_string();
                                    let known =
                                        consumed.origins.entry(source.id).or_insert_with(|| origin.clone()).clone();
                                    if known != origin {
                                        consumed
                                            .errors
                                            .push(format!("source {} mixes {known} and {origin}", source.id));
                                    }
                                }
                            }
                            Err(error) => consumed.errors.push(format!("source {}: {error}", source.id)),
                        }
                    }
                    Err(error) => consumed.errors.push(format!("source {}: {error}", source.id)),
                }
                if popped % 4 == 0 && source.frames.take_unblocked() {
                    consumed.resumes += 1;
                    resumer.resume(source.id);
                }
            }
            if popped > 0 {
                progress = true;
                if source.frames.take_unblocked() {
                    consumed.lock().unwrap().resumes += 1;
                    resumer.resume(source.id);
                }
            }
        }
        let before = sources.len();
        sources.retain(|source| !source.frames.is_abandoned());
        consumed.lock().unwrap().abandoned += (before - sources.len()) as u64;
        if !progress {
            if stop.load(Ordering::Acquire) {
                return;
            }
            signal.wait(Some(20));
        }
    }
}

/// Sends `frames` frames of `events_per_frame` events as client `client`, then closes.
fn send_frames(mut stream: impl Write, client: u64, frames: u64, events_per_frame: u64) {
    for seq in 1..=frames {
        stream.write_all(&events_frame(client, seq, events_per_frame)).unwrap();
    }
    stream.flush().unwrap();
}

fn tcp_client(addr: SocketAddr, client: u64, frames: u64, events_per_frame: u64) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let stream = TcpStream::connect(addr).unwrap();
        send_frames(stream, client, frames, events_per_frame);
    })
}

/// Reads until the reactor closes the connection and decodes the one error frame.
fn read_error_frame(mut stream: impl Read) -> String {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).unwrap();
    let frame = wire::decode_frame(&bytes, FRAME_BYTES_MAX).expect("an error frame");
    assert_eq!(frame.header.kind, FrameKind::Error);
    assert_eq!(frame.header.frame_bytes(), bytes.len(), "exactly one frame before the close");
    String::from_utf8(frame.payload.to_vec()).unwrap()
}

fn connect_with_timeout(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    stream
}

fn start(config: ReactorConfig, frame_delay: Duration) -> (Reactor, Consumer) {
    let signal = Signal::new();
    let (reactor, new_sources) = Reactor::start(config, Arc::clone(&signal)).unwrap();
    let consumer = Consumer::spawn(signal, new_sources, reactor.resumer(), frame_delay);
    (reactor, consumer)
}

fn assert_in_order(consumed: &Consumed, frames_per_source: u64) {
    for (source, seqs) in &consumed.seqs {
        let expected: Vec<u64> = (1..=frames_per_source).collect();
        assert!(*seqs == expected, "source {source}: {} frames, not 1..={frames_per_source} in order", seqs.len());
    }
}

#[test]
fn four_clients_every_event_arrives_once_in_order() {
    const CLIENTS: u64 = 4;
    const FRAMES: u64 = 500;
    const EVENTS_PER_FRAME: u64 = 3;
    let (reactor, consumer) = start(tcp_config(64, 16), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let clients: Vec<_> = (0..CLIENTS).map(|client| tcp_client(addr, client, FRAMES, EVENTS_PER_FRAME)).collect();
    for client in clients {
        client.join().unwrap();
    }
    consumer.wait_for("every event and every close", |consumed| {
        consumed.events == CLIENTS * FRAMES * EVENTS_PER_FRAME && consumed.abandoned == CLIENTS
    });
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_eq!(consumed.events, CLIENTS * FRAMES * EVENTS_PER_FRAME);
    assert_eq!(consumed.seqs.len() as u64, CLIENTS);
    assert_in_order(&consumed, FRAMES);
    let mut origins: Vec<&String> = consumed.origins.values().collect();
    origins.sort();
    origins.dedup();
    assert_eq!(origins.len() as u64, CLIENTS, "one client per source");
    assert_eq!((stats.accepted, stats.closed, stats.frames_in), (CLIENTS, CLIENTS, CLIENTS * FRAMES));
    assert_eq!(stats.errors_by_reason, [0; ERROR_REASONS.len()]);
    assert_eq!(stats.disconnected_mid_frame, 0);
}

#[test]
fn garbage_gets_an_error_frame_and_closes_alone() {
    const FRAMES: u64 = 300;
    let (reactor, consumer) = start(tcp_config(8, 16), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let good: Vec<_> = (0..2).map(|client| tcp_client(addr, client, FRAMES, 2)).collect();

    let mut garbage = connect_with_timeout(addr);
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: meshos\r\nAccept: */*\r\nUser-Agent: test\r\n\r\n").unwrap();
    let text = read_error_frame(&mut garbage);
    assert!(text.contains("bad magic"), "{text}");

    // A frame whose header announces more than frame_bytes_max.
    let mut oversized = connect_with_timeout(addr);
    let mut frame = events_frame(9, 1, 1);
    frame[8..12].copy_from_slice(&(FRAME_BYTES_MAX * 2).to_le_bytes());
    oversized.write_all(&frame).unwrap();
    let text = read_error_frame(&mut oversized);
    assert!(text.contains("exceeds the limit"), "{text}");

    // A valid frame of a kind clients may not send.
    let mut record = connect_with_timeout(addr);
    let mut frame = Vec::new();
    wire::encode_frame(&mut frame, FrameKind::Record, 1, 5, &wire::encode_batch(&EventBatch { events: vec![] }));
    record.write_all(&frame).unwrap();
    let text = read_error_frame(&mut record);
    assert!(text.contains("Record"), "{text}");

    for client in good {
        client.join().unwrap();
    }
    consumer.wait_for("the good clients' events", |consumed| consumed.events == 2 * FRAMES * 2);
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_eq!(consumed.events, 2 * FRAMES * 2);
    assert_in_order(&consumed, FRAMES);
    let index = |code: &str| ERROR_REASONS.iter().position(|known| *known == code).unwrap();
    assert_eq!(stats.errors_by_reason[index("bad_magic")], 1);
    assert_eq!(stats.errors_by_reason[index("oversized")], 1);
    assert_eq!(stats.errors_by_reason.iter().sum::<u64>(), 2);
    assert_eq!(stats.unexpected_kind, 1);
    assert_eq!(stats.frames_in, 2 * FRAMES);
}

#[test]
fn a_partial_frame_from_a_departed_peer_is_discarded() {
    let (reactor, consumer) = start(tcp_config(8, 16), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    {
        let mut stream = TcpStream::connect(addr).unwrap();
        for seq in 1..=3 {
            stream.write_all(&events_frame(1, seq, 4)).unwrap();
        }
        let next = events_frame(1, 4, 4);
        stream.write_all(&next[..next.len() / 2]).unwrap();
    }
    consumer.wait_for("three frames and the close", |consumed| consumed.events == 12 && consumed.abandoned == 1);
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_in_order(&consumed, 3);
    assert_eq!(consumed.events, 12);
    assert_eq!((stats.frames_in, stats.disconnected_mid_frame, stats.closed), (3, 1, 1));
}

/// One client streams megabytes into a long ring while another sends a little: the
/// stream is read in budgeted rounds and both arrive whole.
#[test]
fn a_big_stream_is_read_in_rounds() {
    const BIG_FRAMES: u64 = 400;
    const BIG_EVENTS: u64 = 100;
    let (reactor, consumer) = start(tcp_config(4096, 16), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let frames: Vec<u8> = (1..=BIG_FRAMES).flat_map(|seq| events_frame(1, seq, BIG_EVENTS)).collect();
    assert!(frames.len() > 2 * READ_BUDGET_BYTES, "the stream must exceed a round's budget");
    let big = std::thread::spawn(move || TcpStream::connect(addr).unwrap().write_all(&frames).unwrap());
    let small = tcp_client(addr, 2, 50, 1);
    big.join().unwrap();
    small.join().unwrap();
    let expected = BIG_FRAMES * BIG_EVENTS + 50;
    consumer.wait_for("every event", |consumed| consumed.events == expected && consumed.abandoned == 2);
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    for seqs in consumed.seqs.values() {
        assert!(seqs.iter().copied().eq(1..=seqs.len() as u64), "out of order");
    }
    assert_eq!(stats.frames_in, BIG_FRAMES + 50);
    eprintln!("{} bytes in, budget spent {} times", stats.bytes_in, stats.budget_spent);
}

#[test]
fn a_slow_consumer_pauses_and_resumes_without_loss() {
    const CLIENTS: u64 = 2;
    const FRAMES: u64 = 2_000;
    let (reactor, consumer) = start(tcp_config(2, 16), Duration::from_micros(20));
    let addr = reactor.local_tcp_addr().unwrap();
    let clients: Vec<_> = (0..CLIENTS).map(|client| tcp_client(addr, client, FRAMES, 2)).collect();
    for client in clients {
        client.join().unwrap();
    }
    consumer
        .wait_for("every event", |consumed| consumed.events == CLIENTS * FRAMES * 2 && consumed.abandoned == CLIENTS);
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_in_order(&consumed, FRAMES);
    assert_eq!(stats.frames_in, CLIENTS * FRAMES);
    assert!(stats.pauses >= 10, "only {} pauses", stats.pauses);
    assert!(consumed.resumes >= stats.resumes, "the reactor resumed without being asked");
    assert_eq!(stats.paused_now, 0);
    eprintln!("{} pauses, {} resumes, {} resume calls", stats.pauses, stats.resumes, consumed.resumes);
}

#[test]
fn one_connection_over_the_limit_gets_an_error_frame() {
    let (reactor, consumer) = start(tcp_config(8, 2), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let mut first = connect_with_timeout(addr);
    let mut second = connect_with_timeout(addr);
    let start = Instant::now();
    while reactor.stats().accepted < 2 {
        assert!(start.elapsed() < WAIT_LIMIT, "two connections not accepted");
        std::thread::sleep(Duration::from_millis(2));
    }
    let third = connect_with_timeout(addr);
    let text = read_error_frame(third);
    assert!(text.contains("connections_max"), "{text}");
    first.write_all(&events_frame(1, 1, 1)).unwrap();
    second.write_all(&events_frame(2, 1, 1)).unwrap();
    consumer.wait_for("both admitted clients", |consumed| consumed.events == 2);
    let stats = reactor.shutdown();
    // Shutdown closed the admitted connections: their reads see the end.
    assert_eq!(first.read(&mut [0u8; 16]).unwrap(), 0);
    let consumed = consumer.finish();
    assert_eq!(consumed.abandoned, 2);
    assert_eq!((stats.accepted, stats.rejected_connections, stats.closed), (2, 1, 2));
}

#[test]
fn a_unix_socket_client_is_read_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdk.sock");
    let config = ReactorConfig { listen_tcp: None, listen_unix: Some(path.clone()), ..tcp_config(4, 4) };
    let (reactor, consumer) = start(config, Duration::ZERO);
    assert_eq!(reactor.local_tcp_addr(), None);
    let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    send_frames(stream, 7, 200, 3);
    consumer.wait_for("every event", |consumed| consumed.events == 600 && consumed.abandoned == 1);
    let stats = reactor.shutdown();
    assert!(!path.exists(), "the socket file is removed on shutdown");
    let consumed = consumer.finish();
    assert_in_order(&consumed, 200);
    assert_eq!(consumed.kinds.values().copied().collect::<Vec<_>>(), vec![SourceKind::Unix]);
    assert_eq!(stats.frames_in, 200);
}

#[test]
fn shutdown_joins_with_connections_open_and_paused() {
    // No consumer thread: the test holds the sources, so one ring stays full.
    let signal = Signal::new();
    let (reactor, new_sources) = Reactor::start(tcp_config(2, 16), Arc::clone(&signal)).unwrap();
    let addr = reactor.local_tcp_addr().unwrap();
    let mut idle = connect_with_timeout(addr);
    let mut busy = connect_with_timeout(addr);
    for seq in 1..=10 {
        busy.write_all(&events_frame(1, seq, 1)).unwrap();
    }
    let start = Instant::now();
    while reactor.stats().paused_now < 1 {
        assert!(start.elapsed() < WAIT_LIMIT, "the busy source never paused: {:?}", reactor.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
    let started = Instant::now();
    let stats = reactor.shutdown();
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown took {:?}", started.elapsed());
    assert_eq!((stats.accepted, stats.closed, stats.paused_now, stats.pauses), (2, 2, 0, 1));
    assert_eq!(stats.frames_in, 2, "a ring of 2 took two frames");
    // Both peers see the close; the frames pushed before shutdown are still there.
    assert_eq!(idle.read(&mut [0u8; 16]).unwrap(), 0);
    assert!(matches!(busy.read(&mut [0u8; 16]), Ok(0) | Err(_)));
    let mut sources: Vec<Source> = new_sources.try_iter().collect();
    assert_eq!(sources.len(), 2);
    let mut frames = 0;
    for source in &mut sources {
        while source.frames.pop().is_some() {
            frames += 1;
        }
        assert!(source.frames.is_abandoned());
    }
    assert_eq!(frames, 2);
}

#[test]
fn a_configuration_that_cannot_hold_a_frame_is_refused() {
    let config = ReactorConfig { connection_buffer_bytes: FRAME_BYTES_MAX - 1, ..tcp_config(8, 8) };
    match Reactor::start(config, Signal::new()) {
        Err(ReactorError::Config { field, .. }) => assert_eq!(field, "connection_buffer_bytes"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("started with a buffer smaller than a frame"),
    }
}
