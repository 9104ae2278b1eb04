//! The daemon executor, the SDK server and the SDK against hostile or unlucky daemons,
//! on a miniature node (the real engine, executor and SDK server; every executor event
//! folded as the next record). Each test names the defect a review found in the first
//! version: stops that could hang, a log that could grow without bound, a daemon that
//! could register as another, answers paired with the wrong call.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use meshos::action::ActionKind;
use meshos::config::Config;
use meshos::engine::Engine;
use meshos::event::{DaemonPlacement, DaemonSignal, DaemonSpec, Event, EventKind, Outcome};
use meshos::exec::daemons::{DaemonExecConfig, DaemonExecutor};
use meshos::ingest::park::Signal;
use meshos::sdk::proto::{self, ToDaemon, ToNode};
use meshos::sys::sdk_server::{self, Inbound, SdkHandle};

const NODE: &str = "node-1";

fn spec(name: &str, command: &str, args: &[&str], stop_grace_ms: u32) -> DaemonSpec {
    DaemonSpec {
        args: args.iter().map(|arg| arg.to_string()).collect(),
        stop_grace_ms,
        ..DaemonSpec::new(name, command)
    }
}

/// A miniature node: engine (fold + reconcile), the executor and a real SDK server;
/// every action for NODE is dispatched, every executor event is folded as the next record.
struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    engine: Engine,
    exec: DaemonExecutor,
    sdk: SdkHandle,
    seq: u64,
    time_ms: u64,
    /// Every event the executor emitted, in order.
    emitted: Vec<EventKind>,
    records: u64,
}

