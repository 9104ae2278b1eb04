//! The daemon executor: carries out this node's daemon actions with real processes
//! and turns what the processes do into events.
//!
//! - Start: spawn the spec's command as the leader of a new process group, with the
//!   spec's env plus `MESHOS_SDK_SOCKET`, `MESHOS_DAEMON_TOKEN` (16 random bytes, one
//!   per process start), `MESHOS_DAEMON_NAME` and `MESHOS_NODE_NAME`; stdout and stderr
//!   go to rotating files in `DATA_DIR/daemons/NAME/`; a pid file there records the pid
//!   and its start time. Reports `Started`, then the action's outcome.
//! - Stop: a `Shutdown` control event (when the daemon registered), SIGTERM to the
//!   group after half the spec's stop grace (at once if it never registered), SIGKILL
//!   after all of it. Reports `Stopped`, or `Crashed { signal: 9 }` when SIGKILL was
//!   needed, then the outcome. Restart is a stop (with a `Restart` control event)
//!   followed by a start.
//! - Reaping: a process that ends by itself is reported as `Exited { code }` or
//!   `Crashed { signal }`; fold decides backoff and gating.
//! - SDK: a connection registers with the token of a process this executor started,
//!   from that process or its group (the peer's credentials), as the node's user;
//!   then its health, saturation and capability reports become events (health and
//!   saturation at most once per `report_interval_ms` unless the value changes).
//! - A node restart adopts nothing: processes named by pid files whose start time
//!   still matches are orphans of the previous run and are stopped; daemons the log
//!   says run here are reported `Stopped`, and daemon actions left in flight for this
//!   node are reported failed, so reconcile starts afresh from what is true.
//!
//! Invariants: at most one process per daemon name; every spawned process is reaped;
//! a pid file exists exactly while its process may be alive; this module never
//! decides what should run (reconcile does), it only executes and reports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::action::{Action, ActionKind};
use crate::event::{ActionId, DaemonSignal, DaemonSpec, EventKind, Outcome};
use crate::sdk::proto::{self, Control, ToDaemon, ToNode};
use crate::state::ids::NodeRow;
use crate::state::State;
use crate::sys::process;
use crate::sys::sdk_server::{ConnectionId, Inbound, SdkHandle};

/// Grace for orphans whose spec is unknown, and the default of the spec field.
const ORPHAN_GRACE_DEFAULT: Duration = Duration::from_secs(10);
const PID_FILE: &str = "pid";
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

/// What the executor needs from the node's config.
#[derive(Debug, Clone)]
pub struct DaemonExecConfig {
    pub node_name: String,
    /// `DATA_DIR/daemons`: one directory per daemon name.
    pub daemons_dir: PathBuf,
    pub sdk_socket: PathBuf,
    pub log_bytes_max: u64,
    pub log_files_kept: u32,
    pub report_interval_ms: u32,
    /// Labels a daemon may publish, and their length: what fold accepts.
    pub labels_max: u32,
    pub label_bytes_max: u32,
}

/// Unregistered SDK connections are closed after this long (a slot held by nobody).
const UNREGISTERED_IDLE: Duration = Duration::from_secs(10);
/// SDK messages the executor handles per call of `on_sdk_batch`.
pub const SDK_MESSAGES_PER_TICK_MAX: usize = 1024;

/// Counters, for the node's stats line and tests.
#[derive(Debug, Default, Clone)]
pub struct DaemonExecStats {
    pub spawned: u64,
    pub spawn_failures: u64,
    pub exits: u64,
    pub stops: u64,
    pub kills: u64,
    pub orphans_stopped: u64,
    pub registrations: u64,
    pub registrations_refused: u64,
    pub reports: u64,
    pub reports_coalesced: u64,
    pub labels_refused: u64,
}

/// One kind of report (health or saturation) under the rate limit: at most one event
/// per interval; a value that arrives inside the interval waits for its end.
#[derive(Debug, Default, Clone, Copy)]
struct Limited<T> {
    logged: Option<(T, Instant)>,
    waiting: Option<T>,
}

