//! Crash safety of the embedded log: a writer SIGKILLed at random moments never loses a record it reported durable, and recovery always leaves a log that `verify` finds clean with every payload exact.
//!
//! The parent test re-executes this test binary as a child (selected by the
//! `MESHOS_CRASH_CHILD_DIR` environment variable) that appends deterministic records
//! and prints `durable <position>` after each fsync. Override the seed with
//! `MESHOS_CRASH_SEED=<u64>`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshos::config::{Config, FsyncPolicy};
use meshos::event::{DaemonSignal, Event, EventBatch, EventKind};
use meshos::redex::embedded::{verify, EmbeddedLog};
use meshos::redex::Redex;
use meshos::wire;

const CHILD_DIR_ENV: &str = "MESHOS_CRASH_CHILD_DIR";
const CHILD_MODE_ENV: &str = "MESHOS_CRASH_CHILD_MODE";
const SEED_ENV: &str = "MESHOS_CRASH_SEED";
const CHILD_TEST_NAME: &str = "crash_child";
const LOG_DIRS: usize = 6;
const ROUNDS_PER_DIR: usize = 10;

/// The payload of the record at `position`: its events encode the position, and
/// its size varies so torn writes land at every kind of offset.
fn expected_payload(position: u64) -> Vec<u8> {
    let note_bytes = (position as usize * 37) % 700;
    let batch = EventBatch {
        events: vec![
            Event {
                origin: format!("node-{}", position % 5),
                origin_seq: position,
                kind: EventKind::Rtt { peer: "peer".to_string(), rtt_us: position as u32 },
            },
            Event {
                origin: "crash".to_string(),
                origin_seq: position * 2,
                kind: EventKind::Daemon {
                    daemon: "x".repeat(note_bytes),
                    signal: DaemonSignal::Saturation { permille: 7 },
                },
            },
        ],
    };
    wire::encode_batch(&batch).to_vec()
}

/// Mode `i` of a log directory: (config, how the child syncs).
fn config_for(mode: usize) -> Config {
    let small = Config { frame_bytes_max: 4096, segment_bytes_max: 8192, ..Config::for_tests() };
    match mode % 4 {
        0 => Config { fsync: FsyncPolicy::Always, ..small },
        1 => Config { fsync: FsyncPolicy::Manual, ..Config::for_tests() },
        2 => Config { fsync: FsyncPolicy::Group { records: 5, bytes: 1 << 20 }, ..small },
        _ => Config { fsync: FsyncPolicy::Manual, ..small },
    }
}

/// splitmix64: small, seeded, deterministic.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The child: appends forever (until killed), reporting every durable position.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else { return };
    let mode: usize = std::env::var(CHILD_MODE_ENV).unwrap().parse().unwrap();
    let config = config_for(mode);
    let (mut log, _) = EmbeddedLog::open(Path::new(&dir), &config).unwrap();
    let stdout = std::io::stdout();
    let mut durable_reported = log.durable_position();
    for _ in 0..1_000_000 {
        let position = log.last_position() + 1;
        log.append_at(&expected_payload(position), position * 3).unwrap();
        if config.fsync == FsyncPolicy::Manual && position % 7 == 0 {
            log.sync().unwrap();
        }
        if log.durable_position() > durable_reported {
            durable_reported = log.durable_position();
            let mut out = stdout.lock();
            writeln!(out, "durable {durable_reported}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn sigkilled_writer_loses_nothing_durable() {
    let seed = std::env::var(SEED_ENV).ok().and_then(|text| text.parse().ok()).unwrap_or(0x0000_005E_ED0F_C4A5_u64);
    println!("crash test seed {seed} (override with {SEED_ENV}=<u64>)");
    let mut rng = SplitMix(seed);
    let started = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut expected_cache: Vec<Vec<u8>> = vec![Vec::new()];
    let mut kills = 0;
    let mut torn_tails = 0;
    let mut segments_max = 0;
    for mode in 0..LOG_DIRS {
        let dir = root.path().join(format!("log-{mode}"));
        let config = config_for(mode);
        let mut acked_max = 0u64;
        for round in 0..ROUNDS_PER_DIR {
            let mut child = Command::new(&exe)
                .args(["--exact", CHILD_TEST_NAME, "--nocapture", "--test-threads", "1"])
                .env(CHILD_DIR_ENV, &dir)
                .env(CHILD_MODE_ENV, mode.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let delay_ms = 5 + rng.next() % 120;
            std::thread::sleep(Duration::from_millis(delay_ms));
            child.kill().unwrap();
            let status = child.wait().unwrap();
            kills += 1;
            let mut stdout = String::new();
            child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
            let mut stderr = String::new();
            child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
            {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "child ended on its own ({status}); stderr:\n{stderr}\nstdout:\n{stdout}"
                );
            }
            for line in stdout.lines() {
                if let Some(position) = line.strip_prefix("durable ") {
                    acked_max = acked_max.max(position.trim().parse().unwrap());
                }
            }

            let (log, report) = EmbeddedLog::open(&dir, &config).unwrap();
            torn_tails += usize::from(report.damage.is_some());
            segments_max = segments_max.max(report.segments);
            let context = format!("seed {seed}, dir {mode}, round {round}, delay {delay_ms} ms, report {report:?}");
            assert!(report.last_position >= acked_max, "lost durable records: acked {acked_max}; {context}");
            assert_eq!(log.last_position(), report.last_position, "{context}");
            drop(log);
            let checked = verify(&dir, &config).unwrap();
            assert_eq!(checked.damage, None, "{context}");
            assert_eq!(checked.bytes_after_damage, 0, "{context}");
            assert_eq!(checked.records, report.last_position, "{context}");

            let (mut log, again) = EmbeddedLog::open(&dir, &config).unwrap();
            assert_eq!(again.dropped_bytes, 0, "{context}");
            let last = log.last_position();
            while expected_cache.len() as u64 <= last {
                let position = expected_cache.len() as u64;
                expected_cache.push(expected_payload(position));
            }
            let mut next = 1u64;
            let mut previous_time_ms = 0;
            log.read_from(1, &mut |record| {
                assert_eq!(record.position, next, "{context}");
                assert!(record.time_ms >= previous_time_ms, "{context}");
                assert_eq!(record.payload, &expected_cache[next as usize][..], "payload of {next}; {context}");
                previous_time_ms = record.time_ms;
                next += 1;
                true
            })
            .unwrap();
            assert_eq!(next - 1, last, "{context}");
        }
        println!("dir {mode}: {acked_max} records acknowledged durable");
    }
    println!(
        "{kills} kills, {torn_tails} torn tails recovered, up to {segments_max} segments, in {:?}",
        started.elapsed()
    );
    assert!(kills >= 50);
}
