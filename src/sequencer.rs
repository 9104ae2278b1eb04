//! The sequencer: merges every source's queue into one sequence of log records,
//! commits them in groups with one fsync, and acknowledges what is durable.
//!
//! One collection ([`Sequencer::collect`]) serves the sources round-robin, taking at
//! most `frames_per_round_max` frames from each per round, until the queues are empty
//! or the group is full (`records_per_commit_max` records or `commit_bytes_max`
//! bytes); the next collection starts at the source after the last one served, so a
//! chatty connection cannot starve the others. Each client frame (a batch of events)
//! becomes one log record; the node's own events (heartbeats, backpressure) gathered
//! since the last collection become one record at the front of the group. A source
//! nothing came from for a few collections counts as idle and is looked at only every
//! few collections (and whenever a collection found nothing), so a thousand idle
//! connections do not slow the busy ones. The payloads
//! are copied once, into one 16-byte-aligned group buffer, where they are validated
//! (signed sections whose bodies are archived batches, `check_sections`) and later
//! folded in place.
//!
//! Signers: the node's own events become one record signed with its key. A local
//! source (the Unix socket, mode 0600: the node's own tools) may send unsigned
//! sections, whose events must name this node as their origin: the sequencer stamps
//! their `origin_seq` from the node's own counter, patching the archived field in
//! place, and signs the section as the node's; it may also send sections already
//! signed (an operator's). A TCP source must sign every section, and never as this
//! node (only the node itself speaks for it). Signatures are fold's to check. [`Sequencer::commit`] appends every record of the group,
//! syncs the log once, and only then queues an `Ack` for each source that asked
//! (`EventsAckWanted`), carrying that source's highest frame number in the group.
//!
//! Backpressure: after each commit the fullest queue (permille of its ring) and the
//! commit's latency are compared with the high marks; crossing either raises global
//! backpressure, and only staying below both low marks for `backpressure_hold_ms`
//! lowers it (hysteresis, and at most one raise per hold period). Each
//! change is an event of this node in the log, so every node's reconcile sees it.
//!
//! Invariants: a record is appended only whole and validated; acks follow the sync
//! that made their records durable; frames of one source keep their order; a bad
//! frame closes its source (the reactor sends the error) and the frames after it are
//! discarded and counted, never appended; nothing here reads the log back or folds.

use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;

use crate::event::{Event, EventBatch, EventKind};
use crate::ingest::ring::Consumer;
use crate::redex::{Redex, RedexError, Stamp};
use crate::sys::reactor::{ClientFrame, Command, Source, SourceKind};
use crate::trust::{Sealer, SignerKind};
use crate::wire::{self, FrameError, FrameKind};

/// Limits and marks of the sequencer (from the node config's `[ingest]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequencerConfig {
    /// This node's name: the origin of its own and its local sources' events.
    pub node_name: String,
    pub frame_bytes_max: u32,
    pub frames_per_round_max: u32,
    pub records_per_commit_max: u32,
    pub commit_bytes_max: u32,
    pub backpressure_queue_high_permille: u32,
    pub backpressure_queue_low_permille: u32,
    pub backpressure_commit_high_ms: u32,
    pub backpressure_commit_low_ms: u32,
    /// Once raised, backpressure is lowered only after the low marks held this long
    /// without a break (a saturating client fills and empties its ring every group).
    pub backpressure_hold_ms: u32,
}

/// Counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequencerStats {
    pub frames: u64,
    pub events: u64,
    pub records: u64,
    pub commits: u64,
    pub acks: u64,
    /// Frames whose payload failed validation or named a foreign origin on a local socket.
    pub rejected_frames: u64,
    /// Frames a source sent after a rejected one (the connection is closing).
    pub discarded_frames: u64,
    pub backpressure_raised: u64,
    pub backpressure_lowered: u64,
    /// The slowest commit (appends and the fsync), in microseconds.
    pub commit_us_max: u64,
    /// Own events dropped because this node's origin sequence numbers ran out (2^64).
    pub own_events_unnumbered: u64,
    /// The latest commits' durations (appends and the fsync), microseconds, at most
    /// `COMMIT_SAMPLES_MAX` (then overwritten in a ring), for percentiles.
    pub commit_us_samples: Vec<u32>,
}

