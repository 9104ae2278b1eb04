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
//! ([`crate::exec::daemons`]); every action is also recorded, one line each, in
//! `DATA_DIR/dispatched.log`. Blob actions are only recorded until the blob store
//! exists. What the executors observe (process starts and ends, SDK registrations and
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
use crate::engine::Engine;
use crate::event::{EventKind, NodeHealth};
use crate::exec::capability::CapabilityPublisher;
use crate::exec::daemons::DaemonExecutor;
use crate::ingest::park::Signal;
use crate::node::config::NodeConfig;
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
/// The dispatcher's record of what it would run, in the data directory.
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
struct Dispatcher {
    out: BufWriter<File>,
    path: PathBuf,
    dispatched: u64,
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
        let verb = if action.kind.is_daemon() { "runs" } else { "would run" };
        tracing::debug!(position = action.id.position, index = action.id.index, "{verb}: {line}");
        // Best effort: the record is for operators, the state already holds the action.
        let _ = writeln!(self.out, "{}.{} {verb}: {line}", action.id.position, action.id.index);
    }

    fn flush(&mut self) {
        if let Err(error) = self.out.flush() {
            tracing::warn!("{}: {error}", self.path.display());
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io { path: path.to_path_buf(), source }
}

/// Everything that acts on this node's behalf, and the events it produced that wait
/// for the next group.
struct Executors {
    dispatcher: Dispatcher,
    daemons: DaemonExecutor,
    sdk: SdkHandle,
    capability: CapabilityPublisher,
    events: Vec<EventKind>,
}

impl Executors {
    /// Serves the SDK, reaps and escalates, publishes the capability set; queues the
    /// resulting events on the sequencer.
    fn tick(&mut self, state: &State, name: &str, sequencer: &mut Sequencer) {
        // Bounded per tick: a daemon pipelining requests cannot keep the loop here.
        for inbound in self.sdk.inbound.try_iter().take(crate::exec::daemons::SDK_MESSAGES_PER_TICK_MAX) {
            self.daemons.on_sdk(inbound, &self.sdk, &mut self.events);
        }
        self.daemons.poll(Instant::now(), state, &self.sdk, &mut self.events);
        let labels = self.daemons.published_labels();
        if let Some(event) = self.capability.next(state, name, &labels) {
            self.events.push(event);
        }
        for event in self.events.drain(..) {
            sequencer.push_own(event);
        }
    }
}

/// Writes `text` to `path` atomically (temporary file, fsync, rename).
fn write_atomically(path: &Path, text: &str) -> Result<(), NodeError> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(text.as_bytes()).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io_error(path))
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
            .spawn(move || run_until(&config, &stop, Some(ready_tx)))
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
    run_until(config, stop, None)
}

