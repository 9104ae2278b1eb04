//! Daemon supervision with real processes: `meshos node` runs as a child process and
//! supervises the example daemon (`examples/daemon.rs`, built by `cargo test`) and
//! plain commands. Each test drives the node through its local socket, watches the
//! daemon's own output files, then stops the node and reads what happened, with log
//! times, from its log.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use meshos::event::{DaemonPlacement, DaemonSignal, DaemonSpec, Event, EventKind, RestartPolicy};
use meshos::node::config::NodeConfig;
use meshos::redex::Redex;

const WAIT_LIMIT: Duration = Duration::from_secs(60);
const NODE: &str = "node-1";

/// The example daemon, built next to this test's binary by `cargo test`.
fn example_daemon() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let path = deps.parent().unwrap().join("examples").join("daemon");
    assert!(
        path.exists(),
        "{} missing: `cargo test` builds the examples; alone, run `cargo build --example daemon` first",
        path.display()
    );
    path
}

struct Node {
    child: Child,
    dir: PathBuf,
}

fn start(dir: &Path) -> Node {
    start_with(dir, "")
}

/// Starts a node whose config file ends with `extra`.
fn start_with(dir: &Path, extra: &str) -> Node {
    let config = dir.join("node.toml");
    let text = format!(
        "name = \"{NODE}\"\ndata_dir = \"{}\"\nheartbeat_ms = 50\nlog_level = \"info\"\n\n[ingest]\nlisten_tcp = \
         \"127.0.0.1:0\"\n\n[daemons]\nreport_interval_ms = 100\n{extra}",
        dir.display()
    );
    std::fs::write(&config, text).unwrap();
    let _ = std::fs::remove_file(dir.join("node.addr"));
    let child = common::spawn_node(&config, &dir.join("stderr.log"));
    let node = Node { child, dir: dir.to_path_buf() };
    wait_for(&node, "the node to listen", || dir.join("node.addr").exists());
    node
}

impl Drop for Node {
    /// A failed test must not leave its node (and the node's daemons) running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = libc::pid_t::try_from(self.child.id()).unwrap();
            // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

impl Node {
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Appends events through the local socket (intents signed with the operator key
    /// the node's first start wrote); waits until durable.
    fn send(&self, kinds: Vec<EventKind>) {
        common::send_local(&self.dir, NODE, kinds);
    }

    /// SIGTERM (or SIGKILL), then waits; true when it exited 0.
    fn stop(mut self, signal: i32) -> bool {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        self.child.wait().unwrap().success()
    }

    fn daemon_output(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("daemons").join(name).join("stdout.log")).unwrap_or_default()
    }

    fn dispatched(&self, what: &str) -> usize {
        let text = std::fs::read_to_string(self.dir.join("dispatched.log")).unwrap_or_default();
        text.lines().filter(|line| line.contains(what)).count()
    }

    fn pid_file(&self, name: &str) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("daemons").join(name).join("pid")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }
}

fn node_stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

