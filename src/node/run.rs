//! The node's main loop: reactor, sequencer, embedded log, fold, reconcile and the
//! dispatcher, on two threads (the reactor's and this one).
//!
//! Start: open the log (recovering a torn tail), replay every record through the
//! [`Engine`] (fold, then the reconcile pass, as at first commit), so the state hash
//! equals what `meshos log replay --reconcile` prints for the same log; then bind the
//! listeners and write the TCP address to `DATA_DIR/node.addr`. Loop: take new
//! sources, queue this node's heartbeat when due, collect a group, commit it (one
//! fsync), fold and reconcile each record, hand this node's actions to the
//! dispatcher, send acks and resumes to the reactor; sleep on the ingest signal when
//! there is nothing to do. Stop (SIGTERM, SIGINT): the reactor stops accepting and
//! reading (connections stay open), every queue is drained and committed and its acks
//! sent, backpressure this node raised is lowered, then the connections close (acks
//! written best effort), the log is fsynced and the report returned.
//!
//! This node's actions go to the executors: daemon actions run real processes
//! ([`crate::exec::daemons`]), blob actions fetch, verify and delete blobs in
//! `DATA_DIR/blobs` ([`crate::exec::blobs`], from peers' ports announced in their
//! capabilities); every action is also recorded, one line each, in
//! `DATA_DIR/dispatched.log`. What the executors observe (process starts and ends, SDK registrations and
//! reports, action outcomes, the node's capability set) goes back into the log as
//! this node's own events. At start, daemons a previous run left are stopped (pid
//! files) before anything else; at stop, every daemon is stopped (control event,
//! SIGTERM, SIGKILL after its grace) and its end committed before the log closes.
//!
//! Invariants: a record is folded only after the fsync that made it durable; the
//! engine's position equals the log's durable position between groups; actions are
//! dispatched only for records committed by this run (replayed ones were dispatched,
//! or lost with the crash, before); nothing here panics on what a client sends.

use crate::sync::Arc;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::action::{describe, Action};
use crate::config::Config;
use crate::engine::Engine;
use crate::event::{EventKind, NodeHealth};
use crate::exec::capability::CapabilityPublisher;
use crate::exec::daemons::DaemonExecutor;
use crate::ingest::park::Signal;
use crate::node::config::NodeConfig;
use crate::node::identity::NodeIdentity;
use crate::redex::embedded::EmbeddedLog;
use crate::redex::{Redex, RedexError};
use crate::sequencer::{Sequencer, SequencerStats};
use crate::state::State;
use crate::sys::reactor::{Command, Reactor, ReactorError, ReactorStats};
use crate::sys::sdk_server::{SdkHandle, SdkServerError};
use crate::sys::signals::StopFlag;