impl Rig {
    fn new(report_interval_ms: u32) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let exec = DaemonExecutor::new(DaemonExecConfig {
            node_name: NODE.to_string(),
            daemons_dir: dir.join("daemons"),
            sdk_socket: dir.join("sdk.sock"),
            log_bytes_max: 1 << 20,
            log_files_kept: 1,
            report_interval_ms,
            labels_max: 32,
            label_bytes_max: 253,
        });
        let sdk = sdk_server::start(&dir.join("sdk.sock"), 16, Signal::new()).unwrap();
        let mut rig = Rig {
            _tmp: tmp,
            dir,
            engine: Engine::new(&Config::for_tests()),
            exec,
            sdk,
            seq: 0,
            time_ms: 1_000,
            emitted: vec![],
            records: 0,
        };
        let capability = EventKind::Capability(Box::new(meshos::event::Capability {
            version: 1,
            fork_of: 0,
            zone: "z".into(),
            capacity_bytes: 1 << 30,
            labels: vec![],
            endpoint: String::new(),
        }));
        rig.record(vec![capability]);
        rig.record(vec![EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 0 })]);
        rig
    }

    /// Folds one record of NODE's own events, dispatches NODE's actions, folds what
    /// the executor answered as the next record (at most `RECORDS_PER_CALL` rounds).
    fn record(&mut self, kinds: Vec<EventKind>) -> bool {
        let mut kinds = kinds;
        let mut any = false;
        for _ in 0..200 {
            let events: Vec<Event> = kinds
                .drain(..)
                .map(|kind| {
                    self.seq += 1;
                    Event { origin: NODE.to_string(), origin_seq: self.seq, kind }
                })
                .collect();
            self.time_ms += 10;
            let payload = meshos::trust::testing::seal_for(&self.engine.state, &events, self.time_ms);
            self.records += 1;
            let position = self.engine.state.position + 1;
            let (state, actions) = self.engine.apply(position, self.time_ms, &payload);
            let own = state.nodes.find(NODE).unwrap();
            let mut out = Vec::new();
            for action in actions.iter().filter(|action| action.node == own) {
                any = true;
                self.exec.dispatch(state, action, &self.sdk, &mut out);
            }
            if out.is_empty() {
                return any;
            }
            self.emitted.extend(out.iter().cloned());
            kinds = out;
        }
        any
    }

    /// One tick of the node loop: SDK inbound, reap/escalate, fold what came out.
    fn tick(&mut self) {
        let mut out = Vec::new();
        while let Ok(inbound) = self.sdk.inbound.try_recv() {
            self.exec.on_sdk(inbound, &self.sdk, &mut out);
        }
        self.exec.poll(Instant::now(), &self.engine.state, &self.sdk, &mut out);
        if !out.is_empty() {
            self.emitted.extend(out.iter().cloned());
            self.record(out);
        }
    }

    fn run_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.tick();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn declare(&mut self, spec: DaemonSpec, runs_on: DaemonPlacement) {
        self.record(vec![EventKind::DaemonIntent { spec: Box::new(spec), runs_on }]);
    }

    fn daemon_dir(&self, name: &str) -> PathBuf {
        self.dir.join("daemons").join(name)
    }

    fn signals(&self, name: &str) -> Vec<DaemonSignal> {
        self.emitted
            .iter()
            .filter_map(|kind| match kind {
                EventKind::Daemon { daemon, signal } if daemon == name => Some(*signal),
                _ => None,
            })
            .collect()
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_token(dir: &Path) -> String {
    let path = dir.join("token");
    wait_until("the token file", || std::fs::read_to_string(&path).is_ok_and(|text| text.ends_with('\n')));
    std::fs::read_to_string(&path).unwrap().trim().to_string()
}

fn euid() -> u32 {
    meshos::sys::process::effective_uid()
}

/// A sh daemon that writes its token to ./token and sleeps.
fn token_daemon(name: &str) -> DaemonSpec {
    spec(name, "/bin/sh", &["-c", "echo $MESHOS_DAEMON_TOKEN > token; exec sleep 30"], 500)
}

// ---------------------------------------------------------------------------------

/// Finding: health/saturation changes are never rate limited; a flapping daemon
/// appends one event per report, without bound.
#[test]
fn flapping_health_and_saturation_are_rate_limited() {
    let mut rig = Rig::new(1_000);
    rig.declare(token_daemon("flap"), DaemonPlacement::AllNodes);
    let pid = rig.exec.pid_of("flap").expect("started");
    let token = read_token(&rig.daemon_dir("flap"));
    let connection = 1 << 40;
    let mut out = Vec::new();
    rig.exec.on_sdk(Inbound::Connected { connection, pid, uid: euid() }, &rig.sdk, &mut out);
    rig.exec.on_sdk(Inbound::Message { connection, message: ToNode::Hello { token } }, &rig.sdk, &mut out);
    for index in 0..2_000u32 {
        let message = if index % 2 == 0 {
            ToNode::Health { healthy: index % 4 == 0 }
        } else {
            ToNode::Saturation { permille: (index % 1000) as u16 }
        };
        rig.exec.on_sdk(Inbound::Message { connection, message }, &rig.sdk, &mut out);
    }
    let reports = out
        .iter()
        .filter(|kind| {
            matches!(
                kind,
                EventKind::Daemon { signal: DaemonSignal::Health { .. } | DaemonSignal::Saturation { .. }, .. }
            )
        })
        .count();
    process_kill(pid);
    // 2,000 reports well within one report interval of 1 s.
    assert!(reports <= 10, "{reports} report events appended within one report interval");
}

/// Finding: any same-uid process in the node's session can join a daemon's process
/// group (setpgid), read its token from /proc/PID/environ and register as it.
#[test]
fn another_daemon_cannot_register_as_the_victim() {
    let mut rig = Rig::new(1_000);
    rig.declare(token_daemon("victim"), DaemonPlacement::AllNodes);
    let victim = rig.exec.pid_of("victim").unwrap();
    let _ = read_token(&rig.daemon_dir("victim"));
    let script = r#"
        use Socket;
        my $v = $ARGV[0];
        setpgrp(0, $v) or die "setpgrp: $!";
        open(my $f, '<', "/proc/$v/environ") or die "environ: $!";
        local $/; my $e = <$f>;
        my ($t) = $e =~ /MESHOS_DAEMON_TOKEN=([0-9a-f]+)/ or die "no token";
        socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die;
        connect($s, sockaddr_un($ENV{MESHOS_SDK_SOCKET})) or die "connect: $!";
        my $body = pack("C v", 1, length $t) . $t;
        syswrite($s, pack("V", length $body) . $body);
        sysread($s, my $r, 4096);
        print "answer type ", ord(substr($r, 4, 1)), "\n";
        sleep 30;
    "#;
    let victim_arg = victim.to_string();
    rig.declare(spec("attacker", "/usr/bin/perl", &["-e", script, &victim_arg], 500), DaemonPlacement::AllNodes);
    let attacker = rig.exec.pid_of("attacker").unwrap();
    let output = rig.daemon_dir("attacker").join("stdout.log");
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && !std::fs::read_to_string(&output).unwrap_or_default().contains("answer") {
        rig.tick();
        std::thread::sleep(Duration::from_millis(5));
    }
    let said = std::fs::read_to_string(&output).unwrap_or_default();
    process_kill(victim);
    process_kill(attacker);
    assert!(
        !rig.signals("victim").iter().any(|signal| matches!(signal, DaemonSignal::Registered { .. })),
        "the attacker registered as the victim (attacker said: {said:?})"
    );
}

/// Finding: stop signalled only the group -PID, and a daemon could move to another
/// group of the node's session: it never got SIGTERM or SIGKILL, and the stop (and
/// the node's shutdown) never ended. Daemons now lead their own session (they cannot
/// change group) and the stop signals the leader too.
#[test]
fn a_daemon_cannot_leave_its_group_and_is_stopped() {
    let mut rig = Rig::new(1_000);
    let script =
        "$| = 1; if (setpgrp(0, getpgrp(getppid()))) { print qq(left\n) } else { print qq(stayed\n) } sleep 30";
    rig.declare(spec("escaper", "/usr/bin/perl", &["-e", script], 200), DaemonPlacement::AllNodes);
    let pid = rig.exec.pid_of("escaper").unwrap();
    let output = rig.daemon_dir("escaper").join("stdout.log");
    wait_until("the daemon to try", || std::fs::read_to_string(&output).is_ok_and(|text| !text.is_empty()));
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "stayed\n", "a session leader cannot change group");
    assert_eq!(meshos::sys::process::process_group(pid), Some(pid));
    let mut removal = spec("escaper", "/usr/bin/perl", &["-e", script], 200);
    removal.command = "/usr/bin/perl".into();
    rig.declare(removal, DaemonPlacement::Nowhere);
    rig.run_for(Duration::from_secs(2)); // 10x the grace
    let still = rig.exec.running_count();
    process_kill(pid);
    rig.run_for(Duration::from_millis(200));
    assert_eq!(still, 0, "SIGKILL at the grace should have ended the daemon");
}