impl<T: Copy + PartialEq> Limited<T> {
    /// The value to log now, if any.
    fn report(&mut self, value: T, now: Instant, interval: Duration) -> Option<T> {
        match self.logged {
            Some((_, at)) if now.duration_since(at) < interval => {
                self.waiting = Some(value);
                None
            }
            _ => {
                self.logged = Some((value, now));
                self.waiting = None;
                Some(value)
            }
        }
    }

    /// A waiting value whose interval is over, if it differs from the last logged one.
    fn due(&mut self, now: Instant, interval: Duration) -> Option<T> {
        let (last, at) = self.logged?;
        if now.duration_since(at) < interval {
            return None;
        }
        let value = self.waiting.take()?;
        (value != last).then(|| {
            self.logged = Some((value, now));
            value
        })
    }
}

struct Stopping {
    /// The stop or restart action, `None` when the node itself shuts down.
    action: Option<ActionId>,
    began: Instant,
    grace: Duration,
    term_sent: bool,
    kill_sent: bool,
    /// Start this spec again once the process is gone (a restart).
    restart: Option<DaemonSpec>,
}

struct Supervised {
    child: Child,
    pid: u32,
    token: String,
    spec_generation: u32,
    connection: Option<ConnectionId>,
    registered: bool,
    labels: Vec<String>,
    health: Limited<bool>,
    saturation: Limited<u16>,
    stopping: Option<Stopping>,
    output: Vec<std::thread::JoinHandle<()>>,
}

pub struct DaemonExecutor {
    config: DaemonExecConfig,
    running: HashMap<String, Supervised>,
    /// Connections that have not registered: their peer's pid and uid, and since when.
    unregistered: HashMap<ConnectionId, (u32, u32, Instant)>,
    uid: u32,
    /// The node is stopping: nothing new starts.
    node_stopping: bool,
    pub stats: DaemonExecStats,
}

fn daemon_event(name: &str, signal: DaemonSignal) -> EventKind {
    EventKind::Daemon { daemon: name.to_string(), signal }
}

fn cancelled(action: ActionId, reason: &str) -> EventKind {
    EventKind::ActionOutcome { action, outcome: Outcome::Cancelled { reason: reason.to_string() } }
}

fn outcome(action: ActionId, result: Result<(), String>) -> EventKind {
    let outcome = match result {
        Ok(()) => Outcome::Success,
        Err(reason) => Outcome::Failure { reason },
    };
    EventKind::ActionOutcome { action, outcome }
}

impl DaemonExecutor {
    pub fn new(config: DaemonExecConfig) -> DaemonExecutor {
        assert!(config.log_bytes_max > 0 && config.report_interval_ms > 0);
        DaemonExecutor {
            config,
            running: HashMap::new(),
            unregistered: HashMap::new(),
            uid: process::effective_uid(),
            node_stopping: false,
            stats: DaemonExecStats::default(),
        }
    }

