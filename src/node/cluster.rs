//! A node as one of many: the cluster's log is a NATS JetStream stream shared by
//! every node (`[cluster] nats`), met through `redex::SharedRedex` (publish, outcomes,
//! records read back; `redex::jetstream::JetStream` is its backend); this node's disk
//! holds a mirror of it, checkpoints of its state, and nothing else of the order.
//!
//! Start: load the newest checkpoint (`DATA_DIR/checkpoints`, else `[cluster]
//! checkpoint_from` for a new node, else an empty state), fold the mirror past it, then
//! read the stream from the next position until caught up, folding without acting.
//! Only then do the executors open, the sockets listen and the node publish: its own
//! events are numbered from what the log says it last sent, so it must have read it.
//! Loop: the sequencer's groups are handed to JetStream (each record with its content
//! hash as message id, so a retried publish is stored once); what the stream delivers
//! is mirrored, folded and reconciled in stream order, and this node's actions are
//! dispatched; clients are acknowledged only once their record is read back (an admin
//! command is confirmed when it is in the cluster's order, not when it was sent).
//! Every `commitment_interval_records` positions the node publishes its state hash
//! there; when its own hash is not the one most nodes committed at the same position,
//! it says so (log, snapshot) and stops acting on its decisions until an operator
//! looks. Every `checkpoint_interval_records` it writes a checkpoint; the oldest one it
//! keeps bounds what it needs from the stream, published with each commitment, and the
//! first live node in row order purges the stream below what every node still needs.
//! Another process publishing as this node's name (names are unique in a cluster) is
//! noticed the same way: records of this origin it did not publish.
//!
//! Invariants: positions and times come from the stream (position = stream sequence,
//! time = max(previous time, server timestamp)), so every node folds the same records
//! with the same stamps; a record is folded only after it is mirrored; actions are
//! dispatched only after the start's catch-up and never while fenced; a client ack
//! names a position this node has folded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;

use crate::config::Config;
use crate::engine::Engine;
use crate::event::EventKind;
use crate::ingest::park::Signal;
use crate::node::config::NodeConfig;
use crate::node::run::{dispatch_actions, refresh_keys, write_atomically, Executors, NodeError, NodeReport, ADDR_FILE};
use crate::redex::jetstream::{
    Delivered, JetStream, JetStreamConfig, JetStreamError, PublishError, PublishOutcome, Stored,
};
use crate::redex::mirror::Mirror;
use crate::redex::SharedRedex;
use crate::sequencer::{Handed, Sequencer};
use crate::state::checkpoint::CheckpointStore;
use crate::state::State;
use crate::sync::Arc;
use crate::sys::reactor::{Command, Reactor};
use crate::sys::signals::StopFlag;
use crate::wire;

/// The file holding the mirror's base position, in the data directory.
pub const MIRROR_BASE_FILE: &str = "log.base";
/// Records folded per turn of the loop at most (then the sockets get a turn).
const RECORDS_PER_TURN_MAX: usize = 4096;
/// Own commitments remembered, to compare with other nodes' at the same position.
const COMMITMENTS_KEPT: usize = 64;
/// How often the first live node looks whether the stream can be trimmed.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);
/// How long a clean stop waits for this node's last records to come back.
const STOP_DRAIN_WAIT: Duration = Duration::from_secs(10);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Why this node stopped acting on its own decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// Its state hash at `position` is not the one most nodes committed there.
    Diverged { position: u64, own: [u8; 16], majority: [u8; 16], agreeing: usize, reporting: usize },
    /// Records of this node's name that it did not publish: another process runs under it.
    NameInUse { position: u64 },
    /// After every NATS server lost its tail, another node's record took a position
    /// this node had folded something else at.
    TailLost { position: u64 },
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fence::Diverged { position, own, majority, agreeing, reporting } => write!(
                f,
                "state diverged at log position {position}: this node's hash is {} but {agreeing} of {reporting} nodes \
                 committed {}; this node stops acting until an operator looks (restart it without \
                 DATA_DIR/checkpoints and DATA_DIR/log to refold from the cluster's log, and compare [fold] and \
                 [reconcile] settings)",
                crate::event::hex(own),
                crate::event::hex(majority)
            ),
            Fence::NameInUse { position } => write!(
                f,
                "another process publishes as this node (record at log position {position} was not sent by this \
                 process): node names must be unique in a cluster; this node stops acting"
            ),
            Fence::TailLost { position } => write!(
                f,
                "the cluster's log lost its tail and position {position} now holds another record than the one this \
                 node folded there; this node stops acting (restart it from another node's checkpoint)"
            ),
        }
    }
}

/// Client records waiting to be read back, in the order they were handed over.
struct PendingAcks {
    queue: VecDeque<Pending>,
}

struct Pending {
    ticket: u64,
    /// Where it was stored, once known.
    position: Option<u64>,
    source: u64,
    /// The frame number to acknowledge, when the client asked.
    ack: Option<u64>,
}

impl PendingAcks {
    /// The entry of `ticket` (tickets rise in hand-over order, so the queue is sorted).
    fn find(&self, ticket: u64) -> Option<usize> {
        self.queue.binary_search_by_key(&ticket, |entry| entry.ticket).ok()
    }

    fn stored(&mut self, ticket: u64, position: u64) {
        if let Some(at) = self.find(ticket) {
            self.queue[at].position = Some(position);
        }
    }

    /// A client's record was not stored: acks are cumulative, so no later frame of
    /// its source may be acknowledged (that would confirm the lost one too). The
    /// source is told and closed instead.
    fn failed(&mut self, ticket: u64, reason: &str, commands: &mut Vec<Command>) {
        if let Some(source) = self.find(ticket).map(|at| self.queue[at].source) {
            self.close(source, reason, commands);
        }
    }

