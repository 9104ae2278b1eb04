//! Shared test helpers: build events tersely, fold records in memory.
#![allow(dead_code)]

use meshos::admin::OperatorKey;
use meshos::config::Config;
use meshos::event::{AdminCommand, Capability, Event, EventBatch, EventKind, NodeHealth};
use meshos::fold::fold_payload;
use meshos::sim::gen::{GenOptions, Generator};
use meshos::state::State;
use meshos::wire;

/// An event from `origin` with origin sequence `seq`.
pub fn event(origin: &str, seq: u64, kind: EventKind) -> Event {
    Event { origin: origin.to_string(), origin_seq: seq, kind }
}

/// The operator key tests sign with (the simulator's fixed test key).
pub fn operator_key() -> OperatorKey {
    meshos::admin::test_key()
}

/// An admin event from `origin` (origin sequence `seq`), signed by `key` with admin
/// sequence `admin_seq`.
pub fn signed_with(key: &OperatorKey, origin: &str, seq: u64, admin_seq: u64, command: AdminCommand) -> Event {
    event(origin, seq, EventKind::Admin(Box::new(key.sign("ops", admin_seq, command))))
}

/// An admin event signed by the test operator key, its admin sequence the origin's.
pub fn admin(origin: &str, seq: u64, command: AdminCommand) -> Event {
    signed_with(&operator_key(), origin, seq, seq, command)
}

/// The keyring's genesis: the test operator key installs itself.
pub fn genesis(origin: &str, seq: u64) -> Event {
    admin(origin, seq, AdminCommand::SetKeyring { version: 1, keys: vec![operator_key().public_key()] })
}

pub fn heartbeat(origin: &str, seq: u64) -> Event {
    event(origin, seq, EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 10 }))
}

pub fn capability(origin: &str, seq: u64, version: u64, fork_of: u64, zone: &str) -> Event {
    let capability = Capability {
        version,
        fork_of,
        zone: zone.to_string(),
        capacity_bytes: 1 << 40,
        labels: vec!["storage".into()],
    };
    event(origin, seq, EventKind::Capability(capability))
}

/// Folds each batch as one record, log time advancing 100 ms per record.
pub fn fold_batches(state: &mut State, batches: &[Vec<Event>]) {
    for events in batches {
        let payload = wire::encode_batch(&EventBatch { events: events.clone() });
        let position = state.position + 1;
        fold_payload(state, position, 1_000 + position * 100, &payload);
    }
}

/// Folds `events` as one record into a fresh state.
pub fn fold_events(events: &[Event]) -> State {
    let mut state = State::new(&Config::default());
    fold_batches(&mut state, &[events.to_vec()]);
    state
}

/// The names of the reasons of every rejection, in order.
pub fn rejection_names(state: &State) -> Vec<&'static str> {
    state.rejections.kept.iter().map(|rejection| rejection.reason.name()).collect()
}

/// Generates a log in memory: the archived payloads and their log times.
pub fn generate(options: GenOptions) -> Vec<(u64, rkyv::util::AlignedVec<16>)> {
    let mut generator = Generator::new(options, &Config::default().fold).expect("valid options");
    let mut batch = EventBatch::default();
    let mut records = Vec::new();
    while let Some(time_ms) = generator.next_batch(&mut batch) {
        records.push((time_ms, wire::encode_batch(&batch)));
    }
    records
}

pub fn small_options(seed: u64) -> GenOptions {
    GenOptions { seed, nodes: 12, blobs: 200, replicas: 3, events: 20_000, record_events: 128 }
}

/// Folds generated records into a fresh state.
pub fn fold_generated(records: &[(u64, rkyv::util::AlignedVec<16>)]) -> State {
    let mut state = State::new(&Config::default());
    for (index, (time_ms, payload)) in records.iter().enumerate() {
        fold_payload(&mut state, index as u64 + 1, *time_ms, payload);
    }
    state
}
