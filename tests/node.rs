//! `meshos node` as a real process on loopback: every event of the good clients is
//! acknowledged and folded despite bad clients; SIGTERM stops it cleanly (exit 0)
//! with the state hash a replay of its log gives; after SIGKILL during a load run,
//! every acknowledged event is in the log and the restarted node recovers exactly the
//! state a replay gives.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshos::config::FsyncPolicy;
use meshos::loadgen::{self, ConnectionResult, LoadOptions};
use meshos::logtool;
use meshos::node::config::NodeConfig;
use meshos::state::hash::hash_hex;

const START_LIMIT: Duration = Duration::from_secs(30);
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

struct Node {
    child: Child,
    addr: SocketAddr,
}

fn write_config(dir: &Path) -> PathBuf {
    write_config_with(dir, "")
}

/// The test config, with `ingest` lines added to its `[ingest]` section.
fn write_config_with(dir: &Path, ingest: &str) -> PathBuf {
    common::trust_node_dir(dir, "node-1", &clients());
    let path = dir.join("node.toml");
    // Every test client connects from 127.0.0.1 (a test that sets handshake limits
    // of its own keeps them).
    let handshake_limits = if ingest.contains("handshake_") {
        ""
    } else {
        "handshake_per_address_max = 1024\nhandshake_connections_max = 1024\n"
    };
    let mut text = format!(
        "name = \"node-1\"\ndata_dir = \"{}\"\nheartbeat_ms = 100\nlog_level = \"info\"\n\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\n\
         connections_per_address_max = 1024\n{handshake_limits}",
        dir.display()
    );
    text.push_str(ingest);
    std::fs::write(&path, text).unwrap();
    path
}

fn library_config(dir: &Path) -> meshos::config::Config {
    let config = NodeConfig::load(&dir.join("node.toml")).unwrap().engine_config().unwrap();
    meshos::config::Config { fsync: FsyncPolicy::Manual, ..config }
}

#[allow(clippy::zombie_processes, reason = "the returned Node is waited on by terminate() or after kill()")]
fn start(dir: &Path) -> Node {
    start_limited(dir, None)
}

/// `start`, optionally under `ulimit -n fd_limit` (through `sh`, which then execs the node).
fn start_limited(dir: &Path, fd_limit: Option<u32>) -> Node {
    let config = write_config(dir);
    start_config(dir, &config, fd_limit.map(|limit| format!("ulimit -n {limit}")))
}

/// Starts the node with `config`, optionally after the shell command `prefix`
/// (through `sh`, which then execs the node).
#[allow(clippy::zombie_processes, reason = "the returned Node is waited on by terminate() or after kill()")]
fn start_config(dir: &Path, config: &Path, prefix: Option<String>) -> Node {
    let addr_file = dir.join("node.addr");
    let _ = std::fs::remove_file(&addr_file);
    let stderr = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let mut command = match prefix {
        None => {
            let mut command = Command::new(env!("CARGO_BIN_EXE_meshos"));
            command.args(["node", "--config"]).arg(config);
            command
        }
        Some(prefix) => {
            let mut command = Command::new("sh");
            command.arg("-c").arg(format!(
                "{prefix} && exec '{}' node --config '{}'",
                env!("CARGO_BIN_EXE_meshos"),
                config.display()
            ));
            command
        }
    };
    let mut child = command.env_remove("RUST_LOG").stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            if let Ok(addr) = text.trim().parse() {
                return Node { child, addr };
            }
        }
        if started.elapsed() > START_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("node did not start: {}", stderr_of(dir));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

/// Sends SIGTERM to the node.
fn sigterm(node: &Node) {
    let pid = libc::pid_t::try_from(node.child.id()).unwrap();
    // SAFETY: kill(2) takes plain integers and touches no memory of this process; the
    // pid is our own child, not yet reaped (so not reused).
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(result, 0, "kill: {}", std::io::Error::last_os_error());
}

/// SIGTERM, wait; returns (exit success, stdout).
fn terminate(mut node: Node) -> (bool, String) {
    sigterm(&node);
    let status = node.child.wait().unwrap();
    let mut stdout = String::new();
    node.child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    (status.success(), stdout)
}