    fn close(&mut self, source: u64, reason: &str, commands: &mut Vec<Command>) {
        self.queue.retain(|entry| entry.source != source);
        let reason = format!("a record of this connection was not stored in the cluster's log: {reason}");
        commands.push(Command::Close { source, error: wire::FrameError::BadPayload { reason } });
    }

    /// Acks, in hand-over order, every client whose record is folded (at or below `applied`).
    fn release(&mut self, applied: u64, time_ms: u64, commands: &mut Vec<Command>) {
        while let Some(&Pending { position: Some(position), source, ack, .. }) = self.queue.front() {
            if position > applied {
                break;
            }
            self.queue.pop_front();
            if let Some(seq) = ack {
                commands.push(Command::Ack { source, seq, position, time_ms });
            }
        }
    }
}

/// Message ids this process published whose record has not come back yet (bounded by
/// the publishes in flight and the records stored but not yet read back).
#[derive(Default)]
struct OwnIds {
    ids: hashbrown::HashSet<[u8; 16]>,
    by_ticket: hashbrown::HashMap<u64, [u8; 16]>,
}

impl OwnIds {
    fn published(&mut self, ticket: u64, id: [u8; 16]) {
        self.ids.insert(id);
        self.by_ticket.insert(ticket, id);
    }

    /// A publish ended: a record not stored, or stored at or below what was already
    /// folded (a duplicate of an earlier record), never comes back.
    fn outcome(&mut self, ticket: u64, result: &Result<Stored, String>, folded: u64) {
        let Some(id) = self.by_ticket.remove(&ticket) else { return };
        if result.as_ref().map_or(true, |stored| stored.position <= folded) {
            self.ids.remove(&id);
        }
    }

    /// A record came back: true when this process published it.
    fn delivered(&mut self, id: [u8; 16]) -> bool {
        self.ids.remove(&id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len() + self.by_ticket.len()
    }
}

/// What the loop keeps beside the engine.
struct Cluster {
    name: String,
    /// The node's settings (a rollback starts a new JetStream client from them).
    config: NodeConfig,
    engine: Engine,
    mirror: Mirror,
    aligned: AlignedVec<{ wire::ALIGN_BYTES }>,
    /// Message ids this process published whose record has not come back yet.
    own_ids: OwnIds,
    /// Records of this node's name folded since the start's catch-up.
    acting: bool,
    fence: Option<Fence>,
    commitments: VecDeque<(u64, [u8; 16])>,
    /// The last commitment position compared with every voter's.
    commitment_checked: u64,
    commitment_interval: u64,
    checkpoint_interval: u64,
    checkpoints: CheckpointStore,
    last_checkpoint: u64,
    /// Own events (commitments) for the sequencer.
    own_events: Vec<EventKind>,
    mirrored_unsynced: bool,
    folded: u64,
    /// Roll-backs to a stream that lost its tail.
    rewinds: u64,
    /// Own events stored out of order and queued again under new numbers.
    restamped: u64,
    /// The mirror's frame limit: a larger record from the stream is folded as empty.
    frame_bytes_max: u32,
    /// This node's public key: sections signed with it are this node's.
    own_key: crate::trust::PublicKey,
    /// Copies of this node's old records delivered under another message id.
    replayed_own: u64,
    /// Records this node did not publish that fold applied events of, and those it
    /// applied nothing of: a node whose genesis is not the cluster's (or whose peers
    /// are not admitted) sees only the second kind, and must not trim the stream.
    foreign_applied: u64,
    foreign_refused: u64,
}

impl Cluster {
    /// Mirrors, folds and reconciles one delivered record; dispatches this node's
    /// actions when acting.
    fn apply(&mut self, record: &Delivered<'_>, locals: &mut [Executors]) -> Result<(), NodeError> {
        let position = record.position;
        assert_eq!(position, self.engine.state.position + 1, "the stream is delivered densely, in order");
        // A record republished after the stream lost it keeps the time it was folded at.
        let stamp_ms = record.stamped_ms.unwrap_or(record.timestamp_ns / 1_000_000);
        let time_ms = self.engine.state.now_ms.max(stamp_ms);
        self.aligned.clear();
        if wire::frame_bytes(record.payload.len()) as u64 <= u64::from(self.frame_bytes_max) {
            self.aligned.extend_from_slice(record.payload);
        } else {
            // Too large for the mirror (`[log] frame_bytes_max`): never an event batch this
            // node could have sent. It is mirrored and folded as an empty record, which fold
            // rejects, so the mirror stays dense and a replay folds the same.
            tracing::warn!(
                position,
                bytes = record.payload.len(),
                "a record too large for the mirror: folded as empty"
            );
        }
        let from_self = record.msg_id.is_some_and(|id| self.own_ids.delivered(id));
        // One look at the batch (validated again by fold): does it speak for this node,
        // does it carry a commitment?
        let own_last =
            self.engine.state.nodes.find(&self.name).map(|row| self.engine.state.nodes.origin_seq_last[row.index()]);
        // The client thread checked the signatures of exactly these bytes (an oversized
        // record is folded empty: nothing of it is verified).
        let verified = if self.aligned.len() == record.payload.len() { record.verified } else { 0 };
        let scanned = scan(&self.aligned, &self.name, &self.own_key, own_last, from_self, verified);
        let (speaks_for_self, commits) = (scanned.speaks_for_self, scanned.commits);
        if !from_self && scanned.replayed_own {
            // Our own signed bytes again under another message id: a duplicate (fold
            // refuses its events as stale), never a reason to stop.
            self.replayed_own += 1;
            tracing::warn!(position, "a copy of a record this node published before: refused as a duplicate");
        }
        if self.acting && !from_self && self.fence.is_none() && speaks_for_self {
            let fence = Fence::NameInUse { position };
            tracing::error!("{fence}");
            self.fence = Some(fence);
        }
        if from_self && self.acting && scanned.stale_own {
            self.restamp_stale_own_events(own_last.expect("a stale own event needs the node's row"));
        }
        self.mirror.append(position, time_ms, &self.aligned)?;
        self.mirrored_unsynced = true;
        let applied_before = self.engine.state.events_applied;
        let (state, actions) = self.engine.apply_verified(position, time_ms, &self.aligned, verified);
        self.folded += 1;
        if !from_self {
            if state.events_applied > applied_before {
                self.foreign_applied += 1;
            } else {
                self.foreign_refused += 1;
                if self.foreign_applied == 0 && self.foreign_refused == FOREIGN_REFUSED_WARN {
                    tracing::warn!(
                        refused = self.foreign_refused,
                        cluster = crate::event::hex(&state.keyring.cluster_id),
                        "none of the records other nodes published was applied here: is this node's genesis the \
                         cluster's (`[cluster] genesis_file`), and are the others admitted? This node does not \
                         trim the stream until one is"
                    );
                }
            }
        }
        refresh_keys(state, locals);
        if self.acting && self.fence.is_none() {
            dispatch_actions(state, actions, locals);
        }
        if position.is_multiple_of(self.commitment_interval) {
            let hash = state.state_hash().to_le_bytes();
            if self.commitments.len() == COMMITMENTS_KEPT {
                self.commitments.pop_front();
            }
            self.commitments.push_back((position, hash));
            if self.acting {
                let needs_position = self.checkpoints.oldest().map_or(0, |oldest| oldest + 1);
                self.own_events.push(EventKind::Commitment { position, state_hash: hash, needs_position });
            }
        }
        if commits {
            // Compared as each commitment arrives: under load a turn spans many
            // positions, and the moment every voter stands at one position is brief.
            self.check_commitments();
        }
        if position >= self.last_checkpoint + self.checkpoint_interval {
            self.checkpoint();
        }
        Ok(())
    }

