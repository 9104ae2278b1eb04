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
//! Invariants: a copy is announced healthy only after its bytes were checked and
//! stored; a blob not in the log's tables is never fetched; this module only emits
//! events (reconcile decides), and never deletes a copy it was not told to.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::action::{Action, ActionKind};
use crate::event::{ActionId, BlobHash, EventKind, Outcome, ReplicaState};
use crate::exec::blobstore::BlobStore;
use crate::state::ids::NodeRow;
use crate::state::State;
use crate::sys::peer_server::{self, RateLimit};

#[derive(Debug, Clone)]
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
}

/// One unit of work for a worker thread.
enum Job {
    /// Fetch `blob` from the first of `holders` (peer ports) that delivers it whole.
    Fetch {
        action: ActionId,
        blob: BlobHash,
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
}

pub struct BlobExecutor {
    config: BlobExecConfig,
    store: Arc<BlobStore>,
    limit: Arc<RateLimit>,
    queue: VecDeque<Job>,
    running: u32,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// Set to stop the background verifier.
    verifier_stop: Arc<std::sync::atomic::AtomicBool>,
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
            verifier_stop,
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

    /// Carries out one of this node's actions (non-blob actions are ignored here).
    pub fn dispatch(&mut self, state: &State, action: &Action, out: &mut Vec<EventKind>) {
        let Some(blob_row) = action.kind.blob() else { return };
        let blob = state.blobs.hash[blob_row.index()];
        match action.kind {
            ActionKind::PullReplica { source: first, .. } | ActionKind::MigrateBlob { from: first, .. } => {
                let holders = holders(state, blob_row, first, action.node);
                self.queue.push_back(Job::Fetch { action: action.id, blob, holders });
            }
            ActionKind::VerifyReplica { .. } => self.queue.push_back(Job::Verify { action: action.id, blob }),
            ActionKind::DropReplica { .. } => {
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
            let (store, limit, done) = (Arc::clone(&self.store), Arc::clone(&self.limit), self.done_tx.clone());
            let (timeout, bytes_max) =
                (Duration::from_millis(self.config.fetch_timeout_ms as u64), self.config.blob_bytes_max);
            let spawned = std::thread::Builder::new().name("meshos-blob".to_string()).spawn(move || {
                let _ = done.send(run_job(job, &store, &limit, timeout, bytes_max));
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
        while let Ok(done) = self.done_rx.try_recv() {
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
            match done {
                Done::Fetched { action, blob, bytes } => {
                    self.stats.fetched += 1;
                    self.stats.fetched_bytes += bytes;
                    out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy });
                    out.push(outcome(action, Ok(())));
                }
                Done::FetchFailed { action, reason } => {
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
                Done::Scanned { .. } => unreachable!("handled above"),
                Done::VerifyFailed { action, blob, reason } => {
                    // Unreadable is as good as corrupt: it cannot serve anyone.
                    self.stats.corrupt += 1;
                    out.push(EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt });
                    out.push(outcome(action, Err(reason)));
                }
            }
        }
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

fn run_job(job: Job, store: &BlobStore, limit: &RateLimit, timeout: Duration, bytes_max: u64) -> Done {
    match job {
        Job::Fetch { action, blob, holders } => {
            if store.contains(&blob) && store.verify(&blob, &mut |_| {}).unwrap_or(false) {
                let bytes = store.size_of(&blob).unwrap_or(0);
                return Done::Fetched { action, blob, bytes };
            }
            let mut errors = Vec::new();
            for (name, endpoint) in holders {
                let attempt = peer_server::fetch(&endpoint, &blob, timeout)
                    .map_err(|error| error.to_string())
                    .and_then(|(size, mut reader)| {
                        if size > bytes_max {
                            return Err(format!("{size} bytes, above blob_bytes_max {bytes_max}"));
                        }
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
            Done::FetchFailed { action, reason: errors.join("; ") }
        }
        Job::Verify { action, blob } => match store.verify(&blob, &mut |bytes| limit.take(bytes)) {
            Ok(healthy) => Done::Verified { action, blob, healthy },
            Err(error) => Done::VerifyFailed { action, blob, reason: error.to_string() },
        },
    }
}