/// The value after `key=` in `line`, without quotes.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len() + 1;
    let rest = &line[start..];
    rest[..rest.find(' ').unwrap_or(rest.len())].trim_matches('"')
}

fn origin_seq_last(state: &meshos::state::State, origin: &str) -> u64 {
    state.nodes.find(origin).map_or(0, |row| state.nodes.origin_seq_last[row.index()])
}

/// Every event's origin sequence number in the log, per origin, in log order.
fn log_origin_seqs(dir: &Path) -> HashMap<String, Vec<u64>> {
    let (mut log, _) = meshos::redex::embedded::EmbeddedLog::open(&dir.join("log"), &library_config(dir)).unwrap();
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    meshos::redex::Redex::read_from(&mut log, 1, &mut |record| {
        for event in meshos::wire::decode_sections(record.payload).unwrap().into_iter().flat_map(|batch| batch.events) {
            seqs.entry(event.origin).or_default().push(event.origin_seq);
        }
        true
    })
    .unwrap();
    seqs
}

/// The origin's events in the log are exactly 1, 2, ..., n (none lost, none twice, in
/// order); returns n.
fn contiguous(seqs: &HashMap<String, Vec<u64>>, origin: &str) -> u64 {
    let list = seqs.get(origin).map_or(&[][..], |list| list.as_slice());
    for (index, &seq) in list.iter().enumerate() {
        assert_eq!(seq, index as u64 + 1, "{origin}: event {index} of the log has origin_seq {seq}");
    }
    list.len() as u64
}

/// The clients these tests' genesis admits with their test keys: the load clients
/// (load-0.., 900 and 901) and the descriptor test's fd-0..
fn clients() -> Vec<String> {
    let mut names = common::load_names(0, 8);
    names.extend(common::load_names(900, 2));
    names.extend((0..90).map(|index| format!("fd-{index}")));
    names
}

/// The genesis of every node these tests start (`common::trust_node_dir`).
fn genesis() -> meshos::trust::Genesis {
    let mut names = vec!["node-1".to_string()];
    names.extend(clients());
    meshos::trust::Genesis::for_tests(&names)
}

fn cluster_id() -> [u8; 16] {
    genesis().cluster_id()
}

fn load(addr: SocketAddr, first_index: u32, connections: u32, frames: u64) -> Vec<ConnectionResult> {
    let options = LoadOptions {
        connections,
        first_index,
        events_per_frame: 64,
        frames_per_connection: frames,
        frames_per_write: 4,
        peer: "node-1".to_string(),
        resume_after: 0,
        cluster_id: cluster_id(),
    };
    loadgen::run(addr, &options, ACK_TIMEOUT)
}

