//! Operator tools over a log directory: generate a synthetic log, replay it into a
//! state, verify every record. The `meshos log ...` commands are thin wrappers.
//!
//! Invariants: `replay` folds records in position order through the same
//! `fold::fold_payload` a node uses, so its summary line is the node's state at that
//! position; `generate` is deterministic (same options, same log bytes); `verify`
//! never writes. Progress goes to the caller's callback, never into results.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::engine::Engine;
use crate::event::EventBatch;
use crate::redex::embedded::{self, EmbeddedLog, RecoveryReport, VerifyReport};
use crate::redex::{Redex, RedexError};
use crate::sim::gen::{GenError, GenOptions, Generator};
use crate::state::{State, Summary};

/// How far a long job has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    /// 0 when the total is not known in advance.
    pub total: u64,
    pub unit: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Gen(#[from] GenError),
    #[error(transparent)]
    Log(#[from] RedexError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} already holds a log ({records} records): give an empty or new directory")]
    OutputNotEmpty { path: PathBuf, records: u64 },
    #[error("{path}: no log here (no segment files)")]
    NoLog { path: PathBuf },
}

/// What `generate` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenReport {
    pub records: u64,
    pub events: u64,
    pub last_position: u64,
}

/// Writes a deterministic synthetic log into `dir` (which must hold no log yet).
pub fn generate(
    dir: &Path,
    options: &GenOptions,
    config: &Config,
    progress: &mut dyn FnMut(Progress),
) -> Result<GenReport, ToolError> {
    config.validate()?;
    let record_bytes_bound = options.record_events as u64 * crate::sim::gen::EVENT_BYTES_BOUND + 64;
    if record_bytes_bound > config.frame_bytes_max as u64 {
        return Err(ToolError::Gen(GenError::Invalid {
            flag: "record-events",
            reason: format!(
                "{} events per record may take up to {record_bytes_bound} bytes, above frame_bytes_max ({}): \
                 lower --record-events or raise --frame-bytes-max",
                options.record_events, config.frame_bytes_max
            ),
        }));
    }
    let mut generator = Generator::new(options.clone(), &config.fold)?;
    let (mut log, recovery) = EmbeddedLog::open(dir, config)?;
    if recovery.last_position > 0 {
        return Err(ToolError::OutputNotEmpty { path: dir.to_path_buf(), records: recovery.last_position });
    }
    let mut batch = EventBatch::default();
    let mut sealer = crate::trust::testing::MixedSealer::new(config.genesis.cluster_id());
    let mut records = 0;
    while let Some(time_ms) = generator.next_batch(&mut batch) {
        let payload = sealer.seal(&batch.events, time_ms);
        log.append_at(&payload, time_ms)?;
        records += 1;
        progress(Progress { done: generator.produced(), total: options.events, unit: "events" });
    }
    let last_position = log.sync()?;
    assert_eq!(last_position, records, "every generated record is durable");
    Ok(GenReport { records, events: generator.produced(), last_position })
}

/// What `replay` found.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// What opening the log recovered (a dropped tail is reported here).
    pub recovery: RecoveryReport,
    pub records: u64,
    pub events: u64,
    /// Actions reconcile emitted over the replay (a node executes its own share).
    pub actions: u64,
    pub summary: Summary,
    pub state: State,
}

/// Opens the log (recovering a torn or damaged tail) and folds every record; with
/// `reconcile`, also runs the incremental reconcile pass after each record, as a node
/// does, so the result is the node's whole state (in-flight actions and gates included).
pub fn replay(
    dir: &Path,
    config: &Config,
    reconcile: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<ReplayReport, ToolError> {
    config.validate()?;
    if !has_segments(dir)? {
        return Err(ToolError::NoLog { path: dir.to_path_buf() });
    }
    let (mut log, recovery) = EmbeddedLog::open(dir, config)?;
    let total = log.last_position();
    let mut engine = Engine::new(config);
    let mut events = 0u64;
    let mut actions = 0u64;
    let cluster_id = config.genesis.cluster_id();
    crate::verify_ahead::read_verified(|visit| log.read_from(1, visit), &cluster_id, &mut |record, verified| {
        if reconcile {
            actions += engine.apply_verified(record.position, record.time_ms, record.payload, verified).1.len() as u64;
        } else {
            engine.fold_only_verified(record.position, record.time_ms, record.payload, verified);
        }
        let state = &engine.state;
        events = state.events_applied + state.rejections.total;
        progress(Progress { done: record.position, total, unit: "records" });
    })?;
    let state = engine.state;
    assert_eq!(state.position, total, "replay folds every record");
    if cfg!(debug_assertions) {
        state.check_invariants();
    }
    Ok(ReplayReport { recovery, records: total, events, actions, summary: state.summary(), state })
}

/// Checks every record without changing anything.
pub fn verify(dir: &Path, config: &Config) -> Result<VerifyReport, ToolError> {
    config.validate()?;
    if !has_segments(dir)? {
        return Err(ToolError::NoLog { path: dir.to_path_buf() });
    }
    Ok(embedded::verify(dir, config)?)
}

fn has_segments(dir: &Path) -> Result<bool, ToolError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(ToolError::Io { path: dir.to_path_buf(), source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| ToolError::Io { path: dir.to_path_buf(), source })?;
        if entry.file_name().to_string_lossy().ends_with(".seg") {
            return Ok(true);
        }
    }
    Ok(false)
}