/// Commit durations kept for percentiles.
pub const COMMIT_SAMPLES_MAX: usize = 1 << 16;

/// One record of the current group: where its payload sits in the group buffer and
/// whom to acknowledge.
#[derive(Debug, Clone, Copy)]
struct GroupRecord {
    offset: usize,
    bytes: usize,
    /// Index into `sources`, or `usize::MAX` for the node's own events.
    source: usize,
    frame_seq: u64,
    ack_wanted: bool,
    events: u64,
    /// Sections whose signatures the reactor verified (`ClientFrame::verified`).
    verified: crate::fold::VerifiedSections,
}

struct SourceSlot {
    id: u64,
    kind: SourceKind,
    frames: Consumer<ClientFrame>,
    /// A frame of this source was rejected: the rest are discarded.
    rejected: bool,
    /// Popped from since the last `take_unblocked`: only then can its producer be
    /// waiting for a resume (it pauses only on a full ring, which a pop relieves).
    popped: bool,
    /// Collections in a row that took nothing from this source (saturating). From
    /// `IDLE_AFTER_COLLECTS` on, the source is looked at only in scanning collections.
    idle_collects: u8,
    /// The last frame number taken; the next must be above it (numbers start at 1).
    last_frame_seq: u64,
    /// Highest frame seq to acknowledge after the current group's sync (0: none).
    ack_seq: u64,
    ack_position: u64,
}

/// What a commit made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    pub records: u64,
    pub events: u64,
    pub last: Stamp,
    pub commit_us: u64,
}

/// A record handed to a shared log: its ticket there, and the source and frame
/// number to acknowledge once the record is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handed {
    pub ticket: u64,
    /// The client source the record came from (None: the node's own events).
    pub source: Option<u64>,
    pub ack: Option<(u64, u64)>,
}

/// The merge-and-commit stage between the rings and the log.
pub struct Sequencer {
    config: SequencerConfig,
    sources: Vec<SourceSlot>,
    /// The source the next collection starts at.
    cursor: usize,
    group: AlignedVec<{ wire::ALIGN_BYTES }>,
    records: Vec<GroupRecord>,
    stamps: Vec<Stamp>,
    /// Events of this node waiting for the next group.
    own_events: Vec<EventKind>,
    /// The last origin_seq this node used.
    own_seq: u64,
    backpressure: bool,
    /// Since when every commit was under both low marks (while raised).
    low_since: Option<Instant>,
    stats: SequencerStats,
    /// Replies for the reactor (acks, resumes, closes), taken by the caller.
    commands: Vec<Command>,
    patch_offsets: Vec<usize>,
    /// Offsets (in the frame being taken) of unsigned sections to sign as this node's.
    unsigned_sections: Vec<usize>,
    /// Signs this node's records and its local clients' unsigned sections.
    sealer: Sealer,
    own_batch: EventBatch,
    /// Collections so far, and whether the current one also looks at idle sources.
    collects: u64,
    scan_idle: bool,
    /// Closes of sources whose frame was bad, held back until the acks of the frames
    /// before it (in the same group) are queued: the reactor drops a closed source's acks.
    pending_closes: Vec<Command>,
}

/// Collections without a frame after which a source counts as idle.
const IDLE_AFTER_COLLECTS: u8 = 4;
/// Every this many collections (and after any that found nothing), idle sources are
/// looked at too. Under load an idle source that wakes waits at most this many
/// groups; a thousand idle connections no longer cost a thousand cache misses per round.
const IDLE_SCAN_EVERY: u64 = 8;
const _: () = assert!(IDLE_SCAN_EVERY >= 1 && IDLE_AFTER_COLLECTS >= 1);

/// Bytes from the start of `base` to `field` (both inside one buffer).
fn offset_in(base: &[u8], field: *const u8) -> usize {
    field as usize - base.as_ptr() as usize
}

