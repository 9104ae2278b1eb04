//! This node's capability set: what the node's config says (zone, capacity, labels)
//! plus the labels its daemons publish through the SDK, published as a new version
//! forked from the current one whenever it differs from what the log holds, and
//! afresh (same attributes, new version) when the node exits maintenance.
//!
//! Invariants: at most one publication is in flight (pushed, not yet seen folded); a
//! set fold refused is not sent again until it changes (no loop of refusals).

use crate::event::{Capability, EventKind};
use crate::state::nodes::MaintenanceState;
use crate::state::State;

/// How long a publication may be neither applied nor refused before it is sent again.
const PENDING_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct CapabilityPublisher {
    pub zone: String,
    pub capacity_bytes: u64,
    pub labels: Vec<String>,
    /// The peer port other nodes reach this one on (empty: none).
    pub endpoint: String,
    /// Version pushed, the log position and the time then; cleared once folded.
    pending: Option<(u64, u64, std::time::Instant)>,
    refused: Option<(String, u64, Vec<String>)>,
    refused_endpoint: String,
    /// A refused set was sent once more for the current way out of maintenance.
    exit_retried: bool,
    pub published: u64,
}

impl CapabilityPublisher {
    pub fn new(zone: String, capacity_bytes: u64, labels: Vec<String>) -> CapabilityPublisher {
        CapabilityPublisher {
            zone,
            capacity_bytes,
            labels,
            endpoint: String::new(),
            pending: None,
            refused: None,
            refused_endpoint: String::new(),
            exit_retried: false,
            published: 0,
        }
    }

    /// The event to push now, if any. `daemon_labels` are sorted and without repeats.
    pub fn next(&mut self, state: &State, node_name: &str, daemon_labels: &[String]) -> Option<EventKind> {
        let own = state.nodes.find(node_name);
        let current = own.map_or(0, |row| state.nodes.capability_version[row.index()]);
        if let Some((version, position, pushed_at)) = self.pending {
            // Events may take a while to reach the log (a node of a demo group sends
            // them over TCP): refused is what fold says, not what has not arrived yet.
            let refused = state.rejections.kept.iter().any(|rejection| {
                rejection.position > position && rejection.kind == "capability" && &*rejection.origin == node_name
            });
            if current >= version {
                self.pending = None;
            } else if refused {
                tracing::warn!(version, "capability publication refused by fold; see the log's rejections");
                self.pending = None;
                self.refused = Some(self.desired(daemon_labels));
                self.refused_endpoint = self.endpoint.clone();
                return None;
            } else if pushed_at.elapsed() > PENDING_WAIT {
                // Neither applied nor refused (lost with a restart of the log's owner): again.
                self.pending = None;
            } else {
                return None;
            }
        }
        let desired = self.desired(daemon_labels);
        let exiting =
            own.is_some_and(|row| state.nodes.maintenance[row.index()] == MaintenanceState::ExitingMaintenance);
        // A refused set is not sent again until it changes, except once on each way out
        // of maintenance, which needs a fresh version whatever the set.
        let retry_for_exit = exiting && !self.exit_retried;
        self.exit_retried = exiting && (self.exit_retried || self.refused.is_some());
        if !retry_for_exit && self.refused.as_ref() == Some(&desired) && self.refused_endpoint == self.endpoint {
            return None;
        }
        let stale = match own {
            None => true,
            Some(row) => {
                let index = row.index();
                let nodes = &state.nodes;
                let labels: Vec<&str> = nodes.labels[index].iter().map(|&id| state.symbols.name(id)).collect();
                let differs = state.symbols.name(nodes.zone[index]) != desired.0
                    || nodes.capacity_bytes[index] != desired.1
                    || labels != desired.2.iter().map(String::as_str).collect::<Vec<_>>()
                    || *nodes.endpoint[index] != *self.endpoint;
                let exiting = nodes.maintenance[index] == MaintenanceState::ExitingMaintenance
                    && nodes.capability_version[index] == nodes.capability_version_at_enter[index];
                differs || exiting
            }
        };
        if !stale {
            return None;
        }
        let (zone, capacity_bytes, labels) = desired;
        let version = current + 1;
        self.pending = Some((version, state.position, std::time::Instant::now()));
        self.published += 1;
        let endpoint = self.endpoint.clone();
        Some(EventKind::Capability(Box::new(Capability {
            version,
            fork_of: current,
            zone,
            capacity_bytes,
            labels,
            endpoint,
        })))
    }

    fn desired(&self, daemon_labels: &[String]) -> (String, u64, Vec<String>) {
        let mut labels: Vec<String> = self.labels.iter().chain(daemon_labels).cloned().collect();
        labels.sort();
        labels.dedup();
        (self.zone.clone(), self.capacity_bytes, labels)
    }
}