/// Longest wait for the reactor to stop reading at shutdown.
const QUIESCE_WAIT: Duration = Duration::from_secs(5);
/// Longest sleep between looks at the stop flag.
const STOP_POLL_MS: u64 = 100;
/// How often the loop logs its counters at info level.
const STATS_INTERVAL: Duration = Duration::from_secs(10);
/// The file the node writes its bound TCP address to, in its data directory.
pub const ADDR_FILE: &str = "node.addr";
/// The dispatcher's record of the actions this node ran, in the data directory.
pub const DISPATCH_FILE: &str = "dispatched.log";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("log: {0}")]
    Log(#[from] RedexError),
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    #[error(transparent)]
    Sdk(#[from] SdkServerError),
    #[error("blob store: {0}")]
    Blobs(#[from] crate::exec::blobstore::BlobStoreError),
    #[error(transparent)]
    Peer(#[from] crate::sys::peer_server::PeerError),
    #[error(transparent)]
    Config(#[from] crate::node::config::NodeConfigError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::state::checkpoint::CheckpointError),
    #[error("cluster log: {0}")]
    JetStream(#[from] crate::redex::jetstream::JetStreamError),
    #[error("identity: {0}")]
    Trust(#[from] crate::trust::TrustError),
    #[error(
        "the cluster's log was trimmed: this node needs position {requested} but the stream begins at {first}; copy a \
         recent checkpoint from another node (DATA_DIR/checkpoints) and name it in [cluster] checkpoint_from"
    )]
    Trimmed { requested: u64, first: u64 },
}

/// What a run did, returned on a clean stop.
#[derive(Debug, Clone)]
pub struct NodeReport {
    /// Records found in the log at start (replayed).
    pub replayed_records: u64,
    pub position: u64,
    pub state_hash: u128,
    pub events_applied: u64,
    pub rejected: u64,
    pub dispatched_actions: u64,
    pub daemons: crate::exec::daemons::DaemonExecStats,
    pub sequencer: SequencerStats,
    pub reactor: ReactorStats,
}

/// Records the actions addressed to this node, one line each.
pub(super) struct Dispatcher {
    out: BufWriter<File>,
    path: PathBuf,
    pub(super) dispatched: u64,
}

impl Dispatcher {
    fn open(path: PathBuf) -> Result<Dispatcher, NodeError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| NodeError::Io { path: path.clone(), source })?;
        Ok(Dispatcher { out: BufWriter::new(file), path, dispatched: 0 })
    }

    fn record(&mut self, state: &State, action: &Action) {
        self.dispatched += 1;
        let line = describe(state, action);
        tracing::debug!(position = action.id.position, index = action.id.index, "runs: {line}");
        // Best effort: the record is for operators, the state already holds the action.
        let _ = writeln!(self.out, "{}.{} runs: {line}", action.id.position, action.id.index);
    }

    pub(super) fn flush(&mut self) {
        if let Err(error) = self.out.flush() {
            tracing::warn!("{}: {error}", self.path.display());
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io { path: path.to_path_buf(), source }
}

/// How a local node's own events reach the log: the node that owns the log queues
/// them on its sequencer; another node of this process (a demo cluster) numbers them
/// itself and sends them to the log's owner over TCP, like any peer.
enum Sink {
    Own,
    Peer(PeerSink),
}

/// The sending side of a node of this process that does not own the log: a thread
/// with a TCP client to the owner's ingest port, fed through a bounded channel.
struct PeerSink {
    sender: Option<std::sync::mpsc::SyncSender<Vec<EventKind>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Batches queued for a peer sink's thread at most.
const PEER_SINK_BATCHES_MAX: usize = 1024;
/// Events per frame a peer sink sends at most.
const PEER_SINK_EVENTS_PER_FRAME: usize = 256;

impl PeerSink {
    /// `secure`: this node's identity on the owner's ingest port; `owner`: the node
    /// that owns the log (the one its handshake must reach).
    fn start(
        name: String,
        sealer: crate::trust::Sealer,
        seq_last: u64,
        ingest: std::net::SocketAddr,
        secure: std::sync::Arc<crate::sys::secure::SecureConfig>,
        owner: String,
    ) -> Result<PeerSink, NodeError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<EventKind>>(PEER_SINK_BATCHES_MAX);
        let thread = std::thread::Builder::new()
            .name(format!("meshos-sink-{name}"))
            .spawn(move || {
                let (mut client, mut replies) =
                    match crate::sys::client::Client::connect_tcp(ingest, secure, Some(&owner)) {
                        Ok(connected) => connected,
                        Err(error) => return tracing::error!(node = name, "cannot reach the log's owner: {error}"),
                    };
                client.set_sealer(sealer);
                let mut seq = seq_last;
                let mut last_frame = None;
                for kinds in receiver {
                    // Frames of at most PEER_SINK_EVENTS_PER_FRAME events stay far below
                    // the log's frame limit whatever piled up.
                    let mut kinds = kinds.into_iter().peekable();
                    while kinds.peek().is_some() {
                        let events = kinds
                            .by_ref()
                            .take(PEER_SINK_EVENTS_PER_FRAME)
                            .map(|kind| {
                                seq += 1;
                                crate::event::Event { origin: name.clone(), origin_seq: seq, kind }
                            })
                            .collect();
                        match client.send(&crate::event::EventBatch { events }, true) {
                            Ok(frame) => last_frame = Some(frame),
                            Err(error) => return tracing::error!(node = name, "lost the log's owner: {error}"),
                        }
                    }
                }
                // Closed: wait until the last frame is durable, so a stop loses nothing.
                if let Some(frame) = last_frame {
                    if let Err(error) = replies.wait_acked(frame, Duration::from_secs(10)) {
                        tracing::warn!(node = name, "last events not acknowledged: {error}");
                    }
                }
            })
            .map_err(|source| NodeError::Io { path: PathBuf::from("<thread>"), source })?;
        Ok(PeerSink { sender: Some(sender), thread: Some(thread) })
    }

    /// Closes the channel; the thread sends what is queued and waits for its ack.
    fn close(&mut self) {
        self.sender = None;
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|thread| thread.is_finished())
    }
}

/// One node of this process: its name, everything that acts on its behalf, and the
/// events it produced that wait for the next group.
pub(super) struct Executors {
    name: String,
    pub(super) dispatcher: Dispatcher,
    pub(super) daemons: DaemonExecutor,
    pub(super) blobs: crate::exec::blobs::BlobExecutor,
    /// Serves this node's blobs and round trips to its peers; dropped at stop.
    _peer_server: crate::sys::peer_server::PeerServer,
    /// What the peer port and its clients trust: the state's admitted keys.
    keys: std::sync::Arc<crate::node::identity::StateKeys>,
    pub(super) sdk: SdkHandle,
    capability: CapabilityPublisher,
    pub(super) events: Vec<EventKind>,
    sink: Sink,
    prober: crate::exec::probes::Prober,
    heartbeat: Duration,
    next_heartbeat: Instant,
}

impl Executors {
    /// Opens a node's executors: stops what a previous run left, reports what the log
    /// wrongly calls running, opens the blob store, binds the peer port and the SDK socket.
    pub(super) fn open(
        config: &NodeConfig,
        identity: &NodeIdentity,
        keys: &std::sync::Arc<crate::node::identity::StateKeys>,
        state: &State,
        signal: &Arc<Signal>,
    ) -> Result<Executors, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(io_error(&config.data_dir))?;
        let mut daemons = DaemonExecutor::new(config.daemon_exec_config());
        let orphans = daemons.stop_orphans(state);
        if orphans > 0 {
            tracing::warn!(node = config.name, orphans, "stopped daemons a previous run of this node left running");
        }
        let mut events = Vec::new();
        daemons.adopt_nothing(state, state.nodes.find(&config.name), &mut events);
        let store = crate::exec::blobstore::BlobStore::open(&config.blobs_dir())?;
        let secure = config.node_identity(identity, std::sync::Arc::clone(keys) as _).secure_config();
        let blobs = crate::exec::blobs::BlobExecutor::new(config.blob_exec_config(&secure), std::sync::Arc::new(store));
        blobs.adopt_nothing(state, state.nodes.find(&config.name), &mut events);
        let peer_server = crate::sys::peer_server::PeerServer::start(config.peer_server_config(&secure))?;
        let capacity_bytes = match config.capability.capacity_bytes {
            0 => crate::sys::process::filesystem_bytes(&config.data_dir).unwrap_or(0),
            bytes => bytes,
        };
        let mut capability =
            CapabilityPublisher::new(config.capability.zone.clone(), capacity_bytes, config.capability.labels.clone());
        capability.endpoint = peer_server.addr().to_string();
        let sdk = crate::sys::sdk_server::start(
            &config.sdk_socket_path(),
            config.daemons.sdk_connections_max,
            Arc::clone(signal),
        )?;
        Ok(Executors {
            name: config.name.clone(),
            dispatcher: Dispatcher::open(config.data_dir.join(DISPATCH_FILE))?,
            daemons,
            blobs,
            _peer_server: peer_server,
            keys: std::sync::Arc::clone(keys),
            sdk,
            capability,
            events,
            sink: Sink::Own,
            prober: crate::exec::probes::Prober::new(config.probe_config(&secure)),
            heartbeat: Duration::from_millis(config.heartbeat_ms as u64),
            next_heartbeat: Instant::now(),
        })
    }

    /// Serves the SDK, reaps and escalates, publishes the capability set, beats the
    /// heart when due; hands the resulting events on.
    pub(super) fn tick(&mut self, state: &State, sequencer: &mut Sequencer) {
        // Bounded per tick: a daemon pipelining requests cannot keep the loop here.
        for inbound in self.sdk.inbound.try_iter().take(crate::exec::daemons::SDK_MESSAGES_PER_TICK_MAX) {
            self.daemons.on_sdk(inbound, &self.sdk, &mut self.events);
        }
        self.daemons.poll(Instant::now(), state, &self.sdk, &mut self.events);
        self.blobs.poll(state, state.nodes.find(&self.name), &mut self.events);
        self.prober.tick(state, &self.name, Instant::now(), &mut self.events);
        let labels = self.daemons.published_labels();
        if let Some(event) = self.capability.next(state, &self.name, &labels) {
            self.events.push(event);
        }
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.events.push(EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }));
            self.next_heartbeat = now + self.heartbeat;
        }
        self.flush_events(sequencer);
    }

    /// Hands the queued events to the sequencer (own) or the peer sink's thread.
    fn flush_events(&mut self, sequencer: &mut Sequencer) {
        if self.events.is_empty() {
            return;
        }
        match &mut self.sink {
            Sink::Own => {
                for event in self.events.drain(..) {
                    sequencer.push_own(event);
                }
            }
            Sink::Peer(sink) => {
                let Some(sender) = &sink.sender else { return self.events.clear() };
                match sender.try_send(std::mem::take(&mut self.events)) {
                    Ok(()) => {}
                    // Full: they wait here for the next turn (the channel is the bound).
                    Err(std::sync::mpsc::TrySendError::Full(events)) => self.events = events,
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                        tracing::error!(node = self.name, "events lost: the sink to the log's owner is gone")
                    }
                }
            }
        }
    }
}