fn wait_for(node: &Node, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < WAIT_LIMIT, "timed out waiting for {what}; node stderr:\n{}", node.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spec(name: &str, command: &Path, args: &[&str], health_timeout_ms: u32, restart: RestartPolicy) -> EventKind {
    EventKind::DaemonIntent {
        spec: Box::new(DaemonSpec {
            args: args.iter().map(|arg| arg.to_string()).collect(),
            health_timeout_ms,
            restart,
            stop_grace_ms: 1_000,
            ..DaemonSpec::new(name, &command.display().to_string())
        }),
        runs_on: DaemonPlacement::AllNodes,
    }
}

/// Every event in the (stopped) node's log, with its record's log time.
fn history(dir: &Path) -> Vec<(u64, Event)> {
    let config = NodeConfig::load(&dir.join("node.toml")).unwrap().engine_config().unwrap();
    let (mut log, _) = meshos::redex::embedded::EmbeddedLog::open(&dir.join("log"), &config).unwrap();
    let mut events = Vec::new();
    log.read_from(1, &mut |record| {
        let batches = meshos::wire::decode_sections(record.payload).unwrap();
        events.extend(batches.into_iter().flat_map(|batch| batch.events).map(|event| (record.time_ms, event)));
        true
    })
    .unwrap();
    events
}

/// Log times of one daemon's signals that `select` picks.
fn signal_times(history: &[(u64, Event)], name: &str, select: impl Fn(&DaemonSignal) -> bool) -> Vec<u64> {
    history
        .iter()
        .filter_map(|(time_ms, event)| match &event.kind {
            EventKind::Daemon { daemon, signal } if daemon == name && select(signal) => Some(*time_ms),
            _ => None,
        })
        .collect()
}

fn replay(dir: &Path) -> meshos::state::State {
    let config = NodeConfig::load(&dir.join("node.toml")).unwrap().engine_config().unwrap();
    meshos::logtool::replay(&dir.join("log"), &config, true, &mut |_| {}).unwrap().state
}

#[test]
fn a_crashing_daemon_restarts_with_growing_delays_then_is_gated() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let policy = RestartPolicy {
        backoff_base_ms: 100,
        backoff_max_ms: 10_000,
        reset_after_ms: 600_000,
        crash_loop_limit: 5,
        crash_loop_window_ms: 60_000,
    };
    node.send(vec![spec("crasher", &example_daemon(), &["--crash-after-ms", "30", "--interval-ms", "10"], 0, policy)]);
    wait_for(&node, "five crashes", || node.daemon_output("crasher").matches("crashing on purpose").count() >= 5);
    // The next delay would be 1.6 s: wait past it and see no sixth start.
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(node.dispatched("start_daemon crasher"), 5, "gated after five crashes in the window");
    assert!(node.stop(libc::SIGTERM), "node exits 0");

    let history = history(dir.path());
    let starts = signal_times(&history, "crasher", |signal| matches!(signal, DaemonSignal::Started { .. }));
    let crashes = signal_times(&history, "crasher", |signal| matches!(signal, DaemonSignal::Crashed { signal: 6 }));
    assert_eq!((starts.len(), crashes.len()), (5, 5), "five runs, each ended by SIGABRT");
    let delays: Vec<u64> = crashes.iter().zip(&starts[1..]).map(|(crash, next)| next - crash).collect();
    for (index, delay) in delays.iter().enumerate() {
        let backoff = 100u64 << index;
        assert!(
            *delay >= backoff,
            "restart {} came {delay} ms after the crash, before its backoff {backoff}",
            index + 1
        );
    }
    // Each wait is at least its doubling backoff (100, 200, 400, 800 ms); scheduling
    // adds to each, so the growth is judged end to end.
    assert!(delays[3] > delays[0] + 400, "delays grow: {delays:?}");
    let state = replay(dir.path());
    let spec = state.specs.find("crasher").unwrap();
    let row = state.daemons.find(spec, state.nodes.find(NODE).unwrap()).unwrap();
    assert!(state.daemons.gated[row.index()], "the state shows the gate");
}

#[test]
fn a_daemon_whose_health_reports_stop_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let args = ["--healthy-for-ms", "300", "--interval-ms", "50"];
    node.send(vec![spec("quiet", &example_daemon(), &args, 1_000, RestartPolicy::default())]);
    wait_for(&node, "a health restart", || node.dispatched("restart_daemon quiet") >= 1);
    wait_for(&node, "the second run to register", || node.daemon_output("quiet").matches("registered as").count() >= 2);
    let output = node.daemon_output("quiet");
    assert!(output.contains("no more health reports") && output.contains("control: restart"), "{output}");
    assert!(node.stop(libc::SIGTERM));

    let history = history(dir.path());
    let healthy = signal_times(&history, "quiet", |signal| matches!(signal, DaemonSignal::Health { healthy: true }));
    let starts = signal_times(&history, "quiet", |signal| matches!(signal, DaemonSignal::Started { .. }));
    assert!(starts.len() >= 2, "restarted: {starts:?}");
    // Health is awaited from the start, then from each report: the restart comes a
    // full timeout after the last of them.
    let heard = healthy.iter().filter(|time| **time < starts[1]).max().map_or(starts[0], |last| *last.max(&starts[0]));
    assert!(starts[1] - heard > 1_000, "restarted only after the 1 s health timeout: {healthy:?} {starts:?}");
}

