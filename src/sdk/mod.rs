//! The daemon SDK: what a process supervised by a MeshOS node links to talk to it.
//! Sync and std only (blocking I/O over the node's Unix socket, no async runtime):
//! depend on `meshos` with `default-features = false` and only this module builds.
//!
//! ```no_run
//! use meshos::sdk::{self, Control};
//! use std::time::Duration;
//!
//! let mut daemon = sdk::register_daemon()?; // reads MESHOS_SDK_SOCKET and MESHOS_DAEMON_TOKEN
//! daemon.publish_capabilities(&["cache"])?;
//! loop {
//!     daemon.report_health(true)?;
//!     daemon.report_saturation(120)?;
//!     match daemon.next_control_timeout(Duration::from_secs(1))? {
//!         Some(Control::Shutdown) => break,
//!         Some(Control::ReloadConfig) | Some(Control::Restart) | None => {}
//!     }
//! }
//! daemon.graceful_shutdown()?;
//! # Ok::<(), meshos::sdk::SdkError>(())
//! ```
//!
//! The node starts each daemon with the socket path and a one-time token in its
//! environment; it accepts the registration only from the process it started (the
//! token, and the peer's process group from the socket's credentials). Every call
//! waits for the node's answer and returns a typed error: the socket is gone (the
//! node is down: calls reconnect for up to `Options::reconnect_wait` first), the node
//! rejected it, or no answer came in time. Control events that arrive while a call
//! waits are kept, in order, for `next_control`.
//!
//! Invariants: at most one request is unanswered at a time; a control event is handed
//! out exactly once; nothing here panics on what the socket sends.

pub mod proto;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use proto::Control;
use proto::{ProtoError, ToDaemon, ToNode};

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The process was not started by a MeshOS node (the variable is missing).
    #[error("{0} is not set: this process was not started by a MeshOS node")]
    NotSupervised(&'static str),
    /// The node's socket cannot be reached (the node is down or restarting).
    #[error("node socket {path} is gone: {source}")]
    SocketGone { path: PathBuf, source: std::io::Error },
    /// The node refused the call, and says why.
    #[error("the node rejected the call: {0}")]
    Rejected(String),
    /// No answer within the call timeout.
    #[error("no answer from the node within {0:?}")]
    TimedOut(Duration),
    /// The node sent bytes that are not the protocol.
    #[error("protocol error from the node: {0}")]
    Protocol(#[from] ProtoError),
}

/// How the SDK reaches its node.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub token: String,
    /// How long a call waits for the node's answer.
    pub call_timeout: Duration,
    /// How long a call keeps trying to reconnect to a node that went away.
    pub reconnect_wait: Duration,
}

impl Options {
    /// Options from the environment the node set (`MESHOS_SDK_SOCKET`, `MESHOS_DAEMON_TOKEN`).
    pub fn from_env() -> Result<Options, SdkError> {
        let read = |name: &'static str| std::env::var(name).map_err(|_| SdkError::NotSupervised(name));
        Ok(Options {
            socket: PathBuf::from(read(proto::ENV_SOCKET)?),
            token: read(proto::ENV_TOKEN)?,
            call_timeout: Duration::from_secs(5),
            reconnect_wait: Duration::from_secs(5),
        })
    }
}

/// A registered daemon's connection to its node.
pub struct Daemon {
    options: Options,
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    controls: VecDeque<Control>,
    node: String,
    name: String,
    /// A call timed out or the node sent bad bytes: an answer may still be in flight,
    /// so the connection is replaced before the next call (answers are never paired
    /// with the wrong call).
    stale: bool,
}

/// `now + timeout`, or a year from now when that does not fit (`Duration::MAX`).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Registers the calling process with the node that started it, using the environment.
pub fn register_daemon() -> Result<Daemon, SdkError> {
    register_daemon_with(Options::from_env()?)
}

/// Registers with explicit options (tests, or a socket path not in the environment).
pub fn register_daemon_with(options: Options) -> Result<Daemon, SdkError> {
    let stream = connect(&options.socket)?;
    let mut daemon = Daemon {
        options,
        stream,
        input: Vec::with_capacity(proto::FRAME_BYTES_MAX),
        output: Vec::with_capacity(256),
        controls: VecDeque::new(),
        node: String::new(),
        name: String::new(),
        stale: false,
    };
    daemon.hello()?;
    Ok(daemon)
}

fn connect(path: &Path) -> Result<UnixStream, SdkError> {
    UnixStream::connect(path).map_err(|source| SdkError::SocketGone { path: path.to_path_buf(), source })
}

impl Daemon {
    /// The node this daemon runs under.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The daemon's name (its spec's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reports whether the daemon is healthy. A daemon whose spec has a health timeout
    /// must report more often than that, or the node restarts it.
    pub fn report_health(&mut self, healthy: bool) -> Result<(), SdkError> {
        self.call(&ToNode::Health { healthy })
    }