/// Writes `text` to `path` atomically (`sys::files::write_atomically`).
pub(super) fn write_atomically(path: &Path, text: &str) -> Result<(), NodeError> {
    crate::sys::files::write_atomically(path, text.as_bytes()).map_err(|(path, source)| NodeError::Io { path, source })
}

/// A node running on a thread of this process (benches, the load tool, embedding).
pub struct Background {
    pub addr: std::net::SocketAddr,
    stop: StopFlag,
    thread: Option<std::thread::JoinHandle<Result<NodeReport, NodeError>>>,
}

impl Background {
    /// Stops the node as SIGTERM would and returns its report.
    pub fn stop(mut self) -> Result<NodeReport, NodeError> {
        self.stop.set();
        let thread = self.thread.take().expect("joined once");
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for Background {
    /// A node dropped without `stop` still stops cleanly (its daemons with it).
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.set();
            let _ = thread.join();
        }
    }
}

/// Starts the node on its own thread and returns once it listens (or failed to start).
pub fn spawn(config: NodeConfig) -> Result<Background, NodeError> {
    let stop = StopFlag::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("meshos-node".to_string())
            .spawn(move || run_until(std::slice::from_ref(&config), &stop, Some(ready_tx)))
            .map_err(|source| NodeError::Io { path: PathBuf::from("<thread>"), source })?
    };
    match ready_rx.recv() {
        Ok(addr) => Ok(Background { addr, stop, thread: Some(thread) }),
        // The sender is gone before the node listened: it failed; its error says why.
        Err(_) => Err(thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .expect_err("a node that never listened returned an error")),
    }
}

