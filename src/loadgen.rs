//! Load generation for the ingest benchmark, the load tool (`perf/load.rs`) and the
//! end-to-end tests: pre-built event frames whose sequence numbers are patched in
//! place, and one writer thread plus one acknowledgement reader per connection.
//!
//! A connection of origin `load-<i>` first sends a setup frame (its joining
//! heartbeat and the announcement of its own blob), then frames of `events_per_frame`
//! small events cycling through the kinds a node hears most: heartbeats, RTT samples
//! (to the node under test) and replica updates (of its own blob). Every event is
//! under 128 bytes on the wire and valid, so fold applies every one and a test can
//! count them: after the run, origin `load-<i>`'s last origin_seq equals the events
//! that connection sent.
//!
//! Invariants: a template's archived layout never changes after it is built (only the
//! 8-byte `origin_seq` fields and the header are rewritten), so a patched frame is a
//! valid frame; frame numbers and origin sequence numbers strictly increase per
//! connection. Timing lives here, not in fold or reconcile.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event::{Event, EventBatch, EventKind, NodeHealth, ReplicaState};
use crate::sys::client::{Client, ClientError, Replies};
use crate::wire::{self, FrameKind};

/// Frames whose send time a connection remembers, for ack latency; also the most
/// frames a connection has unacknowledged (the writer waits), so every ack finds its
/// frame's send time.
const SEND_TIMES: usize = 4096;

/// Send times and the acknowledged frame, shared by a connection's writer and reader.
struct Window {
    send_times: Vec<Instant>,
    acked_seq: u64,
    /// The reader stopped (error or done): the writer must not wait for it.
    reader_done: bool,
}

type SharedWindow = Arc<(Mutex<Window>, Condvar)>;

/// A frame of events whose sequence numbers can be rewritten in place: one node
/// section signed with the origin's test key (`trust::test_key_of`; the node under
/// load admits it in its genesis), signed again at each `fill`.
pub struct FrameTemplate {
    frame: Vec<u8>,
    payload_bytes: usize,
    /// Offsets of each event's `origin_seq` field within the payload.
    seq_offsets: Vec<usize>,
    sealer: crate::trust::Sealer,
}

/// The blob connection `index` announces and reports on.
pub fn load_blob(index: u32) -> [u8; 32] {
    *blake3::hash(format!("load-blob-{index}").as_bytes()).as_bytes()
}

/// The origin name of load connection `index`.
pub fn load_origin(index: u32) -> String {
    format!("load-{index}")
}

impl FrameTemplate {
    /// A template of `kinds` (one event each) from `origin`, for cluster `cluster_id`.
    pub fn new(origin: &str, kinds: Vec<EventKind>, cluster_id: crate::trust::ClusterId) -> FrameTemplate {
        let events = kinds
            .into_iter()
            .enumerate()
            .map(|(index, kind)| Event { origin: origin.to_string(), origin_seq: index as u64 + 1, kind })
            .collect();
        let sealer = crate::trust::Sealer::node(origin, crate::trust::test_key_of(origin), cluster_id);
        let payload = sealer.seal_batch(&EventBatch { events });
        let section = crate::trust::sections(&payload).next().expect("one section").expect("a sealed section");
        let batch = wire::access_batch(section.body).expect("a freshly archived batch validates");
        let base = payload.as_ptr() as usize;
        let seq_offsets =
            batch.events.iter().map(|event| (&event.origin_seq as *const _ as *const u8) as usize - base).collect();
        let mut frame = Vec::new();
        wire::encode_frame(&mut frame, FrameKind::Events, 1, 0, &payload);
        FrameTemplate { frame, payload_bytes: payload.len(), seq_offsets, sealer }
    }

    /// The steady-state frame of load connection `index`: `events` events cycling
    /// heartbeat, RTT sample to `peer`, replica update.
    pub fn steady(index: u32, events: u32, peer: &str, cluster_id: crate::trust::ClusterId) -> FrameTemplate {
        let blob = load_blob(index);
        let kinds = (0..events)
            .map(|at| match at % 3 {
                0 => EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 }),
                1 => EventKind::Rtt { peer: peer.to_string(), rtt_us: 200 + at },
                _ => EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
            })
            .collect();
        FrameTemplate::new(&load_origin(index), kinds, cluster_id)
    }

    /// The setup frame of load connection `index`: join, announce its blob, report
    /// its copy healthy.
    pub fn setup(index: u32, cluster_id: crate::trust::ClusterId) -> FrameTemplate {
        let blob = load_blob(index);
        FrameTemplate::new(
            &load_origin(index),
            vec![
                EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 100 }),
                EventKind::BlobAnnounce { blob, size_bytes: 4096 },
                EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
            ],
            cluster_id,
        )
    }

    pub fn events(&self) -> u64 {
        self.seq_offsets.len() as u64
    }

    /// Bytes on the wire per frame.
    pub fn frame_bytes(&self) -> usize {
        self.frame.len()
    }

    /// Rewrites the frame as frame `frame_seq` whose events carry origin sequence
    /// numbers from `first_origin_seq`, and returns it.
    pub fn fill(&mut self, frame_seq: u64, first_origin_seq: u64, ack: bool) -> &[u8] {
        let payload_start = wire::HEADER_BYTES;
        for (index, &offset) in self.seq_offsets.iter().enumerate() {
            let at = payload_start + offset;
            self.frame[at..at + 8].copy_from_slice(&(first_origin_seq + index as u64).to_le_bytes());
        }
        self.sealer.sign_section_at(&mut self.frame[payload_start..payload_start + self.payload_bytes], 0);
        let kind = if ack { FrameKind::EventsAckWanted } else { FrameKind::Events };
        let payload = &self.frame[payload_start..payload_start + self.payload_bytes];
        let header = wire::header_bytes(kind, frame_seq, 0, payload);
        self.frame[..wire::HEADER_BYTES].copy_from_slice(&header);
        &self.frame
    }
}