impl Sequencer {
    /// A sequencer whose own events continue after `own_seq_last` (the highest
    /// origin_seq of this node in the folded state); `backpressure_raised` is this
    /// node's backpressure mark in the folded state.
    pub fn new(config: SequencerConfig, sealer: Sealer, own_seq_last: u64, backpressure_raised: bool) -> Sequencer {
        assert_eq!(sealer.kind, SignerKind::Node, "a sequencer signs as its node");
        assert_eq!(sealer.name, config.node_name, "a sequencer signs with its own node's key");
        assert!(config.frames_per_round_max >= 1 && config.records_per_commit_max >= 1);
        assert!(config.commit_bytes_max >= config.frame_bytes_max, "a group must hold one frame");
        assert!(config.backpressure_queue_low_permille < config.backpressure_queue_high_permille);
        assert!(config.backpressure_commit_low_ms < config.backpressure_commit_high_ms);
        let mut sequencer = Sequencer {
            group: AlignedVec::with_capacity(config.commit_bytes_max as usize),
            records: Vec::with_capacity(config.records_per_commit_max as usize + 1),
            stamps: Vec::with_capacity(config.records_per_commit_max as usize + 1),
            config,
            sources: Vec::new(),
            cursor: 0,
            own_events: Vec::new(),
            own_seq: own_seq_last,
            backpressure: false,
            low_since: None,
            stats: SequencerStats::default(),
            commands: Vec::new(),
            patch_offsets: Vec::new(),
            unsigned_sections: Vec::new(),
            sealer,
            own_batch: EventBatch::default(),
            collects: 0,
            scan_idle: true,
            pending_closes: Vec::new(),
        };
        if backpressure_raised {
            // Raised by an earlier run of this node (in the folded state) and never
            // lowered: nothing in this run raised it, so lower it first thing.
            sequencer.push_own(EventKind::Backpressure { raised: false });
            sequencer.stats.backpressure_lowered += 1;
        }
        sequencer
    }

    /// Lowers backpressure if this node raised it (a clean shutdown calls this so a
    /// stopped node does not hold the cluster until it is declared down).
    pub fn lower_backpressure(&mut self) {
        if self.backpressure {
            self.backpressure = false;
            self.stats.backpressure_lowered += 1;
            self.push_own(EventKind::Backpressure { raised: false });
        }
    }

    /// The next origin sequence number of this node, or `None` once exhausted.
    fn next_own_seq(&mut self) -> Option<u64> {
        self.own_seq = self.own_seq.checked_add(1)?;
        Some(self.own_seq)
    }

    /// Takes a newly accepted source into the rotation.
    pub fn add_source(&mut self, source: Source) {
        self.sources.push(SourceSlot {
            id: source.id,
            kind: source.kind,
            frames: source.frames,
            rejected: false,
            popped: false,
            idle_collects: 0,
            last_frame_seq: 0,
            ack_seq: 0,
            ack_position: 0,
        });
    }

    /// Queues an event of this node for the next group.
    pub fn push_own(&mut self, kind: EventKind) {
        self.own_events.push(kind);
    }

    pub fn stats(&self) -> &SequencerStats {
        &self.stats
    }

    /// Sources in the rotation (open, or closed with frames left).
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// Whether global backpressure is raised by this node.
    pub fn backpressure(&self) -> bool {
        self.backpressure
    }

    /// Replies for the reactor since the last call (send them with `Resumer::send`).
    pub fn commands(&mut self) -> &mut Vec<Command> {
        &mut self.commands
    }

    /// Events of this node waiting for the next collection.
    pub fn own_events_pending(&self) -> usize {
        self.own_events.len()
    }

    /// Records collected and not yet committed.
    pub fn pending_records(&self) -> usize {
        self.records.len()
    }