/// Runs the node until `stop` is set, then shuts down cleanly.
pub fn run(config: &NodeConfig, stop: &StopFlag) -> Result<NodeReport, NodeError> {
    run_until(std::slice::from_ref(config), stop, None)
}

/// Runs several nodes in this process on one log (a demo cluster): the first owns the
/// log, the sockets and the sequencer; every node has its own executors, data
/// directory, blob store, peer port and SDK socket, and the others send their events
/// to the first over TCP like any peer. All fold the same records into one state.
pub fn run_group(configs: &[NodeConfig], stop: &StopFlag) -> Result<NodeReport, NodeError> {
    assert!(!configs.is_empty(), "a group has a node");
    run_until(configs, stop, None)
}

fn run_until(
    configs: &[NodeConfig],
    stop: &StopFlag,
    ready: Option<std::sync::mpsc::Sender<std::net::SocketAddr>>,
) -> Result<NodeReport, NodeError> {
    let config = &configs[0];
    if config.clustered() {
        assert_eq!(configs.len(), 1, "a group of nodes shares one embedded log, not a cluster's");
        return crate::node::cluster::run_cluster(config, stop, ready);
    }
    let mut identities = Vec::with_capacity(configs.len());
    for node in configs {
        let identity = crate::node::identity::prepare(node)?;
        for line in &identity.created {
            tracing::info!(node = node.name, "{line}");
        }
        if identity.genesis
            != identities.first().map_or(identity.genesis.clone(), |first: &NodeIdentity| first.genesis.clone())
        {
            return Err(NodeError::Trust(crate::trust::TrustError::Genesis {
                path: node.genesis_path(),
                reason: "the nodes of one group must share their genesis".to_string(),
            }));
        }
        identities.push(identity);
    }
    let library_config = Config { genesis: identities[0].genesis.clone(), ..config.to_config() };
    std::fs::create_dir_all(&config.data_dir).map_err(io_error(&config.data_dir))?;
    // The only copy of acknowledged records: damage in the middle is refused (and
    // named, with the command that repairs it), never cut; a torn tail is cut.
    let (mut log, recovery) =
        EmbeddedLog::open_with(&config.log_dir(), &library_config, crate::redex::embedded::MidLogDamage::Refuse)?;
    if recovery.dropped_bytes > 0 {
        tracing::warn!(
            dropped_records = recovery.dropped_records,
            dropped_bytes = recovery.dropped_bytes,
            "recovered the log: dropped a damaged tail after position {}, kept in {}",
            recovery.last_position,
            recovery.quarantine_path.as_ref().map_or_else(String::new, |path| path.display().to_string())
        );
    }
    let mut engine = Engine::new(&library_config);
    let replay_started = Instant::now();
    let cluster_id = library_config.genesis.cluster_id();
    crate::verify_ahead::read_verified(|visit| log.read_from(1, visit), &cluster_id, &mut |record, verified| {
        engine.apply_verified(record.position, record.time_ms, record.payload, verified);
    })?;
    let replayed_records = engine.state.position;
    assert_eq!(replayed_records, log.last_position(), "replay folds every record");
    tracing::info!(
        position = engine.state.position,
        state_hash = format!("{:032x}", engine.state.state_hash()),
        elapsed_ms = replay_started.elapsed().as_millis() as u64,
        "recovered from the log"
    );

    let seq_last_of =
        |name: &str| engine.state.nodes.find(name).map_or(0, |row| engine.state.nodes.origin_seq_last[row.index()]);
    let backpressure_raised =
        engine.state.nodes.find(&config.name).is_some_and(|row| engine.state.nodes.backpressure[row.index()]);
    let mut sequencer = Sequencer::new(
        config.sequencer_config(),
        identities[0].sealer(&config.name),
        seq_last_of(&config.name),
        backpressure_raised,
    );
    for (node, identity) in configs.iter().zip(&identities) {
        crate::node::identity::warn_if_not_admitted(&node.name, identity, &engine.state);
    }
    let signal = Signal::new();
    crate::sys::process::reset_child_signal();
    let mut locals = Vec::with_capacity(configs.len());
    let keys = crate::node::identity::StateKeys::from_state(&engine.state);
    for (node, identity) in configs.iter().zip(&identities) {
        locals.push(Executors::open(node, identity, &keys, &engine.state, &signal)?);
    }
    let ingest_secure = config.node_identity(&identities[0], std::sync::Arc::clone(&keys) as _).ingest_secure_config();
    let (reactor, new_sources) = Reactor::start(config.reactor_config(), Some(ingest_secure), Arc::clone(&signal))?;
    let resumer = reactor.resumer();
    let tcp_addr = reactor.local_tcp_addr().map(|addr| addr.to_string()).unwrap_or_default();
    if configs.len() > 1 {
        let ingest = reactor.local_tcp_addr().expect("a group's first node listens on TCP");
        for ((local, identity), node) in locals[1..].iter_mut().zip(&identities[1..]).zip(&configs[1..]) {
            let sealer = identity.sealer(&local.name);
            let secure = node.node_identity(identity, std::sync::Arc::clone(&keys) as _).secure_config();
            local.sink = Sink::Peer(PeerSink::start(
                local.name.clone(),
                sealer,
                seq_last_of(&local.name),
                ingest,
                secure,
                config.name.clone(),
            )?);
        }
    }
    write_atomically(&config.data_dir.join(ADDR_FILE), &format!("{tcp_addr}\n"))?;
    if let (Some(ready), Some(addr)) = (ready, reactor.local_tcp_addr()) {
        // The caller may have gone; the node runs on regardless.
        let _ = ready.send(addr);
    }
    tracing::info!(
        name = config.name,
        tcp = tcp_addr,
        local_socket = %config.local_socket_path().display(),
        sdk_socket = %config.sdk_socket_path().display(),
        nodes = configs.len(),
        "node running"
    );

    let mut snapshots = config.snapshot_writer();
    let mut next_stats = Instant::now() + STATS_INTERVAL;
    while !stop.is_set() {
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
        for local in &mut locals {
            local.tick(&engine.state, &mut sequencer);
        }
        let worked = commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)?;
        let now = Instant::now();
        if snapshots.is_due(&engine.state, now) {
            snapshots.set_ingest(&ingest_view(&reactor.stats(), config));
        }
        snapshots.tick(&engine.state, now);
        resumer.send(sequencer.commands());
        let now = Instant::now();
        if now >= next_stats {
            next_stats = now + STATS_INTERVAL;
            locals.iter_mut().for_each(|local| local.dispatcher.flush());
            log_stats(&sequencer, &engine, &reactor.stats());
        }
        if !worked {
            locals.iter_mut().for_each(|local| local.dispatcher.flush());
            let next_heartbeat = locals.iter().map(|local| local.next_heartbeat).min().expect("a node");
            let until_heartbeat = next_heartbeat.saturating_duration_since(Instant::now()).as_millis() as u64;
            signal.wait(Some(until_heartbeat.clamp(1, STOP_POLL_MS)));
        }
    }

    // Nothing new starts from here; what runs is stopped and its end committed, then
    // the other nodes' sinks are closed once what they queued is durable.
    for local in &mut locals {
        local.daemons.stop_all(&engine.state, &local.sdk);
        local.blobs.stop();
    }
    let running = |locals: &[Executors]| locals.iter().map(|local| local.daemons.running_count()).sum::<usize>();
    if running(&locals) > 0 {
        tracing::info!(daemons = running(&locals), "stopping: stopping daemons");
    }
    while running(&locals) > 0 {
        for local in &mut locals {
            local.tick(&engine.state, &mut sequencer);
        }
        if !commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)? {
            signal.wait(Some(10));
        }
        resumer.send(sequencer.commands());
    }
    // Every event queued for a peer sink is handed over before its channel closes.
    let flush_started = Instant::now();
    loop {
        for local in &mut locals {
            local.tick(&engine.state, &mut sequencer);
        }
        if locals.iter().all(|local| local.events.is_empty()) || flush_started.elapsed() > QUIESCE_WAIT {
            break;
        }
        if !commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)? {
            signal.wait(Some(10));
        }
        resumer.send(sequencer.commands());
    }
    for local in &mut locals {
        if let Sink::Peer(sink) = &mut local.sink {
            sink.close();
        }
    }
    while !locals
        .iter()
        .all(|local| matches!(&local.sink, Sink::Peer(sink) if sink.finished()) || matches!(local.sink, Sink::Own))
    {
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
        if !commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)? {
            signal.wait(Some(10));
        }
        resumer.send(sequencer.commands());
    }
    tracing::info!("stopping: no new connections, no more reads; draining the queues");
    resumer.send(&mut vec![Command::Quiesce]);
    let quiesce_started = Instant::now();
    while !reactor.is_quiesced() && quiesce_started.elapsed() < QUIESCE_WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing is pushed any more: drain every ring, commit and send the acks while the
    // connections are still open. Two empty collections in a row have looked at every
    // source, idle ones included.
    let mut empty_collects = 0;
    while empty_collects < 2 {
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
        let worked = commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)?;
        resumer.send(sequencer.commands());
        empty_collects = if worked { 0 } else { empty_collects + 1 };
    }
    sequencer.lower_backpressure();
    commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)?;
    resumer.send(sequencer.commands());
    // Writes the acks sent above (best effort, without blocking), then closes.
    let reactor_stats = reactor.shutdown();
    while let Ok(source) = new_sources.try_recv() {
        sequencer.add_source(source);
    }
    while commit_group(&mut sequencer, &mut log, &mut engine, &mut locals)? || !sequencer.drained() {
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
    }
    sequencer.commands().clear();
    log.sync()?;
    snapshots.set_ingest(&ingest_view(&reactor_stats, config));
    snapshots.finish(&engine.state);
    Ok(NodeReport::at_stop(replayed_records, &engine.state, &mut locals, &sequencer, reactor_stats))
}

