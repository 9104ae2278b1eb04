//! The blob executor: carries out this node's blob actions against its store and its
//! peers, and reports what happened as events.
//!
//! - Pull and migrate: fetch the blob from the node the action names (its peer port,
//!   from its capability), then from every other node the log says holds a healthy
//!   copy, until one arrives whose bytes hash to the blob's name; it is stored
//!   (temporary file, fsync, rename) and only then announced: `ReplicaUpdate
//!   Healthy`, then the outcome. When no holder delivers, the outcome is a failure
//!   naming each holder's error (fold backs the blob off).
//! - Drop: delete the local copy, `ReplicaUpdate Deleted`, outcome.
//! - Verify: re-hash the local copy, `Healthy` or `Corrupt`, outcome.
//!
//! Transfers and verifications run on worker threads, at most `transfers_max` at
//! once (further actions wait in a queue, in order); received bytes pass the node's
//! shared rate limit. Results come back on a channel the node loop drains.
//!
//! Fetches run over the secure channel (`sys::secure`, through `sys::peer_server`):
//! this node proves its identity (`secure`) and each holder must prove it is the node
//! the log names. A holder that refuses this node's identity, or is not who the log
//! says, is logged by name, counted (`credential_failures`) and treated as a failed
//! source: the next holder is tried.
//!
//! Level-triggered inventory (at start and after each background verification pass):
//! copies the log calls healthy whose file is gone are reported `Deleted`; stored
//! copies of known blobs the log has no copy of on this node (an announcement lost,
//! say with the tail of a cluster's log) are announced `Healthy` again; and the
//! digest of what is on disk is reported (`InventoryDigest`; a mismatch with the log's
//! view makes fold queue this node's copies for verification).
//!
//! (A re-announced copy's bytes were checked when it was stored: the store keeps a
//! file only under the hash of its bytes; rot since then is the verifier's to find.)
//!
//! Invariants: a copy is announced healthy only after its bytes were checked and
//! stored (the bytes must hash to the blob's name, whoever served them); a blob not
//! in the log's tables is never fetched; this module only emits events (reconcile
//! decides), and never deletes a copy it was not told to.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::action::{Action, ActionKind};
use crate::event::{ActionId, BlobHash, EventKind, Outcome, ReplicaState};
use crate::exec::blobstore::BlobStore;
use crate::state::ids::NodeRow;
use crate::state::State;
use crate::sys::peer_server::{self, RateLimit};
use crate::sys::secure::SecureConfig;

#[derive(Clone)]
pub struct BlobExecConfig {
    /// Transfers and verifications running at once.
    pub transfers_max: u32,
    /// Connect and read timeout of one fetch.
    pub fetch_timeout_ms: u32,
    /// Largest blob accepted from a peer.
    pub blob_bytes_max: u64,
    /// Bytes per second received in total (0: no limit).
    pub receive_bytes_per_s: u64,
    /// Anti-entropy: the background verifier re-hashes every stored blob at most at
    /// this rate (0: no background verification), one pass per `verify_pass_ms`.
    pub verify_bytes_per_s: u64,
    pub verify_pass_ms: u32,
    /// This node's identity, its cluster and the admitted keys, for the secure channel.
    pub secure: Arc<SecureConfig>,
}

impl std::fmt::Debug for BlobExecConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobExecConfig")
            .field("transfers_max", &self.transfers_max)
            .field("fetch_timeout_ms", &self.fetch_timeout_ms)
            .field("blob_bytes_max", &self.blob_bytes_max)
            .field("receive_bytes_per_s", &self.receive_bytes_per_s)
            .field("verify_bytes_per_s", &self.verify_bytes_per_s)
            .field("verify_pass_ms", &self.verify_pass_ms)
            .field("secure", &self.secure)
            .finish()
    }
}