    /// A record of this node's that the stream stored after a later one (a publish
    /// failed, and was resent after the next was stored) has events numbered at or
    /// below what was folded: fold refuses them as stale. Those safe to apply late
    /// (outcomes, samples, heartbeats, inventory digests, announcements, admin commands
    /// with their own sequence) are queued again under new numbers; order-sensitive
    /// facts (replica and daemon states, capabilities, intents, backpressure) are not:
    /// the executors report them again (level-triggered).
    fn restamp_stale_own_events(&mut self, last: u64) {
        let own_key = self.own_key;
        let sections: Vec<crate::event::EventBatch> = crate::trust::sections(&self.aligned)
            .map_while(Result::ok)
            .filter(|section| section.kind == crate::trust::SignerKind::Node && section.key == own_key)
            .filter_map(|section| wire::decode_batch(section.body).ok())
            .collect();
        let owned = sections.into_iter().flat_map(|batch| batch.events);
        for event in owned.filter(|event| event.origin == self.name && event.origin_seq <= last) {
            let late_is_safe = matches!(
                event.kind,
                EventKind::ActionOutcome { .. }
                    | EventKind::Rtt { .. }
                    | EventKind::NodeHealth(crate::event::NodeHealth::Heartbeat { .. })
                    | EventKind::InventoryDigest { .. }
                    | EventKind::BlobAnnounce { .. }
            );
            self.restamped += u64::from(late_is_safe);
            tracing::warn!(
                origin_seq = event.origin_seq,
                last,
                kind = event.kind.name(),
                again = late_is_safe,
                "an own event was stored after a later one (a publish was resent)"
            );
            if late_is_safe {
                self.own_events.push(event.kind);
            }
        }
    }

    /// Writes a checkpoint of the state now (logged, never fatal: the mirror still holds
    /// everything).
    fn checkpoint(&mut self) {
        let position = self.engine.state.position;
        // The mirror first: a checkpoint never runs ahead of what the disk holds.
        if let Err(error) = self.mirror.sync() {
            return tracing::warn!("mirror: {error}");
        }
        self.mirrored_unsynced = false;
        match self.checkpoints.write(&self.engine.state) {
            Ok(path) => {
                self.last_checkpoint = position;
                tracing::info!(position, path = %path.display(), "checkpoint written");
            }
            Err(error) => tracing::warn!(position, "checkpoint not written: {error}"),
        }
    }

