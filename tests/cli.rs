//! The `meshos log` commands as an operator runs them: generate, replay (twice, same
//! line), verify a damaged log (named, non-zero exit), replay after recovery
//! (reports the dropped tail), and clear errors for bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::write_small_cluster_log;

fn meshos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshos")).args(args).output().expect("run meshos")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn last_line(output: &Output) -> String {
    stdout(output).lines().last().unwrap_or_default().to_string()
}

fn gen(dir: &Path, seed: &str, events: &str) -> Output {
    let flags = format!("--seed {seed} --nodes 20 --blobs 500 --replicas 3 --events {events}");
    let mut args = vec!["log", "gen", "--out", dir.to_str().unwrap()];
    args.extend(flags.split(' '));
    let output = meshos(&args);
    assert!(output.status.success(), "gen failed: {}", stderr(&output));
    output
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn gen_then_replay_twice_prints_the_same_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    gen(&log, "3", "50000");
    let first = meshos(&["log", "replay", log.to_str().unwrap()]);
    let second = meshos(&["log", "replay", log.to_str().unwrap()]);
    assert!(first.status.success() && second.status.success(), "{}", stderr(&first));
    let line = last_line(&first);
    assert_eq!(line, last_line(&second));
    let fields: Vec<&str> = line.split(' ').collect();
    let names: Vec<&str> = fields.iter().map(|field| field.split('=').next().unwrap()).collect();
    assert_eq!(names, ["position", "state_hash", "nodes", "blobs", "replicas", "daemons", "rejected"], "{line}");
    let hash = fields[1].strip_prefix("state_hash=").unwrap();
    assert_eq!(hash.len(), 32);
    assert!(hash.chars().all(|character| character.is_ascii_hexdigit()));
    assert!(line.contains(" nodes=20 blobs=500 ") && line.ends_with(" rejected=0"), "{line}");

    let reconciled = meshos(&["log", "replay", log.to_str().unwrap(), "--reconcile"]);
    let again = meshos(&["log", "replay", log.to_str().unwrap(), "--reconcile"]);
    assert!(stdout(&reconciled).contains("reconcile: "), "{}", stdout(&reconciled));
    assert_eq!(last_line(&reconciled), last_line(&again), "reconcile is deterministic too");

    let json = meshos(&["log", "replay", log.to_str().unwrap(), "-o", "json"]);
    let json = stdout(&json);
    assert!(json.trim_start().starts_with('{') && json.contains(&format!("\"state_hash\":\"{hash}\"")), "{json}");
}

#[test]
fn gen_is_deterministic_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second, other) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    gen(&first, "9", "20000");
    gen(&second, "9", "20000");
    gen(&other, "10", "20000");
    let bytes = |log: &Path| segments(log).iter().map(|path| std::fs::read(path).unwrap()).collect::<Vec<_>>();
    assert_eq!(bytes(&first), bytes(&second));
    assert_ne!(bytes(&first), bytes(&other));
}