impl NodeReport {
    /// The report of a clean stop (the dispatchers' records flushed), logged.
    pub(super) fn at_stop(
        replayed_records: u64,
        state: &State,
        locals: &mut [Executors],
        sequencer: &Sequencer,
        reactor: ReactorStats,
    ) -> NodeReport {
        locals.iter_mut().for_each(|local| local.dispatcher.flush());
        let report = NodeReport {
            replayed_records,
            position: state.position,
            state_hash: state.state_hash(),
            events_applied: state.events_applied,
            rejected: state.rejections.total,
            dispatched_actions: locals.iter().map(|local| local.dispatcher.dispatched).sum(),
            daemons: locals[0].daemons.stats.clone(),
            sequencer: sequencer.stats().clone(),
            reactor,
        };
        tracing::info!(
            position = report.position,
            state_hash = format!("{:032x}", report.state_hash),
            "stopped cleanly"
        );
        report
    }
}

/// Collects, commits (one fsync), folds and reconciles one group, and hands each
/// local node the actions addressed to it; false when there was nothing to commit.
fn commit_group(
    sequencer: &mut Sequencer,
    log: &mut EmbeddedLog,
    engine: &mut Engine,
    locals: &mut [Executors],
) -> Result<bool, NodeError> {
    if sequencer.collect() == 0 {
        return Ok(false);
    }
    let committed = sequencer.commit(log)?;
    tracing::trace!(
        records = committed.records,
        events = committed.events,
        commit_us = committed.commit_us,
        "committed"
    );
    for (stamp, payload, verified) in sequencer.committed() {
        // Signatures the reactor verified are not verified again on this thread.
        let (state, actions) = engine.apply_verified(stamp.position, stamp.time_ms, payload, verified);
        dispatch_actions(state, actions, locals);
    }
    refresh_keys(&engine.state, locals);
    debug_assert_eq!(engine.state.position, log.durable_position());
    sequencer.release();
    for local in locals.iter_mut() {
        local.flush_events(sequencer);
    }
    Ok(true)
}

