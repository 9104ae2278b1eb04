//! Signing for tests, the simulator and generated logs, whose records mix many
//! origins: each run of consecutive node events of one origin becomes a section
//! signed with that origin's test key (`test_key_of`), each run of operator intents a
//! section signed with the test operator key. A node name the sealer has not seen
//! before is admitted by an operator section at the front of the same record
//! (`AdmitNode` with its test key), so positions and the order of events are those of
//! the mixed batch and a test reads as before. Only a genesis from
//! `Genesis::for_tests` trusts the test operator key.
//!
//! Invariants: deterministic (nonces count up from a seed; no clock, no randomness);
//! never used by a node.

use std::collections::HashMap;

use rkyv::util::AlignedVec;

use super::genesis::test_operator_key;
use super::keys::{test_key_of, KeyPair};
use super::record::{ClusterId, Sealer};
use super::{native_sender_of, Sender};
use crate::event::{AdminCommand, Event, EventBatch, EventKind};
use crate::wire::{self, ALIGN_BYTES};

/// How long an operator section of a test stays valid after the record's time.
pub const TEST_OPERATOR_VALIDITY_MS: u64 = 60_000;

/// Seals mixed batches (module docs).
pub struct MixedSealer {
    cluster_id: ClusterId,
    operator: Sealer,
    nodes: HashMap<String, Sealer>,
    nonce_next: u64,
    /// Admit unknown origins automatically (on by default).
    pub admit: bool,
}

impl MixedSealer {
    pub fn new(cluster_id: ClusterId) -> MixedSealer {
        MixedSealer {
            cluster_id,
            operator: Sealer::operator("ops", test_operator_key(), cluster_id),
            nodes: HashMap::new(),
            nonce_next: 1,
            admit: true,
        }
    }

    /// The operator key sealing operator sections (to sign with another one).
    pub fn set_operator(&mut self, key: KeyPair) {
        self.operator = Sealer::operator("ops", key, self.cluster_id);
    }

    fn node(&mut self, name: &str) -> &Sealer {
        let cluster_id = self.cluster_id;
        self.nodes.entry(name.to_string()).or_insert_with(|| Sealer {
            kind: super::SignerKind::Node,
            name: name.to_string(),
            key: test_key_of(name),
            cluster_id,
        })
    }

    /// The payload of one record holding `events` at log time `time_ms` (origins
    /// this sealer has not seen are admitted in it).
    pub fn seal(&mut self, events: &[Event], time_ms: u64) -> AlignedVec<ALIGN_BYTES> {
        self.seal_admitting(events, time_ms, &|sealer: &MixedSealer, name: &str| sealer.nodes.contains_key(name))
    }

    /// The same, admitting the origins `state` has not admitted with their test key.
    pub fn seal_for(&mut self, state: &crate::state::State, events: &[Event], time_ms: u64) -> AlignedVec<ALIGN_BYTES> {
        self.seal_admitting(events, time_ms, &|_: &MixedSealer, name: &str| {
            state.keyring.node_key(name) == Some(test_key_of(name).public_key())
        })
    }

    fn seal_admitting(
        &mut self,
        events: &[Event],
        time_ms: u64,
        admitted: &dyn Fn(&MixedSealer, &str) -> bool,
    ) -> AlignedVec<ALIGN_BYTES> {
        let mut out = AlignedVec::<ALIGN_BYTES>::new();
        if self.admit {
            let mut admissions = Vec::new();
            let mut named = std::collections::HashSet::new();
            for event in events {
                if native_sender_of(&event.kind) == Sender::Node
                    && !admitted(self, &event.origin)
                    && named.insert(event.origin.clone())
                    && super::check_node_name(&event.origin).is_ok()
                {
                    let key = self.node(&event.origin).key.public_key();
                    let command = AdminCommand::AdmitNode { name: event.origin.clone(), key };
                    admissions.push(Event {
                        origin: String::new(),
                        origin_seq: 0,
                        kind: EventKind::Admin(Box::new(command)),
                    });
                }
            }
            if !admissions.is_empty() {
                let body = wire::encode_batch(&EventBatch { events: admissions });
                let nonce = self.next_nonce();
                self.operator.seal_into(&mut out, &body, time_ms.saturating_add(TEST_OPERATOR_VALIDITY_MS), &nonce);
            }
        }
        let mut start = 0;
        while start < events.len() {
            let sender = native_sender_of(&events[start].kind);
            let origin = &events[start].origin;
            let end = start
                + events[start..]
                    .iter()
                    .take_while(|event| {
                        native_sender_of(&event.kind) == sender
                            && (sender == Sender::Operator || &event.origin == origin)
                    })
                    .count();
            let body = wire::encode_batch(&EventBatch { events: events[start..end].to_vec() });
            match sender {
                Sender::Operator => {
                    let nonce = self.next_nonce();
                    self.operator.seal_into(&mut out, &body, time_ms.saturating_add(TEST_OPERATOR_VALIDITY_MS), &nonce)
                }
                Sender::Node => {
                    let origin = origin.clone();
                    self.node(&origin).seal_into(&mut out, &body, 0, &[0; 16])
                }
            }
            start = end;
        }
        if events.is_empty() {
            let body = wire::encode_batch(&EventBatch::default());
            let nonce = self.next_nonce();
            self.operator.seal_into(&mut out, &body, time_ms.saturating_add(TEST_OPERATOR_VALIDITY_MS), &nonce);
        }
        out
    }

    /// Starts the nonces at a value of the caller's (a fresh sealer per record must
    /// not repeat the nonces of the last one).
    pub fn set_nonce_base(&mut self, base: u64) {
        self.nonce_next = base;
    }

    fn next_nonce(&mut self) -> [u8; 16] {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.nonce_next.to_le_bytes());
        nonce[8..].copy_from_slice(&self.cluster_id[..8]);
        self.nonce_next += 1;
        nonce
    }
}

/// One record of mixed `events` for `state` at `time_ms`, with a fresh sealer
/// (origins `state` has not admitted are admitted in the record; nonces from the
/// record's position, so no two records share one).
pub fn seal_for(state: &crate::state::State, events: &[Event], time_ms: u64) -> AlignedVec<ALIGN_BYTES> {
    let mut sealer = MixedSealer::new(state.keyring.cluster_id);
    sealer.set_nonce_base((state.position + 1) << 20);
    sealer.seal_for(state, events, time_ms)
}