#[derive(Debug, Default, Clone)]
pub struct BlobExecStats {
    pub fetched: u64,
    pub fetched_bytes: u64,
    pub fetch_failures: u64,
    pub deleted: u64,
    pub verified: u64,
    pub corrupt: u64,
    /// Blobs the background verifier re-hashed, and found corrupt.
    pub background_verified: u64,
    pub background_corrupt: u64,
    /// Copies the log called healthy whose file was gone.
    pub missing: u64,
    /// Stored copies the log knew nothing of, announced again (level-triggered inventory).
    pub reannounced: u64,
    /// Fetch attempts that failed on an identity (the holder refused this node's, or
    /// did not prove it is the node the log names).
    pub credential_failures: u64,
}

/// One unit of work for a worker thread.
enum Job {
    /// Fetch `blob` from the first of `holders` (peer ports) that delivers it whole.
    Fetch {
        action: ActionId,
        blob: BlobHash,
        /// The blob's size as the log knows it: a peer announcing another is refused.
        size_bytes: u64,
        holders: Vec<(String, String)>,
    },
    Verify {
        action: ActionId,
        blob: BlobHash,
    },
}

/// What a worker reports.
enum Done {
    Fetched {
        action: ActionId,
        blob: BlobHash,
        bytes: u64,
    },
    FetchFailed {
        action: ActionId,
        blob: BlobHash,
        reason: String,
    },
    Verified {
        action: ActionId,
        blob: BlobHash,
        healthy: bool,
    },
    VerifyFailed {
        action: ActionId,
        blob: BlobHash,
        reason: String,
    },
    /// The background verifier re-hashed a stored blob.
    Scanned {
        blob: BlobHash,
        healthy: bool,
    },
    /// The background verifier finished a pass over the store.
    PassEnded,
}

impl Done {
    fn action(&self) -> Option<ActionId> {
        match self {
            Done::Fetched { action, .. }
            | Done::FetchFailed { action, .. }
            | Done::Verified { action, .. }
            | Done::VerifyFailed { action, .. } => Some(*action),
            Done::Scanned { .. } | Done::PassEnded => None,
        }
    }
}

fn cancelled(action: ActionId, reason: &str) -> EventKind {
    EventKind::ActionOutcome { action, outcome: Outcome::Cancelled { reason: reason.to_string() } }
}

pub struct BlobExecutor {
    config: BlobExecConfig,
    store: Arc<BlobStore>,
    limit: Arc<RateLimit>,
    queue: VecDeque<Job>,
    running: u32,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// Jobs running per blob, and blobs dropped while a job on them ran.
    running_blobs: std::collections::HashMap<BlobHash, u32>,
    dropped_while_running: std::collections::HashSet<BlobHash>,
    /// Copies announced again whose announcement the log has not shown yet: not
    /// announced twice (the log may lag by a pass).
    reannounced: std::collections::HashSet<BlobHash>,
    /// The node is stopping: new blob actions stay unanswered (the next run cancels them).
    stopping: bool,
    /// The first poll compares the log with the store (copies it lost while down).
    checked_at_start: bool,
    /// Set to stop the background verifier.
    verifier_stop: Arc<std::sync::atomic::AtomicBool>,
    /// Credential failures counted by the workers (copied into `stats` on `poll`).
    credential_failures: Arc<AtomicU64>,
    pub stats: BlobExecStats,
}