#[test]
fn stop_sends_the_control_event_then_sigterm_then_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let example = example_daemon();
    node.send(vec![spec("stubborn", &example, &["--ignore-shutdown", "--interval-ms", "20"], 0, Default::default())]);
    wait_for(&node, "registration", || node.daemon_output("stubborn").contains("registered as"));
    let pid = node.pid_file("stubborn").unwrap();
    let EventKind::DaemonIntent { spec: stubborn, .. } = spec("stubborn", &example, &[], 0, Default::default()) else {
        unreachable!()
    };
    node.send(vec![EventKind::DaemonIntent { spec: stubborn, runs_on: DaemonPlacement::Nowhere }]);
    wait_for(&node, "the stop to end", || node.pid_file("stubborn").is_none());
    let output = node.daemon_output("stubborn");
    let control = output.find("control: shutdown (ignoring it)").expect("the control event came");
    let term = output.find("SIGTERM received: ignoring it").expect("SIGTERM came");
    assert!(control < term, "control event first, then SIGTERM:\n{output}");
    // The node's own log times each step: SIGTERM at half the 1 s grace, SIGKILL at its end.
    let stderr = node.stderr();
    let at = |what: &str| -> f64 {
        let line =
            stderr.lines().find(|line| line.contains(what)).unwrap_or_else(|| panic!("no `{what}` in\n{stderr}"));
        let clock = &line[line.find('T').unwrap() + 1..line.find('Z').unwrap()];
        let parts: Vec<f64> = clock.split(':').map(|part| part.parse().unwrap()).collect();
        parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    };
    let (began, term_at, kill_at) = (at("control=Shutdown"), at("stop: SIGTERM"), at("stop: grace over, SIGKILL"));
    assert!(term_at - began >= 0.5 && kill_at - began >= 1.0, "steps at {began} {term_at} {kill_at}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the process is gone");
    assert!(node.stop(libc::SIGTERM));

    let history = history(dir.path());
    let killed = signal_times(&history, "stubborn", |signal| matches!(signal, DaemonSignal::Crashed { signal: 9 }));
    assert_eq!(killed.len(), 1, "the stop ended in SIGKILL");
    let state = replay(dir.path());
    let row = state.daemons.find(state.specs.find("stubborn").unwrap(), state.nodes.find(NODE).unwrap()).unwrap();
    assert!(!state.daemons.state[row.index()].is_running());
    assert_eq!(state.daemons.backoff_ms[row.index()], 0, "a requested stop is not an unplanned end");
}

#[test]
fn the_example_daemon_registers_reports_and_shuts_down_on_node_stop() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let started = Instant::now();
    node.send(vec![spec(
        "example",
        &example_daemon(),
        &["--saturation", "250", "--label", "cache"],
        0,
        Default::default(),
    )]);
    wait_for(&node, "registration", || node.daemon_output("example").contains("published capability label cache"));
    let pid = node.pid_file("example").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.stop(libc::SIGTERM), "node exits 0");
    let output = std::fs::read_to_string(dir.path().join("daemons/example/stdout.log")).unwrap();
    assert!(output.contains("control: shutdown") && output.contains("shut down cleanly"), "{output}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the daemon is gone with the node");

    let history = history(dir.path());
    let has = |select: &dyn Fn(&DaemonSignal) -> bool| !signal_times(&history, "example", select).is_empty();
    assert!(has(&|signal| matches!(signal, DaemonSignal::Registered { pid: registered } if *registered == pid)));
    assert!(has(&|signal| matches!(signal, DaemonSignal::Health { healthy: true })));
    assert!(has(&|signal| matches!(signal, DaemonSignal::Saturation { permille: 250 })));
    assert!(has(&|signal| matches!(signal, DaemonSignal::Stopped)), "a clean stop");
    let capabilities: Vec<&meshos::event::Capability> = history
        .iter()
        .filter_map(|(_, event)| match &event.kind {
            EventKind::Capability(capability) => Some(capability.as_ref()),
            _ => None,
        })
        .collect();
    assert!(capabilities.iter().all(|capability| capability.capacity_bytes > 0), "capacity: the data file system");
    assert!(capabilities.windows(2).all(|pair| pair[1].fork_of == pair[0].version), "one chain of versions");
    let with_cache = capabilities.iter().position(|capability| capability.labels == ["cache"]);
    let without = capabilities.iter().rposition(|capability| capability.labels.is_empty());
    assert!(with_cache.is_some_and(|with| without > Some(with)), "the label came with the daemon and went with it");
    let state = replay(dir.path());
    // 20 heartbeats a second and a few dozen daemon events: a hot loop would be thousands.
    let bound = 100 + started.elapsed().as_millis() as u64 / 10;
    assert!(state.position < bound, "a quiet node appends little: {} records (bound {bound})", state.position);
}

/// An admin command (`Node::send` signs it with the node's operator key).
fn admin(_admin_seq: u64, command: meshos::event::AdminCommand) -> EventKind {
    EventKind::Admin(Box::new(command))
}