/// Gives the transports the keys fold admits now (a no-op unless the keyring changed).
pub(super) fn refresh_keys(state: &State, locals: &[Executors]) {
    for local in locals {
        local.keys.refresh(state);
    }
}

/// Hands each local node the actions of a pass addressed to it.
pub(super) fn dispatch_actions(state: &State, actions: &[Action], locals: &mut [Executors]) {
    for local in locals.iter_mut() {
        let Some(own) = state.nodes.find(&local.name) else { continue };
        for action in actions.iter().filter(|action| action.node == own) {
            local.dispatcher.record(state, action);
            local.daemons.dispatch(state, action, &local.sdk, &mut local.events);
            local.blobs.dispatch(state, action, &mut local.events);
        }
    }
}

/// The node's ingest counters as the snapshot shows them (`meshos status`).
pub(super) fn ingest_view(reactor: &ReactorStats, config: &NodeConfig) -> crate::snapshot::IngestView {
    let (frame_error_names, frame_errors) =
        reactor.frame_rejections().iter().map(|(name, count)| (name.to_string(), *count)).unzip();
    // The connection refusals, then the failed handshakes by reason (`auth_<reason>`;
    // their sum is the refusal `authentication_failed`).
    let (connection_refusal_names, connection_refusals) = reactor
        .connection_refusals()
        .iter()
        .map(|(name, count)| (name.to_string(), *count))
        .chain(reactor.authentication_failures().iter().map(|(name, count)| (format!("auth_{name}"), *count)))
        .unzip();
    crate::snapshot::IngestView {
        connections_open: reactor.accepted - reactor.closed,
        frames_in: reactor.frames_in,
        bytes_in: reactor.bytes_in,
        partial_frame_bytes: reactor.partial_frame_bytes,
        partial_frame_bytes_peak: reactor.partial_frame_bytes_peak,
        partial_frame_bytes_max: config.ingest.partial_frame_bytes_max,
        frame_error_names,
        frame_errors,
        connection_refusal_names,
        connection_refusals,
    }
}

/// The loop's periodic counters line. `rejected_frames`: every frame refused (the
/// reactor's frame errors, the sequencer's payload refusals it acted on, wrong
/// kinds); `refused_connections`: connections refused or closed by a limit. Each
/// rejection is also logged by the reactor as it happens (rate-limited per reason).
pub(super) fn log_stats(sequencer: &Sequencer, engine: &Engine, reactor: &ReactorStats) {
    let stats = sequencer.stats();
    let rejected_frames: u64 = reactor.frame_rejections().iter().map(|(_, count)| count).sum();
    // `memory_budget_wait` counts waits for the partial-frame budget, not connections.
    let refused_connections: u64 = reactor
        .connection_refusals()
        .iter()
        .filter(|(name, _)| *name != "memory_budget_wait")
        .map(|(_, count)| count)
        .sum();
    tracing::info!(
        position = engine.state.position,
        events = stats.events,
        records = stats.records,
        commits = stats.commits,
        connections = reactor.accepted - reactor.closed,
        backpressure = sequencer.backpressure(),
        rejected_frames,
        payloads_rejected = stats.rejected_frames,
        refused_connections,
        partial_frame_bytes = reactor.partial_frame_bytes,
        budget_waits = reactor.budget_waits,
        "ingest"
    );
}