    /// Collects the next group from the queues (and this node's own events); returns
    /// the number of records in it. Call [`Sequencer::commit`] next when non-zero.
    pub fn collect(&mut self) -> usize {
        assert!(self.records.is_empty(), "collect after commit");
        self.group.clear();
        if !self.own_events.is_empty() {
            self.collect_own();
        }
        let records_max = self.config.records_per_commit_max as usize;
        let bytes_max = self.config.commit_bytes_max as usize;
        let per_round = self.config.frames_per_round_max as usize;
        if self.scan_idle {
            // Wake the idle sources that have frames: they join the rotation below on
            // equal terms, wherever the cursor is.
            for slot in &mut self.sources {
                if slot.idle_collects >= IDLE_AFTER_COLLECTS && !slot.frames.is_empty() {
                    slot.idle_collects = 0;
                }
            }
        }
        let mut full = false;
        while !full && !self.sources.is_empty() {
            let mut progressed = false;
            let count = self.sources.len();
            for step in 0..count {
                let index = (self.cursor + step) % count;
                if self.sources[index].idle_collects >= IDLE_AFTER_COLLECTS {
                    continue;
                }
                for _ in 0..per_round {
                    let Some(frame) = self.sources[index].frames.pop() else { break };
                    progressed = true;
                    let slot = &mut self.sources[index];
                    (slot.popped, slot.idle_collects) = (true, 0);
                    self.take_frame(index, &frame.bytes, frame.verified);
                    if self.records.len() >= records_max || self.group.len() >= bytes_max {
                        full = true;
                        break;
                    }
                }
                if full {
                    // The next collection starts after the source served last.
                    self.cursor = (index + 1) % count;
                    break;
                }
            }
            if !progressed {
                break;
            }
        }
        let found = self.records.len();
        self.resume_and_age();
        if self.records.is_empty() {
            // No acks will follow: the closes can go now.
            self.commands.append(&mut self.pending_closes);
            self.remove_abandoned();
        }
        self.collects += 1;
        // Look at idle sources next time when this one found nothing (the node is not
        // busy), and every IDLE_SCAN_EVERY collections in any case.
        self.scan_idle = found == 0 || self.collects.is_multiple_of(IDLE_SCAN_EVERY);
        found
    }

    /// After the pops of a collection: asks the reactor to resume every popped source
    /// whose producer paused, and ages the sources nothing was taken from.
    fn resume_and_age(&mut self) {
        for slot in &mut self.sources {
            if std::mem::take(&mut slot.popped) {
                // Only a popped source can have a paused producer to resume.
                if slot.frames.take_unblocked() {
                    self.commands.push(Command::Resume { source: slot.id });
                }
            } else {
                slot.idle_collects = slot.idle_collects.saturating_add(1);
            }
        }
    }

    /// Between groups (the group's records name sources by index): drops the closed,
    /// drained sources among those this collection looked at, keeping the cursor on
    /// the same next source.
    fn remove_abandoned(&mut self) {
        debug_assert!(self.records.is_empty());
        let scan_idle = self.scan_idle;
        let mut index = 0;
        while index < self.sources.len() {
            let slot = &self.sources[index];
            let looked_at = scan_idle || slot.idle_collects < IDLE_AFTER_COLLECTS;
            if looked_at && slot.frames.is_abandoned() {
                self.sources.remove(index);
                if self.cursor > index {
                    self.cursor -= 1;
                }
                continue;
            }
            index += 1;
        }
        if self.cursor >= self.sources.len() {
            self.cursor = 0;
        }
    }

    fn collect_own(&mut self) {
        self.own_batch.events.clear();
        for kind in std::mem::take(&mut self.own_events) {
            let Some(origin_seq) = self.next_own_seq() else {
                // 2^64 events of this node: nothing can be numbered any more.
                self.stats.own_events_unnumbered += 1;
                continue;
            };
            self.own_batch.events.push(Event { origin: self.config.node_name.clone(), origin_seq, kind });
        }
        if self.own_batch.events.is_empty() {
            return;
        }
        // Signed straight into the group (a section ends 16-aligned).
        let body = wire::encode_batch(&self.own_batch);
        let offset = self.group.len();
        self.sealer.seal_into(&mut self.group, &body, 0, &[0; 16]);
        let events = self.own_batch.events.len() as u64;
        self.records.push(GroupRecord {
            offset,
            bytes: self.group.len() - offset,
            source: usize::MAX,
            frame_seq: 0,
            ack_wanted: false,
            events,
            verified: 0,
        });
    }

