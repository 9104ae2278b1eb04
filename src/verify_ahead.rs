//! Reading a log with its signatures verified ahead of fold: one thread reads the
//! records and checks every section's signature (`fold::verified_sections`, a pure
//! function of the bytes and the cluster id), the caller's thread folds each record
//! with what was found, so fold skips the checks already made. Fold decides exactly
//! as without it (a section not marked verified is verified in fold).
//!
//! Invariants: records reach the visitor once each, in position order; at most
//! `RECORDS_AHEAD_MAX` records wait between the threads (the reader blocks when they
//! do: a bounded queue that pushes back); a read error is returned after the records
//! before it were visited; nothing here folds or decides.

use crate::fold::{verified_sections, VerifiedSections};
use crate::redex::{RecordView, RedexError};
use crate::trust::ClusterId;

/// Records the reader may run ahead of fold.
pub const RECORDS_AHEAD_MAX: usize = 64;

/// One record read and verified ahead.
struct Ahead {
    position: u64,
    time_ms: u64,
    payload: rkyv::util::AlignedVec<{ crate::wire::ALIGN_BYTES }>,
    verified: VerifiedSections,
}

/// Runs `read` (a log's `read_from`, given its visitor) on a second thread that
/// verifies each record's sections for `cluster_id`; calls `visit` on this thread with
/// each record and its verified sections, in order.
pub fn read_verified<R>(
    read: R,
    cluster_id: &ClusterId,
    visit: &mut dyn FnMut(RecordView<'_>, VerifiedSections),
) -> Result<(), RedexError>
where
    R: FnOnce(&mut dyn FnMut(RecordView<'_>) -> bool) -> Result<u64, RedexError> + Send,
{
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Ahead>(RECORDS_AHEAD_MAX);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            read(&mut |record| {
                let mut payload = rkyv::util::AlignedVec::with_capacity(record.payload.len());
                payload.extend_from_slice(record.payload);
                let verified = verified_sections(&payload, cluster_id);
                let ahead = Ahead { position: record.position, time_ms: record.time_ms, payload, verified };
                // The folding side stops only by returning, after the reader is done.
                sender.send(ahead).is_ok()
            })
        });
        for ahead in receiver {
            let view = RecordView { position: ahead.position, time_ms: ahead.time_ms, payload: &ahead.payload };
            visit(view, ahead.verified);
        }
        reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)).map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FsyncPolicy};
    use crate::engine::Engine;
    use crate::event::EventBatch;
    use crate::redex::embedded::EmbeddedLog;
    use crate::redex::Redex;
    use crate::sim::gen::{GenOptions, Generator};

    /// A generated log with a record whose signature was damaged after signing: folded
    /// with its signatures verified ahead, it reaches the very state a plain fold does,
    /// every record visited once, in order.
    #[test]
    fn verifying_ahead_folds_the_same_state_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { fsync: FsyncPolicy::Manual, ..Config::for_tests() };
        let (mut log, _) = EmbeddedLog::open(dir.path(), &config).unwrap();
        let options = GenOptions { seed: 3, nodes: 8, blobs: 40, replicas: 2, events: 3_000, record_events: 32 };
        let mut generator = Generator::new(options, &config.fold).unwrap();
        let mut sealer = crate::trust::testing::MixedSealer::new(config.genesis.cluster_id());
        let mut batch = EventBatch::default();
        while let Some(time_ms) = generator.next_batch(&mut batch) {
            let mut payload = sealer.seal(&batch.events, time_ms);
            if log.last_position() == 40 {
                payload[150] ^= 1; // inside the first section's signature
            }
            log.append_at(&payload, time_ms).unwrap();
        }
        let last = log.sync().unwrap();
        let mut plain = Engine::new(&config);
        log.read_from(1, &mut |record| {
            plain.apply(record.position, record.time_ms, record.payload);
            true
        })
        .unwrap();
        let mut ahead = Engine::new(&config);
        let mut positions = Vec::new();
        let cluster_id = config.genesis.cluster_id();
        read_verified(|visit| log.read_from(1, visit), &cluster_id, &mut |record, verified| {
            positions.push(record.position);
            ahead.apply_verified(record.position, record.time_ms, record.payload, verified);
        })
        .unwrap();
        assert_eq!(positions, (1..=last).collect::<Vec<_>>());
        assert_eq!(ahead.state.state_hash(), plain.state.state_hash());
        assert_eq!(ahead.state.rejections.total, 1, "the damaged signature is refused either way");
        assert_eq!(ahead.state.rejections.kept[0].reason.name(), "bad_signature");
    }
}