    /// Daemons with a live (or not yet reaped) process.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// The pid of the named daemon's process, if this executor runs one.
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.running.get(name).map(|supervised| supervised.pid)
    }

    /// Labels the daemons published, sorted and without repeats.
    pub fn published_labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = self.running.values().flat_map(|daemon| daemon.labels.iter().cloned()).collect();
        labels.sort();
        labels.dedup();
        labels
    }

    fn daemon_dir(&self, name: &str) -> PathBuf {
        self.config.daemons_dir.join(name)
    }

    /// At node start, before anything runs: stops the processes a previous run left
    /// (pid file present and the start time matching), waiting up to each spec's stop
    /// grace before SIGKILL. Returns how many it stopped.
    pub fn stop_orphans(&mut self, state: &State) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.config.daemons_dir) else { return 0 };
        let mut orphans = Vec::new();
        for entry in entries.flatten() {
            let pid_path = entry.path().join(PID_FILE);
            let Ok(text) = std::fs::read_to_string(&pid_path) else { continue };
            let mut fields = text.split_whitespace().map(|field| field.parse::<u64>().ok());
            if let (Some(Some(pid)), Some(Some(ticks))) = (fields.next(), fields.next()) {
                let pid = pid as u32;
                if pid > 1 && process::start_ticks(pid) == Some(ticks) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let grace = state.specs.find(&name).map_or(ORPHAN_GRACE_DEFAULT, |spec| {
                        Duration::from_millis(state.specs.spec[spec.index()].stop_grace_ms as u64)
                    });
                    tracing::warn!(daemon = name, pid, "stopping a daemon left running by a previous run of this node");
                    process::signal_group(pid, SIGTERM);
                    orphans.push((pid, ticks, Instant::now() + grace));
                }
            }
            let _ = std::fs::remove_file(&pid_path);
        }
        let count = orphans.len();
        while !orphans.is_empty() {
            let now = Instant::now();
            orphans.retain(|&(pid, ticks, deadline)| {
                let alive = process::start_ticks(pid) == Some(ticks);
                if alive && now >= deadline {
                    process::signal_group(pid, SIGKILL);
                    return false;
                }
                alive
            });
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stats.orphans_stopped += count as u64;
        count
    }

    /// At node start, after replay: what the log says about this node's daemons is
    /// from a previous run. Daemons it calls running are reported stopped; daemon
    /// actions still in flight for this node are reported failed.
    pub fn adopt_nothing(&mut self, state: &State, own: Option<NodeRow>, out: &mut Vec<EventKind>) {
        let Some(own) = own else { return };
        for row in 0..state.daemons.len() {
            if state.daemons.node[row] == own && state.daemons.state[row].is_running() {
                let name = &state.specs.spec[state.daemons.spec[row].index()].name;
                out.push(daemon_event(name, DaemonSignal::Stopped));
            }
        }
        for entry in state.inflight.entries.0.iter() {
            if entry.action.node == own && entry.action.kind.is_daemon() {
                out.push(cancelled(entry.action.id, "the node restarted before the action finished"));
            }
        }
    }

    /// Carries out one of this node's actions (non-daemon actions are ignored here).
    pub fn dispatch(&mut self, state: &State, action: &Action, sdk: &SdkHandle, out: &mut Vec<EventKind>) {
        let Some(spec_row) = action.kind.daemon_spec() else { return };
        let spec = &state.specs.spec[spec_row.index()];
        let generation = state.specs.generation[spec_row.index()];
        if self.node_stopping && !matches!(action.kind, ActionKind::StopDaemon { .. }) {
            // Left in flight, unanswered: an outcome now would only free the budget for
            // the same start again, record after record. The next run cancels it.
            tracing::debug!(daemon = spec.name, "not started: the node is shutting down");
            return;
        }
        match action.kind {
            ActionKind::StartDaemon { .. } => {
                if self.running.contains_key(&spec.name) {
                    out.push(outcome(action.id, Err(format!("{} already runs on this node", spec.name))));
                    return;
                }
                let result = self.spawn(spec, generation, out);
                out.push(outcome(action.id, result));
            }
            ActionKind::StopDaemon { .. } | ActionKind::RestartDaemon { .. } => {
                let restart = matches!(action.kind, ActionKind::RestartDaemon { .. });
                let Some(daemon) = self.running.get_mut(&spec.name) else {
                    // Nothing runs here under that name: the log's view is stale.
                    let own_row = state.daemons.find(spec_row, action.node);
                    if own_row.is_some_and(|row| state.daemons.state[row.index()].is_running()) {
                        out.push(daemon_event(&spec.name, DaemonSignal::Stopped));
                    }
                    if restart {
                        let result = self.spawn(spec, generation, out);
                        out.push(outcome(action.id, result));
                    } else {
                        out.push(outcome(action.id, Ok(())));
                    }
                    return;
                };
                if let Some(stopping) = daemon.stopping.as_mut() {
                    // Already stopping (the node is shutting down, or the action that
                    // began it timed out in the log): this action ends with the process.
                    stopping.action = Some(action.id);
                    stopping.restart = restart.then(|| spec.clone());
                    return;
                }
                let control = if restart { Control::Restart } else { Control::Shutdown };
                let grace = Duration::from_millis(spec.stop_grace_ms as u64);
                begin_stop(daemon, Some(action.id), grace, control, sdk);
                daemon.stopping.as_mut().expect("just set").restart = restart.then(|| spec.clone());
            }
            _ => unreachable!("daemon_spec is Some only for daemon actions"),
        }
    }

    fn spawn(&mut self, spec: &DaemonSpec, generation: u32, out: &mut Vec<EventKind>) -> Result<(), String> {
        let result = self.try_spawn(spec, generation);
        match result {
            Ok(pid) => {
                self.stats.spawned += 1;
                out.push(daemon_event(&spec.name, DaemonSignal::Started { pid }));
                tracing::info!(daemon = spec.name, pid, "started");
                Ok(())
            }
            Err(reason) => {
                self.stats.spawn_failures += 1;
                tracing::warn!(daemon = spec.name, "start failed: {reason}");
                Err(reason)
            }
        }
    }

    fn try_spawn(&mut self, spec: &DaemonSpec, generation: u32) -> Result<u32, String> {
        let dir = self.daemon_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let mut token_bytes = [0u8; 16];
        process::random_bytes(&mut token_bytes).map_err(|error| format!("/dev/urandom: {error}"))?;
        let token = crate::event::hex(&token_bytes);
        let mut env: Vec<(String, String)> = spec.env.iter().map(|var| (var.key.clone(), var.value.clone())).collect();
        env.push((proto::ENV_SOCKET.to_string(), self.config.sdk_socket.display().to_string()));
        env.push((proto::ENV_TOKEN.to_string(), token.clone()));
        env.push((proto::ENV_DAEMON.to_string(), spec.name.clone()));
        env.push((proto::ENV_NODE.to_string(), self.config.node_name.clone()));
        let working_dir = if spec.working_dir.is_empty() { dir.clone() } else { PathBuf::from(&spec.working_dir) };
        let mut child = process::spawn_in_group(&spec.command, &spec.args, &env, &working_dir)
            .map_err(|error| format!("cannot run {:?} in {}: {error}", spec.command, working_dir.display()))?;
        let pid = child.id();
        let ticks = process::start_ticks(pid).unwrap_or(0);
        // Without its pid file a crash of the node would leave an orphan nobody stops.
        if let Err(error) = write_pid_file(&dir.join(PID_FILE), pid, ticks) {
            process::signal_child_and_group(pid, SIGKILL);
            let _ = child.wait();
            return Err(format!("{}: {error}", dir.join(PID_FILE).display()));
        }
        let mut output = Vec::with_capacity(2);
        let (bytes_max, kept) = (self.config.log_bytes_max, self.config.log_files_kept);
        if let Some(stdout) = child.stdout.take() {
            output.extend(crate::exec::output::spawn_copier(stdout, &dir, "stdout", bytes_max, kept).ok());
        }
        if let Some(stderr) = child.stderr.take() {
            output.extend(crate::exec::output::spawn_copier(stderr, &dir, "stderr", bytes_max, kept).ok());
        }
        self.running.insert(
            spec.name.clone(),
            Supervised {
                child,
                pid,
                token,
                spec_generation: generation,
                connection: None,
                registered: false,
                labels: Vec::new(),
                health: Limited::default(),
                saturation: Limited::default(),
                stopping: None,
                output,
            },
        );
        Ok(pid)
    }

    /// Reaps ended processes and escalates stops that are past their steps.
    pub fn poll(&mut self, now: Instant, state: &State, sdk: &SdkHandle, out: &mut Vec<EventKind>) {
        let mut ended = Vec::new();
        for (name, daemon) in self.running.iter_mut() {
            if let Some(stopping) = daemon.stopping.as_mut() {
                let elapsed = now.saturating_duration_since(stopping.began);
                if !stopping.term_sent && elapsed >= stopping.grace / 2 {
                    stopping.term_sent = true;
                    tracing::info!(daemon = name, pid = daemon.pid, "stop: SIGTERM");
                    process::signal_child_and_group(daemon.pid, SIGTERM);
                }
                if !stopping.kill_sent && elapsed >= stopping.grace {
                    stopping.kill_sent = true;
                    self.stats.kills += 1;
                    tracing::warn!(daemon = name, pid = daemon.pid, "stop: grace over, SIGKILL");
                    process::signal_child_and_group(daemon.pid, SIGKILL);
                }
            }
            match daemon.child.try_wait() {
                Ok(Some(status)) => ended.push((name.clone(), Some(status))),
                Ok(None) => {}
                // ECHILD: somebody else reaped it (SIGCHLD ignored by the process); it
                // is gone, how it ended is unknown.
                Err(_) => ended.push((name.clone(), None)),
            }
            let interval = Duration::from_millis(self.config.report_interval_ms as u64);
            if let Some(healthy) = daemon.health.due(now, interval) {
                out.push(daemon_event(name, DaemonSignal::Health { healthy }));
                self.stats.reports += 1;
            }
            if let Some(permille) = daemon.saturation.due(now, interval) {
                out.push(daemon_event(name, DaemonSignal::Saturation { permille }));
                self.stats.reports += 1;
            }
        }
        for (name, status) in ended {
            let daemon = self.running.remove(&name).expect("listed above");
            self.reaped(&name, daemon, status, state, sdk, out);
        }
        // A connection that never registered gives its slot back.
        self.unregistered.retain(|&connection, &mut (_, _, since)| {
            let idle = now.saturating_duration_since(since) >= UNREGISTERED_IDLE;
            if idle {
                sdk.send(connection, Some(ToDaemon::Rejected { reason: "no hello within 10 s".to_string() }));
                sdk.send(connection, None);
            }
            !idle
        });
        // A spec changed while its daemon runs: tell it to read its config again.
        for (name, daemon) in self.running.iter_mut() {
            let Some(spec) = state.specs.find(name) else { continue };
            let generation = state.specs.generation[spec.index()];
            if generation != daemon.spec_generation {
                daemon.spec_generation = generation;
                if let Some(connection) = daemon.connection {
                    sdk.send(connection, Some(ToDaemon::Control(Control::ReloadConfig)));
                }
            }
        }
    }

    fn reaped(
        &mut self,
        name: &str,
        mut daemon: Supervised,
        status: Option<std::process::ExitStatus>,
        state: &State,
        sdk: &SdkHandle,
        out: &mut Vec<EventKind>,
    ) {
        use std::os::unix::process::ExitStatusExt;
        self.stats.exits += 1;
        // Whatever the leader left behind in its group goes with it.
        process::signal_group(daemon.pid, SIGKILL);
        let _ = std::fs::remove_file(self.daemon_dir(name).join(PID_FILE));
        if let Some(connection) = daemon.connection {
            sdk.send(connection, None);
        }
        // The copier threads end at the pipes' end of file; never wait for them here (a
        // grandchild that left the group could hold a pipe open).
        daemon.output.clear();
        match daemon.stopping.take() {
            Some(stopping) => {
                self.stats.stops += 1;
                let signal = if stopping.kill_sent && status.and_then(|status| status.signal()) == Some(SIGKILL) {
                    DaemonSignal::Crashed { signal: SIGKILL }
                } else {
                    DaemonSignal::Stopped
                };
                tracing::info!(daemon = name, pid = daemon.pid, ?status, "stopped");
                out.push(daemon_event(name, signal));
                match (stopping.action, stopping.restart) {
                    // Left in flight (see `dispatch`); the next run cancels it.
                    (Some(_), Some(_)) if self.node_stopping => {}
                    (Some(action), Some(spec)) => {
                        // The spec as it is now: it may have changed during the stop.
                        let current = state.specs.find(&spec.name).map(|row| row.index());
                        let result = match current {
                            Some(row) => self.spawn(&state.specs.spec[row], state.specs.generation[row], out),
                            None => self.spawn(&spec, daemon.spec_generation, out),
                        };
                        out.push(outcome(action, result));
                    }
                    (Some(action), None) => out.push(outcome(action, Ok(()))),
                    (None, _) => {}
                }
            }
            None => {
                let code = status.and_then(|status| status.code());
                let signal = match (code, status.and_then(|status| status.signal())) {
                    (Some(code), _) => DaemonSignal::Exited { code },
                    (None, Some(signal)) => DaemonSignal::Crashed { signal },
                    (None, None) => DaemonSignal::Exited { code: -1 },
                };
                tracing::warn!(daemon = name, pid = daemon.pid, ?status, "ended by itself");
                out.push(daemon_event(name, signal));
            }
        }
    }

    /// Node shutdown: begins stopping every daemon; `poll` until `running_count` is 0.
    pub fn stop_all(&mut self, state: &State, sdk: &SdkHandle) {
        self.node_stopping = true;
        for (name, daemon) in self.running.iter_mut() {
            if daemon.stopping.is_none() {
                let grace = state.specs.find(name).map_or(ORPHAN_GRACE_DEFAULT, |spec| {
                    Duration::from_millis(state.specs.spec[spec.index()].stop_grace_ms as u64)
                });
                begin_stop(daemon, None, grace, Control::Shutdown, sdk);
            }
        }
    }

    /// One message from the SDK socket.
    pub fn on_sdk(&mut self, inbound: Inbound, sdk: &SdkHandle, out: &mut Vec<EventKind>) {
        match inbound {
            Inbound::Connected { connection, pid, uid } => {
                self.unregistered.insert(connection, (pid, uid, Instant::now()));
            }
            Inbound::Closed { connection } => {
                self.unregistered.remove(&connection);
                for daemon in self.running.values_mut() {
                    if daemon.connection == Some(connection) {
                        daemon.connection = None;
                    }
                }
            }
            Inbound::Malformed { connection, error } => {
                tracing::warn!(connection, "SDK connection sent bad bytes and was closed: {error}");
            }
            Inbound::Message { connection, message: ToNode::Hello { token } } => {
                let answer = self.register(connection, &token, out);
                let refused = matches!(answer, ToDaemon::Rejected { .. });
                sdk.send(connection, Some(answer));
                if refused {
                    sdk.send(connection, None);
                }
            }
            Inbound::Message { connection, message } => {
                let answer = self.report(connection, message, out);
                sdk.send(connection, Some(answer));
            }
        }
    }

    fn register(&mut self, connection: ConnectionId, token: &str, out: &mut Vec<EventKind>) -> ToDaemon {
        let refuse = |stats: &mut DaemonExecStats, reason: String| {
            stats.registrations_refused += 1;
            tracing::warn!(connection, "SDK registration refused: {reason}");
            ToDaemon::Rejected { reason }
        };
        let Some(&(peer_pid, peer_uid, _)) = self.unregistered.get(&connection) else {
            return refuse(&mut self.stats, "this connection already registered".to_string());
        };
        if peer_uid != self.uid {
            return refuse(&mut self.stats, format!("peer uid {peer_uid} is not the node's uid {}", self.uid));
        }
        let found = self.running.iter_mut().find(|(_, daemon)| !token.is_empty() && daemon.token == token);
        let Some((name, daemon)) = found else {
            return refuse(&mut self.stats, "unknown token: this node did not start this process".to_string());
        };
        let same_group = peer_pid == daemon.pid || process::process_group(peer_pid) == Some(daemon.pid);
        if !same_group {
            let reason = format!("peer pid {peer_pid} is not daemon {name} (pid {}) nor in its group", daemon.pid);
            return refuse(&mut self.stats, reason);
        }
        self.unregistered.remove(&connection);
        daemon.connection = Some(connection);
        if !daemon.registered {
            daemon.registered = true;
            self.stats.registrations += 1;
            out.push(daemon_event(name, DaemonSignal::Registered { pid: daemon.pid }));
        }
        ToDaemon::Welcome { node: self.config.node_name.clone(), daemon: name.clone() }
    }

    fn report(&mut self, connection: ConnectionId, message: ToNode, out: &mut Vec<EventKind>) -> ToDaemon {
        let interval = Duration::from_millis(self.config.report_interval_ms as u64);
        let now = Instant::now();
        let Some((name, daemon)) = self.running.iter_mut().find(|(_, daemon)| daemon.connection == Some(connection))
        else {
            return ToDaemon::Rejected {
                reason: "register first (hello with the token from MESHOS_DAEMON_TOKEN)".to_string(),
            };
        };
        // At most one event per kind per interval: a daemon flapping its health or
        // jittering its load cannot grow the log faster than that.
        match message {
            ToNode::Hello { .. } => unreachable!("handled by register"),
            ToNode::Health { healthy } => match daemon.health.report(healthy, now, interval) {
                Some(healthy) => {
                    out.push(daemon_event(name, DaemonSignal::Health { healthy }));
                    self.stats.reports += 1;
                }
                None => self.stats.reports_coalesced += 1,
            },
            ToNode::Saturation { permille } => match daemon.saturation.report(permille.min(1000), now, interval) {
                Some(permille) => {
                    out.push(daemon_event(name, DaemonSignal::Saturation { permille }));
                    self.stats.reports += 1;
                }
                None => self.stats.reports_coalesced += 1,
            },
            ToNode::Capabilities { mut labels } => {
                let (labels_max, bytes_max) = (self.config.labels_max as usize, self.config.label_bytes_max as usize);
                if labels.len() > labels_max {
                    self.stats.labels_refused += 1;
                    return ToDaemon::Rejected { reason: format!("{} labels; at most {labels_max}", labels.len()) };
                }
                if let Some(bad) = labels.iter().find(|label| label.is_empty() || label.len() > bytes_max) {
                    self.stats.labels_refused += 1;
                    return ToDaemon::Rejected { reason: format!("label {bad:?} must be 1..={bytes_max} bytes") };
                }
                labels.sort();
                labels.dedup();
                daemon.labels = labels;
            }
            ToNode::ShuttingDown => {
                tracing::info!(daemon = name, pid = daemon.pid, "daemon says it is shutting down");
            }
        }
        ToDaemon::Ok
    }
}