    /// Copies one frame's payload into the group, validates it and, for a local
    /// source, stamps its origin sequence numbers.
    fn take_frame(&mut self, index: usize, frame: &[u8], verified: crate::fold::VerifiedSections) {
        self.stats.frames += 1;
        if self.sources[index].rejected {
            self.stats.discarded_frames += 1;
            return;
        }
        // The reactor checked the whole frame; a failure here is a bug upstream, but
        // it is still answered as bad input rather than a panic.
        let header = match wire::decode_header(frame, self.config.frame_bytes_max) {
            Ok(header) if header.frame_bytes() == frame.len() => header,
            Ok(header) => {
                let (needed, available) = (header.frame_bytes() as u64, frame.len() as u64);
                return self.reject(index, FrameError::Truncated { needed, available });
            }
            Err(error) => return self.reject(index, error),
        };
        let ack_wanted = match header.kind {
            FrameKind::Events => false,
            FrameKind::EventsAckWanted => true,
            other => {
                let reason = format!("frame kind {other:?} is not accepted from clients");
                return self.reject(index, FrameError::BadPayload { reason });
            }
        };
        let last_frame_seq = self.sources[index].last_frame_seq;
        if header.seq <= last_frame_seq {
            let reason = format!(
                "frame number {} does not follow {last_frame_seq}: frame numbers start at 1 and increase",
                header.seq
            );
            return self.reject(index, FrameError::BadPayload { reason });
        }
        let payload = &frame[wire::HEADER_BYTES..wire::HEADER_BYTES + header.payload_bytes as usize];
        let offset = self.group.len();
        self.group.extend_from_slice(payload);
        let local = self.sources[index].kind == SourceKind::Unix;
        let checked = check_sections(
            &self.group[offset..],
            local,
            &self.config.node_name,
            u64::MAX - self.own_seq,
            &mut self.patch_offsets,
            &mut self.unsigned_sections,
        );
        let events = match checked {
            Ok(events) => events,
            Err(error) => {
                self.group.resize(offset, 0);
                return self.reject(index, error);
            }
        };
        for &at in &self.patch_offsets {
            // Checked above: enough numbers remain for every event of the frame.
            self.own_seq += 1;
            self.group[offset + at..offset + at + 8].copy_from_slice(&self.own_seq.to_le_bytes());
        }
        for &start in &self.unsigned_sections {
            // Stamped: now the node signs the local client's section as its own.
            self.sealer.sign_unsigned_at(&mut self.group[offset..], start);
        }
        self.sources[index].last_frame_seq = header.seq;
        pad_to_alignment(&mut self.group);
        self.stats.events += events;
        self.records.push(GroupRecord {
            offset,
            bytes: payload.len(),
            source: index,
            frame_seq: header.seq,
            ack_wanted,
            events,
            // Only sections the reactor verified, which the patches above never touch
            // (they change unsigned sections alone, which never verify).
            verified,
        });
    }

    fn reject(&mut self, index: usize, error: FrameError) {
        let slot = &mut self.sources[index];
        slot.rejected = true;
        self.stats.rejected_frames += 1;
        self.pending_closes.push(Command::Close { source: slot.id, error });
    }