    /// Compares this node's commitment with the other nodes' once every live node
    /// stands at the same position (commitments arrive at different
    /// times; a decision on part of them could fence a healthy node): when this
    /// node's hash is not held by a strict majority of them, it is fenced.
    fn check_commitments(&mut self) {
        if self.fence.is_some() {
            return;
        }
        let nodes = &self.engine.state.nodes;
        let Some(own_row) = nodes.find(&self.name).map(|row| row.index()) else { return };
        let position = nodes.commitment_position[own_row];
        if position == 0 || position == self.commitment_checked {
            return;
        }
        let Some(&(_, own)) = self.commitments.iter().find(|(at, _)| *at == position) else { return };
        let mut voters = 0usize;
        let mut agreeing = 0usize;
        let mut tally: Vec<([u8; 16], usize)> = Vec::new();
        for row in 0..nodes.len() {
            if !nodes.live[row] && row != own_row {
                continue; // not live: not a voter
            }
            if nodes.commitment_position[row] != position {
                // Not every live node is here yet (one that never commits, an outside
                // client heartbeating under its own name, holds the decision until it
                // is no longer live): look again later.
                return;
            }
            let hash = if row == own_row { own } else { nodes.commitment_hash[row] };
            voters += 1;
            agreeing += usize::from(hash == own);
            match tally.iter_mut().find(|(seen, _)| *seen == hash) {
                Some((_, count)) => *count += 1,
                None => tally.push((hash, 1)),
            }
        }
        self.commitment_checked = position;
        if voters < 2 || agreeing * 2 > voters {
            return;
        }
        let (majority, count) = tally.iter().copied().max_by_key(|(_, count)| *count).expect("own is counted");
        let fence = Fence::Diverged { position, own, majority, agreeing: count, reporting: voters };
        tracing::error!("{fence}");
        self.fence = Some(fence);
    }
}

/// What a delivered batch holds, found in one look (fold validates it again).
struct Scanned {
    /// A section validly signed with this node's key carries an event numbered above
    /// what was folded of this node: if this node did not publish it, another process
    /// holds its key.
    speaks_for_self: bool,
    /// A section signed with this node's key whose events were all folded before: a
    /// copy of an old record (a replay), refused by fold as stale.
    replayed_own: bool,
    /// An event is a state commitment.
    commits: bool,
    /// An event of this node is numbered at or below what was folded of it (stored
    /// after a later one): fold will refuse it as stale.
    stale_own: bool,
}

/// Records from others refused one after another (none applied yet) before the node
/// warns that its genesis may not be the cluster's.
const FOREIGN_REFUSED_WARN: u64 = 100;

/// Scans `payload` for sections signed with this node's key (`own_last`: its last
/// origin sequence folded, None before it joined) and for commitments. Unless the
/// record is one this node published (`from_self`: its message id, the hash of these
/// bytes, is one of ours), an own section counts only if its signature is valid: the
/// client thread's check (`verified`, the sections it found valid), so a forged
/// section naming this node never counts. All false for a bad payload.
fn scan(
    payload: &[u8],
    name: &str,
    own_key: &crate::trust::PublicKey,
    own_last: Option<u64>,
    from_self: bool,
    verified: crate::fold::VerifiedSections,
) -> Scanned {
    let mut found = Scanned { speaks_for_self: false, replayed_own: false, commits: false, stale_own: false };
    for (index, section) in crate::trust::sections(payload).enumerate() {
        let Ok(section) = section else { break };
        let Ok(batch) = wire::access_batch(section.body) else { continue };
        let own = section.kind == crate::trust::SignerKind::Node && section.name == name && &section.key == own_key;
        let (mut fresh, mut stale) = (false, false);
        for event in batch.events.iter() {
            found.commits |= matches!(event.kind, crate::event::ArchivedEventKind::Commitment { .. });
            if own && event.origin.as_str() == name {
                let old = own_last.is_some_and(|last| event.origin_seq.to_native() <= last);
                stale |= old;
                fresh |= !old;
            }
        }
        let valid = from_self || (index < 64 && verified & (1 << index) != 0);
        if own && (fresh || stale) && valid {
            found.speaks_for_self |= fresh;
            found.stale_own |= stale;
            found.replayed_own |= stale && !fresh;
        }
    }
    found
}

/// The content hash a record is published under (JetStream's de-duplication id): a
/// retry of the same bytes is stored once; two records never share bytes, since
/// each carries its origin and origin sequence.
pub fn message_id(payload: &[u8]) -> [u8; 16] {
    let hash = blake3::hash(payload);
    let mut id = [0u8; 16];
    id.copy_from_slice(&hash.as_bytes()[..16]);
    id
}

/// The JetStream client's settings from the node's `[cluster]` (call after `check`).
pub fn jetstream_config(config: &NodeConfig) -> Result<JetStreamConfig, NodeError> {
    let cluster = &config.cluster;
    Ok(JetStreamConfig {
        servers: cluster.nats.clone(),
        token: config.nats_token()?,
        client_name: config.name.clone(),
        stream: cluster.stream.clone(),
        subject: cluster.subject.clone(),
        stream_replicas: cluster.stream_replicas,
        duplicate_window_ms: 120_000,
        publish_window_max: cluster.publish_window_max,
        publish_queue_max: cluster.publish_queue_max,
        delivered_queue_max: 4096,
        request_timeout_ms: 2000,
        ack_timeout_ms: 2000,
        heartbeat_ms: 1000,
        reconnect_backoff_max_ms: 2000,
        record_bytes_max: config.log.frame_bytes_max,
        // Set by the node once it has its genesis (`run_cluster`).
        verify_cluster_id: None,
    })
}

/// Loads the state a clustered node starts from: its newest readable checkpoint, else
/// `[cluster] checkpoint_from`, else nothing (position 0).
fn starting_state(config: &NodeConfig, checkpoints: &mut CheckpointStore) -> Result<Option<State>, NodeError> {
    let library_config = config.engine_config()?;
    let mut below = u64::MAX;
    while let Some((position, path)) = checkpoints.latest_at_or_below(below) {
        match checkpoints.load(&path, &library_config) {
            Ok(state) => {
                tracing::info!(position, path = %path.display(), "starting from checkpoint");
                return Ok(Some(state));
            }
            Err(error) => tracing::warn!("skipping checkpoint: {error}"),
        }
        if position == 0 {
            break;
        }
        below = position - 1;
    }
    let from = &config.cluster.checkpoint_from;
    if from.as_os_str().is_empty() {
        return Ok(None);
    }
    let path = config.data_dir.join(from);
    let state = checkpoints.load(&path, &library_config)?;
    tracing::info!(position = state.position, path = %path.display(), "new node: starting from a copied checkpoint");
    checkpoints.write(&state)?;
    Ok(Some(state))
}

/// Runs a clustered node until `stop` is set.
pub fn run_cluster(
    config: &NodeConfig,
    stop: &StopFlag,
    ready: Option<std::sync::mpsc::Sender<std::net::SocketAddr>>,
) -> Result<NodeReport, NodeError> {
    assert!(config.clustered(), "run_cluster needs [cluster] nats");
    let identity = crate::node::identity::prepare(config)?;
    for line in &identity.created {
        tracing::info!("{line}");
    }
    let library_config = Config { genesis: identity.genesis.clone(), ..config.to_config() };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| NodeError::Io { path: config.data_dir.clone(), source })?;
    let mut checkpoints = CheckpointStore::new(config.checkpoints_dir(), config.cluster.checkpoints_kept as usize);
    let started = starting_state(config, &mut checkpoints)?;
    let (mut mirror, recovery) =
        Mirror::open(&config.log_dir(), &config.data_dir.join(MIRROR_BASE_FILE), &library_config)?;
    if recovery.dropped_bytes > 0 {
        tracing::warn!(dropped_records = recovery.dropped_records, "mirror: dropped a damaged tail");
    }
    let mut engine = match started {
        Some(state) => Engine::from_state(state),
        None => Engine::new(&library_config),
    };
    let position = engine.state.position;
    if mirror.base() > position || mirror.last_position() < position {
        // The mirror does not continue from the state: begin a new one there.
        tracing::info!(from = mirror.base(), to = mirror.last_position(), position, "starting a new mirror");
        mirror.reset(position)?;
    }
    let replay_started = Instant::now();
    if mirror.last_position() > position {
        let cluster_id = library_config.genesis.cluster_id();
        let read = |visit: &mut dyn FnMut(crate::redex::RecordView<'_>) -> bool| mirror.read_from(position + 1, visit);
        crate::verify_ahead::read_verified(read, &cluster_id, &mut |record, verified| {
            engine.apply_verified(record.position, record.time_ms, record.payload, verified);
        })?;
    }
    let replayed_records = engine.state.position - position;
    tracing::info!(
        position = engine.state.position,
        replayed_records,
        elapsed_ms = replay_started.elapsed().as_millis() as u64,
        "folded the mirror; reading the cluster's log"
    );

    let signal = Signal::new();
    let jetstream_settings =
        JetStreamConfig { verify_cluster_id: Some(identity.genesis.cluster_id()), ..jetstream_config(config)? };
    let mut jetstream = JetStream::start(jetstream_settings, engine.state.position + 1, Arc::clone(&signal))?;
    let mut cluster = Cluster {
        name: config.name.clone(),
        own_key: identity.key.public_key(),
        replayed_own: 0,
        foreign_applied: 0,
        foreign_refused: 0,
        config: config.clone(),
        last_checkpoint: checkpoints.latest().map_or(0, |(position, _)| position),
        engine,
        mirror,
        aligned: AlignedVec::new(),
        own_ids: OwnIds::default(),
        acting: false,
        fence: None,
        commitments: VecDeque::new(),
        commitment_checked: 0,
        commitment_interval: config.cluster.commitment_interval_records as u64,
        checkpoint_interval: config.cluster.checkpoint_interval_records as u64,
        checkpoints,
        own_events: Vec::new(),
        mirrored_unsynced: false,
        folded: 0,
        rewinds: 0,
        restamped: 0,
        frame_bytes_max: library_config.frame_bytes_max,
    };

    // Catch up before acting: fold what the stream holds beyond the mirror; when the
    // stream lost a tail this node holds, give it back, or roll back to the stream
    // and catch up again.
    let mut locals: Vec<Executors> = Vec::new();
    let mut pending = PendingAcks { queue: VecDeque::new() };
    let mut next_progress = Instant::now() + PROGRESS_INTERVAL;
    while !stop.is_set() {
        let count = poll(&mut jetstream, &mut cluster, &mut locals)?;
        // Caught up: the consumer says nothing is pending, or the stream ends at or
        // below what was folded (its tail was lost). The stream's end as of the
        // connection covers every record this node published before.
        if let Some(stream_last) = jetstream.take_regression() {
            cluster.mirror.sync()?;
            repair(&mut jetstream, &mut cluster, &mut pending, &mut Vec::new(), stream_last, stop, &signal)?;
            continue;
        }
        let position = cluster.engine.state.position;
        let stream_ends = jetstream.stream_bounds().is_some_and(|(_, last)| last <= position);
        if count == 0 && (jetstream.caught_up() || stream_ends) {
            break;
        }
        if Instant::now() >= next_progress {
            next_progress = Instant::now() + PROGRESS_INTERVAL;
            let stats = jetstream.stats();
            tracing::info!(
                position = cluster.engine.state.position,
                stream_last = jetstream.stream_bounds().map_or(0, |(_, last)| last),
                connected = stats.connected,
                "catching up with the cluster's log before acting"
            );
        }
        if count == 0 {
            signal.wait(Some(100));
        }
    }
    cluster.mirror.sync()?;
    // Stopped while catching up: nothing is dispatched; the loop below only winds down.
    cluster.acting = !stop.is_set();
    tracing::info!(position = cluster.engine.state.position, folded = cluster.folded, "caught up; acting");

    let seq_last = cluster
        .engine
        .state
        .nodes
        .find(&config.name)
        .map_or(0, |row| cluster.engine.state.nodes.origin_seq_last[row.index()]);
    let backpressure_raised = cluster
        .engine
        .state
        .nodes
        .find(&config.name)
        .is_some_and(|row| cluster.engine.state.nodes.backpressure[row.index()]);
    let mut sequencer =
        Sequencer::new(config.sequencer_config(), identity.sealer(&config.name), seq_last, backpressure_raised);
    crate::sys::process::reset_child_signal();
    crate::node::identity::warn_if_not_admitted(&config.name, &identity, &cluster.engine.state);
    let keys = crate::node::identity::StateKeys::from_state(&cluster.engine.state);
    locals.push(Executors::open(config, &identity, &keys, &cluster.engine.state, &signal)?);
    let ingest_secure = config.node_identity(&identity, std::sync::Arc::clone(&keys) as _).ingest_secure_config();
    let (reactor, new_sources) = Reactor::start(config.reactor_config(), Some(ingest_secure), Arc::clone(&signal))?;
    let resumer = reactor.resumer();
    let tcp_addr = reactor.local_tcp_addr().map(|addr| addr.to_string()).unwrap_or_default();
    write_atomically(&config.data_dir.join(ADDR_FILE), &format!("{tcp_addr}\n"))?;
    if let (Some(ready), Some(addr)) = (ready, reactor.local_tcp_addr()) {
        let _ = ready.send(addr);
    }
    tracing::info!(name = config.name, tcp = tcp_addr, nats = ?config.cluster.nats, "node running in the cluster");

    let mut snapshots = config.snapshot_writer();
    let mut handed: Vec<Handed> = Vec::new();
    let mut outcomes: Vec<PublishOutcome> = Vec::new();
    let capacity = config.cluster.publish_queue_max as usize;
    let group_max = config.ingest.records_per_commit_max as usize;
    let mut next_trim = Instant::now() + TRIM_INTERVAL;
    let mut trimmed_below = 0u64;
    let mut draining: Option<Instant> = None;
    loop {
        if stop.is_set() && draining.is_none() {
            // Nothing new starts; what runs is stopped and its end published.
            for local in &mut locals {
                local.daemons.stop_all(&cluster.engine.state, &local.sdk);
                local.blobs.stop();
            }
            draining = Some(Instant::now());
        }
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
        for local in &mut locals {
            local.tick(&cluster.engine.state, &mut sequencer);
        }
        for event in cluster.own_events.drain(..) {
            sequencer.push_own(event);
        }
        let mut worked = false;
        let in_flight = jetstream.pending() as usize;
        if in_flight + group_max <= capacity && sequencer.collect() > 0 {
            handed.clear();
            let mut publish_failed = None;
            sequencer.hand_over(
                &mut |payload| {
                    let id = message_id(payload);
                    match jetstream.publish(id, payload) {
                        Ok(ticket) => {
                            cluster.own_ids.published(ticket, id);
                            ticket
                        }
                        Err(error) => {
                            publish_failed = Some(error.to_string());
                            0
                        }
                    }
                },
                &mut handed,
            );
            if let Some(error) = &publish_failed {
                tracing::error!("a record could not be published: {error}");
            }
            for record in &handed {
                match record.source {
                    Some(source) if record.ticket == 0 => {
                        let reason = publish_failed.as_deref().unwrap_or("not published");
                        pending.close(source, reason, sequencer.commands());
                    }
                    Some(source) => pending.queue.push_back(Pending {
                        ticket: record.ticket,
                        position: None,
                        source,
                        ack: record.ack.map(|(_, seq)| seq),
                    }),
                    None => {}
                }
            }
            worked = true;
        }
        outcomes.clear();
        jetstream.poll_acks(&mut outcomes);
        for outcome in &outcomes {
            cluster.own_ids.outcome(outcome.ticket, &outcome.result, cluster.engine.state.position);
            match &outcome.result {
                Ok(stored) => pending.stored(outcome.ticket, stored.position),
                Err(reason) => {
                    tracing::error!(ticket = outcome.ticket, "JetStream refused a record: {reason}");
                    pending.failed(outcome.ticket, reason, sequencer.commands());
                }
            }
        }
        worked |= !outcomes.is_empty();
        let folded = poll(&mut jetstream, &mut cluster, &mut locals)?;
        worked |= folded > 0;
        if !cluster.acting && draining.is_none() && !stop.is_set() && folded == 0 && jetstream.caught_up() {
            tracing::info!(position = cluster.engine.state.position, "caught up again after the rollback; acting");
            cluster.acting = true;
        }
        if let Some(stream_last) = jetstream.take_regression() {
            repair(&mut jetstream, &mut cluster, &mut pending, sequencer.commands(), stream_last, stop, &signal)?;
        }
        if cluster.mirrored_unsynced && folded < RECORDS_PER_TURN_MAX {
            cluster.mirror.sync()?;
            cluster.mirrored_unsynced = false;
        }
        pending.release(cluster.engine.state.position, cluster.engine.state.now_ms, sequencer.commands());
        let now = Instant::now();
        if config.cluster.trim && now >= next_trim {
            next_trim = now + TRIM_INTERVAL;
            // Records others published, none of them applied: this node may hold another
            // genesis, and its lonely view of the cluster must not trim the shared stream.
            // (A cluster of one sees no foreign record; garbage on the stream, which
            // anyone with NATS access can publish, only holds its trim back.)
            let trusted = cluster.foreign_applied > 0 || cluster.foreign_refused == 0;
            if let Some(below) = trim_position(&cluster.engine.state, &config.name).filter(|_| trusted) {
                if below > trimmed_below {
                    tracing::info!(below, "trimming the cluster's log below the oldest position any node needs");
                    jetstream.purge_below(below);
                    trimmed_below = below;
                }
            }
        }
        if let Some(fence) = &cluster.fence {
            snapshots.set_fence(&fence.to_string());
        }
        if snapshots.is_due(&cluster.engine.state, now) {
            snapshots.set_ingest(&crate::node::run::ingest_view(&reactor.stats(), config));
        }
        snapshots.tick(&cluster.engine.state, now);
        resumer.send(sequencer.commands());
        if let Some(since) = draining {
            let running: usize = locals.iter().map(|local| local.daemons.running_count()).sum();
            // Events pushed after this turn's collection (a daemon reaped, a commitment)
            // wait for the next one: not quiet yet.
            let in_flight = jetstream.pending();
            let quiet = running == 0
                && in_flight == 0
                && locals.iter().all(|local| local.events.is_empty())
                && sequencer.own_events_pending() == 0
                && cluster.own_events.is_empty();
            if quiet || since.elapsed() > STOP_DRAIN_WAIT {
                if !quiet {
                    tracing::warn!(in_flight, running, "stopping before every record came back");
                }
                break;
            }
        }
        if !worked {
            signal.wait(Some(50));
        }
    }
    resumer.send(&mut vec![Command::Quiesce]);
    let reactor_stats = reactor.shutdown();
    jetstream.stop();
    cluster.checkpoint();
    cluster.mirror.sync()?;
    snapshots.set_ingest(&crate::node::run::ingest_view(&reactor_stats, config));
    snapshots.finish(&cluster.engine.state);
    Ok(NodeReport::at_stop(replayed_records, &cluster.engine.state, &mut locals, &sequencer, reactor_stats))
}

/// After every NATS server lost the stream's tail at once (an acknowledgement is
/// replication, not fsync): publishes this node's mirrored records past the stream's
/// end (`stream_last`) again, each pinned to the position it had
/// (`Nats-Expected-Last-Sequence`), so the stream holds again what was folded there.
/// Several nodes may do it at once: the same bytes have the same message id and are
/// stored once. Returns the first position whose pin failed (another record took it
/// first): the node must then rewind to the stream below it.
fn republish_tail(
    log: &mut dyn SharedRedex,
    cluster: &mut Cluster,
    stream_last: u64,
    stop: &StopFlag,
    signal: &Signal,
) -> Result<Option<u64>, NodeError> {
    let mirrored = cluster.mirror.last_position();
    if stream_last >= mirrored {
        return Ok(None);
    }
    if stream_last < cluster.mirror.base() {
        // The mirror begins after the loss: what it lacks cannot be given back.
        return Ok(Some(stream_last + 1));
    }
    tracing::warn!(
        stream_last,
        mirrored,
        "the cluster's log lost its tail (did every NATS server crash?): publishing this node's copy of positions \
         {}..={mirrored} again",
        stream_last + 1
    );
    let mut expected: hashbrown::HashMap<u64, u64> = hashbrown::HashMap::new();
    let mut first_failed: Option<u64> = None;
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + STOP_DRAIN_WAIT * 3;
    cluster.mirror.read_from(stream_last + 1, &mut |record| loop {
        match log.publish_restamped(message_id(record.payload), record.payload, record.position - 1, record.time_ms) {
            Ok(ticket) => {
                expected.insert(ticket, record.position);
                return true;
            }
            // More than the client holds at once: settle what came back, then go on.
            Err(PublishError::Full { .. }) if !stop.is_set() && Instant::now() < deadline => {
                outcomes.clear();
                log.poll_acks(&mut outcomes);
                settle_repairs(&outcomes, &mut expected, &mut first_failed);
                if outcomes.is_empty() {
                    signal.wait(Some(50));
                }
            }
            Err(error) => {
                tracing::warn!(position = record.position, "tail republish stopped: {error}");
                first_failed = Some(first_failed.map_or(record.position, |failed| failed.min(record.position)));
                return false;
            }
        }
    })?;
    while !expected.is_empty() && !stop.is_set() {
        if Instant::now() > deadline {
            // Unresolved: treat the earliest as failed (the rewind re-reads the stream).
            first_failed = expected.values().copied().chain(first_failed).min();
            break;
        }
        outcomes.clear();
        log.poll_acks(&mut outcomes);
        settle_repairs(&outcomes, &mut expected, &mut first_failed);
        if outcomes.is_empty() {
            signal.wait(Some(50));
        }
    }
    if first_failed.is_none() {
        tracing::info!(from = stream_last + 1, to = mirrored, "the stream's lost tail is restored");
    }
    Ok(first_failed)
}

/// The stream lost its tail (it ends at `stream_last`, below what this node read): its
/// client holds every new record back while the node gives the tail back from its
/// mirror; when another record already took one of those positions, the node rolls
/// back to the stream instead. Publishing resumes either way.
fn repair(
    log: &mut dyn SharedRedex,
    cluster: &mut Cluster,
    pending: &mut PendingAcks,
    commands: &mut Vec<Command>,
    stream_last: u64,
    stop: &StopFlag,
    signal: &Arc<Signal>,
) -> Result<(), NodeError> {
    match republish_tail(log, cluster, stream_last, stop, signal)? {
        None => log.resume_publishing(),
        Some(failed) => rewind(log, cluster, pending, commands, failed - 1)?,
    }
    Ok(())
}

/// Rolls this node back to stream position `to` (the stream is the truth: its tail
/// was lost and others wrote new records there): the newest checkpoint at or below
/// `to` (else the empty state), a mirror begun again there, and a new consumer from
/// the next position; the node folds without acting until it has caught up again.
/// What it had folded past `to` and the stream lost comes back through the
/// level-triggered reports (heartbeats, capabilities, inventories, daemon states).
fn rewind(
    log: &mut dyn SharedRedex,
    cluster: &mut Cluster,
    pending: &mut PendingAcks,
    commands: &mut Vec<Command>,
    to: u64,
) -> Result<(), NodeError> {
    let library_config = cluster.config.engine_config()?;
    let from = cluster.engine.state.position;
    let state = match cluster.checkpoints.latest_at_or_below(to) {
        Some((_, path)) => Some(cluster.checkpoints.load(&path, &library_config)?),
        None => None,
    };
    cluster.engine = match state {
        Some(state) => Engine::from_state(state),
        None => Engine::new(&library_config),
    };
    let position = cluster.engine.state.position;
    tracing::error!(
        from,
        to,
        restart_at = position + 1,
        "the cluster's log lost records this node had folded and others wrote past them: rolling back to the \
         stream"
    );
    cluster.mirror.reset(position)?;
    let _ = cluster.checkpoints.remove_above(position);
    cluster.last_checkpoint = position;
    cluster.commitments.retain(|(at, _)| *at <= position);
    cluster.commitment_checked = cluster.commitment_checked.min(position);
    // Clients whose records the stream lost, or whose publishes the restart abandons,
    // get no ack: their connections are closed.
    let lost: Vec<u64> = pending
        .queue
        .iter()
        .filter(|entry| entry.position.is_none_or(|stored| stored > to))
        .map(|entry| entry.source)
        .collect();
    for source in lost {
        pending.close(source, "the cluster's log lost it (every NATS server crashed)", commands);
    }
    log.restart_from(position + 1)?;
    cluster.acting = false;
    cluster.rewinds += 1;
    Ok(())
}

/// Checks the outcomes of tail-repair publishes: each must be stored at the position
/// it had, else another record took it and this node is fenced.
fn settle_repairs(
    outcomes: &[PublishOutcome],
    expected: &mut hashbrown::HashMap<u64, u64>,
    first_failed: &mut Option<u64>,
) {
    for outcome in outcomes {
        let Some(position) = expected.remove(&outcome.ticket) else { continue };
        let stored_at = outcome.result.as_ref().ok().map(|stored| stored.position);
        if stored_at != Some(position) {
            tracing::warn!(position, result = ?outcome.result, "a republished record did not take its position");
            *first_failed = Some(first_failed.map_or(position, |failed| failed.min(position)));
        }
    }
}

/// Folds what the stream delivered (at most a turn's worth); returns how many.
fn poll(log: &mut dyn SharedRedex, cluster: &mut Cluster, locals: &mut [Executors]) -> Result<usize, NodeError> {
    let mut failure = None;
    let count = log
        .poll_records(RECORDS_PER_TURN_MAX, &mut |record| {
            if failure.is_none() {
                if let Err(error) = cluster.apply(&record, locals) {
                    failure = Some(error);
                }
            }
        })
        .map_err(|error| match error {
            JetStreamError::BeforeStart { requested, first } => NodeError::Trimmed { requested, first },
            other => NodeError::JetStream(other),
        })?;
    match failure {
        Some(error) => Err(error),
        None => Ok(count),
    }
}

/// Where the stream may be trimmed, when this node is the one to do it: the lowest
/// position any node (but those that left) still needs, decided by their commitments
/// in the log; the first live node in row order sends the purge.
pub fn trim_position(state: &State, own_name: &str) -> Option<u64> {
    use crate::event::NodeStatus;
    let nodes = &state.nodes;
    let first_live = (0..nodes.len()).find(|&row| nodes.status[row] == NodeStatus::Up)?;
    if *nodes.name[first_live] != *own_name {
        return None;
    }
    let mut below = u64::MAX;
    for row in 0..nodes.len() {
        if nodes.status[row] == NodeStatus::Left {
            continue;
        }
        let needs = nodes.needs_position[row];
        if needs == 0 {
            return None;
        }
        below = below.min(needs);
    }
    (below != u64::MAX && below > 1).then_some(below)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_record_closes_its_source_and_nothing_of_it_is_acknowledged() {
        let mut pending = PendingAcks { queue: VecDeque::new() };
        for (ticket, source, ack) in [(1, 7, Some(1)), (2, 8, Some(1)), (3, 7, None), (4, 7, Some(3))] {
            pending.queue.push_back(Pending { ticket, position: None, source, ack });
        }
        let mut commands = Vec::new();
        pending.stored(1, 10);
        pending.stored(2, 11);
        pending.failed(3, "refused", &mut commands);
        pending.stored(4, 12);
        pending.release(12, 0, &mut commands);
        assert!(matches!(commands[0], Command::Close { source: 7, .. }), "{commands:?}");
        assert!(matches!(commands[1..], [Command::Ack { source: 8, seq: 1, position: 11, .. }]), "{commands:?}");
    }

    #[test]
    fn own_ids_forget_publishes_that_never_come_back() {
        let mut own = OwnIds::default();
        own.published(1, [1; 16]);
        own.outcome(1, &Err("refused".into()), 10);
        own.published(2, [2; 16]);
        own.outcome(2, &Ok(Stored { position: 5, duplicate: true }), 10);
        assert_eq!(own.len(), 0, "a refused publish and a duplicate of a folded record are forgotten");
        own.published(3, [3; 16]);
        own.outcome(3, &Ok(Stored { position: 11, duplicate: false }), 10);
        assert!(own.delivered([3; 16]));
        assert!(!own.delivered([3; 16]));
        assert_eq!(own.len(), 0);
        // Read back before its ack: forgotten on delivery, the ack finds nothing left.
        own.published(4, [4; 16]);
        assert!(own.delivered([4; 16]));
        own.outcome(4, &Ok(Stored { position: 12, duplicate: false }), 12);
        assert_eq!(own.len(), 0);
    }
}
