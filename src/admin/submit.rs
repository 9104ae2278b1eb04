//! Sending operator sections and local events to the local node, and confirming
//! what became of them.
//!
//! Everything goes over the node's Unix socket (`NodeConfig::local_socket_path`,
//! mode 0600: only the node's user reaches it) as one frame asking for an
//! acknowledgement. An operator section (admin commands, daemon specs, placement
//! intents) is signed here with the operator's key and passes the node untouched;
//! local events (a blob `put` stored) go as an unsigned section naming the node,
//! which the node's sequencer numbers and signs as its own. The ack comes once the
//! record is durable and gives its log position; the node folds it right after. To
//! say whether fold applied or rejected it, `outcome` replays the log read-only up
//! to that position (the same fold and passes the node ran) and looks for a
//! rejection at that position.
//!
//! Invariants: nothing here writes to the log except through the node.

use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::event::{Event, EventBatch, EventKind};
use crate::sys::client::{Ack, Client};

use super::preview::replay_read_only;
use super::AdminError;

/// Sends a sealed payload (an operator section) to the node listening on `socket`
/// and waits up to `timeout` for the acknowledgement (durable in the node's log).
pub fn send_payload(socket: &Path, payload: &[u8], timeout: Duration) -> Result<Ack, AdminError> {
    let (mut client, mut replies) = Client::connect_unix(socket)?;
    let seq = client.send_payload(payload, true)?;
    Ok(replies.wait_acked(seq, timeout)?)
}

/// Sends events as the node's own, in one record, and waits for the acknowledgement.
pub fn send_events(socket: &Path, node: &str, kinds: Vec<EventKind>, timeout: Duration) -> Result<Ack, AdminError> {
    let (mut client, mut replies) = Client::connect_unix(socket)?;
    let events = kinds.into_iter().map(|kind| Event { origin: node.to_string(), origin_seq: 0, kind }).collect();
    let seq = client.send(&EventBatch { events }, true)?;
    Ok(replies.wait_acked(seq, timeout)?)
}

/// What fold did with the record at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// (reason name, message).
    Rejected(&'static str, String),
    /// The log (read without the lock) does not reach the position yet.
    NotInLog {
        log_position: u64,
    },
}

/// Replays the log in `dir` read-only through `position` and says whether the events
/// of that record were applied (the first rejection of the record otherwise).
pub fn outcome(dir: &Path, config: &Config, position: u64) -> Result<Outcome, AdminError> {
    let (engine, read) = replay_read_only(dir, config, position)?;
    if read.last_position < position {
        return Ok(Outcome::NotInLog { log_position: read.last_position });
    }
    let rejection = engine.state.rejections.kept.iter().find(|rejection| rejection.position == position);
    Ok(match rejection {
        None => Outcome::Applied,
        Some(rejection) => Outcome::Rejected(rejection.reason.name(), rejection.reason.to_string()),
    })
}
