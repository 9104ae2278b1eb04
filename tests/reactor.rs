//! The reactor end to end on loopback: every event sent arrives once, in order per
//! connection, through pauses and resumes; bad input and excess connections get an
//! error frame and close alone; Unix sockets work; shutdown joins. The reply path:
//! acks reach the client cumulative and in order, a client that never reads its acks
//! costs a bounded amount and slows nobody, a consumer's `Close` answers with an error
//! frame, and a paused source still gets its acks.

mod common;

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
use meshos::sys::client::Client;
use meshos::sys::reactor::{
    Command, Reactor, ReactorConfig, ReactorError, ReactorStats, Resumer, Source, SourceKind, ERROR_REASONS,
};
use meshos::sys::secure::{Channel, LocalIdentity, SecureConfig, StaticPeerKeys};
use meshos::wire::{self, FrameError, FrameHeader, FrameKind};

const FRAME_BYTES_MAX: u32 = 64 << 10;
/// The reactor reads at most 16 chunks of 64 KiB per connection per round.
const READ_BUDGET_BYTES: usize = 16 * (64 << 10);
const WAIT_LIMIT: Duration = Duration::from_secs(10);

fn tcp_config(queue_frames: u32, connections_max: u32) -> ReactorConfig {
    ReactorConfig {
        listen_tcp: Some("127.0.0.1:0".parse().unwrap()),
        listen_unix: None,
        connections_max,
        local_connections_max: 64,
        // Tests connect many clients from 127.0.0.1.
        connections_per_address_max: 1 << 16,
        connection_buffer_bytes: 256 << 10,
        partial_frame_bytes_max: 1 << 30,
        idle_timeout_ms: 600_000,
        frame_timeout_ms: 600_000,
        rejection_log_interval_ms: 10_000,
        handshake_connections_max: 64,
        handshake_per_address_max: 64,
        handshake_timeout_ms: 5_000,
        queue_frames,
        queue_bytes_max: 1 << 30,
        queue_bytes_total_max: 1 << 40,
        frame_bytes_max: FRAME_BYTES_MAX,
    }
}

/// Frame `seq` (from 1) of client `client`: `events_per_frame` heartbeats whose
/// origin names the client and whose `origin_seq` continues across frames.
fn events_frame(client: u64, seq: u64, events_per_frame: u64) -> Vec<u8> {
    client_frame(FrameKind::Events, client, seq, events_per_frame)
}

/// As `events_frame`, asking for an acknowledgement.
fn ack_wanted_frame(client: u64, seq: u64, events_per_frame: u64) -> Vec<u8> {
    client_frame(FrameKind::EventsAckWanted, client, seq, events_per_frame)
}

fn client_frame(kind: FrameKind, client: u64, seq: u64, events_per_frame: u64) -> Vec<u8> {
    let events = (0..events_per_frame)
        .map(|index| Event {
            origin: format!("client-{client}"),
            origin_seq: (seq - 1) * events_per_frame + index + 1,
            kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 }),
        })
        .collect();
    let payload = wire::encode_batch(&EventBatch { events });
    let mut frame = Vec::new();
    wire::encode_frame(&mut frame, kind, seq, 0, &payload);
    frame
}

