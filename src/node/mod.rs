//! The node process: its config file now; the reactor, sequencer and main loop that
//! run ingest, the log, fold, reconcile and the dispatcher arrive with issue 4.

pub mod config;