/// What one load run does.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub connections: u32,
    /// Index of the first connection (origins `load-<first>`...), so runs can share a node.
    pub first_index: u32,
    pub events_per_frame: u32,
    /// Frames each connection sends after its setup frame.
    pub frames_per_connection: u64,
    /// Frames per write call.
    pub frames_per_write: u32,
    /// The node's name (the RTT samples' peer).
    pub peer: String,
    /// Events each origin already sent in earlier runs against the same node: 0 for
    /// new origins (a setup frame first); else no setup frame, and origin sequence
    /// numbers continue after this.
    pub resume_after: u64,
    /// The node's cluster (its genesis admits the load origins' test keys).
    pub cluster_id: crate::trust::ClusterId,
}

/// What one connection did.
#[derive(Debug, Clone, Default)]
pub struct ConnectionResult {
    pub origin: String,
    /// Events sent (setup included) and acknowledged.
    pub events_sent: u64,
    pub events_acked: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Ack latencies (send of a frame to its ack), microseconds.
    pub ack_latency_us: Vec<u32>,
    pub error: Option<String>,
}

/// Events acknowledged once frame `seq` is (the setup frame, if any, is frame 1).
fn events_through(seq: u64, setup_frames: u64, setup_events: u64, steady_events: u64) -> u64 {
    if seq == 0 {
        0
    } else {
        setup_events + (seq - setup_frames) * steady_events
    }
}

/// Runs `options.connections` connections against `addr` until each sent its frames
/// and saw them all acknowledged (or failed); returns one result per connection.
pub fn run(addr: SocketAddr, options: &LoadOptions, ack_timeout: Duration) -> Vec<ConnectionResult> {
    let handles: Vec<JoinHandle<ConnectionResult>> = (0..options.connections)
        .map(|offset| {
            let options = options.clone();
            std::thread::Builder::new()
                .name(format!("load-{offset}"))
                .stack_size(256 << 10)
                .spawn(move || drive(addr, options.first_index + offset, &options, ack_timeout))
                .expect("spawn a load thread")
        })
        .collect();
    handles.into_iter().map(|handle| handle.join().expect("a load thread panicked")).collect()
}

/// The secure channel of load connection `index`: the origin's test key, towards the
/// node `peer` of cluster `cluster_id` with its test key (as
/// `sim::fixtures::trust_test_node_dir` writes it).
pub fn client_secure(
    index: u32,
    peer: &str,
    cluster_id: crate::trust::ClusterId,
) -> Arc<crate::sys::secure::SecureConfig> {
    let origin = load_origin(index);
    let local = crate::sys::secure::LocalIdentity::node(&origin, &crate::trust::test_key_of(&origin));
    let server_key = crate::trust::test_key_of(peer).public_key();
    crate::sys::secure::SecureConfig::towards_node(cluster_id, local, peer, server_key)
}

fn drive(addr: SocketAddr, index: u32, options: &LoadOptions, ack_timeout: Duration) -> ConnectionResult {
    let mut result = ConnectionResult { origin: load_origin(index), ..ConnectionResult::default() };
    let (client, replies) =
        match Client::connect_tcp(addr, client_secure(index, &options.peer, options.cluster_id), Some(&options.peer)) {
            Ok(pair) => pair,
            Err(error) => {
                result.error = Some(error.to_string());
                return result;
            }
        };
    let window: SharedWindow = Arc::new((
        Mutex::new(Window { send_times: vec![Instant::now(); SEND_TIMES], acked_seq: 0, reader_done: false }),
        Condvar::new(),
    ));
    let mut setup = FrameTemplate::setup(index, options.cluster_id);
    let mut steady = FrameTemplate::steady(index, options.events_per_frame, &options.peer, options.cluster_id);
    let setup_frames = (options.resume_after == 0) as u64;
    let (setup_events, steady_events) = (setup.events() * setup_frames, steady.events());
    let last_seq = setup_frames + options.frames_per_connection;
    let reader = {
        let window = Arc::clone(&window);
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || read_acks(replies, last_seq, window, ack_timeout))
            .expect("spawn an ack reader")
    };
    let sent = send_all(client, &mut setup, &mut steady, options, &window, &mut result);
    let (acked_seq, latencies, read_error) = reader.join().expect("an ack reader panicked");
    result.events_acked = events_through(acked_seq, setup_frames, setup_events, steady_events);
    result.ack_latency_us = latencies;
    if let Err(error) = sent {
        result.error = Some(error.to_string());
    } else if let Some(error) = read_error {
        result.error = Some(error);
    }
    result
}

