//! The sequencer on its own, with real rings and a real embedded log: fairness across
//! sources, one record per frame, origin stamping for local sources, acks only after
//! the sync, rejection of a bad frame and what follows it, backpressure with hysteresis.

use meshos::config::{Config, FsyncPolicy};
use meshos::event::{Event, EventBatch, EventKind, NodeHealth};
use meshos::ingest::ring::{ring, Producer};
use meshos::redex::embedded::EmbeddedLog;
use meshos::sequencer::{Sequencer, SequencerConfig};
use meshos::sys::reactor::{ClientFrame, Command, Source, SourceKind};
use meshos::wire::{self, FrameKind};

fn config(frames_per_round_max: u32, records_per_commit_max: u32) -> SequencerConfig {
    SequencerConfig {
        node_name: "node-1".to_string(),
        frame_bytes_max: 1 << 20,
        frames_per_round_max,
        records_per_commit_max,
        commit_bytes_max: 1 << 20,
        backpressure_queue_high_permille: 800,
        backpressure_queue_low_permille: 500,
        backpressure_commit_high_ms: 60_000,
        backpressure_commit_low_ms: 59_999,
        backpressure_hold_ms: 0,
    }
}

fn frame(origin: &str, first_seq: u64, count: u64, frame_seq: u64, ack: bool) -> ClientFrame {
    frame_as(origin, origin != "node-1", first_seq, count, frame_seq, ack)
}

/// A frame of heartbeats of `origin`, signed with its test key or unsigned (what a
/// local client sends: the node signs it).
fn frame_as(origin: &str, signed: bool, first_seq: u64, count: u64, frame_seq: u64, ack: bool) -> ClientFrame {
    let events = (0..count)
        .map(|index| Event {
            origin: origin.to_string(),
            origin_seq: first_seq + index,
            kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 1 }),
        })
        .collect();
    // This node's own events come unsigned over its Unix socket (the sequencer signs
    // them); every other origin signs with its key.
    let batch = EventBatch { events };
    let payload = if !signed {
        meshos::trust::record::unsigned_batch(&batch)
    } else {
        meshos::trust::Sealer::node(origin, meshos::trust::test_key_of(origin), CLUSTER_ID).seal_batch(&batch)
    };
    let mut out = Vec::new();
    let kind = if ack { FrameKind::EventsAckWanted } else { FrameKind::Events };
    wire::encode_frame(&mut out, kind, frame_seq, 0, &payload);
    // As the reactor hands it on: the signed section verified there.
    let verified = meshos::fold::verified_sections(&payload, &CLUSTER_ID);
    assert_eq!(verified, signed as u64);
    ClientFrame { bytes: out, verified }
}

const CLUSTER_ID: [u8; 16] = [3; 16];

/// What node-1 signs its records with.
fn sealer() -> meshos::trust::Sealer {
    meshos::trust::Sealer::node("node-1", meshos::trust::test_key_of("node-1"), CLUSTER_ID)
}

fn source(id: u64, kind: SourceKind, capacity: usize) -> (Producer<ClientFrame>, Source) {
    let (producer, consumer) = ring(capacity);
    (producer, Source { id, frames: consumer, kind })
}

fn command_kinds(sequencer: &mut Sequencer) -> Vec<&'static str> {
    sequencer
        .commands()
        .drain(..)
        .map(|command| match command {
            Command::Ack { .. } => "ack",
            Command::Close { .. } => "close",
            Command::Resume { .. } => "resume",
            Command::Quiesce => "quiesce",
        })
        .collect()
}

/// An embedded log in a new temporary directory (kept alive by the returned guard).
fn temp_log() -> (tempfile::TempDir, EmbeddedLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), &Config { fsync: FsyncPolicy::Manual, ..Config::for_tests() }).unwrap().0;
    (dir, log)
}