impl Drop for BlobExecutor {
    fn drop(&mut self) {
        self.verifier_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The background verifier: passes over the store, re-hashing each blob through its
/// own rate limit, reporting each result; sleeps between passes.
fn start_verifier(
    store: Arc<BlobStore>,
    bytes_per_s: u64,
    pass: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Sender<Done>,
) {
    let stopped = move || stop.load(std::sync::atomic::Ordering::Relaxed);
    let spawned = std::thread::Builder::new().name("meshos-verifier".to_string()).spawn(move || {
        let limit = RateLimit::new(bytes_per_s);
        while !stopped() {
            let started = std::time::Instant::now();
            for blob in store.list().unwrap_or_default() {
                if stopped() {
                    return;
                }
                // A blob deleted meanwhile is not reported.
                if let Ok(healthy) = store.verify(&blob, &mut |bytes| limit.take(bytes)) {
                    if done.send(Done::Scanned { blob, healthy }).is_err() {
                        return;
                    }
                }
            }
            if done.send(Done::PassEnded).is_err() {
                return;
            }
            while !stopped() && started.elapsed() < pass {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!("no background verification: {error}");
    }
}

impl BlobExecutor {
    pub fn new(config: BlobExecConfig, store: Arc<BlobStore>) -> BlobExecutor {
        assert!(config.transfers_max > 0, "at least one transfer at a time");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let limit = Arc::new(RateLimit::new(config.receive_bytes_per_s));
        let verifier_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if config.verify_bytes_per_s > 0 {
            let pass = Duration::from_millis(config.verify_pass_ms as u64);
            start_verifier(
                Arc::clone(&store),
                config.verify_bytes_per_s,
                pass,
                Arc::clone(&verifier_stop),
                done_tx.clone(),
            );
        }
        BlobExecutor {
            config,
            store,
            limit,
            queue: VecDeque::new(),
            running: 0,
            done_tx,
            done_rx,
            running_blobs: std::collections::HashMap::new(),
            dropped_while_running: std::collections::HashSet::new(),
            reannounced: std::collections::HashSet::new(),
            stopping: false,
            checked_at_start: false,
            verifier_stop,
            credential_failures: Arc::new(AtomicU64::new(0)),
            stats: BlobExecStats::default(),
        }
    }

    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// Jobs queued or running.
    pub fn busy(&self) -> usize {
        self.queue.len() + self.running as usize
    }

    /// The node stops: blob actions dispatched from now on stay unanswered (an answer
    /// could no longer reach the log; the next run cancels them).
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// At node start: blob actions the log still has in flight for this node are from
    /// a previous run; they are cancelled (whatever they did is found by the store check).
    pub fn adopt_nothing(&self, state: &State, own: Option<NodeRow>, out: &mut Vec<EventKind>) {
        let Some(own) = own else { return };
        for entry in state.inflight.entries.iter() {
            if entry.action.node == own && entry.action.kind.blob().is_some() && entry.action.kind.is_tracked() {
                out.push(cancelled(entry.action.id, "the node restarted before the action finished"));
            }
        }
    }

    /// Reports `Deleted` for every copy the log says `own` holds healthy whose file is
    /// gone (lost while the node was down, or by hand): it must not count.
    fn report_missing(&mut self, state: &State, own: Option<NodeRow>, out: &mut Vec<EventKind>) {
        let Some(own) = own else { return };
        for &replica in &state.nodes.replica_rows[own.index()] {
            let index = replica.index();
            let blob = state.blobs.hash[state.replicas.blob[index].index()];
            let busy = self.running_blobs.contains_key(&blob);
            if state.replicas.state[index] == ReplicaState::Healthy && !busy && !self.store.contains(&blob) {
                self.stats.missing += 1;
                tracing::warn!(
                    blob = crate::exec::blobstore::hex(&blob),
                    "a copy the log calls healthy is not on disk"
                );
                out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Deleted });
            }
        }
        self.announce_inventory(state, own, out);
    }

    /// Level-triggered inventory: re-announces as healthy every stored copy of a known
    /// blob that the log has no copy of on this node at all (its announcement was lost,
    /// say with the tail of a cluster's log), and reports the digest of what is on disk
    /// (a mismatch with the log's view makes fold queue this node's copies for
    /// verification). Copies with a job running are left to the job.
    fn announce_inventory(&mut self, state: &State, own: NodeRow, out: &mut Vec<EventKind>) {
        let stored = match self.store.list() {
            Ok(stored) => stored,
            Err(error) => return tracing::warn!("inventory: {error}"),
        };
        let (mut count, mut digest) = (0u32, 0u128);
        for blob in stored {
            let Some(row) = state.blobs.find(&blob) else { continue };
            if self.running_blobs.contains_key(&blob) {
                continue;
            }
            let replica = state.replicas.find(row, own);
            if replica.is_some() {
                self.reannounced.remove(&blob);
            } else if self.reannounced.insert(blob) {
                self.stats.reannounced += 1;
                tracing::info!(
                    blob = crate::exec::blobstore::hex(&blob),
                    "a stored copy the log does not know of: announcing it"
                );
                out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy });
            }
            count += 1;
            digest = digest.wrapping_add(u128::from_le_bytes(blob[..16].try_into().expect("16 bytes")));
        }
        out.push(EventKind::InventoryDigest { blob_count: count, digest: digest.to_le_bytes() });
    }

    /// Carries out one of this node's actions (non-blob actions are ignored here).
    pub fn dispatch(&mut self, state: &State, action: &Action, out: &mut Vec<EventKind>) {
        let Some(blob_row) = action.kind.blob() else { return };
        if self.stopping {
            return;
        }
        let blob = state.blobs.hash[blob_row.index()];
        match action.kind {
            ActionKind::PullReplica { source: first, .. } | ActionKind::MigrateBlob { from: first, .. } => {
                let holders = holders(state, blob_row, first, action.node);
                let size_bytes = state.blobs.size_bytes[blob_row.index()];
                self.queue.push_back(Job::Fetch { action: action.id, blob, size_bytes, holders });
            }
            ActionKind::VerifyReplica { .. } => self.queue.push_back(Job::Verify { action: action.id, blob }),
            ActionKind::DropReplica { .. } => {
                // Jobs on this blob still queued end now; one running reports nothing
                // about the copy when it ends (its verdict would be about bytes that
                // are gone: a deleted copy must never come back as healthy).
                let mut kept = VecDeque::with_capacity(self.queue.len());
                for job in self.queue.drain(..) {
                    match job {
                        Job::Fetch { action, blob: queued, .. } | Job::Verify { action, blob: queued }
                            if queued == blob =>
                        {
                            out.push(cancelled(action, "the copy was dropped"))
                        }
                        job => kept.push_back(job),
                    }
                }
                self.queue = kept;
                if self.running_blobs.contains_key(&blob) {
                    self.dropped_while_running.insert(blob);
                }
                let (update, result) = match self.store.delete(&blob) {
                    Ok(()) => {
                        self.stats.deleted += 1;
                        (Some(ReplicaState::Deleted), Ok(()))
                    }
                    Err(error) => (None, Err(error.to_string())),
                };
                if let Some(state) = update {
                    out.push(EventKind::ReplicaUpdate { blob, state });
                }
                out.push(outcome(action.id, result));
            }
            // Advisory actions about a blob take effect in the state; nothing to run.
            _ => {}
        }
        self.start_queued();
    }

    fn start_queued(&mut self) {
        while self.running < self.config.transfers_max {
            let Some(job) = self.queue.pop_front() else { return };
            self.running += 1;
            let blob = match &job {
                Job::Fetch { blob, .. } | Job::Verify { blob, .. } => *blob,
            };
            *self.running_blobs.entry(blob).or_insert(0) += 1;
            let (store, done) = (Arc::clone(&self.store), self.done_tx.clone());
            let fetcher = Fetcher {
                limit: Arc::clone(&self.limit),
                timeout: Duration::from_millis(self.config.fetch_timeout_ms as u64),
                bytes_max: self.config.blob_bytes_max,
                secure: Arc::clone(&self.config.secure),
                credential_failures: Arc::clone(&self.credential_failures),
            };
            let spawned = std::thread::Builder::new().name("meshos-blob".to_string()).spawn(move || {
                let _ = done.send(run_job(job, &store, &fetcher));
            });
            if let Err(error) = spawned {
                // No thread: the job is lost; say so (the action times out in the log).
                tracing::error!("cannot start a blob worker: {error}");
                self.running -= 1;
                return;
            }
        }
    }

    /// Collects finished jobs as events and starts queued ones. The background
    /// verifier's finds are reported only for copies the log says `own` holds healthy
    /// (a corrupt copy the log already knows, or a file it never heard of, says nothing).
    pub fn poll(&mut self, state: &State, own: Option<NodeRow>, out: &mut Vec<EventKind>) {
        if !self.checked_at_start && own.is_some() {
            self.checked_at_start = true;
            self.report_missing(state, own, out);
        }
        while let Ok(done) = self.done_rx.try_recv() {
            if let Done::PassEnded = done {
                self.report_missing(state, own, out);
                continue;
            }
            if let Done::Scanned { blob, healthy } = done {
                self.stats.background_verified += 1;
                let known_healthy = own
                    .zip(state.blobs.find(&blob))
                    .and_then(|(own, row)| state.replicas.find(row, own))
                    .is_some_and(|replica| state.replicas.state[replica.index()] == ReplicaState::Healthy);
                if !healthy && known_healthy {
                    self.stats.background_corrupt += 1;
                    tracing::warn!(blob = crate::exec::blobstore::hex(&blob), "background verification: corrupt copy");
                    out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt });
                }
                continue;
            }
            self.running -= 1;
            let blob = match &done {
                Done::Fetched { blob, .. } | Done::Verified { blob, .. } | Done::VerifyFailed { blob, .. } => {
                    Some(*blob)
                }
                Done::FetchFailed { blob, .. } => Some(*blob),
                Done::Scanned { .. } | Done::PassEnded => None,
            };
            if let Some(blob) = blob {
                let count = self.running_blobs.get_mut(&blob).expect("a running job counts its blob");
                *count -= 1;
                if *count == 0 {
                    self.running_blobs.remove(&blob);
                }
                let dropped = self.dropped_while_running.contains(&blob);
                if dropped && !self.running_blobs.contains_key(&blob) {
                    self.dropped_while_running.remove(&blob);
                }
                if dropped {
                    // The copy was dropped meanwhile: no verdict about it, only the end.
                    let action = done.action().expect("job results name their action");
                    out.push(cancelled(action, "the copy was dropped while this ran"));
                    continue;
                }
            }
            match done {
                Done::Fetched { action, blob, bytes } => {
                    self.stats.fetched += 1;
                    self.stats.fetched_bytes += bytes;
                    out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy });
                    out.push(outcome(action, Ok(())));
                }
                Done::FetchFailed { action, reason, .. } => {
                    self.stats.fetch_failures += 1;
                    tracing::warn!(position = action.position, index = action.index, "blob fetch failed: {reason}");
                    out.push(outcome(action, Err(reason)));
                }
                Done::Verified { action, blob, healthy } => {
                    self.stats.verified += 1;
                    self.stats.corrupt += !healthy as u64;
                    let state = if healthy { ReplicaState::Healthy } else { ReplicaState::Corrupt };
                    out.push(EventKind::ReplicaUpdate { blob, state });
                    out.push(outcome(action, Ok(())));
                }
                Done::Scanned { .. } | Done::PassEnded => unreachable!("handled above"),
                Done::VerifyFailed { action, blob, reason } => {
                    // Unreadable is as good as corrupt: it cannot serve anyone.
                    self.stats.corrupt += 1;
                    out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt });
                    out.push(outcome(action, Err(reason)));
                }
            }
        }
        // After the results: a worker counts before it reports.
        self.stats.credential_failures = self.credential_failures.load(Ordering::Relaxed);
        self.start_queued();
    }
}