#[test]
fn every_event_of_good_clients_is_folded_despite_bad_clients_and_sigterm_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());

    // Bad clients first, so they are there during the whole good run: strangers that
    // connect and say nothing (each holds a handshake slot until its deadline), a
    // stranger that sends garbage instead of a handshake, and authenticated clients
    // that send garbage, half a frame, or frames whose acks they never read.
    let mut idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(node.addr).unwrap()).collect();
    let mut stranger = TcpStream::connect(node.addr).unwrap();
    stranger.write_all(&[0x5a; 4096]).unwrap();
    let (mut garbage, mut garbage_replies) = common::connect_as(node.addr, &genesis(), "fd-1", "node-1").unwrap();
    garbage.send_raw(&[0x5a; 4096]).unwrap();
    let (mut cut, cut_replies) = common::connect_as(node.addr, &genesis(), "load-900", "node-1").unwrap();
    let mut template = loadgen::FrameTemplate::setup(900, cluster_id());
    let frame = template.fill(1, 1, true).to_vec();
    cut.send_raw(&frame[..frame.len() / 2]).unwrap();
    drop((cut, cut_replies));
    // A client that sends and never reads its acknowledgements.
    let (mut deaf, _deaf_replies) = common::connect_as(node.addr, &genesis(), "load-901", "node-1").unwrap();
    let mut deaf_template = loadgen::FrameTemplate::setup(901, cluster_id());
    deaf.send_raw(deaf_template.fill(1, 1, true)).unwrap();
    let mut deaf_steady = loadgen::FrameTemplate::steady(901, 64, "node-1", cluster_id());
    for seq in 2..=300u64 {
        deaf.send_raw(deaf_steady.fill(seq, 4 + (seq - 2) * 64, true)).unwrap();
    }
    let deaf_events = 3 + 299 * 64;

    // A local client (a daemon's path): its events name this node and get this node's
    // sequence numbers from the sequencer.
    let (mut local, mut local_replies) =
        meshos::sys::client::Client::connect_unix(&dir.path().join("local.sock")).unwrap();
    let local_batch = meshos::event::EventBatch {
        events: (0..5)
            .map(|_| meshos::event::Event {
                origin: "node-1".to_string(),
                origin_seq: 0,
                kind: meshos::event::EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 7 }),
            })
            .collect(),
    };
    let local_seq = local.send(&local_batch, true).unwrap();
    let local_ack = local_replies.wait_acked(local_seq, ACK_TIMEOUT).unwrap();
    assert!(local_ack.position > 0);

    let results = load(node.addr, 0, 4, 300);
    let refused = garbage_replies.next_ack(Some(Duration::from_secs(10))).unwrap_err().to_string();
    assert!(refused.contains("magic"), "garbage gets an error frame: {refused}");
    // The stranger's garbage fails its handshake: the node closes the connection.
    stranger.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = [0u8; 256];
    match stranger.read(&mut reply) {
        Ok(0) => {}
        Err(error) if !matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("a failed handshake is closed, got {other:?}"),
    }
    for result in &results {
        assert_eq!(result.error, None, "{}", result.origin);
        assert_eq!(result.events_acked, result.events_sent, "{}: every event acknowledged", result.origin);
    }
    idle.clear();
    let (clean, stdout) = terminate(node);
    assert!(clean, "SIGTERM exits 0: {}", stderr_of(dir.path()));
    let line = stdout.lines().find(|line| line.starts_with("node: ")).expect("the report line");

    let replay = logtool::replay(&dir.path().join("log"), &library_config(dir.path()), true, &mut |_| {}).unwrap();
    assert_eq!(field(line, "position"), replay.state.position.to_string());
    assert_eq!(field(line, "state_hash"), hash_hex(replay.state.state_hash()), "the node's hash is the replay's");
    let seqs = log_origin_seqs(dir.path());
    for result in &results {
        assert_eq!(contiguous(&seqs, &result.origin), result.events_sent, "{}: every event once", result.origin);
        assert_eq!(origin_seq_last(&replay.state, &result.origin), result.events_sent, "{}", result.origin);
    }
    assert_eq!(contiguous(&seqs, "load-901"), deaf_events, "the deaf client's events are all in the log");
    assert_eq!(origin_seq_last(&replay.state, "load-901"), deaf_events, "the deaf client's events are all folded");
    assert_eq!(origin_seq_last(&replay.state, "load-900"), 0, "half a frame is never folded");
    assert_eq!(replay.state.rejections.total, 0, "every folded event was applied, the local ones included");
    // The local frame's record: this node's origin, sequence numbers stamped in order.
    let (mut log, _) =
        meshos::redex::embedded::EmbeddedLog::open(&dir.path().join("log"), &library_config(dir.path())).unwrap();
    let mut stamped = Vec::new();
    meshos::redex::Redex::read_from(&mut log, local_ack.position, &mut |record| {
        let batches = meshos::wire::decode_sections(record.payload).unwrap();
        stamped = batches
            .iter()
            .flat_map(|batch| batch.events.iter().map(|event| (event.origin.clone(), event.origin_seq)))
            .collect();
        false
    })
    .unwrap();
    assert_eq!(stamped.len(), 5);
    let first = stamped[0].1;
    assert!(first > 0, "stamped by the sequencer, not the client's 0");
    for (index, (origin, seq)) in stamped.iter().enumerate() {
        assert_eq!((origin.as_str(), *seq), ("node-1", first + index as u64));
    }
    let stderr = stderr_of(dir.path());
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
}