/// (origin, origin_seq) of every event of the last commit, record by record.
fn committed(sequencer: &Sequencer) -> Vec<Vec<(String, u64)>> {
    sequencer
        .committed()
        .map(|(_, payload, _)| {
            let batches = wire::decode_sections(payload).unwrap();
            batches
                .iter()
                .flat_map(|batch| batch.events.iter().map(|event| (event.origin.clone(), event.origin_seq)))
                .collect()
        })
        .collect()
}

#[test]
fn sources_are_served_round_robin_and_a_full_group_resumes_after_the_last_served() {
    let (_dir, mut log) = temp_log();
    let mut sequencer = Sequencer::new(config(2, 4), sealer(), 0, false);
    let (mut chatty, chatty_source) = source(20, SourceKind::Tcp, 16);
    let (mut quiet, quiet_source) = source(21, SourceKind::Tcp, 16);
    let (mut third, third_source) = source(22, SourceKind::Tcp, 16);
    for seq in 1..=8 {
        chatty.try_push(frame("a", seq, 1, seq, false)).unwrap();
    }
    quiet.try_push(frame("b", 1, 1, 1, false)).unwrap();
    third.try_push(frame("c", 1, 1, 1, false)).unwrap();
    for source in [chatty_source, quiet_source, third_source] {
        sequencer.add_source(source);
    }
    assert_eq!(sequencer.collect(), 4);
    sequencer.commit(&mut log).unwrap();
    let origins: Vec<String> = committed(&sequencer).into_iter().map(|record| record[0].0.clone()).collect();
    assert_eq!(origins, ["a", "a", "b", "c"], "two from the chatty source, then the others");
    sequencer.release();
    assert_eq!(sequencer.collect(), 4);
    sequencer.commit(&mut log).unwrap();
    let seqs: Vec<u64> = committed(&sequencer).into_iter().map(|record| record[0].1).collect();
    assert_eq!(seqs, [3, 4, 5, 6], "per source, frames keep their order");
    sequencer.release();
}

#[test]
fn local_sources_get_this_nodes_sequence_numbers_and_a_foreign_origin_closes_them() {
    let (_dir, mut log) = temp_log();
    let mut sequencer = Sequencer::new(config(8, 64), sealer(), 41, false);
    let (mut local, local_source) = source(30, SourceKind::Unix, 8);
    sequencer.add_source(local_source);
    local.try_push(frame("node-1", 0, 3, 1, false)).unwrap();
    local.try_push(frame_as("intruder", false, 0, 1, 2, false)).unwrap();
    local.try_push(frame("node-1", 0, 1, 3, false)).unwrap();
    assert_eq!(sequencer.collect(), 1, "the foreign frame and the one after it are not recorded");
    sequencer.commit(&mut log).unwrap();
    assert_eq!(
        committed(&sequencer),
        vec![vec![("node-1".to_string(), 42), ("node-1".to_string(), 43), ("node-1".to_string(), 44)]]
    );
    sequencer.release();
    let closes: Vec<&Command> =
        sequencer.commands().iter().filter(|command| matches!(command, Command::Close { source: 30, .. })).collect();
    assert_eq!(closes.len(), 1);
    if let Command::Close { error, .. } = closes[0] {
        assert!(error.to_string().contains("intruder"), "{error}");
    }
    assert_eq!((sequencer.stats().rejected_frames, sequencer.stats().discarded_frames), (1, 1));
}

#[test]
fn acks_are_queued_after_the_sync_with_the_highest_frame_of_each_source() {
    let (_dir, mut log) = temp_log();
    let mut sequencer = Sequencer::new(config(8, 64), sealer(), 0, false);
    let (mut client, client_source) = source(40, SourceKind::Tcp, 8);
    sequencer.add_source(client_source);
    client.try_push(frame("a", 1, 2, 1, true)).unwrap();
    client.try_push(frame("a", 3, 2, 2, false)).unwrap();
    client.try_push(frame("a", 5, 2, 3, true)).unwrap();
    assert_eq!(sequencer.collect(), 3);
    assert!(
        sequencer.commands().iter().all(|command| !matches!(command, Command::Ack { .. })),
        "nothing before the sync"
    );
    let committed = sequencer.commit(&mut log).unwrap();
    assert_eq!((committed.records, committed.events), (3, 6));
    let acks: Vec<Command> =
        sequencer.commands().drain(..).filter(|command| matches!(command, Command::Ack { .. })).collect();
    assert_eq!(acks, vec![Command::Ack { source: 40, seq: 3, position: 3, time_ms: committed.last.time_ms }]);
    assert_eq!(meshos::redex::Redex::durable_position(&log), 3);
    sequencer.release();
}