fn outcome(action: ActionId, result: Result<(), String>) -> EventKind {
    let outcome = match result {
        Ok(()) => Outcome::Success,
        Err(reason) => Outcome::Failure { reason },
    };
    EventKind::ActionOutcome { action, outcome }
}

/// Where to fetch a blob from: the node the action names first, then every other node
/// the log says holds a healthy copy (never the executing node), live ones before the
/// rest, as (name, peer port).
fn holders(state: &State, blob: crate::state::ids::BlobRow, first: NodeRow, own: NodeRow) -> Vec<(String, String)> {
    let nodes = &state.nodes;
    let mut rows = vec![first];
    for &replica in &state.blobs.replica_rows[blob.index()] {
        let node = state.replicas.node[replica.index()];
        let healthy = state.replicas.state[replica.index()] == ReplicaState::Healthy;
        if healthy && node != own && !rows.contains(&node) {
            rows.push(node);
        }
    }
    rows[1..].sort_by_key(|row| !nodes.live[row.index()]);
    rows.into_iter()
        .filter(|row| !nodes.endpoint[row.index()].is_empty())
        .map(|row| (nodes.name[row.index()].to_string(), nodes.endpoint[row.index()].to_string()))
        .collect()
}

/// The slowest transfer rate a fetch may average before its deadline passes.
const FETCH_RATE_FLOOR_BYTES_PER_S: u64 = 64 * 1024;

