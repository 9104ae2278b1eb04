//! An example MeshOS daemon: every SDK call, in the order a real daemon makes them.
//!
//! A node starts it (a daemon spec whose command is this binary); it registers with
//! the token the node put in its environment, publishes a capability label, reports
//! health and saturation every `--interval-ms`, and waits for control events between
//! reports. On `Shutdown` it finishes, tells the node (`graceful_shutdown`) and exits
//! 0. It prints one line per step on stdout, which the node keeps in
//! `DATA_DIR/daemons/NAME/stdout.log`.
//!
//! Flags for trying the supervisor's rules (all optional):
//!   --interval-ms N        report every N ms (default 200)
//!   --saturation N         saturation to report, in permille (default 100)
//!   --label L              capability label to publish (default example)
//!   --healthy-for-ms N     stop reporting health after N ms (a health-timeout restart)
//!   --crash-after-ms N     abort after N ms (a crash: restart with backoff, then the gate)
//!   --ignore-shutdown      ignore the Shutdown event and SIGTERM (the stop ends in SIGKILL)
//!
//! Build it alone, without the engine: `cargo build --no-default-features --example daemon`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshos::sdk::{self, Control, SdkError};

static SIGTERM_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_signal: libc::c_int) {
    SIGTERM_SEEN.store(true, Ordering::SeqCst);
}

struct Flags {
    interval: Duration,
    saturation_permille: u16,
    label: String,
    healthy_for: Option<Duration>,
    crash_after: Option<Duration>,
    ignore_shutdown: bool,
}

fn parse_flags() -> Result<Flags, String> {
    let mut flags = Flags {
        interval: Duration::from_millis(200),
        saturation_permille: 100,
        label: "example".to_string(),
        healthy_for: None,
        crash_after: None,
        ignore_shutdown: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let millis = |text: String| {
            text.parse::<u64>().map(Duration::from_millis).map_err(|_| format!("{text} is not a number of ms"))
        };
        match flag.as_str() {
            "--interval-ms" => flags.interval = millis(value()?)?,
            "--saturation" => {
                flags.saturation_permille = value()?.parse().map_err(|_| "--saturation takes 0..=1000".to_string())?
            }
            "--label" => flags.label = value()?,
            "--healthy-for-ms" => flags.healthy_for = Some(millis(value()?)?),
            "--crash-after-ms" => flags.crash_after = Some(millis(value()?)?),
            "--ignore-shutdown" => flags.ignore_shutdown = true,
            "--help" | "-h" => {
                println!("see the top of examples/daemon.rs for the flags");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(flags)
}

fn main() {
    let flags = match parse_flags() {
        Ok(flags) => flags,
        Err(error) => {
            eprintln!("daemon: {error}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(&flags) {
        eprintln!("daemon: {error}");
        std::process::exit(1);
    }
}

fn run(flags: &Flags) -> Result<(), SdkError> {
    if flags.ignore_shutdown {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t) };
    }
    let started = Instant::now();
    let mut daemon = sdk::register_daemon()?;
    println!("registered as {} on {}", daemon.name(), daemon.node());
    daemon.publish_capabilities(&[flags.label.as_str()])?;
    println!("published capability label {}", flags.label);
    let mut said_unhealthy = false;
    loop {
        if SIGTERM_SEEN.swap(false, Ordering::SeqCst) {
            println!("SIGTERM received: ignoring it");
        }
        if flags.crash_after.is_some_and(|after| started.elapsed() >= after) {
            println!("crashing on purpose");
            std::process::abort();
        }
        if flags.healthy_for.is_none_or(|healthy_for| started.elapsed() < healthy_for) {
            daemon.report_health(true)?;
        } else if !said_unhealthy {
            said_unhealthy = true;
            println!("no more health reports");
        }
        daemon.report_saturation(flags.saturation_permille)?;
        match daemon.next_control_timeout(flags.interval)? {
            Some(Control::Shutdown) if flags.ignore_shutdown => println!("control: shutdown (ignoring it)"),
            Some(Control::Shutdown) => {
                println!("control: shutdown");
                break;
            }
            Some(Control::Restart) => {
                println!("control: restart");
                break;
            }
            Some(Control::ReloadConfig) => println!("control: reload config"),
            None => {}
        }
    }
    daemon.graceful_shutdown()?;
    println!("shut down cleanly");
    Ok(())
}