#[test]
fn after_sigkill_every_acknowledged_event_is_recovered_with_the_replay_hash() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path());
    let addr = node.addr;
    let loader = std::thread::spawn(move || load(addr, 0, 8, 100_000));
    std::thread::sleep(Duration::from_millis(1500));
    node.child.kill().unwrap(); // SIGKILL
    node.child.wait().unwrap();
    let results = loader.join().unwrap();
    let acked: u64 = results.iter().map(|result| result.events_acked).sum();
    assert!(
        acked > 0,
        "some events were acknowledged before the kill: {:?}",
        results
            .iter()
            .map(|r| (r.events_sent, r.events_acked, r.frames_sent, r.error.clone(), r.ack_latency_us.len()))
            .collect::<Vec<_>>()
    );

    let config = library_config(dir.path());
    let replay = logtool::replay(&dir.path().join("log"), &config, true, &mut |_| {}).unwrap();
    let seqs = log_origin_seqs(dir.path());
    for result in &results {
        assert!(
            contiguous(&seqs, &result.origin) >= result.events_acked,
            "{}: acknowledged events in the log",
            result.origin
        );
        assert!(
            origin_seq_last(&replay.state, &result.origin) >= result.events_acked,
            "{}: acknowledged {} events, the log holds {}",
            result.origin,
            result.events_acked,
            origin_seq_last(&replay.state, &result.origin)
        );
    }

    let node = start(dir.path());
    let stderr = stderr_of(dir.path());
    let recovered = stderr.lines().find(|line| line.contains("recovered from the log")).expect("a recovery line");
    assert_eq!(field(recovered, "position"), replay.state.position.to_string());
    assert_eq!(
        field(recovered, "state_hash"),
        hash_hex(replay.state.state_hash()),
        "restart recovers the replay's hash"
    );
    let (clean, _) = terminate(node);
    assert!(clean);
    eprintln!("sigkill: {acked} events acknowledged before the kill, log position {}", replay.state.position);
}

#[test]
fn sigterm_during_load_drains_commits_and_acknowledges_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let addr = node.addr;
    let loader = std::thread::spawn(move || load(addr, 0, 8, 100_000));
    std::thread::sleep(Duration::from_millis(1500));
    let (clean, stdout) = terminate(node);
    let results = loader.join().unwrap();
    assert!(clean, "SIGTERM under load exits 0: {}", stderr_of(dir.path()));
    let acked: u64 = results.iter().map(|result| result.events_acked).sum();
    assert!(acked > 0);
    let line = stdout.lines().find(|line| line.starts_with("node: ")).expect("the report line");
    let replay = logtool::replay(&dir.path().join("log"), &library_config(dir.path()), true, &mut |_| {}).unwrap();
    assert_eq!(field(line, "position"), replay.state.position.to_string());
    assert_eq!(field(line, "state_hash"), hash_hex(replay.state.state_hash()));
    let seqs = log_origin_seqs(dir.path());
    let mut in_log_not_acked = 0;
    for result in &results {
        let in_log = contiguous(&seqs, &result.origin);
        assert!(
            in_log >= result.events_acked,
            "{}: {} acknowledged, {in_log} in the log",
            result.origin,
            result.events_acked
        );
        in_log_not_acked += in_log - result.events_acked;
    }
    // The drain's acks are written before the connections close (best effort: a
    // client that stops reading may miss its last one), so this is usually 0.
    eprintln!("sigterm: {acked} events acknowledged, {in_log_not_acked} in the log without an ack");
    let stderr = stderr_of(dir.path());
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
}