#[test]
fn backpressure_rises_above_the_high_mark_and_falls_only_below_the_low_mark() {
    let (_dir, mut log) = temp_log();
    // One frame per group, so the queue drains one frame per commit.
    let mut sequencer = Sequencer::new(config(1, 1), sealer(), 0, false);
    let (mut client, client_source) = source(50, SourceKind::Tcp, 16);
    sequencer.add_source(client_source);
    for seq in 1..=15 {
        client.try_push(frame("a", seq, 1, seq, false)).unwrap();
    }
    let mut raised_at = None;
    let mut lowered_at = None;
    let mut own_events = Vec::new();
    for commit in 0..40 {
        if sequencer.collect() == 0 {
            break;
        }
        sequencer.commit(&mut log).unwrap();
        for record in committed(&sequencer) {
            own_events.extend(record.into_iter().filter(|(origin, _)| origin == "node-1"));
        }
        sequencer.release();
        if sequencer.backpressure() && raised_at.is_none() {
            raised_at = Some((commit, sequencer.queue_fill_permille()));
        }
        if !sequencer.backpressure() && raised_at.is_some() && lowered_at.is_none() {
            lowered_at = Some((commit, sequencer.queue_fill_permille()));
        }
    }
    let (_, fill_raised) = raised_at.expect("raised");
    let (_, fill_lowered) = lowered_at.expect("lowered");
    assert!(fill_raised >= 800, "raised at {fill_raised} permille");
    assert!(fill_lowered < 500, "lowered at {fill_lowered} permille: hysteresis");
    assert_eq!(sequencer.stats().backpressure_raised, 1, "no flapping between the marks");
    assert_eq!(own_events.len(), 2, "one event raises it, one lowers it, both in the log: {own_events:?}");
}

#[test]
fn an_idle_source_is_served_wherever_it_sits_among_busy_ones() {
    for quiet_at in 0..5usize {
        let (_dir, mut log) = temp_log();
        let mut sequencer = Sequencer::new(config(1, 2), sealer(), 0, false);
        let (mut busy, mut quiet) = (Vec::new(), None);
        for index in 0..5usize {
            let (producer, new_source) = source(100 + index as u64, SourceKind::Tcp, 64);
            sequencer.add_source(new_source);
            if index == quiet_at {
                quiet = Some(producer);
            } else {
                busy.push((producer, 0u64, format!("busy{index}")));
            }
        }
        let refill = |busy: &mut Vec<(Producer<ClientFrame>, u64, String)>| {
            for (producer, seq, origin) in busy.iter_mut() {
                while producer.len() < 32 {
                    *seq += 1;
                    producer.try_push(frame(origin, *seq, 1, *seq, false)).unwrap();
                }
            }
        };
        for _ in 0..20 {
            refill(&mut busy);
            assert_eq!(sequencer.collect(), 2);
            sequencer.commit(&mut log).unwrap();
            sequencer.release();
        }
        quiet.as_mut().unwrap().try_push(frame("q", 1, 1, 1, false)).unwrap();
        let mut waited = None;
        for group in 0..40 {
            refill(&mut busy);
            assert!(sequencer.collect() > 0);
            sequencer.commit(&mut log).unwrap();
            let served = committed(&sequencer).iter().any(|record| record[0].0 == "q");
            sequencer.release();
            if served {
                waited = Some(group);
                break;
            }
        }
        let waited = waited.unwrap_or_else(|| panic!("the quiet source at index {quiet_at} was never served"));
        // Woken at the next scanning collection (every 8th), then served within one
        // rotation of the 5 sources at 2 records per group.
        assert!(waited <= 8 + 3, "the quiet source at index {quiet_at} waited {waited} groups");
    }
}