    /// Appends every record of the group, syncs the log once, queues the acks and
    /// updates backpressure. On error the group is kept (nothing was acknowledged).
    pub fn commit(&mut self, log: &mut dyn Redex) -> Result<Committed, RedexError> {
        assert!(!self.records.is_empty(), "commit of an empty group");
        let started = Instant::now();
        self.stamps.clear();
        for record in &self.records {
            let stamp = log.append(&self.group[record.offset..record.offset + record.bytes])?;
            self.stamps.push(stamp);
        }
        let durable = log.sync()?;
        let last = *self.stamps.last().expect("a non-empty group");
        assert!(durable >= last.position, "sync made the group durable");
        let commit_us = started.elapsed().as_micros() as u64;
        for (record, stamp) in self.records.iter().zip(&self.stamps) {
            if record.ack_wanted {
                let slot = &mut self.sources[record.source];
                // Frame numbers increase per source (checked in take_frame).
                debug_assert!(record.frame_seq > slot.ack_seq);
                slot.ack_seq = record.frame_seq;
                slot.ack_position = stamp.position;
            }
        }
        for slot in &mut self.sources {
            if slot.ack_seq > 0 {
                self.commands.push(Command::Ack {
                    source: slot.id,
                    seq: slot.ack_seq,
                    position: slot.ack_position,
                    time_ms: last.time_ms,
                });
                self.stats.acks += 1;
                slot.ack_seq = 0;
            }
        }
        // After the acks of the frames before them.
        self.commands.append(&mut self.pending_closes);
        let records = self.records.len() as u64;
        let events = self.records.iter().map(|record| record.events).sum();
        self.stats.records += records;
        self.stats.commits += 1;
        self.stats.commit_us_max = self.stats.commit_us_max.max(commit_us);
        let sample = commit_us.min(u32::MAX as u64) as u32;
        if self.stats.commit_us_samples.len() < COMMIT_SAMPLES_MAX {
            self.stats.commit_us_samples.push(sample);
        } else {
            self.stats.commit_us_samples[(self.stats.commits as usize) % COMMIT_SAMPLES_MAX] = sample;
        }
        self.update_backpressure(commit_us);
        Ok(Committed { records, events, last, commit_us })
    }

    /// Hands every record of the group to a shared log whose order is decided elsewhere
    /// (a clustered node's JetStream): `submit` queues one payload and returns its
    /// ticket. Returns, per record in order, the ticket and whom to acknowledge once the
    /// record is read back from the log (`Handed::ack`): a shared log acknowledges
    /// nothing here. Ends the group, like `commit` then `release`.
    pub fn hand_over(&mut self, submit: &mut dyn FnMut(&[u8]) -> u64, out: &mut Vec<Handed>) {
        assert!(!self.records.is_empty(), "hand over of an empty group");
        for record in &self.records {
            let ticket = submit(&self.group[record.offset..record.offset + record.bytes]);
            let source = (record.source != usize::MAX).then(|| self.sources[record.source].id);
            let ack = record.ack_wanted.then(|| (self.sources[record.source].id, record.frame_seq));
            out.push(Handed { ticket, source, ack });
        }
        // The acks come later, once read back; a bad frame's close need not wait for them.
        self.commands.append(&mut self.pending_closes);
        let records = self.records.len() as u64;
        self.stats.records += records;
        self.stats.commits += 1;
        self.update_backpressure(0);
        self.records.clear();
        self.stamps.clear();
        self.remove_abandoned();
    }