/// Finding: a restart re-spawns the spec cloned when the restart was dispatched, while
/// recording the newer generation (so no ReloadConfig ever reaches the new process).
#[test]
fn a_restart_starts_the_current_spec() {
    let mut rig = Rig::new(1_000);
    // Each run writes the version it was started with ($0) into its directory.
    let script = "echo $0 > version.$$; exec sleep 30";
    rig.declare(spec("r", "/bin/sh", &["-c", script, "v1"], 500), DaemonPlacement::AllNodes);
    let first = rig.exec.pid_of("r").unwrap();
    // A restart (what a health timeout or `meshos restart` dispatches), then the spec changes.
    let spec_row = rig.engine.state.specs.find("r").unwrap();
    let node = rig.engine.state.nodes.find(NODE).unwrap();
    let action = meshos::action::Action {
        id: meshos::event::ActionId { position: rig.engine.state.position, index: 99 },
        node,
        kind: ActionKind::RestartDaemon { spec: spec_row },
    };
    let mut out = Vec::new();
    rig.exec.dispatch(&rig.engine.state, &action, &rig.sdk, &mut out);
    rig.declare(spec("r", "/bin/sh", &["-c", script, "v2"], 500), DaemonPlacement::AllNodes);
    wait_until("the restart", || {
        rig.tick();
        rig.exec.pid_of("r").is_some_and(|pid| pid != first)
    });
    let second = rig.exec.pid_of("r").unwrap();
    let version = rig.daemon_dir("r").join(format!("version.{second}"));
    wait_until("the new run to say its version", || {
        std::fs::read_to_string(&version).is_ok_and(|text| text.ends_with('\n'))
    });
    process_kill(second);
    let said = std::fs::read_to_string(&version).unwrap();
    assert_eq!(said, "v2\n", "restarted with the spec as it is now");
}