#[test]
fn frame_numbers_must_start_at_one_and_increase() {
    for numbers in [vec![5u64, 3], vec![0], vec![2, 2]] {
        let (_dir, mut log) = temp_log();
        let mut sequencer = Sequencer::new(config(8, 64), sealer(), 0, false);
        let (mut client, client_source) = source(70, SourceKind::Tcp, 8);
        sequencer.add_source(client_source);
        for (index, &number) in numbers.iter().enumerate() {
            client.try_push(frame("a", index as u64 + 1, 1, number, true)).unwrap();
        }
        let good = usize::from(numbers[0] > 0);
        assert_eq!(sequencer.collect(), good, "{numbers:?}");
        if good > 0 {
            sequencer.commit(&mut log).unwrap();
            sequencer.release();
        }
        let commands: Vec<Command> = sequencer.commands().drain(..).collect();
        let close = commands.iter().find_map(|command| match command {
            Command::Close { error, .. } => Some(error.to_string()),
            _ => None,
        });
        assert!(close.expect("the bad frame closes its source").contains("frame numbers start at 1"), "{numbers:?}");
        if good > 0 {
            assert!(commands.contains(&Command::Ack {
                source: 70,
                seq: numbers[0],
                position: 1,
                time_ms: commands
                    .iter()
                    .find_map(|command| match command {
                        Command::Ack { time_ms, .. } => Some(*time_ms),
                        _ => None,
                    })
                    .unwrap()
            }));
        }
    }
}

#[test]
fn a_bad_frame_closes_its_source_only_after_the_acks_of_the_good_frames_before_it() {
    let (_dir, mut log) = temp_log();
    let mut sequencer = Sequencer::new(config(8, 64), sealer(), 0, false);
    let (mut client, client_source) = source(72, SourceKind::Tcp, 8);
    sequencer.add_source(client_source);
    client.try_push(frame("a", 1, 1, 1, true)).unwrap();
    let mut bad = frame("a", 2, 1, 2, true);
    bad.bytes.truncate(wire::HEADER_BYTES);
    client.try_push(bad).unwrap();
    assert_eq!(sequencer.collect(), 1);
    assert!(command_kinds(&mut sequencer).is_empty(), "nothing before the commit");
    sequencer.commit(&mut log).unwrap();
    sequencer.release();
    assert_eq!(command_kinds(&mut sequencer), ["ack", "close"]);
}

#[test]
fn tcp_frames_may_not_speak_for_this_node() {
    let mut sequencer = Sequencer::new(config(8, 64), sealer(), 0, false);
    let (mut tcp, tcp_source) = source(80, SourceKind::Tcp, 8);
    sequencer.add_source(tcp_source);
    tcp.try_push(frame_as("node-1", true, u64::MAX, 1, 1, false)).unwrap();
    assert_eq!(sequencer.collect(), 0, "refused before the log");
    let error = sequencer.commands().iter().find_map(|command| match command {
        Command::Close { error, .. } => Some(error.to_string()),
        _ => None,
    });
    assert!(error.expect("closed").contains("only the node itself"));
    // Unsigned events over TCP are refused too (only the Unix socket's are signed here).
    let (mut stranger, stranger_source) = source(81, SourceKind::Tcp, 8);
    sequencer.add_source(stranger_source);
    stranger.try_push(frame_as("a", false, 1, 1, 1, false)).unwrap();
    assert_eq!(sequencer.collect(), 0, "refused before the log");
    let errors: Vec<String> = sequencer
        .commands()
        .iter()
        .filter_map(|command| match command {
            Command::Close { error, .. } => Some(error.to_string()),
            _ => None,
        })
        .collect();
    assert!(errors.iter().any(|error| error.contains("unsigned events over TCP")), "{errors:?}");
    // Even a folded state at the very end of the numbers does not panic a restart.
    let mut restarted = Sequencer::new(config(8, 64), sealer(), u64::MAX, false);
    restarted.push_own(EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }));
    assert_eq!(restarted.collect(), 0);
    assert_eq!(restarted.stats().own_events_unnumbered, 1);
}