#[test]
fn the_example_daemon_stops_on_enter_maintenance_and_comes_back_on_exit() {
    use meshos::event::AdminCommand;
    use meshos::state::nodes::MaintenanceState;
    let dir = tempfile::tempdir().unwrap();
    let node = start_with(dir.path(), "\n[reconcile]\nrecovery_ms = 300\n");
    let example = spec("example", &example_daemon(), &["--interval-ms", "50"], 2_000, Default::default());
    node.send(vec![example]);
    wait_for(&node, "registration", || node.daemon_output("example").contains("registered as"));
    node.send(vec![admin(2, AdminCommand::EnterMaintenance { node: NODE.to_string() })]);
    wait_for(&node, "a clean exit", || node.daemon_output("example").contains("shut down cleanly"));
    assert!(node.daemon_output("example").contains("control: shutdown"));
    wait_for(&node, "the process to go", || node.pid_file("example").is_none());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(node.dispatched("start_daemon example"), 1, "nothing non-essential starts in maintenance");
    node.send(vec![admin(3, AdminCommand::ExitMaintenance { node: NODE.to_string() })]);
    wait_for(&node, "the daemon back", || node.daemon_output("example").matches("registered as").count() == 2);
    // Exiting, then Recovery (300 ms), then Active: read the log as the node writes it.
    let config = NodeConfig::load(&dir.path().join("node.toml")).unwrap().engine_config().unwrap();
    wait_for(&node, "the node to be active again", || {
        let (engine, _) = meshos::admin::preview::replay_read_only(&dir.path().join("log"), &config, u64::MAX).unwrap();
        let own = engine.state.nodes.find(NODE).unwrap().index();
        engine.state.nodes.maintenance[own] == MaintenanceState::Active
    });
    assert!(node.stop(libc::SIGTERM));

    let history = history(dir.path());
    let stopped = signal_times(&history, "example", |signal| matches!(signal, DaemonSignal::Stopped));
    let starts = signal_times(&history, "example", |signal| matches!(signal, DaemonSignal::Started { .. }));
    assert!(starts.len() == 2 && stopped.len() == 2, "one run before, one after; each stopped cleanly");
    let state = replay(dir.path());
    let own = state.nodes.find(NODE).unwrap().index();
    assert_eq!(state.rejections.total, 0, "every admin event was signed and applied");
    assert!(state.nodes.capability_version[own] > state.nodes.capability_version_at_enter[own], "fresh capability");
    assert_eq!(state.nodes.maintenance[own], MaintenanceState::Active, "through Recovery back to Active");
}

#[test]
fn a_restarted_node_stops_the_orphans_of_its_previous_run() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    // Declared through the CLI, from a spec file.
    let spec_file = dir.path().join("sleeper.toml");
    std::fs::write(&spec_file, "name = \"sleeper\"\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\nstop_grace_ms = 500\n")
        .unwrap();
    let applied = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["daemon", "apply"])
        .arg(&spec_file)
        .arg("--config")
        .arg(dir.path().join("node.toml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&applied.stdout);
    assert!(
        applied.status.success() && said.contains("daemon sleeper: appended") && said.contains("(applied)"),
        "{said}"
    );
    wait_for(&node, "the daemon to run", || node.pid_file("sleeper").is_some());
    let orphan = node.pid_file("sleeper").unwrap();
    let orphan_ticks = meshos::sys::process::start_ticks(orphan).unwrap();
    assert!(!node.stop(libc::SIGKILL), "killed");
    assert_eq!(meshos::sys::process::start_ticks(orphan), Some(orphan_ticks), "the daemon outlived its node");

    let node = start(dir.path());
    wait_for(&node, "a new run of the daemon", || node.pid_file("sleeper").is_some_and(|pid| pid != orphan));
    assert_ne!(meshos::sys::process::start_ticks(orphan), Some(orphan_ticks), "the orphan was stopped");
    assert!(node.stderr().contains("left running by a previous run"), "said so");
    let fresh = node.pid_file("sleeper").unwrap();
    assert!(node.stop(libc::SIGTERM));
    assert!(meshos::sys::process::start_ticks(fresh).is_none(), "SIGTERM of the node stops its daemons");
    let state = replay(dir.path());
    let row = state.daemons.find(state.specs.find("sleeper").unwrap(), state.nodes.find(NODE).unwrap()).unwrap();
    let (starts, daemon_state) = (state.daemons.starts[row.index()], state.daemons.state[row.index()]);
    assert!(
        starts >= 2 && !daemon_state.is_running(),
        "starts {starts}, state {daemon_state:?}\n{}",
        node_stderr_of(dir.path())
    );
}