#[test]
fn connections_past_the_descriptor_limit_are_served_once_descriptors_free() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_limited(dir.path(), Some(64));
    let heartbeat = |index: usize| meshos::event::EventBatch {
        events: vec![meshos::event::Event {
            origin: format!("fd-{index}"),
            origin_seq: 1,
            kind: meshos::event::EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 1 }),
        }],
    };
    // Each client connects (its handshake waits in the listen backlog while the node is
    // out of descriptors), sends one heartbeat, reports it acknowledged, and holds its
    // connection until released.
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(released));
    let addr = node.addr;
    let clients: Vec<_> = (0..90)
        .map(|index| {
            let served = std::sync::Arc::clone(&served);
            let released = std::sync::Arc::clone(&released);
            std::thread::spawn(move || {
                let name = format!("fd-{index}");
                let (mut client, mut replies) = common::connect_as(addr, &genesis(), &name, "node-1")
                    .unwrap_or_else(|error| panic!("client {index}: {error}"));
                client.set_sealer(meshos::trust::Sealer::node(&name, meshos::trust::test_key_of(&name), cluster_id()));
                let seq = client.send(&heartbeat(index), true).unwrap();
                replies
                    .wait_acked(seq, Duration::from_secs(30))
                    .unwrap_or_else(|error| panic!("client {index}: {error}"));
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Hold the connection until the main thread frees descriptors.
                let _ = released.lock().unwrap().recv();
            })
        })
        .collect();
    // Some are served, the rest wait in the listen backlog: the node is out of descriptors.
    let mut stable = 0;
    let mut last = usize::MAX;
    while stable < 10 {
        std::thread::sleep(Duration::from_millis(200));
        let now = served.load(std::sync::atomic::Ordering::SeqCst);
        stable = if now == last && now > 0 { stable + 1 } else { 0 };
        last = now;
    }
    assert!(last > 0 && last < 90, "{last} of 90 served before descriptors free");
    // Free descriptors: the node accepts the backlog without any new connection arriving.
    drop(release);
    for client in clients {
        client.join().unwrap();
    }
    let (clean, _) = terminate(node);
    assert!(clean);
}