fn run_until(
    config: &NodeConfig,
    stop: &StopFlag,
    ready: Option<std::sync::mpsc::Sender<std::net::SocketAddr>>,
) -> Result<NodeReport, NodeError> {
    let library_config = config.to_config();
    std::fs::create_dir_all(&config.data_dir).map_err(io_error(&config.data_dir))?;
    let (mut log, recovery) = EmbeddedLog::open(&config.log_dir(), &library_config)?;
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
    log.read_from(1, &mut |record| {
        engine.apply(record.position, record.time_ms, record.payload);
        true
    })?;
    let replayed_records = engine.state.position;
    assert_eq!(replayed_records, log.last_position(), "replay folds every record");
    tracing::info!(
        position = engine.state.position,
        state_hash = format!("{:032x}", engine.state.state_hash()),
        elapsed_ms = replay_started.elapsed().as_millis() as u64,
        "recovered from the log"
    );

    let own_seq_last =
        engine.state.nodes.find(&config.name).map_or(0, |row| engine.state.nodes.origin_seq_last[row.index()]);
    let backpressure_raised =
        engine.state.nodes.find(&config.name).is_some_and(|row| engine.state.nodes.backpressure[row.index()]);
    let mut sequencer = Sequencer::new(config.sequencer_config(), own_seq_last, backpressure_raised);
    let signal = Signal::new();
    crate::sys::process::reset_child_signal();
    let mut daemons = DaemonExecutor::new(config.daemon_exec_config());
    let orphans = daemons.stop_orphans(&engine.state);
    if orphans > 0 {
        tracing::warn!(orphans, "stopped daemons a previous run of this node left running");
    }
    let mut events = Vec::new();
    daemons.adopt_nothing(&engine.state, engine.state.nodes.find(&config.name), &mut events);
    let capacity_bytes = match config.capability.capacity_bytes {
        0 => crate::sys::process::filesystem_bytes(&config.data_dir).unwrap_or(0),
        bytes => bytes,
    };
    let mut executors = Executors {
        dispatcher: Dispatcher::open(config.data_dir.join(DISPATCH_FILE))?,
        daemons,
        sdk: crate::sys::sdk_server::start(
            &config.sdk_socket_path(),
            config.daemons.sdk_connections_max,
            Arc::clone(&signal),
        )?,
        capability: CapabilityPublisher::new(
            config.capability.zone.clone(),
            capacity_bytes,
            config.capability.labels.clone(),
        ),
        events,
    };
    let (reactor, new_sources) = Reactor::start(config.reactor_config(), Arc::clone(&signal))?;
    let resumer = reactor.resumer();
    let tcp_addr = reactor.local_tcp_addr().map(|addr| addr.to_string()).unwrap_or_default();
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
        "node running"
    );

    let mut snapshots = config.snapshot_writer();
    let heartbeat = Duration::from_millis(config.heartbeat_ms as u64);
    let mut next_heartbeat = Instant::now();
    let mut next_stats = Instant::now() + STATS_INTERVAL;
    while !stop.is_set() {
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
        let now = Instant::now();
        if now >= next_heartbeat {
            sequencer.push_own(EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }));
            next_heartbeat = now + heartbeat;
        }
        executors.tick(&engine.state, &config.name, &mut sequencer);
        let worked = commit_group(&mut sequencer, &mut log, &mut engine, &mut executors, &config.name)?;
        snapshots.tick(&engine.state, now);
        resumer.send(sequencer.commands());
        if now >= next_stats {
            next_stats = now + STATS_INTERVAL;
            executors.dispatcher.flush();
            log_stats(&sequencer, &engine, &reactor.stats());
        }
        if !worked {
            executors.dispatcher.flush();
            let until_heartbeat = next_heartbeat.saturating_duration_since(Instant::now()).as_millis() as u64;
            signal.wait(Some(until_heartbeat.clamp(1, STOP_POLL_MS)));
        }
    }

    // Nothing new starts from here; what runs is stopped and its end committed.
    executors.daemons.stop_all(&engine.state, &executors.sdk);
    if executors.daemons.running_count() > 0 {
        tracing::info!(daemons = executors.daemons.running_count(), "stopping: stopping daemons");
        while executors.daemons.running_count() > 0 {
            executors.tick(&engine.state, &config.name, &mut sequencer);
            if !commit_group(&mut sequencer, &mut log, &mut engine, &mut executors, &config.name)? {
                signal.wait(Some(10));
            }
            resumer.send(sequencer.commands());
        }
        executors.tick(&engine.state, &config.name, &mut sequencer);
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
        let worked = commit_group(&mut sequencer, &mut log, &mut engine, &mut executors, &config.name)?;
        resumer.send(sequencer.commands());
        empty_collects = if worked { 0 } else { empty_collects + 1 };
    }
    sequencer.lower_backpressure();
    commit_group(&mut sequencer, &mut log, &mut engine, &mut executors, &config.name)?;
    resumer.send(sequencer.commands());
    // Writes the acks sent above (best effort, without blocking), then closes.
    let reactor_stats = reactor.shutdown();
    while let Ok(source) = new_sources.try_recv() {
        sequencer.add_source(source);
    }
    while commit_group(&mut sequencer, &mut log, &mut engine, &mut executors, &config.name)? || !sequencer.drained() {
        while let Ok(source) = new_sources.try_recv() {
            sequencer.add_source(source);
        }
    }
    sequencer.commands().clear();
    log.sync()?;
    snapshots.finish(&engine.state);
    executors.dispatcher.flush();
    let report = NodeReport {
        replayed_records,
        position: engine.state.position,
        state_hash: engine.state.state_hash(),
        events_applied: engine.state.events_applied,
        rejected: engine.state.rejections.total,
        dispatched_actions: executors.dispatcher.dispatched,
        daemons: executors.daemons.stats.clone(),
        sequencer: sequencer.stats().clone(),
        reactor: reactor_stats,
    };
    tracing::info!(position = report.position, state_hash = format!("{:032x}", report.state_hash), "stopped cleanly");
    Ok(report)
}

/// Collects, commits (one fsync), folds and reconciles one group; false when there
/// was nothing to commit.
fn commit_group(
    sequencer: &mut Sequencer,
    log: &mut EmbeddedLog,
    engine: &mut Engine,
    executors: &mut Executors,
    name: &str,
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
    for (stamp, payload) in sequencer.committed() {
        let (state, actions) = engine.apply(stamp.position, stamp.time_ms, payload);
        let Some(own) = state.nodes.find(name) else { continue };
        for action in actions.iter().filter(|action| action.node == own) {
            executors.dispatcher.record(state, action);
            executors.daemons.dispatch(state, action, &executors.sdk, &mut executors.events);
        }
    }
    debug_assert_eq!(engine.state.position, log.durable_position());
    sequencer.release();
    for event in executors.events.drain(..) {
        sequencer.push_own(event);
    }
    Ok(true)
}

fn log_stats(sequencer: &Sequencer, engine: &Engine, reactor: &ReactorStats) {
    let stats = sequencer.stats();
    tracing::info!(
        position = engine.state.position,
        events = stats.events,
        records = stats.records,
        commits = stats.commits,
        connections = reactor.accepted - reactor.closed,
        backpressure = sequencer.backpressure(),
        rejected_frames = stats.rejected_frames,
        "ingest"
    );
}