#[test]
fn a_flipped_byte_is_named_by_verify_and_dropped_by_replay() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    gen(&log, "4", "60000");
    let clean = meshos(&["log", "verify", log.to_str().unwrap()]);
    assert!(clean.status.success(), "{}", stdout(&clean));
    assert!(stdout(&clean).contains("ok: no damage"));
    let before = last_line(&meshos(&["log", "replay", log.to_str().unwrap()]));

    let segment = &segments(&log)[0];
    let mut bytes = std::fs::read(segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(segment, &bytes).unwrap();

    let damaged = meshos(&["log", "verify", log.to_str().unwrap()]);
    assert_eq!(damaged.status.code(), Some(1), "verify must fail on damage");
    let report = stdout(&damaged);
    assert!(report.contains("DAMAGED") && report.contains("record ") && report.contains(".seg"), "{report}");

    let replay = meshos(&["log", "replay", log.to_str().unwrap()]);
    assert!(replay.status.success(), "{}", stderr(&replay));
    let text = stdout(&replay);
    assert!(text.contains("recovered: dropped the tail after position"), "{text}");
    assert!(text.contains("quarantine"), "{text}");
    let after = last_line(&replay);
    assert_ne!(before, after);
    let position = |line: &str| line.split(' ').next().unwrap().trim_start_matches("position=").parse::<u64>().unwrap();
    assert!(position(&after) < position(&before));

    let healed = meshos(&["log", "verify", log.to_str().unwrap()]);
    assert!(healed.status.success(), "{}", stdout(&healed));
    assert_eq!(after, last_line(&meshos(&["log", "replay", log.to_str().unwrap()])), "nothing more dropped");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let path = log.to_str().unwrap();

    let missing = meshos(&["log", "replay", path]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no log here"), "{}", stderr(&missing));

    let bad_replicas = meshos(&["log", "gen", "--out", path, "--nodes", "2", "--replicas", "3"]);
    assert!(!bad_replicas.status.success());
    assert!(stderr(&bad_replicas).contains("--replicas"), "{}", stderr(&bad_replicas));

    let too_few = meshos(&["log", "gen", "--out", path, "--nodes", "5", "--blobs", "100", "--events", "10"]);
    assert!(stderr(&too_few).contains("--events") && stderr(&too_few).contains("setup"), "{}", stderr(&too_few));

    let bad_limit = meshos(&["log", "gen", "--out", path, "--frame-bytes-max", "7"]);
    assert!(stderr(&bad_limit).contains("frame_bytes_max"), "{}", stderr(&bad_limit));

    gen(&log, "1", "20000");
    let again = meshos(&["log", "gen", "--out", path, "--nodes", "3", "--blobs", "10", "--events", "5000"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already holds a log"), "{}", stderr(&again));

    let typo = meshos(&["log", "replya", path]);
    assert_eq!(typo.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn help_teaches_every_command() {
    for command in ["", "log", "log gen", "log replay", "log verify"] {
        let mut args: Vec<&str> = command.split_whitespace().collect();
        args.push("--help");
        let output = meshos(&args);
        assert!(output.status.success(), "{args:?}");
        let text = stdout(&output);
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
    let replay = stdout(&meshos(&["log", "replay", "--help"]));
    assert!(replay.contains("state_hash=") && replay.contains("quarantine"), "{replay}");
}

#[test]
fn replay_names_rejected_events_and_their_reasons() {
    use meshos::config::Config;
    use meshos::event::{Event, EventBatch, EventKind, NodeHealth, ReplicaState};
    use meshos::redex::embedded::EmbeddedLog;
    use meshos::redex::Redex;

    let dir = tempfile::tempdir().unwrap();
    let heartbeat = |seq| Event {
        origin: "n1".into(),
        origin_seq: seq,
        kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }),
    };
    let stray = Event {
        origin: "n1".into(),
        origin_seq: 3,
        kind: EventKind::ReplicaUpdate { blob: [5; 32], state: ReplicaState::Healthy },
    };
    let batch = EventBatch { events: vec![heartbeat(1), heartbeat(2), heartbeat(2), stray] };
    let config = Config::for_tests();
    let (mut log, _) = EmbeddedLog::open(dir.path(), &config).unwrap();
    let mut sealer = meshos::trust::testing::MixedSealer::new(config.genesis.cluster_id());
    log.append_at(&sealer.seal(&batch.events, 1_000), 1_000).unwrap();
    log.sync().unwrap();
    drop(log);
    // The log's genesis beside it, as `meshos log gen` writes it.
    config.genesis.write_new(&dir.path().join("genesis.toml")).unwrap();

    let output = meshos(&["log", "replay", dir.path().to_str().unwrap(), "--show-rejections", "5"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("rejected: record 1 event 2 (node_health from `n1` seq 2): origin sequence 2"), "{text}");
    assert!(text.contains("rejected: record 1 event 3 (replica_update from `n1` seq 3): unknown blob 0505"), "{text}");
    assert!(text.contains("rejected by reason: stale_origin_seq=1 unknown_blob=1"), "{text}");
    assert!(last_line(&output).ends_with(" rejected=2"), "{text}");
    let json = stdout(&meshos(&["log", "replay", dir.path().to_str().unwrap(), "-o", "json"]));
    assert!(json.contains("\"rejected_by_reason\":{\"stale_origin_seq\":1,\"unknown_blob\":1}"), "{json}");
}

#[test]
fn verify_flags_an_intact_record_with_an_invalid_payload_and_replay_rejects_it() {
    use meshos::config::Config;
    use meshos::event::{Event, EventKind, NodeHealth};
    use meshos::redex::embedded::EmbeddedLog;
    use meshos::redex::Redex;

    let dir = tempfile::tempdir().unwrap();
    let heartbeat = Event {
        origin: "n\u{1b}[31m1".into(),
        origin_seq: 1,
        kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 0 }),
    };
    // Signed under a name outside the node name rule: never admitted, so refused.
    let config = Config::for_tests();
    let mut sealer = meshos::trust::testing::MixedSealer::new(config.genesis.cluster_id());
    let good = sealer.seal(&[heartbeat.clone(), heartbeat], 1_000);
    let mut bad = good.to_vec();
    bad.push(7);
    let (mut log, _) = EmbeddedLog::open(dir.path(), &config).unwrap();
    log.append_at(&good, 1_000).unwrap();
    log.append_at(&bad, 1_000).unwrap();
    log.sync().unwrap();
    drop(log);
    config.genesis.write_new(&dir.path().join("genesis.toml")).unwrap();

    let path = dir.path().to_str().unwrap();
    let verify = meshos(&["log", "verify", path]);
    assert_eq!(verify.status.code(), Some(1));
    let text = stdout(&verify);
    assert!(text.contains("INVALID PAYLOAD: 1 intact records") && text.contains("record 2"), "{text}");
    let replay = meshos(&["log", "replay", path, "--show-rejections", "3"]);
    let text = stdout(&replay);
    assert!(!text.contains('\u{1b}'), "control characters from the log are escaped: {text:?}");
    assert!(text.contains("rejected by reason: bad_section=1 node_not_admitted=2"), "{text}");
    assert!(last_line(&replay).starts_with("position=2 ") && last_line(&replay).ends_with(" rejected=3"), "{text}");
    assert_eq!(stdout(&meshos(&["log", "verify", path])), stdout(&verify), "verify and replay changed nothing");
}

#[test]
fn sim_prints_its_report_line_last_and_refuses_bad_flags() {
    let args = ["sim", "--seed", "4", "--nodes", "10", "--blobs", "60", "--replicas", "2", "--steps", "1500"];
    let output = meshos(&args);
    assert_eq!(output.status.code(), Some(0), "{}{}", stdout(&output), stderr(&output));
    let line = last_line(&output);
    assert!(line.starts_with("sim: seed=4 steps=1500 faults="), "{line}");
    assert!(line.contains(" violations=0 converged=true moves="), "{line}");
    assert_eq!(meshos(&args).stdout, output.stdout, "the same flags give the same run");

    let bad = meshos(&["sim", "--nodes", "3", "--replicas", "3"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--replicas"), "{}", stderr(&bad));
    let help = stdout(&meshos(&["sim", "--help"]));
    assert!(help.contains("--seed") && help.contains("converged=<true|false>"), "{help}");
}

#[test]
fn config_default_round_trips_and_check_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("node.toml");
    std::fs::write(&good, stdout(&meshos(&["config", "default"]))).unwrap();
    let checked = meshos(&["config", "check", good.to_str().unwrap()]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[reconcile]\nstabilisation_ms = \"soon\"\n").unwrap();
    let refused = meshos(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("stabilisation_ms") && stderr(&refused).contains("bad.toml"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn node_refuses_a_bad_config_or_rust_log_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "name = \"n1\"\n[ingest]\nqueue_frames = 1\n").unwrap();
    let output = meshos(&["node", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("ingest.queue_frames"), "{}", stderr(&output));

    let data_dir = dir.path().join("data");
    std::fs::write(&config, format!("name = \"n1\"\ndata_dir = \"{}\"\n", data_dir.display())).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["node", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "meshos=loud")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("RUST_LOG"), "{}", stderr(&output));
    assert!(!data_dir.exists(), "nothing is started on a bad level");
}

// ---- meshos admin --------------------------------------------------------------

/// Writes a key file holding `seed` with `mode`.
fn key_file(path: &Path, seed: [u8; 32], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let text: String = seed.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A node config named `name` with its data in `dir`.
fn node_config(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join("node.toml");
    let text = format!(
        "name = \"{name}\"\ndata_dir = \"{}\"\nheartbeat_ms = 100\n\n[ingest]\nlisten_tcp = \"127.0.0.1:0\"\n",
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn admin_keygen_writes_an_owner_only_key_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ops.key");
    let output = meshos(&["admin", "keygen", "--out", key.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let public = text.split("public key: ").nth(1).unwrap().lines().next().unwrap().to_string();
    assert_eq!(public.len(), 64, "{text}");
    assert!(text.contains("cluster init --operator-key") && text.contains("set-keyring"), "next step: {text}");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let shown = meshos(&["admin", "public-key", "--key", key.to_str().unwrap()]);
    assert_eq!(stdout(&shown).trim(), public);

    let before = std::fs::read(&key).unwrap();
    let again = meshos(&["admin", "keygen", "--out", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("refusing to overwrite"), "{}", stderr(&again));
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key file is untouched");

    let help = stdout(&meshos(&["admin", "--help"]));
    assert!(help.contains("genesis") && help.contains("--dry-run") && help.contains("admit-node"), "{help}");
}

#[test]
fn admin_refuses_a_key_file_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ops.key");
    key_file(&key, [0x5e; 32], 0o644);
    let config = node_config(dir.path(), "n1");
    let output = meshos(&[
        "admin",
        "cordon",
        "n2",
        "--key",
        key.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert!(error.contains("mode 0644") && error.contains("chmod 600") && error.contains("owner only"), "{error}");
}

#[test]
fn admin_dry_run_prints_what_would_happen_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let last = write_small_cluster_log(&log);
    let config = node_config(dir.path(), "n1");
    meshos::config::Config::for_tests().genesis.write_new(&dir.path().join("genesis.toml")).unwrap();
    let key = dir.path().join("ops.key");
    key_file(&key, [0x5e; 32], 0o600); // the test operator key the genesis trusts
    let before = snapshot(&log);
    let run = |extra: &[&str]| {
        let mut args = vec!["admin", "enter-maintenance", "n2", "--key", key.to_str().unwrap()];
        args.extend(["--config", config.to_str().unwrap(), "--operator", "alice", "--dry-run"]);
        args.extend(extra);
        meshos(&args)
    };
    let output = run(&[]);
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
    let text = stdout(&output);
    for expected in [
        &format!("at position {last}"),
        "as `alice`",
        "would be: applied",
        "actions of the reconcile pass after it (2):",
        "n3: migrate_blob b1b1b1b1 from n2",
        "node `n2`: active -> entering_maintenance; 2 healthy copies",
        "copies to move first (below their intent without this node): 2 (2.0 MiB)",
        "blob b1b1",
        "expected time to safe: unknown",
        "daemons to stop: web",
        "nothing was appended (dry run)",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    let json = stdout(&run(&["-o", "json"]));
    for expected in [
        "\"dry_run\":true",
        "\"command\":\"enter_maintenance\"",
        "\"applied\":true",
        "\"rejection\":null",
        "\"bytes_to_move\":2097152",
        "\"daemons_to_stop\":[\"web\"]",
        "\"appended\":false",
    ] {
        assert!(json.contains(expected), "missing `{expected}` in {json}");
    }
    assert_eq!(snapshot(&log), before, "a dry run changes no byte of the log");

    // A key that is not in the keyring: the dry run says it would be rejected, exit 1.
    let stranger = dir.path().join("stranger.key");
    key_file(&stranger, [3; 32], 0o600);
    let output = meshos(&[
        "admin",
        "restart-daemons",
        "--all",
        "--key",
        stranger.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--operator",
        "eve",
        "--dry-run",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("would be: REJECTED (unknown_admin_key)"), "{}", stdout(&output));
    assert_eq!(snapshot(&log), before);
}

/// The whole path on a running node: genesis, a dry run, a command, and a command
/// signed by a key outside the keyring, each sent over the node's Unix socket.
#[test]
fn admin_commands_reach_a_running_node_through_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(dir.path(), "node-1");
    let stderr_file = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut node = Command::new(env!("CARGO_BIN_EXE_meshos"))
        .args(["node", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !dir.path().join("node.addr").exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the node did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300)); // its first heartbeats
                                                               // The first start wrote the cluster's genesis and its operator key (admin.key):
                                                               // the CLI signs with it by default.
    assert!(dir.path().join("genesis.toml").exists() && dir.path().join("admin.key").exists());
    let key = dir.path().join("ops.key");
    let public = {
        let output = meshos(&["admin", "keygen", "--out", key.to_str().unwrap()]);
        stdout(&output).split("public key: ").nth(1).unwrap().lines().next().unwrap().to_string()
    };
    let admin = |args: &[&str], key: Option<&Path>| {
        let mut all = args.to_vec();
        if let Some(key) = key {
            all.extend(["--key", key.to_str().unwrap()]);
        }
        all.extend(["--config", config.to_str().unwrap(), "--operator", "ops"]);
        meshos(&all)
    };
    let cordon = admin(&["admin", "cordon", "node-1"], Some(&key));
    assert_eq!(cordon.status.code(), Some(1), "a new key is not in the keyring");
    assert!(stdout(&cordon).contains("REJECTED (unknown_admin_key)"), "{}", stdout(&cordon));

    // The node's own operator key adds the new one (rotation to version 2, both keys).
    let admin_public =
        stdout(&meshos(&["admin", "public-key", "--key", dir.path().join("admin.key").to_str().unwrap()]));
    let rotate = admin(
        &["admin", "set-keyring", "--version", "2", "--public-key", admin_public.trim(), "--public-key", &public],
        None,
    );
    assert!(rotate.status.success(), "{}{}", stdout(&rotate), stderr(&rotate));
    assert!(stdout(&rotate).contains("set_keyring: appended at log position") && stdout(&rotate).contains("applied"));

    let dry = admin(&["admin", "cordon", "node-1", "--dry-run"], Some(&key));
    assert!(stdout(&dry).contains("would be: applied"), "{}", stdout(&dry));
    let cordon = admin(&["admin", "cordon", "node-1", "-o", "json"], Some(&key));
    assert!(cordon.status.success(), "{}{}", stdout(&cordon), stderr(&cordon));
    assert!(stdout(&cordon).contains("\"outcome\":\"applied\""), "{}", stdout(&cordon));

    let stranger = dir.path().join("stranger.key");
    key_file(&stranger, [9; 32], 0o600);
    let refused = admin(&["admin", "uncordon", "node-1"], Some(&stranger));
    assert_eq!(refused.status.code(), Some(1));
    assert!(stdout(&refused).contains("REJECTED (unknown_admin_key)"), "{}", stdout(&refused));

    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    assert!(node.wait().unwrap().success());
    let replay =
        meshos(&["log", "replay", dir.path().join("log").to_str().unwrap(), "--config", config.to_str().unwrap()]);
    assert!(stdout(&replay).contains("unknown_admin_key=2"), "{}", stdout(&replay));
}