impl Drop for DaemonExecutor {
    /// A node that stops without `stop_all` (an error) leaves nothing running: what is
    /// left is killed and reaped (no events: the next start reports it stopped).
    fn drop(&mut self) {
        for (name, daemon) in self.running.iter_mut() {
            tracing::warn!(daemon = name, pid = daemon.pid, "node stopping on an error: SIGKILL");
            process::signal_child_and_group(daemon.pid, SIGKILL);
            let _ = daemon.child.wait();
            let _ = std::fs::remove_file(self.config.daemons_dir.join(name).join(PID_FILE));
        }
    }
}

fn begin_stop(daemon: &mut Supervised, action: Option<ActionId>, grace: Duration, control: Control, sdk: &SdkHandle) {
    let began = Instant::now();
    let mut stopping = Stopping { action, began, grace, term_sent: false, kill_sent: false, restart: None };
    match daemon.connection {
        Some(connection) => sdk.send(connection, Some(ToDaemon::Control(control))),
        None => {
            // No way to ask it politely: SIGTERM now.
            stopping.term_sent = true;
            process::signal_child_and_group(daemon.pid, SIGTERM);
        }
    }
    tracing::info!(pid = daemon.pid, ?control, grace_ms = grace.as_millis() as u64, "stopping");
    daemon.stopping = Some(stopping);
}

fn write_pid_file(path: &Path, pid: u32, start_ticks: u64) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, format!("{pid} {start_ticks}\n"))?;
    std::fs::rename(&temporary, path)
}