/// Finding: while a stop is in progress with no daemon action in flight (node
/// shutdown's `stop_all`, or a stop whose action timed out), every StopDaemon reconcile
/// emits fails with "already stopping", which frees the slot, so reconcile emits it
/// again on the next record: a record per round trip for the whole grace.
#[test]
fn no_hot_loop_of_stop_failures_while_stopping() {
    let mut rig = Rig::new(1_000);
    rig.declare(
        spec("slow", "/bin/sh", &["-c", "trap '' TERM; while :; do sleep 0.05; done"], 1_000),
        DaemonPlacement::AllNodes,
    );
    assert!(rig.exec.pid_of("slow").is_some());
    rig.run_for(Duration::from_millis(200));
    // Node shutdown begins (SIGTERM to the node) ...
    rig.exec.stop_all(&rig.engine.state, &rig.sdk);
    // ... and meanwhile the operator removes the daemon (or the node enters maintenance).
    let records_before = rig.records;
    rig.declare(spec("slow", "/bin/sh", &[], 1_000), DaemonPlacement::Nowhere);
    rig.run_for(Duration::from_millis(1_500));
    let failures = rig
        .emitted
        .iter()
        .filter(|kind| matches!(kind, EventKind::ActionOutcome { outcome: Outcome::Failure { .. }, .. }))
        .count();
    let records = rig.records - records_before;
    assert!(failures <= 1 && records < 20, "{failures} stop failures in {records} records");
}

/// Finding: `meshos daemon remove` sends a placeholder spec which fold stores in
/// place of the real one: stop_grace_ms becomes 10 s (a 60 s database gets SIGKILL at
/// 10 s), the command is wiped and the generation bump sends ReloadConfig.
#[test]
fn removal_keeps_the_declared_spec() {
    let mut declared = spec("db", "/usr/bin/db", &["--data", "/d"], 60_000);
    declared.health_timeout_ms = 5_000;
    let intent = EventKind::DaemonIntent { spec: Box::new(declared), runs_on: DaemonPlacement::AllNodes };
    // Exactly what src/main.rs `run_daemon` builds for `meshos daemon remove db`.
    let removal = DaemonSpec {
        name: "db".into(),
        command: String::new(),
        args: Vec::new(),
        env: Vec::new(),
        working_dir: String::new(),
        essential: false,
        health_timeout_ms: 0,
        restart: Default::default(),
        stop_grace_ms: 10_000,
    };
    let remove = EventKind::DaemonIntent { spec: Box::new(removal), runs_on: DaemonPlacement::Nowhere };
    let mut state = meshos::state::State::new(&Config::for_tests());
    fold_batches(
        &mut state,
        &[vec![capability(NODE, 1, 1, 0, "z")], vec![event(NODE, 2, intent)], vec![event(NODE, 3, remove)]],
    );
    assert_eq!(state.rejections.total, 0);
    let row = state.specs.find("db").unwrap().index();
    assert_eq!(state.specs.spec[row].stop_grace_ms, 60_000, "the stop uses the removal's placeholder grace");
}