/// A reader that fails once its deadline has passed.
struct DeadlineReader<R> {
    inner: R,
    deadline: std::time::Instant,
}

impl<R: std::io::Read> std::io::Read for DeadlineReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if std::time::Instant::now() > self.deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the transfer passed its deadline"));
        }
        self.inner.read(buffer)
    }
}

/// What a worker needs to fetch: limits, and who it is to the holders.
struct Fetcher {
    limit: Arc<RateLimit>,
    timeout: Duration,
    bytes_max: u64,
    secure: Arc<SecureConfig>,
    credential_failures: Arc<AtomicU64>,
}

fn run_job(job: Job, store: &BlobStore, fetcher: &Fetcher) -> Done {
    let Fetcher { ref limit, timeout, bytes_max, .. } = *fetcher;
    match job {
        Job::Fetch { action, blob, size_bytes, holders } => {
            if store.contains(&blob) && store.verify(&blob, &mut |_| {}).unwrap_or(false) {
                let bytes = store.size_of(&blob).unwrap_or(0);
                return Done::Fetched { action, blob, bytes };
            }
            let mut errors = Vec::new();
            for (name, endpoint) in holders {
                let attempt = peer_server::fetch(&endpoint, &blob, &fetcher.secure, Some(&name), timeout)
                    .map_err(|error| {
                        if error.is_credential() {
                            fetcher.credential_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                peer = name,
                                blob = crate::exec::blobstore::hex(&blob),
                                "blob fetch failed on an identity: {error}"
                            );
                        }
                        error.to_string()
                    })
                    .and_then(|(size, reader)| {
                        if size != size_bytes {
                            return Err(format!("announced {size} bytes; the log says {size_bytes}"));
                        }
                        if size > bytes_max {
                            return Err(format!("{size} bytes, above blob_bytes_max {bytes_max}"));
                        }
                        // The whole transfer has a deadline: the timeout plus the size at
                        // a floor rate, so a trickling peer cannot hold a slot for ever.
                        let deadline = std::time::Instant::now()
                            + timeout
                            + Duration::from_secs(size / FETCH_RATE_FLOOR_BYTES_PER_S);
                        let mut reader = DeadlineReader { inner: reader, deadline };
                        store
                            .put(&mut reader, Some(&blob), size, &mut |bytes| limit.take(bytes))
                            .map_err(|error| error.to_string())
                    });
                match attempt {
                    Ok((_, bytes)) => return Done::Fetched { action, blob, bytes },
                    Err(error) => errors.push(format!("{name}: {error}")),
                }
            }
            if errors.is_empty() {
                errors.push("no holder announces a peer port".to_string());
            }
            Done::FetchFailed { action, blob, reason: errors.join("; ") }
        }
        Job::Verify { action, blob } => match store.verify(&blob, &mut |bytes| limit.take(bytes)) {
            Ok(healthy) => Done::Verified { action, blob, healthy },
            Err(error) => Done::VerifyFailed { action, blob, reason: error.to_string() },
        },
    }
}