    /// Reports load in thousandths of full; a saturated node gets no new pulls until it cools.
    pub fn report_saturation(&mut self, permille: u16) -> Result<(), SdkError> {
        self.call(&ToNode::Saturation { permille: permille.min(1000) })
    }

    /// Adds labels to the node's capability set (a new version forked from the current one).
    pub fn publish_capabilities(&mut self, labels: &[&str]) -> Result<(), SdkError> {
        self.call(&ToNode::Capabilities { labels: labels.iter().map(|label| label.to_string()).collect() })
    }

    /// Waits for the next control event.
    pub fn next_control(&mut self) -> Result<Control, SdkError> {
        loop {
            if let Some(control) = self.next_control_timeout(Duration::from_secs(3600))? {
                return Ok(control);
            }
        }
    }

    /// Waits up to `timeout` for the next control event; `None` when none came.
    pub fn next_control_timeout(&mut self, timeout: Duration) -> Result<Option<Control>, SdkError> {
        if let Some(control) = self.controls.pop_front() {
            return Ok(Some(control));
        }
        if self.stale {
            self.reconnect()?;
        }
        let deadline = deadline_after(timeout);
        loop {
            match self.read_message(deadline) {
                Ok(Some(ToDaemon::Control(control))) => return Ok(Some(control)),
                Ok(Some(other)) => {
                    return Err(SdkError::Rejected(format!("unexpected answer with no call waiting: {other:?}")))
                }
                Ok(None) => return Ok(None),
                Err(SdkError::SocketGone { .. }) => {
                    // The node went away: wait for it to come back, then listen again.
                    self.reconnect()?;
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(error) => {
                    self.stale |= matches!(error, SdkError::Protocol(_));
                    return Err(error);
                }
            }
        }
    }

    /// Tells the node the daemon is exiting on purpose now, then closes the connection.
    pub fn graceful_shutdown(mut self) -> Result<(), SdkError> {
        self.call(&ToNode::ShuttingDown)
    }

    fn hello(&mut self) -> Result<(), SdkError> {
        let answer = self.exchange(&ToNode::Hello { token: self.options.token.clone() })?;
        match answer {
            ToDaemon::Welcome { node, daemon } => {
                self.node = node;
                self.name = daemon;
                Ok(())
            }
            ToDaemon::Rejected { reason } => Err(SdkError::Rejected(reason)),
            other => Err(SdkError::Rejected(format!("unexpected answer to hello: {other:?}"))),
        }
    }

    fn reconnect(&mut self) -> Result<(), SdkError> {
        let deadline = Instant::now() + self.options.reconnect_wait;
        loop {
            match connect(&self.options.socket) {
                Ok(stream) => {
                    self.stream = stream;
                    self.input.clear();
                    self.stale = false;
                    return self.hello();
                }
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends a request and waits for its `Ok` (reconnecting once if the node went away).
    fn call(&mut self, message: &ToNode) -> Result<(), SdkError> {
        if self.stale {
            self.reconnect()?;
        }
        let answer = match self.exchange(message) {
            Err(SdkError::SocketGone { .. }) => {
                self.reconnect()?;
                self.exchange(message)?
            }
            other => other?,
        };
        match answer {
            ToDaemon::Ok => Ok(()),
            ToDaemon::Rejected { reason } => Err(SdkError::Rejected(reason)),
            other => Err(SdkError::Rejected(format!("unexpected answer: {other:?}"))),
        }
    }

    /// Sends one request and returns the answer, keeping control events for later.
    fn exchange(&mut self, message: &ToNode) -> Result<ToDaemon, SdkError> {
        self.output.clear();
        proto::encode_to_node(message, &mut self.output)?;
        let socket = &self.options.socket;
        self.stream.write_all(&self.output).map_err(|source| SdkError::SocketGone { path: socket.clone(), source })?;
        let deadline = deadline_after(self.options.call_timeout);
        loop {
            match self.read_message(deadline) {
                Ok(Some(ToDaemon::Control(control))) => self.controls.push_back(control),
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => {
                    self.stale = true;
                    return Err(SdkError::TimedOut(self.options.call_timeout));
                }
                Err(error) => {
                    self.stale = matches!(error, SdkError::Protocol(_));
                    return Err(error);
                }
            }
        }
    }

    /// Reads one message, or `None` at the deadline (a partial frame is kept).
    fn read_message(&mut self, deadline: Instant) -> Result<Option<ToDaemon>, SdkError> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((body, consumed)) = proto::split_frame(&self.input)? {
                let message = proto::decode_to_daemon(body)?;
                self.input.drain(..consumed);
                return Ok(Some(message));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let gone = |source| SdkError::SocketGone { path: self.options.socket.clone(), source };
            self.stream.set_read_timeout(Some(left.max(Duration::from_millis(1)))).map_err(gone)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    let source = std::io::Error::new(ErrorKind::UnexpectedEof, "the node closed the connection");
                    return Err(SdkError::SocketGone { path: self.options.socket.clone(), source });
                }
                Ok(read) => self.input.extend_from_slice(&chunk[..read]),
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(source) => return Err(SdkError::SocketGone { path: self.options.socket.clone(), source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The SDK against a scripted node on a real Unix socket: typed errors,
    //! reconnection, control events kept while a call waits.
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted node: reads one request per step and answers with the step's replies.
    fn node(listener: UnixListener, script: Vec<Vec<Vec<ToDaemon>>>) -> std::thread::JoinHandle<Vec<ToNode>> {
        std::thread::spawn(move || {
            let mut heard = Vec::new();
            let connections = script.len();
            for (index, connection) in script.into_iter().enumerate() {
                let (mut stream, _) = listener.accept().unwrap();
                let mut input = Vec::new();
                for replies in connection {
                    let message = loop {
                        if let Some((body, consumed)) = proto::split_frame(&input).unwrap() {
                            let message = proto::decode_to_node(body).unwrap();
                            input.drain(..consumed);
                            break message;
                        }
                        let mut chunk = [0u8; 256];
                        let read = stream.read(&mut chunk).unwrap();
                        assert!(read > 0, "the daemon hung up early");
                        input.extend_from_slice(&chunk[..read]);
                    };
                    heard.push(message);
                    let mut out = Vec::new();
                    for reply in replies {
                        proto::encode_to_daemon(&reply, &mut out).unwrap();
                    }
                    stream.write_all(&out).unwrap();
                }
                if index + 1 == connections {
                    // The last connection stays open (silent) past any call timeout.
                    std::thread::sleep(Duration::from_millis(800));
                }
                // Dropping the stream here is the node going away.
            }
            heard
        })
    }

    fn options(path: &Path) -> Options {
        Options {
            socket: path.to_path_buf(),
            token: "t0k3n".to_string(),
            call_timeout: Duration::from_millis(500),
            reconnect_wait: Duration::from_secs(2),
        }
    }

    /// A fresh socket path in a directory of its own (std only: no tempfile here).
    fn socket_path(test: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("meshos-sdk-{test}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("node.sock");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    fn welcome() -> ToDaemon {
        ToDaemon::Welcome { node: "node-1".into(), daemon: "web".into() }
    }

    #[test]
    fn calls_reconnect_after_the_node_goes_away_and_keep_control_events() {
        let (dir, path) = socket_path("reconnect");
        let listener = UnixListener::bind(&path).unwrap();
        let script = vec![
            // First connection: welcome, then a health report answered after a control event.
            vec![vec![welcome()], vec![ToDaemon::Control(Control::ReloadConfig), ToDaemon::Ok]],
            // The node came back: welcome again, then the retried call.
            vec![vec![welcome()], vec![ToDaemon::Ok]],
        ];
        let server = node(listener, script);
        let mut daemon = register_daemon_with(options(&path)).unwrap();
        assert_eq!((daemon.node(), daemon.name()), ("node-1", "web"));
        daemon.report_health(true).unwrap();
        // The node closed the first connection: this call reconnects and is answered.
        daemon.report_saturation(2_000).unwrap();
        assert_eq!(daemon.next_control_timeout(Duration::ZERO).unwrap(), Some(Control::ReloadConfig), "kept");
        drop(daemon);
        let heard = server.join().unwrap();
        let hello = ToNode::Hello { token: "t0k3n".into() };
        let expected =
            vec![hello.clone(), ToNode::Health { healthy: true }, hello, ToNode::Saturation { permille: 1000 }];
        assert_eq!(heard, expected, "saturation is capped at 1000");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_failure_is_a_typed_error() {
        let (dir, path) = socket_path("errors");
        let error = register_daemon_with(options(&path)).err().expect("nobody listens");
        assert!(matches!(error, SdkError::SocketGone { .. }), "{error}");

        let listener = UnixListener::bind(&path).unwrap();
        let refused = vec![vec![vec![ToDaemon::Rejected { reason: "unknown token".into() }]]];
        let server = node(listener.try_clone().unwrap(), refused);
        let error = register_daemon_with(options(&path)).err().expect("refused");
        assert!(matches!(&error, SdkError::Rejected(reason) if reason == "unknown token"), "{error}");
        server.join().unwrap();

        // Welcome, then silence: the call times out.
        let silent = vec![vec![vec![welcome()], vec![]]];
        let server = node(listener, silent);
        let mut daemon = register_daemon_with(options(&path)).unwrap();
        let error = daemon.report_health(true).expect_err("no answer");
        assert!(matches!(error, SdkError::TimedOut(_)), "{error}");
        drop(daemon);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