/// Finding: after one call times out, its late answer is taken as the answer to the
/// next call (answers stay off by one for the life of the connection).
#[test]
fn a_late_answer_is_not_taken_for_the_next_calls_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = listener.accept().unwrap();
        let read_frame = |stream: &mut std::os::unix::net::UnixStream| {
            let mut header = [0u8; 4];
            stream.read_exact(&mut header).unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
            stream.read_exact(&mut body).unwrap();
            proto::decode_to_node(&body).unwrap()
        };
        let answer = |stream: &mut std::os::unix::net::UnixStream, message: ToDaemon| {
            let mut out = Vec::new();
            proto::encode_to_daemon(&message, &mut out).unwrap();
            stream.write_all(&out).unwrap();
        };
        assert!(matches!(read_frame(&mut stream), ToNode::Hello { .. }));
        answer(&mut stream, ToDaemon::Welcome { node: "n".into(), daemon: "d".into() });
        assert!(matches!(read_frame(&mut stream), ToNode::Health { .. }));
        std::thread::sleep(Duration::from_millis(300)); // a slow node (a long fsync)
        answer(&mut stream, ToDaemon::Ok);
        // The SDK gave the health call up: it reconnects rather than read this late
        // answer as the next call's.
        let (mut stream, _) = listener.accept().unwrap();
        assert!(matches!(read_frame(&mut stream), ToNode::Hello { .. }));
        answer(&mut stream, ToDaemon::Welcome { node: "n".into(), daemon: "d".into() });
        assert!(matches!(read_frame(&mut stream), ToNode::Saturation { .. }));
        answer(&mut stream, ToDaemon::Rejected { reason: "saturation refused".into() });
        std::thread::sleep(Duration::from_millis(500));
    });
    let options = meshos::sdk::Options {
        socket: path,
        token: "t".into(),
        call_timeout: Duration::from_millis(100),
        reconnect_wait: Duration::from_millis(100),
    };
    let mut daemon = meshos::sdk::register_daemon_with(options).unwrap();
    assert!(matches!(daemon.report_health(true), Err(meshos::sdk::SdkError::TimedOut(_))));
    std::thread::sleep(Duration::from_millis(400)); // the late Ok arrives
    let second = daemon.report_saturation(10);
    server.join().unwrap();
    assert!(second.is_err(), "the node rejected the saturation report, the SDK returned {second:?}");
}

/// Finding: `close` pushes `Closed` after removing the connection, so with the inbound
/// channel full the `Closed` cannot be held and is dropped: the executor keeps the
/// connection in `unregistered` forever (or keeps sending control events to it).
#[test]
fn closed_is_delivered_even_when_the_inbound_channel_was_full() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sdk.sock");
    let sdk = sdk_server::start(&path, 16, Signal::new()).unwrap();
    let quiet = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut flood = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut frames = Vec::new();
    for _ in 0..5_000 {
        proto::encode_to_node(&ToNode::Health { healthy: true }, &mut frames).unwrap();
    }
    flood.write_all(&frames).unwrap();
    std::thread::sleep(Duration::from_millis(500)); // the channel (4,096) fills; the main loop is busy
    drop(quiet);
    std::thread::sleep(Duration::from_millis(500));
    let mut connected = Vec::new();
    let mut closed = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        while let Ok(inbound) = sdk.inbound.try_recv() {
            match inbound {
                Inbound::Connected { connection, .. } => connected.push(connection),
                Inbound::Closed { connection } => closed.push(connection),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(flood);
    let quiet_id = *connected.iter().min().unwrap();
    assert!(closed.contains(&quiet_id), "connections {connected:?}, closes seen {closed:?}");
}

/// Finding: a node started with SIGCHLD ignored (inherited across exec) never sees its
/// daemons end (try_wait's ECHILD is ignored): crashes go unreported and SIGTERM of
/// the node hangs forever waiting for `running_count() == 0`.
#[test]
fn a_node_started_with_sigchld_ignored_still_stops() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"{NODE}\"\ndata_dir = \"{}\"\nheartbeat_ms = 50\n\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_meshos"));
    command
        .args(["node", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: signal(2) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        })
    };
    #[allow(clippy::zombie_processes, reason = "waited on below on every path that returns")]
    let mut node = command.spawn().unwrap();
    wait_until("the node to listen", || dir.join("node.addr").exists());
    let kind = EventKind::DaemonIntent {
        spec: Box::new(spec("s", "/bin/sleep", &["30"], 200)),
        runs_on: DaemonPlacement::AllNodes,
    };
    // An operator intent, signed with the key the node's first start wrote.
    common::send_local(dir, NODE, vec![kind]);
    let pid_file = dir.join("daemons/s/pid");
    wait_until("the daemon", || pid_file.exists());
    // SAFETY: plain integers.
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(10);
    let mut exited = false;
    while Instant::now() < until {
        if node.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !exited {
        let _ = node.kill();
        let _ = node.wait();
    }
    assert!(exited, "the node did not exit within 10 s of SIGTERM (daemon grace 200 ms)");
}

