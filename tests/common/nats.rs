//! A real nats-server cluster on loopback for tests: 1 to N servers with JetStream,
//! free ports, temporary store directories, `max_payload: 8MB`, readiness by
//! `/healthz` (which says ok only once the server has a meta leader and every replica
//! it hosts is current), SIGKILL and restart of one server. Dropping the cluster
//! kills every server and removes the directories.
//!
//! A machine without nats-server skips: `NatsCluster::start` prints why and returns
//! `None`, and the test returns early.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to report healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

struct Server {
    name: String,
    client_port: u16,
    http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running set of nats-server processes.
pub struct NatsCluster {
    binary: PathBuf,
    servers: Vec<Server>,
    dir: tempfile::TempDir,
}

/// The nats-server binary: `MESHOS_NATS_SERVER` when set (CI sets it: then a missing
/// binary fails the test instead of skipping it), else on PATH, or where Debian
/// installs it.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Some(required) = std::env::var_os("MESHOS_NATS_SERVER") {
        let required = PathBuf::from(required);
        assert!(
            required.is_file(),
            "MESHOS_NATS_SERVER={} is not a file: the cluster tests must run",
            required.display()
        );
        return Some(required);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

/// Distinct loopback ports that were free a moment ago (bound to port 0, released).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port")).collect();
    listeners.iter().map(|listener| listener.local_addr().expect("local address").port()).collect()
}

/// `GET path` over plain HTTP/1.0: `(status code, body)`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

impl NatsCluster {
    /// Starts `servers` servers (a cluster when more than one) and waits until all are
    /// healthy; `None` (with a message) when nats-server is not installed.
    pub fn start(servers: usize) -> Option<NatsCluster> {
        assert!(servers >= 1);
        let Some(binary) = nats_server_binary() else {
            eprintln!("skipping: nats-server not found on PATH (apt-get install nats-server)");
            return None;
        };
        // Ports can be taken between release and bind: try a few times.
        for attempt in 1..=3 {
            match NatsCluster::try_start(&binary, servers) {
                Ok(cluster) => return Some(cluster),
                Err(error) if attempt < 3 => eprintln!("nats cluster start failed ({error}); retrying"),
                Err(error) => panic!("cannot start a nats cluster of {servers}: {error}"),
            }
        }
        unreachable!()
    }