/// The commit time the test consumer stamps on an ack of log `position`.
fn commit_time_ms(position: u64) -> u64 {
    1_000_000 + position
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
    /// The most frames seen in one ring at a pop.
    queued_max: u64,
    abandoned: u64,
    resumes: u64,
    /// Frames popped from every source: the test's stand-in for a log position.
    position: u64,
    /// `Ack` commands sent (one per drain of a source that sent `EventsAckWanted`).
    acks: u64,
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
    let mut commands: Vec<Command> = Vec::new();
    loop {
        let mut progress = false;
        while let Ok(source) = new_sources.try_recv() {
            consumed.lock().unwrap().kinds.insert(source.id, source.kind);
            sources.push(source);
            progress = true;
        }
        for source in &mut sources {
            let mut popped = 0;
            let mut ack_seq = None;
            loop {
                // Frames left behind this one: the most a ring ever held (+1).
                let queued = source.frames.len();
                let Some(frame) = source.frames.pop() else { break };
                popped += 1;
                {
                    let mut consumed = consumed.lock().unwrap();
                    consumed.queued_max = consumed.queued_max.max(queued as u64);
                }
                if !frame_delay.is_zero() {
                    std::thread::sleep(frame_delay);
                }
                let mut consumed = consumed.lock().unwrap();
                consumed.position += 1;
                match wire::decode_frame(&frame.bytes, FRAME_BYTES_MAX) {
                    Ok(decoded) => {
                        if decoded.header.kind == FrameKind::EventsAckWanted {
                            ack_seq = Some(decoded.header.seq);
                        }
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
                let mut consumed = consumed.lock().unwrap();
                // One cumulative ack per drain, as a sequencer acks a commit group.
                if let Some(seq) = ack_seq {
                    let position = consumed.position;
                    let time_ms = commit_time_ms(position);
                    commands.push(Command::Ack { source: source.id, seq, position, time_ms });
                    consumed.acks += 1;
                }
                if source.frames.take_unblocked() {
                    consumed.resumes += 1;
                    commands.push(Command::Resume { source: source.id });
                }
            }
        }
        resumer.send(&mut commands);
        assert!(commands.is_empty(), "send drains the commands");
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

/// One acknowledgement as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AckSeen {
    seq: u64,
    position: u64,
    time_ms: u64,
}

/// Reads one whole, checked frame; `None` when the stream ends at a frame boundary.
fn read_frame(stream: &mut impl Read) -> Option<(FrameHeader, Vec<u8>)> {
    let mut header = [0u8; wire::HEADER_BYTES];
    let mut filled = 0;
    while filled < header.len() {
        match stream.read(&mut header[filled..]) {
            Ok(0) => {
                assert_eq!(filled, 0, "the stream ends inside a frame header");
                return None;
            }
            Ok(count) => filled += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => panic!("reading a frame: {error}"),
        }
    }
    let decoded = wire::decode_header(&header, FRAME_BYTES_MAX).expect("a frame header");
    let mut frame = header.to_vec();
    frame.resize(decoded.frame_bytes(), 0);
    stream.read_exact(&mut frame[wire::HEADER_BYTES..]).expect("the rest of the frame");
    let checked = wire::decode_frame(&frame, FRAME_BYTES_MAX).expect("a valid frame");
    Some((checked.header, checked.payload.to_vec()))
}

/// Reads acks until the one for `final_seq`; every frame must be an ack, with seqs
/// and positions strictly increasing.
fn read_acks_until(stream: &mut impl Read, final_seq: u64) -> Vec<AckSeen> {
    let mut acks: Vec<AckSeen> = Vec::new();
    loop {
        let (header, payload) = read_frame(stream).expect("the connection ended before the final ack");
        assert_eq!(header.kind, FrameKind::Ack, "only acks come back on this connection");
        let position = wire::ack_position(&payload).expect("an ack payload");
        assert_eq!(&payload[8..], &[0u8; 8], "the ack payload ends in 8 zero bytes");
        let ack = AckSeen { seq: header.seq, position, time_ms: header.time_ms };
        if let Some(last) = acks.last() {
            assert!(ack.seq > last.seq && ack.position > last.position, "{ack:?} after {last:?}");
        }
        assert!(ack.seq <= final_seq, "{ack:?} beyond the final seq {final_seq}");
        acks.push(ack);
        if ack.seq == final_seq {
            return acks;
        }
    }
}

/// Client `client` sends `frames` `EventsAckWanted` frames while another thread
/// reads its acks; returns the acks once frame `frames` is acknowledged, then closes.
fn acking_client(addr: SocketAddr, client: u64, frames: u64) -> JoinHandle<Vec<AckSeen>> {
    std::thread::spawn(move || {
        let stream = connect_with_timeout(addr);
        let mut reader = stream.try_clone().unwrap();
        let reading = std::thread::spawn(move || read_acks_until(&mut reader, frames));
        let mut writer = &stream;
        for seq in 1..=frames {
            writer.write_all(&ack_wanted_frame(client, seq, 1)).unwrap();
        }
        reading.join().unwrap()
    })
}

/// The source id of client `client` once the consumer popped `frames` of its frames.
fn source_with_frames(consumed: &Consumed, client: u64, frames: u64) -> Option<u64> {
    let origin = format!("client-{client}");
    let (id, _) = consumed.origins.iter().find(|(_, known)| **known == origin)?;
    (consumed.seqs.get(id)?.len() as u64 == frames).then_some(*id)
}

/// Polls the reactor's counters until `done` holds.
fn wait_for_stats(reactor: &Reactor, what: &str, done: impl Fn(&ReactorStats) -> bool) -> ReactorStats {
    let start = Instant::now();
    loop {
        let stats = reactor.stats();
        if done(&stats) {
            return stats;
        }
        assert!(start.elapsed() < WAIT_LIMIT, "timed out waiting for {what}: {stats:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ack_command(source: u64, seq: u64) -> Command {
    Command::Ack { source, seq, position: seq, time_ms: commit_time_ms(seq) }
}

/// Sends one ack per call, as a sequencer committing one frame at a time would.
fn send_acks_one_by_one(reactor: &Reactor, source: u64, seqs: std::ops::RangeInclusive<u64>) {
    let mut commands = Vec::with_capacity(1);
    for seq in seqs {
        commands.push(ack_command(source, seq));
        reactor.send(&mut commands);
        assert!(commands.is_empty());
    }
}

/// Acks `source` from `first_seq` on, one at a time, each once the reactor has dealt
/// with the one before, until a write blocks (the peer must not be reading and no
/// other connection may get acks meanwhile); returns the last seq sent. A Unix socket
/// fills after a few hundred acks; TCP on loopback takes megabytes, so the tests
/// that need a full socket use Unix clients.
fn ack_until_blocked(reactor: &Reactor, source: u64, first_seq: u64) -> u64 {
    const ACKS_MAX: u64 = 100_000;
    let before = reactor.stats();
    let accounted = |stats: &ReactorStats| stats.acks_sent + stats.acks_coalesced;
    for (index, seq) in (first_seq..first_seq + ACKS_MAX).enumerate() {
        reactor.send(&mut vec![ack_command(source, seq)]);
        let stats = wait_for_stats(reactor, "the ack written or a blocked write", |stats| {
            stats.writes_blocked > before.writes_blocked || accounted(stats) > accounted(&before) + index as u64
        });
        if stats.writes_blocked > before.writes_blocked {
            return seq;
        }
    }
    panic!("{ACKS_MAX} acks written without the socket filling: {:?}", reactor.stats());
}

fn connect_with_timeout(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    stream
}

fn start(config: ReactorConfig, frame_delay: Duration) -> (Reactor, Consumer) {
    let signal = Signal::new();
    let (reactor, new_sources) = Reactor::start(config, None, Arc::clone(&signal)).unwrap();
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

/// `clients` TCP clients each send `frames` frames of 8 events through a reactor
/// with `config` and a consumer taking `frame_delay` per frame; checks every event
/// arrived once and in order and every source closed, and returns what was seen.
fn clients_through(
    config: ReactorConfig,
    frame_delay: Duration,
    clients: u64,
    frames: u64,
) -> (ReactorStats, Consumed) {
    let (reactor, consumer) = start(config, frame_delay);
    let addr = reactor.local_tcp_addr().unwrap();
    let threads: Vec<_> = (0..clients).map(|client| tcp_client(addr, client, frames, 8)).collect();
    for thread in threads {
        thread.join().unwrap();
    }
    consumer
        .wait_for("every event", |consumed| consumed.events == clients * frames * 8 && consumed.abandoned == clients);
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_in_order(&consumed, frames);
    assert_eq!(stats.frames_in, clients * frames);
    (stats, consumed)
}

#[test]
fn a_byte_budget_pauses_a_connection_before_its_ring_is_full_without_loss() {
    const CLIENTS: u64 = 2;
    const FRAMES: u64 = 2_000;
    let frame_bytes = events_frame(0, 1, 8).len() as u32;
    // 64 slots, but only about two frames' worth of bytes: the budget pauses first.
    let config = ReactorConfig { queue_bytes_max: frame_bytes * 2 + frame_bytes / 2, ..tcp_config(64, 16) };
    let (stats, consumed) = clients_through(config, Duration::from_micros(20), CLIENTS, FRAMES);
    assert!(stats.pauses >= 10, "only {} pauses", stats.pauses);
    assert!(consumed.queued_max <= 2, "a ring held {} frames, over the byte budget of 2.5 frames", consumed.queued_max);
    assert_eq!(stats.paused_now, 0);
}

/// All rings together hold at most `queue_bytes_total_max`: eight clients, a slow
/// consumer and room for about three frames in all. Connections wait (not read) for
/// room, are read again as the consumer drains, and nothing is lost or reordered;
/// the bytes the reactor counted in the rings never passed the total.
#[test]
fn the_total_queue_budget_holds_across_connections_without_loss() {
    const CLIENTS: u64 = 8;
    const FRAMES: u64 = 400;
    let frame_bytes = events_frame(0, 1, 8).len() as u64;
    let total_max = frame_bytes * 3;
    // The total must hold one frame of frame_bytes_max: frames here are far smaller.
    let config =
        ReactorConfig { queue_bytes_total_max: total_max, frame_bytes_max: total_max as u32, ..tcp_config(64, 16) };
    let (stats, _) = clients_through(config, Duration::from_micros(50), CLIENTS, FRAMES);
    assert!(stats.queue_budget_waits >= 10, "only {} waits for the total", stats.queue_budget_waits);
    assert!(stats.queue_bytes_total_peak <= total_max, "{} bytes counted in the rings", stats.queue_bytes_total_peak);
    assert_eq!(stats.waiting_for_queue_now, 0);
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
    let (reactor, new_sources) = Reactor::start(tcp_config(2, 16), None, Arc::clone(&signal)).unwrap();
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
    match Reactor::start(config, None, Signal::new()) {
        Err(ReactorError::Config { field, .. }) => assert_eq!(field, "connection_buffer_bytes"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("started with a buffer smaller than a frame"),
    }
}

#[test]
fn acks_arrive_cumulative_and_in_order() {
    const CLIENTS: u64 = 2;
    const FRAMES: u64 = 1_000;
    let (reactor, consumer) = start(tcp_config(8, 16), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let clients: Vec<_> = (0..CLIENTS).map(|client| acking_client(addr, client, FRAMES)).collect();
    let acks: Vec<Vec<AckSeen>> = clients.into_iter().map(|client| client.join().unwrap()).collect();
    consumer.wait_for("every frame and both closes", |consumed| {
        consumed.events == CLIENTS * FRAMES && consumed.abandoned == CLIENTS
    });
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_in_order(&consumed, FRAMES);
    for client_acks in &acks {
        assert_eq!(client_acks.last().map(|ack| ack.seq), Some(FRAMES), "the final frame is acknowledged");
        for ack in client_acks {
            assert_eq!(ack.time_ms, commit_time_ms(ack.position), "{ack:?}");
        }
    }
    let acks_read: u64 = acks.iter().map(|client_acks| client_acks.len() as u64).sum();
    assert_eq!(stats.acks_sent, acks_read, "every ack written whole was read");
    assert_eq!(stats.acks_sent + stats.acks_coalesced, consumed.acks, "each ack was written or superseded");
    assert_eq!((stats.frames_in, stats.closed, stats.closed_by_consumer), (CLIENTS * FRAMES, CLIENTS, 0));
    assert_eq!(stats.errors_by_reason, [0; ERROR_REASONS.len()]);
    eprintln!("{} acks commanded, {} sent, {} coalesced", consumed.acks, stats.acks_sent, stats.acks_coalesced);
}

/// A client that sends and never reads its acks while it is acked tens of thousands
/// of times: once its socket is full the reactor keeps at most one ack being written
/// and one pending for it (the rest are coalesced), another client gets every ack
/// meanwhile, and once the silent client reads it finds the newest ack last.
#[test]
fn a_client_that_never_reads_its_acks_costs_a_bounded_amount() {
    const SILENT_FRAMES: u64 = 10;
    const FLOOD_ACKS: u64 = 50_000;
    const READER_FRAMES: u64 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdk.sock");
    let config = ReactorConfig { listen_unix: Some(path.clone()), ..tcp_config(64, 16) };
    let (reactor, consumer) = start(config, Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    // On a Unix socket, so that it fills after a few hundred acks.
    let mut silent = std::os::unix::net::UnixStream::connect(&path).unwrap();
    silent.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    for seq in 1..=SILENT_FRAMES {
        silent.write_all(&ack_wanted_frame(1, seq, 1)).unwrap();
    }
    consumer.wait_for("the silent client's frames acked", |consumed| {
        let stats = reactor.stats();
        source_with_frames(consumed, 1, SILENT_FRAMES).is_some()
            && consumed.acks > 0
            && stats.acks_sent + stats.acks_coalesced == consumed.acks
    });
    let silent_id = source_with_frames(&consumer.consumed.lock().unwrap(), 1, SILENT_FRAMES).unwrap();
    // The reactor does not relate ack seqs to the frames it received, so the test
    // acknowledges far more seqs than the silent client sent.
    let filled_seq = ack_until_blocked(&reactor, silent_id, SILENT_FRAMES + 1);

    let reader = acking_client(addr, 2, READER_FRAMES);
    let final_seq = filled_seq + FLOOD_ACKS;
    send_acks_one_by_one(&reactor, silent_id, filled_seq + 1..=final_seq);
    let reader_acks = reader.join().unwrap();
    assert_eq!(reader_acks.last().map(|ack| ack.seq), Some(READER_FRAMES));

    consumer.wait_for("the reader's frames", |consumed| consumed.events == SILENT_FRAMES + READER_FRAMES);
    let acks_total = consumer.consumed.lock().unwrap().acks + (final_seq - SILENT_FRAMES);
    // Every accepted ack is written, superseded, or one of the two the silent
    // connection may hold (being written, pending): nothing else is kept.
    let stats = wait_for_stats(&reactor, "every ack accounted for", |stats| {
        stats.acks_sent + stats.acks_coalesced + 2 >= acks_total
    });
    assert!(stats.acks_sent + stats.acks_coalesced <= acks_total, "{stats:?}");
    assert!(stats.acks_coalesced >= FLOOD_ACKS - 2, "the flood on a full socket is coalesced: {stats:?}");

    let silent_acks = read_acks_until(&mut silent, final_seq);
    assert!((silent_acks.len() as u64) < filled_seq, "{} acks read", silent_acks.len());
    let stats =
        wait_for_stats(&reactor, "the last ack written", |stats| stats.acks_sent + stats.acks_coalesced == acks_total);
    drop(silent);
    consumer.wait_for("both closes", |consumed| consumed.abandoned == 2);
    let final_stats = reactor.shutdown();
    consumer.finish();
    assert_eq!(final_stats.closed, 2);
    assert_eq!(final_stats.errors_by_reason, [0; ERROR_REASONS.len()]);
    eprintln!(
        "filled after {filled_seq} acks; {} silent acks read; {} sent, {} coalesced, {} blocked writes",
        silent_acks.len(),
        stats.acks_sent,
        stats.acks_coalesced,
        stats.writes_blocked
    );
}

#[test]
fn a_close_command_sends_the_error_and_closes_that_source_alone() {
    const READER_FRAMES: u64 = 500;
    let (reactor, consumer) = start(tcp_config(8, 16), Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let mut victim = connect_with_timeout(addr);
    for seq in 1..=3 {
        victim.write_all(&events_frame(1, seq, 2)).unwrap();
    }
    consumer.wait_for("the victim's frames", |consumed| source_with_frames(consumed, 1, 3).is_some());
    let victim_id = source_with_frames(&consumer.consumed.lock().unwrap(), 1, 3).unwrap();
    let bystander = acking_client(addr, 2, READER_FRAMES);

    let error = FrameError::BadPayload { reason: "event 2 names no node".to_string() };
    let mut commands = vec![Command::Close { source: victim_id, error: error.clone() }];
    reactor.send(&mut commands);
    assert!(commands.is_empty());
    assert_eq!(read_error_frame(&mut victim), error.to_string(), "the error's text, then the end");

    // The source is gone: more commands for it, or for an id never given out, are
    // ignored; an empty send does nothing.
    let unknown = 1 << 40;
    let mut commands = Vec::new();
    for source in [victim_id, unknown] {
        commands.push(Command::Close { source, error: error.clone() });
        commands.push(Command::Ack { source, seq: 9, position: 9, time_ms: 9 });
        commands.push(Command::Resume { source });
    }
    reactor.send(&mut commands);
    reactor.send(&mut Vec::new());

    let bystander_acks = bystander.join().unwrap();
    assert_eq!(bystander_acks.last().map(|ack| ack.seq), Some(READER_FRAMES));
    consumer.wait_for("both sources closed", |consumed| {
        consumed.abandoned == 2 && consumed.events == 3 * 2 + READER_FRAMES
    });
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_eq!(consumed.seqs[&victim_id], vec![1, 2, 3]);
    let index = |code: &str| ERROR_REASONS.iter().position(|known| *known == code).unwrap();
    assert_eq!(stats.errors_by_reason[index("bad_payload")], 1);
    assert_eq!(stats.errors_by_reason.iter().sum::<u64>(), 1);
    assert_eq!((stats.closed_by_consumer, stats.closed, stats.unexpected_kind), (1, 2, 0));
}

/// A source paused on a full ring still gets its acks, including through a socket
/// that fills (WRITABLE while READABLE is withheld), and reads on after resuming.
#[test]
fn a_paused_source_still_gets_its_acks() {
    const FRAMES: u64 = 10;
    const FLOOD_ACKS: u64 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdk.sock");
    let config = ReactorConfig { listen_tcp: None, listen_unix: Some(path.clone()), ..tcp_config(2, 16) };
    // No consumer thread: the test holds the source, so its ring of 2 stays full.
    let (reactor, new_sources) = Reactor::start(config, None, Signal::new()).unwrap();
    // On a Unix socket, so that it fills after a few hundred acks.
    let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    for seq in 1..=FRAMES {
        client.write_all(&ack_wanted_frame(1, seq, 1)).unwrap();
    }
    wait_for_stats(&reactor, "the source paused", |stats| stats.paused_now == 1);
    let mut source = new_sources.recv_timeout(WAIT_LIMIT).unwrap();

    // The two frames in the ring are durable.
    reactor.send(&mut vec![ack_command(source.id, 2)]);
    let first = read_acks_until(&mut client, 2);
    assert_eq!(first, vec![AckSeen { seq: 2, position: 2, time_ms: commit_time_ms(2) }]);

    // Many more while the client does not read: the socket fills and the reactor
    // waits for WRITABLE alone. The reactor does not relate ack seqs to frames.
    let filled_seq = ack_until_blocked(&reactor, source.id, 3);
    let flood_last = filled_seq + FLOOD_ACKS;
    send_acks_one_by_one(&reactor, source.id, filled_seq + 1..=flood_last);
    // Every ack (seq 2, then 3..=flood_last) is written, superseded or one of the two
    // held (being written, pending): the flood is dealt with before the client reads.
    let acks_total = flood_last - 1;
    let stats = wait_for_stats(&reactor, "the flood dealt with", |stats| {
        stats.acks_sent + stats.acks_coalesced + 2 >= acks_total
    });
    assert!(stats.acks_sent + stats.acks_coalesced <= acks_total, "{stats:?}");
    assert_eq!((stats.paused_now, stats.pauses, stats.frames_in), (1, 1, 2), "still paused");
    let flood = read_acks_until(&mut client, flood_last);
    assert!((flood.len() as u64) < filled_seq, "{} acks read", flood.len());
    assert_eq!(reactor.stats().paused_now, 1, "acks do not resume reading");

    // Resume: every frame arrives, and acks still flow.
    let mut popped = 0;
    let start = Instant::now();
    while popped < FRAMES {
        assert!(start.elapsed() < WAIT_LIMIT, "{popped} frames popped: {:?}", reactor.stats());
        match source.frames.pop() {
            Some(frame) => {
                let header = wire::decode_frame(&frame.bytes, FRAME_BYTES_MAX).unwrap().header;
                assert_eq!((header.kind, header.seq), (FrameKind::EventsAckWanted, popped + 1));
                popped += 1;
                if source.frames.take_unblocked() {
                    reactor.resume(source.id);
                }
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    let last = flood_last + 1;
    reactor.send(&mut vec![ack_command(source.id, last)]);
    assert_eq!(read_acks_until(&mut client, last).len(), 1);
    let stats = wait_for_stats(&reactor, "every ack accounted for", |stats| {
        stats.acks_sent + stats.acks_coalesced == acks_total + 1
    });
    assert_eq!((stats.paused_now, stats.frames_in), (0, FRAMES));
    assert!(stats.resumes >= 1 && stats.writes_blocked >= 1, "{stats:?}");
    let stats = reactor.shutdown();
    assert_eq!((stats.closed, stats.paused_now), (1, 0));
    assert_eq!(client.read(&mut [0u8; 16]).unwrap(), 0, "shutdown closed the connection");
}

/// The attacker of the issue: idle connections by the thousand. From one address
/// they stop at `connections_per_address_max`, so a client from another address is
/// served; from many addresses they fill `connections_max`, and the local socket,
/// counted apart, is still served (until its own limit).
#[test]
fn a_flood_of_idle_connections_locks_out_neither_other_addresses_nor_the_local_socket() {
    const PER_ADDRESS: u32 = 8;
    const TCP_MAX: u32 = 32;
    const LOCAL_MAX: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.sock");
    let config = ReactorConfig {
        listen_unix: Some(path.clone()),
        connections_per_address_max: PER_ADDRESS,
        local_connections_max: LOCAL_MAX,
        ..tcp_config(8, TCP_MAX)
    };
    let (reactor, consumer) = start(config, Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let mut idle: Vec<TcpStream> = (0..40).map(|_| common::connect_from(attacker, addr)).collect();
    let stats =
        wait_for_stats(&reactor, "the flood dealt with", |stats| stats.accepted + stats.rejected_per_address == 40);
    assert_eq!((stats.accepted, stats.rejected_per_address), (PER_ADDRESS as u64, 40 - PER_ADDRESS as u64));
    let text = read_error_frame(idle.pop().unwrap());
    assert!(text.contains("connections_per_address_max") && text.contains("127.0.0.1"), "{text}");

    // Another address is served.
    let mut good = common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr);
    send_frames(&mut good, 1, 10, 2);
    consumer.wait_for("the other address's frames", |consumed| source_with_frames(consumed, 1, 10).is_some());

    // Many addresses fill connections_max; the local socket is still served.
    let open_before = PER_ADDRESS + 1;
    for host in 10..14u8 {
        for _ in 0..PER_ADDRESS {
            idle.push(common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, host), addr));
        }
    }
    let over_limit = (open_before + 4 * PER_ADDRESS - TCP_MAX) as u64;
    wait_for_stats(&reactor, "connections_max reached", |stats| stats.rejected_connections == over_limit);
    let mut local = std::os::unix::net::UnixStream::connect(&path).unwrap();
    send_frames(&mut local, 2, 10, 2);
    consumer.wait_for("the local client's frames", |consumed| source_with_frames(consumed, 2, 10).is_some());
    // The local socket has its own limit.
    let mut locals: Vec<_> = (1..=LOCAL_MAX).map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap()).collect();
    let refused = locals.pop().unwrap();
    refused.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    let text = read_error_frame(refused);
    assert!(text.contains("local_connections_max"), "{text}");

    let stats = reactor.shutdown();
    consumer.finish();
    assert_eq!(stats.rejected_per_address, 40 - PER_ADDRESS as u64);
    assert_eq!(stats.rejected_connections, over_limit);
    assert_eq!(stats.rejected_local_connections, 1);
    assert_eq!(stats.accepted, (TCP_MAX + LOCAL_MAX) as u64);
    let refusals = stats.connection_refusals();
    assert_eq!(refusals[0], ("over_limit", over_limit));
    assert_eq!(refusals[1], ("local_over_limit", 1));
    assert_eq!(refusals[2], ("per_address", 40 - PER_ADDRESS as u64));
}

/// The attacker of the issue: many connections each holding a big frame minus a few
/// bytes. The read buffers beyond their floor never pass the partial-frame budget
/// (connections beyond it stop being read), small frames of another client are
/// served meanwhile, and the frame deadline closes the holders, freeing the budget.
#[test]
fn partial_frames_held_open_stay_within_the_budget_until_their_deadline() {
    const HOLDERS: usize = 12;
    const BIG_FRAME_BYTES: u32 = 1 << 20;
    const BUDGET_BYTES: u64 = 2 << 20;
    let config = ReactorConfig {
        frame_bytes_max: BIG_FRAME_BYTES,
        connection_buffer_bytes: BIG_FRAME_BYTES,
        partial_frame_bytes_max: BUDGET_BYTES,
        frame_timeout_ms: 3_000,
        ..tcp_config(8, 64)
    };
    let (reactor, consumer) = start(config, Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    // A header announcing a frame of almost BIG_FRAME_BYTES, and all but 100 bytes of it.
    let mut partial = events_frame(9, 1, 1)[..wire::HEADER_BYTES].to_vec();
    let payload_bytes = BIG_FRAME_BYTES - 64;
    partial[8..12].copy_from_slice(&payload_bytes.to_le_bytes());
    partial.resize(wire::HEADER_BYTES + payload_bytes as usize - 100, 0);
    let holders: Vec<JoinHandle<String>> = (0..HOLDERS)
        .map(|_| {
            let partial = partial.clone();
            std::thread::spawn(move || {
                let mut stream = connect_with_timeout(addr);
                // A holder the reactor stops reading blocks here until it is closed.
                let _ = stream.write_all(&partial);
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes);
                match wire::decode_frame(&bytes, FRAME_BYTES_MAX) {
                    Ok(frame) => String::from_utf8_lossy(frame.payload).into_owned(),
                    Err(error) => format!("no error frame: {error}"),
                }
            })
        })
        .collect();
    let stats = wait_for_stats(&reactor, "holders waiting for the budget", |stats| stats.budget_waits >= 1);
    assert!(stats.partial_frame_bytes <= BUDGET_BYTES, "{stats:?}");
    // Small frames need no budget: another client is served meanwhile.
    tcp_client(addr, 1, 50, 2).join().unwrap();
    consumer.wait_for("the small client's frames", |consumed| source_with_frames(consumed, 1, 50).is_some());

    for holder in holders {
        let text = holder.join().unwrap();
        assert!(text.contains("frame_timeout_ms"), "{text}");
    }
    // `closed` counts last in a close: every holder and the small client are gone.
    let stats = wait_for_stats(&reactor, "the budget freed", |stats| stats.closed == HOLDERS as u64 + 1);
    assert_eq!((stats.closed_frame_timeout, stats.partial_frame_bytes), (HOLDERS as u64, 0), "{stats:?}");
    let stats_at_end = reactor.shutdown();
    consumer.finish();
    assert!(stats.partial_frame_bytes_peak <= BUDGET_BYTES, "{stats:?}");
    assert!(stats.partial_frame_bytes_peak >= BUDGET_BYTES / 2, "the holders did use the budget: {stats:?}");
    assert_eq!((stats.waiting_for_budget_now, stats.closed_idle), (0, 0));
    assert_eq!(stats.disconnected_mid_frame, 0);
    assert_eq!(stats_at_end.connection_refusals()[4], ("frame_timeout", HOLDERS as u64));
    eprintln!(
        "peak {} bytes charged, {} waits for the budget, {} bytes in",
        stats.partial_frame_bytes_peak, stats.budget_waits, stats.bytes_in
    );
}

/// Idle connections (TCP and local) are closed after `idle_timeout_ms`, with an
/// error frame saying so; a client that keeps sending stays open.
#[test]
fn idle_connections_are_closed_after_the_timeout_and_busy_ones_are_not() {
    const IDLE_TCP: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.sock");
    let config = ReactorConfig { listen_unix: Some(path.clone()), idle_timeout_ms: 1_000, ..tcp_config(64, 64) };
    let (reactor, consumer) = start(config, Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut stream = connect_with_timeout(addr);
            let mut seq = 0;
            while !stop.load(Ordering::Acquire) {
                seq += 1;
                stream.write_all(&events_frame(1, seq, 1)).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            seq
        })
    };
    let idle: Vec<TcpStream> = (0..IDLE_TCP).map(|_| connect_with_timeout(addr)).collect();
    let local = std::os::unix::net::UnixStream::connect(&path).unwrap();
    local.set_read_timeout(Some(WAIT_LIMIT)).unwrap();
    for stream in idle {
        let text = read_error_frame(stream);
        assert!(text.contains("idle_timeout_ms"), "{text}");
    }
    assert!(read_error_frame(local).contains("idle_timeout_ms"));
    stop.store(true, Ordering::Release);
    let sent = busy.join().unwrap();
    consumer.wait_for("every busy frame", |consumed| source_with_frames(consumed, 1, sent).is_some());
    let stats = reactor.shutdown();
    consumer.finish();
    assert_eq!(stats.closed_idle, IDLE_TCP as u64 + 1, "{stats:?}");
    assert_eq!(stats.closed_frame_timeout, 0);
    assert_eq!(stats.frames_in, sent);
}

/// Slowloris: a frame sent a byte at a time, never idle, is closed at the frame
/// deadline and counted.
#[test]
fn a_frame_trickled_in_is_closed_at_the_frame_deadline() {
    let config = ReactorConfig { frame_timeout_ms: 500, ..tcp_config(8, 8) };
    let (reactor, consumer) = start(config, Duration::ZERO);
    let addr = reactor.local_tcp_addr().unwrap();
    let frame = events_frame(1, 1, 50);
    let mut stream = connect_with_timeout(addr);
    let mut reader = stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for byte in &frame[..frame.len() - 1] {
            if stream.write_all(std::slice::from_ref(byte)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let text = read_error_frame(&mut reader);
    assert!(text.contains("frame_timeout_ms"), "{text}");
    trickle.join().unwrap();
    let stats = reactor.shutdown();
    consumer.finish();
    assert_eq!((stats.closed_frame_timeout, stats.closed_idle, stats.frames_in), (1, 0, 0));
}

/// A connection paused on a full ring is not waiting on its peer: neither timeout
/// closes it (that would drop good data), and every frame arrives once resumed.
#[test]
fn a_paused_connection_outlives_its_timeouts_and_loses_nothing() {
    const FRAMES: u64 = 10;
    let config = ReactorConfig { idle_timeout_ms: 200, frame_timeout_ms: 200, ..tcp_config(2, 8) };
    // No consumer thread: the test holds the source, so its ring of 2 stays full.
    let (reactor, new_sources) = Reactor::start(config, None, Signal::new()).unwrap();
    let mut client = connect_with_timeout(reactor.local_tcp_addr().unwrap());
    for seq in 1..=FRAMES {
        client.write_all(&events_frame(1, seq, 1)).unwrap();
    }
    wait_for_stats(&reactor, "the source paused", |stats| stats.paused_now == 1);
    let mut source = new_sources.recv_timeout(WAIT_LIMIT).unwrap();
    // Several sweeps pass while paused (no timing is asserted: only that none closed it).
    std::thread::sleep(Duration::from_millis(1_000));
    let stats = reactor.stats();
    assert_eq!((stats.closed, stats.closed_idle, stats.closed_frame_timeout), (0, 0, 0), "{stats:?}");
    let mut popped = 0;
    let start = Instant::now();
    while popped < FRAMES {
        assert!(start.elapsed() < WAIT_LIMIT, "{popped} frames popped: {:?}", reactor.stats());
        match source.frames.pop() {
            Some(frame) => {
                popped += 1;
                assert_eq!(wire::decode_frame(&frame.bytes, FRAME_BYTES_MAX).unwrap().header.seq, popped);
                if source.frames.take_unblocked() {
                    reactor.resume(source.id);
                }
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    // Read again and silent: now the idle timeout applies.
    let text = read_error_frame(&mut client);
    assert!(text.contains("idle_timeout_ms"), "{text}");
    let stats = reactor.shutdown();
    assert_eq!((stats.frames_in, stats.closed_idle, stats.closed_frame_timeout), (FRAMES, 1, 0));
}

// The secure port: every TCP connection completes the secure channel's handshake
// before it is a source, and everything after is encrypted.

const CLUSTER: [u8; 16] = [0x5c; 16];

fn test_key(seed: u8) -> meshos::trust::KeyPair {
    meshos::trust::KeyPair::from_seed([seed; 32])
}

/// The reactor's side: node "server" (seed 1), admitting "client-0".."client-7"
/// (seeds 10..).
fn server_secure() -> Arc<SecureConfig> {
    let mut nodes: Vec<(String, [u8; 32])> =
        (0..8u8).map(|client| (format!("client-{client}"), test_key(10 + client).public_key())).collect();
    nodes.push(("server".to_string(), test_key(1).public_key()));
    Arc::new(SecureConfig {
        cluster_id: CLUSTER,
        local: LocalIdentity::node("server", &test_key(1)),
        keys: Arc::new(StaticPeerKeys { nodes: nodes.into_iter().collect(), operators: Vec::new() }),
        accept_operators: false,
        message_bytes_max: meshos::sys::secure::SINGLE_FRAME_MESSAGE_BYTES_MAX as u32,
    })
}

/// Client `name` proving itself with the key of `seed`, towards "server".
fn client_secure(name: &str, seed: u8) -> Arc<SecureConfig> {
    SecureConfig::towards_node(CLUSTER, LocalIdentity::node(name, &test_key(seed)), "server", test_key(1).public_key())
}

fn start_secure(config: ReactorConfig) -> (Reactor, Consumer) {
    let signal = Signal::new();
    let (reactor, new_sources) = Reactor::start(config, Some(server_secure()), Arc::clone(&signal)).unwrap();
    let consumer = Consumer::spawn(signal, new_sources, reactor.resumer(), Duration::ZERO);
    (reactor, consumer)
}

fn secure_config() -> ReactorConfig {
    ReactorConfig { partial_frame_bytes_max: 1 << 30, ..tcp_config(64, 16) }
}

#[test]
fn secure_clients_every_event_arrives_once_in_order_and_acks_come_back() {
    const CLIENTS: u8 = 4;
    const FRAMES: u64 = 400;
    let (reactor, consumer) = start_secure(secure_config());
    let addr = reactor.local_tcp_addr().unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            std::thread::spawn(move || {
                let name = format!("client-{client}");
                let (mut sender, mut replies) =
                    Client::connect_tcp(addr, client_secure(&name, 10 + client), Some("server")).unwrap();
                let frames: Vec<u8> = (1..=FRAMES).flat_map(|seq| ack_wanted_frame(client as u64, seq, 3)).collect();
                // Frames cut across encrypted frames at arbitrary points.
                for chunk in frames.chunks(10_007) {
                    sender.send_raw(chunk).unwrap();
                }
                replies.wait_acked(FRAMES, WAIT_LIMIT).unwrap()
            })
        })
        .collect();
    for client in clients {
        let ack = client.join().unwrap();
        assert_eq!(ack.seq, FRAMES, "the last frame acknowledged through the channel");
    }
    consumer.wait_for("every event", |consumed| consumed.events == CLIENTS as u64 * FRAMES * 3);
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_in_order(&consumed, FRAMES);
    assert_eq!((stats.handshakes_completed, stats.accepted, stats.handshakes_now), (CLIENTS as u64, CLIENTS as u64, 0));
    assert_eq!(stats.authentication_failures_by_reason.iter().sum::<u64>(), 0);
    assert_eq!(stats.bad_encryption, 0);
}

/// Strangers on a secure port: a wrong key or an unknown name fails its handshake
/// (counted by reason, never a source); silent ones hold handshake slots, at most
/// `handshake_per_address_max` per address and `handshake_connections_max` in all,
/// and only until `handshake_timeout_ms`; then an admitted client is served.
#[test]
fn strangers_hold_only_handshake_slots_and_only_until_their_deadline() {
    let config = ReactorConfig {
        handshake_connections_max: 4,
        handshake_per_address_max: 2,
        handshake_timeout_ms: 500,
        ..secure_config()
    };
    let (reactor, consumer) = start_secure(config);
    let addr = reactor.local_tcp_addr().unwrap();
    let wrong_key = Client::connect_tcp(addr, client_secure("client-1", 99), Some("server")).err().unwrap();
    assert!(wrong_key.to_string().contains("key mismatch"), "{wrong_key}");
    let unknown = Client::connect_tcp(addr, client_secure("mallory", 99), Some("server")).err().unwrap();
    assert!(unknown.to_string().contains("unknown node"), "{unknown}");
    // Silent strangers: two from each of two addresses fill the handshake slots.
    let mut silent: Vec<TcpStream> = [3u8, 3, 4, 4]
        .iter()
        .map(|host| common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, *host), addr))
        .collect();
    wait_for_stats(&reactor, "four handshakes", |stats| stats.handshakes_now == 4);
    let third = common::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 3), addr);
    assert!(read_error_frame(third).contains("handshake_per_address_max"));
    // An admitted client is refused too while every slot is taken, and told why.
    let refused = Client::connect_tcp(addr, client_secure("client-0", 10), Some("server")).err().unwrap();
    assert!(refused.to_string().contains("handshake_connections_max"), "{refused}");
    // The deadline frees the slots: the silent ones are closed, the client is served.
    let stats = wait_for_stats(&reactor, "the deadline", |stats| stats.closed_handshake_timeout == 4);
    assert_eq!(stats.handshakes_now, 0);
    for stream in &mut silent {
        assert_eq!(stream.read(&mut [0u8; 64]).unwrap_or(0), 0, "closed without a byte");
    }
    let (mut client, mut replies) = Client::connect_tcp(addr, client_secure("client-0", 10), Some("server")).unwrap();
    client.send_raw(&ack_wanted_frame(0, 1, 2)).unwrap();
    replies.wait_acked(1, WAIT_LIMIT).unwrap();
    let stats = reactor.shutdown();
    consumer.finish();
    assert_eq!(stats.accepted, 1, "only the admitted client became a source");
    let failures = stats.authentication_failures();
    assert_eq!(failures[2], ("unknown_node", 1));
    assert_eq!(failures[3], ("key_mismatch", 1));
    assert_eq!((stats.rejected_handshakes, stats.rejected_handshakes_per_address), (1, 1));
    let refusals = stats.connection_refusals();
    assert_eq!(refusals[6], ("handshakes_over_limit", 1));
    assert_eq!(refusals[7], ("handshakes_per_address", 1));
    assert_eq!(refusals[8], ("handshake_timeout", 4));
    assert_eq!(refusals[9], ("authentication_failed", 2));
}

/// A byte changed on the wire after the handshake: the frame does not decrypt, the
/// connection gets an encrypted error frame naming it and is closed, nothing of it
/// reaches the consumer.
#[test]
fn a_tampered_byte_after_the_handshake_closes_the_connection() {
    let (reactor, consumer) = start_secure(secure_config());
    let addr = reactor.local_tcp_addr().unwrap();
    let mut stream = connect_with_timeout(addr);
    let mut channel = Channel::initiator(client_secure("client-2", 12), Some("server")).unwrap().for_stream();
    let mut chunk = [0u8; 4096];
    while !channel.is_established() {
        stream.write_all(&channel.take_outgoing()).unwrap();
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "the handshake went on");
        channel.receive(&chunk[..read]).unwrap();
    }
    let mut parts = channel.into_stream().unwrap();
    stream.write_all(&parts.outgoing).unwrap();
    let mut sealed = Vec::new();
    parts.sender.seal(&ack_wanted_frame(2, 1, 2), &mut sealed).unwrap();
    sealed[20] ^= 0x01;
    stream.write_all(&sealed).unwrap();
    let mut reply = parts.received;
    let _ = stream.read_to_end(&mut reply);
    let mut scratch = vec![0u8; 64 << 10];
    let plain_end = parts.receiver.open_in_place(&mut reply, 0, &mut scratch).unwrap();
    let frame = wire::decode_frame(&reply[..plain_end], FRAME_BYTES_MAX).expect("an encrypted error frame");
    assert_eq!(frame.header.kind, FrameKind::Error);
    assert!(String::from_utf8_lossy(frame.payload).contains("did not decrypt"));
    let stats = reactor.shutdown();
    let consumed = consumer.finish();
    assert_eq!(stats.bad_encryption, 1);
    assert_eq!(stats.frames_in, 0);
    assert_eq!(consumed.events, 0, "nothing of a tampered stream is pushed");
}

/// The reactor verifies each frame's signed sections off the fold thread: a section
/// signed for this cluster comes marked verified, a forged signature does not (fold
/// then checks it and refuses it).
#[test]
fn signed_sections_arrive_verified_and_forged_ones_do_not() {
    let signal = Signal::new();
    let (reactor, new_sources) = Reactor::start(secure_config(), Some(server_secure()), signal).unwrap();
    let addr = reactor.local_tcp_addr().unwrap();
    let (mut client, _replies) = Client::connect_tcp(addr, client_secure("client-3", 13), Some("server")).unwrap();
    let batch = EventBatch {
        events: vec![Event {
            origin: "client-3".into(),
            origin_seq: 1,
            kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 1 }),
        }],
    };
    let payload = meshos::trust::Sealer::node("client-3", test_key(13), CLUSTER).seal_batch(&batch).to_vec();
    let mut forged = payload.clone();
    forged[150] ^= 0x01; // inside the signature (bytes 136..200 of the header)
    for (seq, payload) in [(1, &payload), (2, &forged)] {
        let mut frame = Vec::new();
        wire::encode_frame(&mut frame, FrameKind::Events, seq, 0, payload);
        client.send_raw(&frame).unwrap();
    }
    let mut source = new_sources.recv_timeout(WAIT_LIMIT).unwrap();
    let mut verified = Vec::new();
    let start = Instant::now();
    while verified.len() < 2 {
        assert!(start.elapsed() < WAIT_LIMIT, "frames never arrived");
        match source.frames.pop() {
            Some(frame) => verified.push(frame.verified),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    assert_eq!(verified, [1, 0]);
    reactor.shutdown();
}
