//! The node process: its config file and its main loop ([`run`]): reactor, sequencer,
//! embedded log, fold, reconcile and the dispatcher; as one node of a cluster, the
//! same on a NATS JetStream log ([`cluster`]).

pub mod cluster;
pub mod config;
pub mod demo;
pub mod identity;
pub mod run;
pub mod spec_file;