    fn try_start(binary: &Path, count: usize) -> Result<NatsCluster, String> {
        let dir = tempfile::Builder::new().prefix("meshos-nats").tempdir().map_err(|e| e.to_string())?;
        let ports = free_ports(count * 3);
        let routes: Vec<String> =
            (0..count).map(|i| format!("nats-route://127.0.0.1:{}", ports[count * 2 + i])).collect();
        let mut servers = Vec::new();
        for i in 0..count {
            let name = format!("n{}", i + 1);
            let (client_port, http_port, cluster_port) = (ports[i], ports[count + i], ports[count * 2 + i]);
            let store = dir.path().join(&name);
            let mut text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n\
                 max_payload: 8MB\njetstream {{\n  store_dir: {}\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}}\n",
                store.display()
            );
            if count > 1 {
                text += &format!(
                    "cluster {{\n  name: meshos\n  listen: 127.0.0.1:{cluster_port}\n  routes: [\n    {}\n  ]\n}}\n",
                    routes.join("\n    ")
                );
            }
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).map_err(|e| e.to_string())?;
            let log = dir.path().join(format!("{name}.log"));
            servers.push(Server { name, client_port, http_port, config, log, child: None });
        }
        let mut cluster = NatsCluster { binary: binary.to_path_buf(), servers, dir };
        for i in 0..count {
            cluster.spawn(i)?;
        }
        for i in 0..count {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let server = &mut self.servers[i];
        assert!(server.child.is_none(), "{} is running", server.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&server.log).map_err(|e| e.to_string())?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|error| format!("spawn {}: {error}", self.binary.display()))?;
        server.child = Some(child);
        Ok(())
    }

    /// Waits until server `i` answers `/healthz` with status ok.
    pub fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            let server = &mut self.servers[i];
            if let Some(child) = server.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    server.child = None;
                    return Err(format!("{} exited ({status}); log: {}", server.name, server.log.display()));
                }
            }
            if let Some((200, body)) = http_get(server.http_port, "/healthz") {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if json["status"] == "ok" {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not healthy after {HEALTHY_TIMEOUT:?}; log: {}",
                    server.name,
                    server.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:port` of every server's client listener, in server order.
    pub fn client_urls(&self) -> Vec<String> {
        self.servers.iter().map(|server| format!("127.0.0.1:{}", server.client_port)).collect()
    }

    /// The server name (`n1`, `n2`, ...) of server `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// Server `i` dies with SIGKILL (no shutdown, no flush).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again with its store and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i).expect("restart the server");
        self.wait_healthy(i).expect("the restarted server becomes healthy");
    }

    /// Every server dies with SIGKILL, then, while all are down, `between` runs on
    /// the directory holding their stores (`n1/`, `n2/`, ...), then all start again and
    /// the call waits until all are healthy. Copying the stores aside at one crash and
    /// back at the next makes the stream lose its tail, as a crash of every server
    /// before its fsync can.
    pub fn crash_all_with(&mut self, between: impl FnOnce(&Path)) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        between(self.dir.path());
        for i in 0..self.servers.len() {
            self.spawn(i).expect("restart a server");
        }
        for i in 0..self.servers.len() {
            self.wait_healthy(i).expect("a restarted server becomes healthy");
        }
    }

    /// Kills every server with SIGKILL, starts them all again and waits until all are
    /// healthy (a clustered server needs a quorum back to become healthy).
    pub fn restart_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        for i in 0..self.servers.len() {
            self.spawn(i).expect("restart a server");
        }
        for i in 0..self.servers.len() {
            self.wait_healthy(i).expect("a restarted server becomes healthy");
        }
    }

    /// The index of the server leading `stream`, from the `/jsz` of any running server
    /// that hosts a replica; `None` while there is no leader.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for server in self.servers.iter().filter(|server| server.child.is_some()) {
            let Some((200, body)) = http_get(server.http_port, "/jsz?streams=true") else { continue };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
            let accounts = json["account_details"].as_array().cloned().unwrap_or_default();
            for account in accounts {
                for detail in account["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if detail["name"] == stream {
                        let leader = detail["cluster"]["leader"].as_str().unwrap_or_default();
                        if let Some(index) = self.servers.iter().position(|server| server.name == leader) {
                            return Some(index);
                        }
                    }
                }
            }
        }
        None
    }

    /// The stream's first sequence (above 1 once purged), from the `/jsz` of any
    /// running server that hosts it.
    pub fn stream_first_seq(&self, stream: &str) -> Option<u64> {
        for server in self.servers.iter().filter(|server| server.child.is_some()) {
            let Some((200, body)) = http_get(server.http_port, "/jsz?streams=true") else { continue };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
            for account in json["account_details"].as_array().cloned().unwrap_or_default() {
                for detail in account["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if detail["name"] == stream {
                        if let Some(first) = detail["state"]["first_seq"].as_u64() {
                            return Some(first);
                        }
                    }
                }
            }
        }
        None
    }

    /// The index of the server hosting the consumer named `consumer` of `stream`
    /// (its leader, for an R1 consumer its only host), from `/jsz`.
    pub fn consumer_host(&self, stream: &str, consumer: &str) -> Option<usize> {
        for server in self.servers.iter().filter(|server| server.child.is_some()) {
            let Some((200, body)) = http_get(server.http_port, "/jsz?streams=true&consumers=true") else { continue };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
            for account in json["account_details"].as_array().cloned().unwrap_or_default() {
                for detail in account["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if detail["name"] != stream {
                        continue;
                    }
                    for found in detail["consumer_detail"].as_array().cloned().unwrap_or_default() {
                        if found["name"] != consumer {
                            continue;
                        }
                        // A clustered consumer names its leader; a single server hosts it itself.
                        let host = found["cluster"]["leader"].as_str().unwrap_or(&server.name).to_string();
                        if let Some(index) = self.servers.iter().position(|server| server.name == host) {
                            return Some(index);
                        }
                    }
                }
            }
        }
        None
    }

    /// The names of the consumers of `stream` that any running server reports.
    pub fn consumer_names(&self, stream: &str) -> Vec<String> {
        let mut names = Vec::new();
        for server in self.servers.iter().filter(|server| server.child.is_some()) {
            let Some((200, body)) = http_get(server.http_port, "/jsz?streams=true&consumers=true") else { continue };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&body) else { continue };
            for account in json["account_details"].as_array().cloned().unwrap_or_default() {
                for detail in account["stream_detail"].as_array().cloned().unwrap_or_default() {
                    if detail["name"] == stream {
                        for found in detail["consumer_detail"].as_array().cloned().unwrap_or_default() {
                            if let Some(name) = found["name"].as_str() {
                                if !names.iter().any(|known| known == name) {
                                    names.push(name.to_string());
                                }
                            }
                        }
                    }
                }
            }
        }
        names
    }

    /// The directory holding configs, logs and stores.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test.
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temporary directory"));
            eprintln!("nats logs kept in {}", kept.keep().display());
        }
    }
}