fn process_kill(pid: u32) {
    // SAFETY: plain integers.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Finding: a daemon name is used as a path (`DATA_DIR/daemons/NAME`), and fold let
/// names hold '/': "team/cache" put its pid file two levels down, where the orphan
/// scan never looks ("..", an absolute name, escaped DATA_DIR). Fold now refuses such
/// names, with the reason, and nothing starts.
#[test]
fn a_daemon_name_that_is_not_one_directory_is_refused() {
    let mut rig = Rig::new(1_000);
    for name in ["team/cache", "..", ".", "/abs", "nul\0"] {
        let before = rig.engine.state.rejections.total;
        rig.declare(spec(name, "/bin/sleep", &["30"], 200), DaemonPlacement::AllNodes);
        assert_eq!(rig.engine.state.rejections.total, before + 1, "{name:?} refused");
        assert!(rig.exec.pid_of(name).is_none(), "{name:?} never starts");
    }
    let reason = rig.engine.state.rejections.kept.back().unwrap().reason.to_string();
    assert!(reason.contains("'/'"), "the reason says what is wrong: {reason}");
}

/// Finding: the executor answers `Ok` to any label list the protocol carries (64
/// labels of up to 1 KiB, empty ones too) and adds them to the node's capability set;
/// fold refuses the whole set (labels_per_node_max 32, name_bytes_max 253, no empty
/// name), and the publisher then never re-sends it: the node's capability stays frozen
/// (config changes, and the fresh version an exit from maintenance needs) while the
/// daemon was told its labels were accepted.
#[test]
fn labels_fold_would_refuse_are_refused_to_the_daemon() {
    let mut rig = Rig::new(1_000);
    rig.declare(token_daemon("labeller"), DaemonPlacement::AllNodes);
    let pid = rig.exec.pid_of("labeller").unwrap();
    let token = read_token(&rig.daemon_dir("labeller"));
    let connection = 1 << 40;
    let mut out = Vec::new();
    rig.exec.on_sdk(Inbound::Connected { connection, pid, uid: euid() }, &rig.sdk, &mut out);
    rig.exec.on_sdk(Inbound::Message { connection, message: ToNode::Hello { token } }, &rig.sdk, &mut out);
    let labels = vec![String::new(), "x".repeat(300)];
    rig.exec.on_sdk(Inbound::Message { connection, message: ToNode::Capabilities { labels } }, &rig.sdk, &mut out);
    assert!(rig.exec.published_labels().is_empty(), "labels fold would refuse are not taken");
    assert_eq!(rig.exec.stats.labels_refused, 1, "the daemon was answered Rejected");
    let mut publisher = meshos::exec::capability::CapabilityPublisher::new("z".into(), 1 << 30, vec![]);
    let rejected_before = rig.engine.state.rejections.total;
    if let Some(event) = publisher.next(&rig.engine.state, NODE, &rig.exec.published_labels()) {
        rig.record(vec![event]);
    }
    process_kill(pid);
    assert_eq!(rig.engine.state.rejections.total, rejected_before, "fold refused the capability set the SDK accepted");
}
