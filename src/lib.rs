//! MeshOS: the behaviour layer of a cluster.
//!
//! One totally ordered event log is folded into struct-of-arrays state; see
//! `ARCHITECTURE.md` for the map. Fold does no I/O, reads no clock and returns
//! no `Result`: the same log gives the same state on every node and every replay.
//!
//! The path of one batch of events, from bytes on a socket to folded state:
//!
//! ```
//! use meshos::config::Config;
//! use meshos::event::{Event, EventBatch, EventKind, NodeHealth};
//! use meshos::state::State;
//! use meshos::trust::{test_key_of, Genesis, Sealer};
//! use meshos::{fold, wire};
//!
//! // The cluster's genesis admits node-1's key (`Genesis::for_tests` uses keys anyone
//! // can compute: a real cluster's comes from `meshos cluster init`).
//! let genesis = Genesis::for_tests(&["node-1"]);
//! let config = Config { genesis: genesis.clone(), ..Config::default() };
//!
//! let batch = EventBatch {
//!     events: vec![Event {
//!         origin: "node-1".into(),
//!         origin_seq: 1,
//!         kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: 120 }),
//!     }],
//! };
//! // A sender signs the archived batch with its key for its cluster, and frames it...
//! let payload = Sealer::node("node-1", test_key_of("node-1"), genesis.cluster_id()).seal_batch(&batch);
//! let mut frame = Vec::new();
//! wire::encode_frame(&mut frame, wire::FrameKind::Events, 1, 0, &payload);
//!
//! // ...a receiver checks the frame (magic, version, size, checksum) before anything else...
//! let received = wire::decode_frame(&frame, config.frame_bytes_max).expect("a valid frame");
//! let mut aligned = rkyv::util::AlignedVec::<16>::new();
//! aligned.extend_from_slice(received.payload);
//!
//! // ...and once the log has stamped it as record 1 at some commit time, fold applies it
//! // (the signature verifies for node-1's admitted key, and node-1 speaks for itself).
//! let mut state = State::new(&config);
//! fold::fold_payload(&mut state, 1, 1_000, &aligned);
//! assert_eq!(state.nodes.find("node-1").map(|row| row.0), Some(0));
//! assert_eq!(state.summary().rejected, 0);
//! ```

#[cfg(feature = "engine")]
pub mod action;
#[cfg(feature = "engine")]
pub mod admin;
#[cfg(feature = "engine")]
pub mod config;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod event;
#[cfg(feature = "engine")]
pub mod exec;
#[cfg(feature = "engine")]
pub mod explain;
#[cfg(feature = "engine")]
pub mod fold;
#[cfg(feature = "engine")]
pub mod ingest;
#[cfg(feature = "engine")]
pub mod loadgen;
#[cfg(feature = "engine")]
pub mod locality;
#[cfg(feature = "engine")]
pub mod logtool;
#[cfg(feature = "engine")]
pub mod node;
#[cfg(feature = "engine")]
pub mod placement;
#[cfg(feature = "engine")]
pub mod reconcile;
#[cfg(feature = "engine")]
pub mod redex;
pub mod sdk;
#[cfg(feature = "engine")]
pub mod sequencer;
#[cfg(feature = "engine")]
pub mod sim;
#[cfg(feature = "engine")]
pub mod snapshot;
#[cfg(feature = "engine")]
pub mod state;
#[cfg(feature = "engine")]
pub mod sync;
#[cfg(feature = "engine")]
pub mod sys;
#[cfg(feature = "engine")]
pub mod trust;
#[cfg(feature = "engine")]
pub mod verify_ahead;
#[cfg(feature = "engine")]
pub mod wire;