    /// The records of the last commit, in log order: stamp, payload (aligned, ready
    /// for `fold::fold_payload_verified`) and the sections the reactor verified. Valid
    /// until the next `collect`.
    pub fn committed(&self) -> impl Iterator<Item = (Stamp, &[u8], crate::fold::VerifiedSections)> + '_ {
        self.records
            .iter()
            .zip(&self.stamps)
            .map(|(record, stamp)| (*stamp, &self.group[record.offset..record.offset + record.bytes], record.verified))
    }

    /// Ends a commit once its records were folded: the next `collect` may start.
    pub fn release(&mut self) {
        assert_eq!(self.records.len(), self.stamps.len(), "release after commit");
        self.records.clear();
        self.stamps.clear();
        self.remove_abandoned();
    }

    /// The fullest queue among the sources not idle, in permille of its ring.
    pub fn queue_fill_permille(&self) -> u32 {
        let fill = |slot: &SourceSlot| (slot.frames.len() * 1000 / slot.frames.capacity().max(1)) as u32;
        self.sources.iter().filter(|slot| slot.idle_collects < IDLE_AFTER_COLLECTS).map(fill).max().unwrap_or(0)
    }

    fn update_backpressure(&mut self, commit_us: u64) {
        let config = &self.config;
        let fill = self.queue_fill_permille();
        let commit_ms = commit_us / 1000;
        let high =
            fill >= config.backpressure_queue_high_permille || commit_ms >= config.backpressure_commit_high_ms as u64;
        let low = fill < config.backpressure_queue_low_permille && commit_ms < config.backpressure_commit_low_ms as u64;
        if !low {
            self.low_since = None;
        } else if self.low_since.is_none() {
            self.low_since = Some(Instant::now());
        }
        let held_low = self
            .low_since
            .is_some_and(|since| since.elapsed() >= Duration::from_millis(config.backpressure_hold_ms as u64));
        if !self.backpressure && high {
            self.backpressure = true;
            self.low_since = None;
            self.stats.backpressure_raised += 1;
            self.push_own(EventKind::Backpressure { raised: true });
        } else if self.backpressure && held_low {
            self.backpressure = false;
            self.stats.backpressure_lowered += 1;
            self.push_own(EventKind::Backpressure { raised: false });
        }
    }

    /// True when every source is closed and drained and nothing is pending: what a
    /// clean shutdown waits for.
    pub fn drained(&self) -> bool {
        self.records.is_empty()
            && self.own_events.is_empty()
            && self.sources.is_empty()
            && self.pending_closes.is_empty()
    }
}

/// Checks a client frame's payload: well-formed sections, each body a valid
/// archived batch. From the Unix socket (`local`), unsigned sections must name this
/// node as every event's origin (their `origin_seq` offsets, relative to `payload`,
/// go to `patch_offsets` and their starts to `unsigned`, for stamping and signing);
/// over TCP every section must be signed, and none by this node's name (only the
/// node itself speaks for it). Signatures are fold's to check. Returns the events.
fn check_sections(
    payload: &[u8],
    local: bool,
    name: &str,
    numbers_left: u64,
    patch_offsets: &mut Vec<usize>,
    unsigned: &mut Vec<usize>,
) -> Result<u64, FrameError> {
    patch_offsets.clear();
    unsigned.clear();
    let mut events = 0u64;
    for section in crate::trust::sections(payload) {
        let section = section.map_err(|error| FrameError::BadPayload { reason: error.to_string() })?;
        let batch = wire::access_batch(section.body).map_err(|error| FrameError::BadPayload {
            reason: format!("section at byte {} (signer `{}`): {error}", section.offset, section.name),
        })?;
        events += batch.events.len() as u64;
        match section.kind {
            SignerKind::Unsigned if !local => {
                return Err(FrameError::BadPayload {
                    reason: "unsigned events over TCP: a client signs its frames with its node key (only the node's \
                             own Unix socket takes unsigned events)"
                        .to_string(),
                })
            }
            SignerKind::Unsigned => {
                for event in batch.events.iter() {
                    if event.origin.as_str() != name {
                        let origin = event.origin.as_str().chars().take(64).collect::<String>();
                        return Err(FrameError::BadPayload {
                            reason: format!(
                                "events on the local socket must name this node `{name}` as their origin, not \
                                 `{origin}`"
                            ),
                        });
                    }
                    let field = &event.origin_seq as *const _ as *const u8;
                    patch_offsets.push(offset_in(payload, field));
                }
                unsigned.push(section.offset);
            }
            SignerKind::Node if section.name == name => {
                return Err(FrameError::BadPayload {
                    reason: format!(
                        "a section signed as this node `{name}` from a client: only the node itself and its local \
                         socket speak for it"
                    ),
                })
            }
            SignerKind::Node | SignerKind::Operator => {}
        }
    }
    if patch_offsets.len() as u64 > numbers_left {
        return Err(FrameError::BadPayload { reason: "this node's origin sequence numbers are exhausted".to_string() });
    }
    Ok(events)
}

fn pad_to_alignment(group: &mut AlignedVec<{ wire::ALIGN_BYTES }>) {
    let padded = group.len() + wire::padding_bytes(group.len());
    group.resize(padded, 0);
}