/// `meshos status` for the node in `dir`, as text or JSON; panics unless it exits 0.
fn status(dir: &Path, json: bool) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_meshos"));
    command.args(["status", "--config"]).arg(dir.join("node.toml"));
    if json {
        command.args(["-o", "json"]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Ten bad frames, a garbage payload and refused connections: the operator sees
/// each by reason in `meshos status` (text and JSON) and in the node's log, which
/// holds one line per reason per interval and counts the lines it held back. The
/// payload's error frame says what failed. Under a permissive umask the local socket
/// is still the owner's alone.
#[test]
fn rejections_reach_status_and_the_log_and_the_local_socket_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        dir.path(),
        "local_connections_max = 2\nrejection_log_interval_ms = 500\nframe_timeout_ms = 300\n",
    );
    let node = start_config(dir.path(), &config, Some("umask 000".to_string()));
    let mode = std::fs::metadata(dir.path().join("local.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "local.sock is mode {mode:o}");

    let read_error_text = |stream: &mut dyn Read| {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        let frame = meshos::wire::decode_frame(&bytes, 1 << 20).expect("an error frame");
        assert_eq!(frame.header.kind, meshos::wire::FrameKind::Error);
        String::from_utf8_lossy(frame.payload).into_owned()
    };
    // Authenticated clients' bad frames come back as error frames on their channel.
    let client = |name: &str| common::connect_as(node.addr, &genesis(), name, "node-1").unwrap();
    let rejection = |replies: &mut meshos::sys::client::Replies| match replies.next_ack(Some(ACK_TIMEOUT)) {
        Err(meshos::sys::client::ClientError::Rejected(text)) => text,
        other => panic!("expected an error frame, got {other:?}"),
    };
    for index in 0..10 {
        let (mut garbage, mut replies) = client(&format!("fd-{index}"));
        garbage.send_raw(&[0x5a; 64]).unwrap();
        assert!(rejection(&mut replies).contains("magic"));
    }
    // A whole frame whose payload is not an event batch.
    let (mut payload, mut replies) = client("fd-10");
    let mut frame = Vec::new();
    meshos::wire::encode_frame(&mut frame, meshos::wire::FrameKind::EventsAckWanted, 1, 0, &[0xff; 64]);
    payload.send_raw(&frame).unwrap();
    let text = rejection(&mut replies);
    assert!(text.contains("section at byte 0 is cut short") && !text.contains("without error information"), "{text}");
    // Half a frame, never finished: closed at the frame deadline.
    let (mut slow, mut replies) = client("fd-11");
    slow.send_raw(&frame[..40]).unwrap();
    assert!(rejection(&mut replies).contains("frame_timeout_ms"));
    // A stranger's garbage instead of a handshake: closed, counted by reason.
    let mut stranger = TcpStream::connect(node.addr).unwrap();
    stranger.set_read_timeout(Some(ACK_TIMEOUT)).unwrap();
    stranger.write_all(&[0x5a; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = stranger.read_to_end(&mut rest);
    assert!(rest.is_empty(), "nothing is sent to a stranger whose handshake failed");
    // The local socket's own limit: two served, the third refused.
    let locals: Vec<_> =
        (0..2).map(|_| std::os::unix::net::UnixStream::connect(dir.path().join("local.sock")).unwrap()).collect();
    let mut refused = std::os::unix::net::UnixStream::connect(dir.path().join("local.sock")).unwrap();
    refused.set_read_timeout(Some(ACK_TIMEOUT)).unwrap();
    assert!(read_error_text(&mut refused).contains("local_connections_max"));

    let started = Instant::now();
    let json = loop {
        let json = status(dir.path(), true);
        if json.contains("\"bad_magic\":10,")
            && json.contains("\"local_over_limit\":1")
            && json.contains("\"auth_bad_handshake\":1")
        {
            break json;
        }
        assert!(started.elapsed() < ACK_TIMEOUT, "status never showed the rejections: {json}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(json.contains("\"bad_payload\":1"), "{json}");
    assert!(json.contains("\"frames_refused\":11,"), "{json}");
    assert!(json.contains("\"frame_timeout\":1,"), "{json}");
    let text = status(dir.path(), false);
    assert!(text.contains("frames refused: 11 (bad_magic=10 bad_payload=1)"), "{text}");
    assert!(text.contains("local_over_limit=1") && text.contains("frame_timeout=1"), "{text}");
    assert!(text.contains("authentication_failed=1") && text.contains("auth_bad_handshake=1"), "{text}");

    // The log: every bad_magic accounted for, in fewer lines than rejections.
    let counted = |stderr: &str| {
        let lines: Vec<&str> =
            stderr.lines().filter(|line| line.contains("ingest rejected") && line.contains("bad_magic")).collect();
        let total: u64 = lines
            .iter()
            .map(|line| {
                let suppressed: u64 = field(line, "suppressed").parse().unwrap();
                if line.contains("more `bad_magic`") {
                    suppressed
                } else {
                    1 + suppressed
                }
            })
            .sum();
        (lines.len(), total)
    };
    let started = Instant::now();
    let (lines, total) = loop {
        let (lines, total) = counted(&stderr_of(dir.path()));
        if total == 10 {
            break (lines, total);
        }
        assert!(started.elapsed() < ACK_TIMEOUT, "{total} of 10 bad frames in the log: {}", stderr_of(dir.path()));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(lines < 10, "{lines} lines for {total} rejections: not rate-limited");
    eprintln!("{text}");
    stderr_of(dir.path()).lines().filter(|line| line.contains("ingest rejected")).for_each(|line| eprintln!("{line}"));
    drop(locals);
    let (clean, _) = terminate(node);
    assert!(clean);
}

/// A node name with a newline (or another character outside the rule) is refused by
/// `meshos config check`, naming the field, the character and its byte.
#[test]
fn config_check_refuses_a_node_name_outside_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "name = \"node-1\\nnode-2\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_meshos")).args(["config", "check"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`name`") && stderr.contains("'\\n' at byte 6"), "{stderr}");
    std::fs::write(&path, "name = \"node-1\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_meshos")).args(["config", "check"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ingest memory at most") && stdout.contains("partial_frame_bytes_max"), "{stdout}");
}

/// The node process's resident memory, in bytes (`VmRSS`).
fn rss_bytes(node: &Node) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The lockout and memory attacks against a real node process, now that the
/// TCP port authenticates: 600 strangers that connect and say nothing get at most
/// `handshake_connections_max` handshake slots (the rest are refused at accept with a
/// message naming the limit: all come from one address here, so the per-address
/// limit is the one met) and lose them at `handshake_timeout_ms`; 60 admitted
/// clients (a compromised node's worth of keys) each holding a frame of 4 MiB less
/// one byte draw on one partial-frame budget of 16 MiB. Meanwhile the local socket
/// and an admitted client are served, the node's resident memory grows by less than
/// the stated bound (the budget, plus per connection its 64 KiB buffer floor, 8 KiB of
/// output and its secure channel), and every refusal is counted by reason.
#[test]
fn floods_of_strangers_and_held_frames_lock_out_no_one_and_stay_within_the_memory_bound() {
    const STRANGERS: usize = 600;
    const HOLDERS: usize = 60;
    const BUDGET_BYTES: u64 = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        dir.path(),
        &format!(
            "handshake_connections_max = 64\nhandshake_per_address_max = 64\nhandshake_timeout_ms = 1500\n\
             partial_frame_bytes_max = {BUDGET_BYTES}\nconnection_buffer_bytes = 8388608\nframe_timeout_ms = 4000\n"
        ),
    );
    let node = start_config(dir.path(), &config, None);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_bytes(&node);
    let addr = node.addr;

    let strangers: Vec<TcpStream> = (0..STRANGERS).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Each holder sends a frame of 4 MiB less one byte from its own thread (the
    // writes block once the node stops reading it) and is closed at the frame deadline.
    let mut frame = Vec::new();
    meshos::wire::encode_frame(&mut frame, meshos::wire::FrameKind::Events, 1, 0, &vec![0u8; (4 << 20) - 64]);
    let frame = std::sync::Arc::new(frame);
    let holders: Vec<_> = (0..HOLDERS)
        .map(|index| {
            let frame = std::sync::Arc::clone(&frame);
            std::thread::spawn(move || {
                // A holder that finds every handshake slot taken tries again.
                let started = Instant::now();
                let (mut client, _replies) = loop {
                    match common::connect_as(addr, &genesis(), &format!("fd-{index}"), "node-1") {
                        Ok(connected) => break connected,
                        Err(error) if started.elapsed() < Duration::from_secs(20) => {
                            assert!(error.to_string().contains("handshake"), "{error}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(error) => panic!("holder {index}: {error}"),
                    }
                };
                // Fails once the node closes the connection at the frame deadline.
                let _ = client.send_raw(&frame[..frame.len() - 1]);
            })
        })
        .collect();

    // Served meanwhile: the local socket at once, an admitted client once a handshake
    // slot is free (it is told the limit until then).
    let mut rss_peak = rss_bytes(&node);
    let (mut local, mut local_replies) =
        meshos::sys::client::Client::connect_unix(&dir.path().join("local.sock")).unwrap();
    let heartbeat = |origin: &str, seq: u64| meshos::event::EventBatch {
        events: vec![meshos::event::Event {
            origin: origin.to_string(),
            origin_seq: seq,
            kind: meshos::event::EventKind::NodeHealth(meshos::event::NodeHealth::Heartbeat { load_permille: 3 }),
        }],
    };
    let seq = local.send(&heartbeat("node-1", 0), true).unwrap();
    local_replies.wait_acked(seq, ACK_TIMEOUT).unwrap();
    let started = Instant::now();
    let (mut good, mut good_replies) = loop {
        rss_peak = rss_peak.max(rss_bytes(&node));
        match common::connect_as(addr, &genesis(), "load-0", "node-1") {
            Ok(connected) => break connected,
            Err(error) => {
                assert!(started.elapsed() < ACK_TIMEOUT, "the good client was never served: {error}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    good.set_sealer(meshos::trust::Sealer::node("load-0", meshos::trust::test_key_of("load-0"), cluster_id()));
    let seq = good.send(&heartbeat("load-0", 1), true).unwrap();
    good_replies.wait_acked(seq, ACK_TIMEOUT).unwrap();
    let json = loop {
        rss_peak = rss_peak.max(rss_bytes(&node));
        let json = status(dir.path(), true);
        let counted =
            |reason: &str| json.contains(&format!("\"{reason}\":")) && !json.contains(&format!("\"{reason}\":0"));
        if ["handshakes_per_address", "handshake_timeout", "memory_budget_wait", "frame_timeout"]
            .iter()
            .all(|reason| counted(reason))
        {
            break json;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the refusals never all showed: {json}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for holder in holders {
        holder.join().unwrap();
    }
    rss_peak = rss_peak.max(rss_bytes(&node));
    drop(strangers);
    let per_connection = meshos::sys::reactor::CONNECTION_FIXED_BYTES_MAX as u64;
    // Rings, queued frames and the allocator's slack on top of the ingest bound.
    let slack = 24 << 20;
    let bound = BUDGET_BYTES + (HOLDERS as u64 + 64 + 2) * per_connection + slack;
    let grown = rss_peak.saturating_sub(rss_before);
    eprintln!("memory: rss {rss_before} -> peak {rss_peak} bytes (+{grown}); bound {bound}: {json}");
    assert!(grown < bound, "the node grew by {grown} bytes, over the bound of {bound}");
    let (clean, _) = terminate(node);
    assert!(clean);
}

/// Every record of the stopped node's log: (position, payload).
fn log_records(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut records = Vec::new();
    meshos::redex::embedded::read_unlocked(&dir.join("log"), &library_config(dir), &mut |record| {
        records.push((record.position, record.payload.to_vec()));
        true
    })
    .unwrap();
    records
}

/// The damage on a single node, with a real process: a byte flipped in the
/// middle of its log after clients' events were acknowledged. The node refuses to
/// start (naming the damage and the repair) instead of cutting the log there;
/// `meshos log salvage` keeps every other acknowledged record at its position with
/// its bytes and makes the damaged one an empty record; the node then starts.
#[test]
fn damage_in_the_middle_of_the_log_stops_the_node_and_salvage_keeps_every_intact_record() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(dir.path(), "\n[log]\nframe_bytes_max = 65536\nsegment_bytes_max = 262144\n");
    let node = start_config(dir.path(), &config, None);
    let results = load(node.addr, 0, 4, 100);
    for result in &results {
        assert_eq!((result.error.as_deref(), result.events_acked), (None, result.events_sent), "{}", result.origin);
    }
    let (clean, _) = terminate(node);
    assert!(clean);
    let before = log_records(dir.path());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{} segments", files.len());
    let victim = &files[files.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let header = meshos::wire::decode_header(&bytes[meshos::wire::SEGMENT_HEADER_BYTES..], 1 << 20).unwrap();
    let lost_position = header.seq;
    bytes[meshos::wire::SEGMENT_HEADER_BYTES + meshos::wire::HEADER_BYTES + 40] ^= 0x20;
    std::fs::write(victim, &bytes).unwrap();

    // The node refuses to start, says why and how to repair, and changes nothing.
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["node", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the node started on a log damaged in the middle");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&format!("record {lost_position}")) && stderr.contains("meshos log salvage"), "{stderr}");
    assert_eq!(std::fs::read(victim).unwrap(), bytes, "nothing changed");

    let verify = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["log", "verify"])
        .arg(dir.path().join("log"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        !verify.status.success() && text.contains(&format!("damaged or missing records: {lost_position}\n")),
        "{text}"
    );
    let salvage = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["log", "salvage"])
        .arg(dir.path().join("log"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&salvage.stdout);
    assert!(salvage.status.success(), "{text}{}", String::from_utf8_lossy(&salvage.stderr));
    assert!(text.contains("1 records lost"), "{text}");

    // Every other acknowledged record at its position with its bytes; the node runs.
    let node = start_config(dir.path(), &config, None);
    let (clean, _) = terminate(node);
    assert!(clean);
    let after = log_records(dir.path());
    for (position, payload) in &before {
        let (at, kept) = &after[(*position - 1) as usize];
        assert_eq!(at, position);
        if *position == lost_position {
            assert!(kept.is_empty(), "the damaged record is a hole");
        } else {
            assert!(kept == payload, "record {position} kept");
        }
    }
}
