//! Process primitives for the daemon executor: spawn a command in its own process
//! group with piped output, signal a whole group, read a process's start time (to
//! tell a live orphan from a reused pid), and read random bytes for one-time tokens.
//!
//! Invariants: every function returns an error or `false` instead of panicking;
//! signals go to process groups the node created (a pid of 0 or 1 is refused, so a
//! corrupt pid file can never signal the node's own group or init).

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Spawns `command` as the leader of a new session (and so of a new process group
/// whose id is its pid), stdin from /dev/null and stdout/stderr piped (the executor
/// copies them into rotating files). A session leader cannot move to another group,
/// and no process of another session can join its group: signalling the group always
/// reaches the daemon and only what it started, and the group proves who it started
/// (SDK registration).
pub fn spawn_in_group(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    working_dir: &Path,
) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(key, value)| (key.as_str(), value.as_str())))
        .current_dir(working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // setsid(2), which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    command.spawn()
}

/// Sends `signal` to every process in the group led by `leader`; false if none is
/// left. Safe after the leader was reaped: a pid is not reused while its group lives.
pub fn signal_group(leader: u32, signal: i32) -> bool {
    if leader <= 1 || leader > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; it reads no memory.
    unsafe { libc::kill(-(leader as i32), signal) == 0 }
}

/// Sends `signal` to the group led by `child` and to `child` itself (in case it left
/// the group). Only for a child not yet reaped, whose pid cannot have been reused.
pub fn signal_child_and_group(child: u32, signal: i32) -> bool {
    let group = signal_group(child, signal);
    if child <= 1 || child > i32::MAX as u32 {
        return group;
    }
    // SAFETY: kill(2) takes plain integers and reads no memory.
    let leader = unsafe { libc::kill(child as i32, signal) == 0 };
    group || leader
}

/// Puts SIGCHLD back to its default action. A parent that ignored it (the setting
/// survives exec) would make the kernel reap the node's children itself, and the
/// executor would never see how its daemons end.
pub fn reset_child_signal() {
    // SAFETY: signal(2) with SIG_DFL installs no handler and reads no memory.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
}

/// The process group of `pid`, if the process exists.
pub fn process_group(pid: u32) -> Option<u32> {
    if pid == 0 || pid > i32::MAX as u32 {
        return None;
    }
    // SAFETY: getpgid(2) reads no memory; it fails with ESRCH for a missing process.
    let group = unsafe { libc::getpgid(pid as i32) };
    (group > 0).then_some(group as u32)
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and reads no memory.
    unsafe { libc::geteuid() }
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat),
/// or `None` if no such process is alive (a zombie is dead: it only waits for a
/// parent to reap it). With the pid it names one process for good.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Fills `bytes` from /dev/urandom (tokens, operator keys, temporary names).
pub fn random_bytes(bytes: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(bytes)
}

/// The size in bytes of the file system holding `path` (statvfs), if it can be read.
pub fn filesystem_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stats` a writable statvfs.
    let result = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    (result == 0).then(|| stats.f_blocks as u64 * stats.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_names_a_live_process_and_not_a_missing_one() {
        let own = std::process::id();
        let ticks = start_ticks(own).expect("this process exists");
        assert_eq!(start_ticks(own), Some(ticks), "stable for one process");
        assert_eq!(start_ticks(u32::MAX - 1), None);
    }

    #[test]
    fn a_group_is_signalled_and_reaped() {
        let mut child = spawn_in_group("sleep", &["30".to_string()], &[], Path::new("/")).expect("spawns");
        assert_eq!(process_group(child.id()), Some(child.id()), "the child leads its own group");
        assert!(signal_group(child.id(), libc::SIGKILL));
        let status = child.wait().expect("reaped");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!signal_group(0, libc::SIGKILL) && !signal_group(1, libc::SIGKILL), "refused");
    }
}
