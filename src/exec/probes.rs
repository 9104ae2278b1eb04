//! RTT probes: each round this node pings a bounded set of peers on their peer ports
//! and reports each round trip as an `Rtt` sample. The set is its nearest neighbours
//! by coordinate (locality is decided among them) plus the next few of a rotation
//! over every other node (so every pair is measured now and then and coordinates stay
//! honest); probing all N^2 pairs would not scale. A peer that does not answer within
//! the timeout gives no sample (node health decides about silent nodes).
//!
//! Probes run over the secure channel (`sys::peer_server::ping`, `sys::secure`): this
//! node proves its identity (`secure`) and a round trip counts only when the peer
//! proved it is the node the log names, so a process listening on a peer's announced
//! port without that node's key cannot inject samples. A credential failure is logged
//! with the peer's name, counted (`credential_failures`) and gives no sample.
//!
//! Invariants: at most `peers_per_round` probes per round, one round per
//! `interval_ms`, one round in flight at a time (a worker thread); samples are at
//! least 1 µs; this node never probes itself or a node without a peer port; every
//! sample comes from a peer that proved its identity.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use crate::event::EventKind;
use crate::state::State;

#[derive(Clone)]
pub struct ProbeConfig {
    pub interval_ms: u32,
    /// Peers probed per round: half the nearest by coordinate, the rest by rotation.
    pub peers_per_round: u32,
    pub timeout_ms: u32,
    /// This node's identity, its cluster and the admitted keys, for the secure channel.
    pub secure: std::sync::Arc<crate::sys::secure::SecureConfig>,
}

impl std::fmt::Debug for ProbeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeConfig")
            .field("interval_ms", &self.interval_ms)
            .field("peers_per_round", &self.peers_per_round)
            .field("timeout_ms", &self.timeout_ms)
            .field("secure", &self.secure)
            .finish()
    }
}

/// What a round's worker reports.
struct Round {
    samples: Vec<(String, u32)>,
    misses: u64,
    credential_failures: u64,
}

pub struct Prober {
    config: ProbeConfig,
    next_round: Instant,
    /// Where the rotation continues (a node row index).
    rotation: usize,
    round: Option<Receiver<Round>>,
    pub samples: u64,
    /// Probes that gave no sample (silent, refused or unproven peers).
    pub misses: u64,
    /// Probes that failed on the credential (also counted in `misses`).
    pub credential_failures: u64,
}

impl Prober {
    pub fn new(config: ProbeConfig) -> Prober {
        assert!(config.interval_ms > 0 && config.timeout_ms > 0);
        Prober {
            config,
            next_round: Instant::now(),
            rotation: 0,
            round: None,
            samples: 0,
            misses: 0,
            credential_failures: 0,
        }
    }

    /// Collects a finished round's samples as events, and starts the next when due.
    pub fn tick(&mut self, state: &State, own_name: &str, now: Instant, out: &mut Vec<EventKind>) {
        if let Some(round) = &self.round {
            match round.try_recv() {
                Ok(Round { samples, misses, credential_failures }) => {
                    self.samples += samples.len() as u64;
                    self.misses += misses;
                    self.credential_failures += credential_failures;
                    out.extend(samples.into_iter().map(|(peer, rtt_us)| EventKind::Rtt { peer, rtt_us }));
                    self.round = None;
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => self.round = None,
            }
        }
        if now < self.next_round {
            return;
        }
        self.next_round = now + Duration::from_millis(self.config.interval_ms as u64);
        let Some(own) = state.nodes.find(own_name) else { return };
        let targets = self.pick(state, own.index());
        if targets.is_empty() {
            return;
        }
        let (sender, receiver) = std::sync::mpsc::channel();
        let timeout = Duration::from_millis(self.config.timeout_ms as u64);
        let secure = std::sync::Arc::clone(&self.config.secure);
        let spawned = std::thread::Builder::new().name("meshos-probe".to_string()).spawn(move || {
            let mut round = Round { samples: Vec::with_capacity(targets.len()), misses: 0, credential_failures: 0 };
            for (name, endpoint) in targets {
                match crate::sys::peer_server::ping(&endpoint, &secure, Some(&name), timeout) {
                    Ok(rtt_us) => round.samples.push((name, rtt_us.max(1))),
                    Err(error) => {
                        round.misses += 1;
                        if error.is_credential() {
                            round.credential_failures += 1;
                            tracing::error!(peer = name, "RTT probe failed on an identity: {error}");
                        } else {
                            tracing::debug!(peer = name, "RTT probe: {error}");
                        }
                    }
                }
            }
            let _ = sender.send(round);
        });
        match spawned {
            Ok(_) => self.round = Some(receiver),
            Err(error) => tracing::warn!("cannot start a probe round: {error}"),
        }
    }

    /// This round's peers: the nearest by coordinate, then the next of the rotation.
    fn pick(&mut self, state: &State, own: usize) -> Vec<(String, String)> {
        let nodes = &state.nodes;
        let candidates: Vec<usize> =
            (0..nodes.len()).filter(|&row| row != own && nodes.live[row] && !nodes.endpoint[row].is_empty()).collect();
        let wanted = (self.config.peers_per_round as usize).min(candidates.len());
        if wanted == 0 {
            return Vec::new();
        }
        let mut by_distance = candidates.clone();
        let here = &nodes.coordinate[own];
        by_distance.sort_by(|&a, &b| {
            let (da, db) = (
                crate::locality::predict_us(here, &nodes.coordinate[a]),
                crate::locality::predict_us(here, &nodes.coordinate[b]),
            );
            da.total_cmp(&db).then(a.cmp(&b))
        });
        let mut picked: Vec<usize> = by_distance.into_iter().take(wanted.div_ceil(2)).collect();
        let start = candidates.partition_point(|&row| row < self.rotation);
        for step in 0..candidates.len() {
            if picked.len() >= wanted {
                break;
            }
            let row = candidates[(start + step) % candidates.len()];
            if !picked.contains(&row) {
                picked.push(row);
                self.rotation = row + 1;
            }
        }
        picked.into_iter().map(|row| (nodes.name[row].to_string(), nodes.endpoint[row].to_string())).collect()
    }
}