#[test]
fn a_restart_lowers_backpressure_an_earlier_run_left_raised() {
    let (_dir, mut log) = temp_log();
    let mut sequencer = Sequencer::new(config(8, 64), sealer(), 10, true);
    assert_eq!(sequencer.collect(), 1);
    sequencer.commit(&mut log).unwrap();
    let batch: Vec<String> = sequencer
        .committed()
        .flat_map(|(_, payload, _)| {
            let batches = wire::decode_sections(payload).unwrap();
            batches
                .into_iter()
                .flat_map(|batch| batch.events)
                .map(|event| format!("{} {} {:?}", event.origin, event.origin_seq, event.kind))
        })
        .collect();
    assert_eq!(batch, ["node-1 11 Backpressure { raised: false }"]);
    sequencer.release();
    assert!(!sequencer.backpressure());
}

#[test]
fn backpressure_is_lowered_only_after_the_low_marks_held_for_the_hold_period() {
    let (_dir, mut log) = temp_log();
    let mut sequencer =
        Sequencer::new(SequencerConfig { backpressure_hold_ms: 200, ..config(1, 1) }, sealer(), 0, false);
    let (mut client, client_source) = source(90, SourceKind::Tcp, 8);
    sequencer.add_source(client_source);
    let mut seq = 0;
    let mut cycle = |sequencer: &mut Sequencer, fill: bool| {
        if fill {
            while client.len() < 8 {
                seq += 1;
                client.try_push(frame("a", seq, 1, seq, false)).unwrap();
            }
        }
        while sequencer.collect() > 0 {
            sequencer.commit(&mut log).unwrap();
            sequencer.release();
        }
    };
    // A client that fills its ring every group: raised once, and it stays raised
    // through empty-and-refill cycles shorter than the hold period.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(100) {
        cycle(&mut sequencer, true);
    }
    assert!(sequencer.backpressure());
    assert_eq!((sequencer.stats().backpressure_raised, sequencer.stats().backpressure_lowered), (1, 0), "no flapping");
    // Quiet for longer than the hold period: lowered.
    let quiet = std::time::Instant::now();
    while sequencer.backpressure() && quiet.elapsed() < std::time::Duration::from_secs(5) {
        sequencer.push_own(EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }));
        cycle(&mut sequencer, false);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!sequencer.backpressure());
    assert!(quiet.elapsed() >= std::time::Duration::from_millis(200), "lowered only after the hold period");
}

/// The sections the reactor verified travel with their record to fold; the node's own
/// records and its local clients' (signed here) are left to fold to verify.
#[test]
fn the_reactors_verified_sections_reach_the_committed_records() {
    let (_dir, mut log) = temp_log();
    let mut sequencer = Sequencer::new(config(8, 64), sealer(), 0, false);
    let (mut tcp, tcp_source) = source(1, SourceKind::Tcp, 8);
    let (mut local, local_source) = source(2, SourceKind::Unix, 8);
    sequencer.add_source(tcp_source);
    sequencer.add_source(local_source);
    tcp.try_push(frame("a", 1, 2, 1, false)).unwrap();
    local.try_push(frame("node-1", 0, 2, 1, false)).unwrap();
    sequencer.push_own(EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }));
    assert_eq!(sequencer.collect(), 3);
    sequencer.commit(&mut log).unwrap();
    let mut masks: Vec<u64> = sequencer.committed().map(|(_, _, verified)| verified).collect();
    masks.sort_unstable();
    assert_eq!(masks, [0, 0, 1], "only the client's signed section came verified");
    sequencer.release();
}