fn send_all(
    mut client: Client,
    setup: &mut FrameTemplate,
    steady: &mut FrameTemplate,
    options: &LoadOptions,
    window: &SharedWindow,
    result: &mut ConnectionResult,
) -> Result<(), ClientError> {
    let per_write = options.frames_per_write.max(1) as u64;
    let mut chunk = Vec::with_capacity(steady.frame_bytes() * per_write as usize);
    let mut origin_seq = options.resume_after + 1;
    let mut seq = 1;
    if options.resume_after == 0 {
        window.0.lock().expect("window").send_times[1] = Instant::now();
        client.send_raw(setup.fill(1, 1, true))?;
        result.events_sent = setup.events();
        result.frames_sent = 1;
        result.bytes_sent = setup.frame_bytes() as u64;
        origin_seq += setup.events();
        seq = 2;
    }
    let last_seq = seq - 1 + options.frames_per_connection;
    while seq <= last_seq {
        let first = seq;
        while seq <= last_seq && seq - first < per_write {
            chunk.extend_from_slice(steady.fill(seq, origin_seq, true));
            origin_seq += steady.events();
            seq += 1;
        }
        {
            let (lock, condvar) = &**window;
            let mut shared = lock.lock().expect("window");
            // Frame seq - 1 reuses the send-time slot of frame seq - 1 - SEND_TIMES:
            // wait until that one is acknowledged.
            while !shared.reader_done && seq - 1 > shared.acked_seq + SEND_TIMES as u64 {
                shared = condvar.wait(shared).expect("window");
            }
            let now = Instant::now();
            for frame in first..seq {
                shared.send_times[frame as usize % SEND_TIMES] = now;
            }
        }
        client.send_raw(&chunk)?;
        result.frames_sent = seq - 1;
        result.events_sent += (seq - first) * steady.events();
        result.bytes_sent += chunk.len() as u64;
        chunk.clear();
    }
    // Keep the sending half open until the reader is done: dropping it would not
    // close the socket (the reader holds a clone), but be explicit about lifetime.
    drop(client);
    Ok(())
}

fn read_acks(
    mut replies: Replies,
    last_seq: u64,
    window: SharedWindow,
    ack_timeout: Duration,
) -> (u64, Vec<u32>, Option<String>) {
    let mut latencies = Vec::new();
    let (lock, condvar) = &*window;
    let error = loop {
        if replies.acked().seq >= last_seq {
            break None;
        }
        match replies.next_ack(Some(ack_timeout)) {
            Ok(ack) => {
                let mut shared = lock.lock().expect("window");
                let sent_at = shared.send_times[ack.seq as usize % SEND_TIMES];
                latencies.push(sent_at.elapsed().as_micros().min(u32::MAX as u128) as u32);
                shared.acked_seq = shared.acked_seq.max(ack.seq);
                condvar.notify_one();
            }
            Err(error) => break Some(error.to_string()),
        }
    };
    lock.lock().expect("window").reader_done = true;
    condvar.notify_one();
    (replies.acked().seq, latencies, error)
}

/// The value at `permille` of the sorted samples (0 when empty).
pub fn percentile(sorted: &[u32], permille: u32) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let at = (sorted.len() - 1) * permille as usize / 1000;
    sorted[at]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_template_is_a_valid_frame_with_the_given_numbers() {
        let mut template = FrameTemplate::steady(3, 64, "node-1", [7; 16]);
        let frame = template.fill(9, 1000, true).to_vec();
        let decoded = wire::decode_frame(&frame, 1 << 20).unwrap();
        assert_eq!((decoded.header.kind, decoded.header.seq), (FrameKind::EventsAckWanted, 9));
        let batches = wire::decode_sections(decoded.payload).unwrap();
        assert_eq!(batches.len(), 1, "one section, signed by the load origin");
        let batch = &batches[0];
        assert_eq!(batch.events.len(), 64);
        for (index, event) in batch.events.iter().enumerate() {
            assert_eq!(event.origin, "load-3");
            assert_eq!(event.origin_seq, 1000 + index as u64);
        }
        let per_event = frame.len() / 64;
        assert!(per_event < 128, "{per_event} bytes per event on the wire");
    }

    #[test]
    fn percentiles_pick_from_sorted_samples() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 500), 500);
        assert_eq!(percentile(&samples, 990), 990);
        assert_eq!(percentile(&[], 500), 0);
    }
}
