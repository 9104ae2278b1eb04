//! Damage handling of the embedded log: flipped bytes, cut tails and bad segment headers are found by `verify` and recovered by `open` (good records kept, the rest quarantined byte for byte); damage in the middle refused by `open_with(Refuse)` and repaired by `salvage` (every intact record at its position); plus locking, size limits, monotonic positions and times, and reads across segments.

use std::path::{Path, PathBuf};

use meshos::config::{Config, FsyncPolicy};
use meshos::event::{Event, EventBatch, EventKind, NodeHealth};
use meshos::redex::embedded::{verify, EmbeddedLog};
use meshos::redex::{Redex, RedexError};
use meshos::wire;

fn payload(position: u64) -> Vec<u8> {
    let batch = EventBatch {
        events: (0..1 + position % 3)
            .map(|index| Event {
                origin: format!("node-{}-{}", position, "y".repeat((position as usize * 13) % 90)),
                origin_seq: position * 10 + index,
                kind: EventKind::NodeHealth(NodeHealth::Heartbeat { load_permille: position as u16 }),
            })
            .collect(),
    };
    // Signed sections, as every record is (the signer's name is the first origin's
    // prefix, a valid node name; the log does not check signatures, fold does).
    let sealer = meshos::trust::Sealer::node(
        &format!("node-{position}"),
        meshos::trust::test_key_of(&format!("node-{position}")),
        [1; 16],
    );
    sealer.seal_batch(&batch).to_vec()
}

/// Small segments so a few dozen records span several files.
fn small_config() -> Config {
    Config { frame_bytes_max: 1024, segment_bytes_max: 2560, fsync: FsyncPolicy::Manual, ..Config::for_tests() }
}

fn write_log(dir: &Path, config: &Config, records: u64) {
    let (mut log, _) = EmbeddedLog::open(dir, config).unwrap();
    for position in 1..=records {
        let stamp = log.append_at(&payload(position), 1_000 + position).unwrap();
        assert_eq!(stamp.position, position);
    }
    assert_eq!(log.sync().unwrap(), records);
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    found.sort();
    found
}

/// (position, byte offset) of every record in one segment file.
fn record_offsets(path: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut offset = wire::SEGMENT_HEADER_BYTES;
    let mut found = Vec::new();
    while offset < bytes.len() {
        let header = wire::decode_header(&bytes[offset..], 1 << 20).unwrap();
        found.push((header.seq, offset as u64));
        offset += header.frame_bytes();
    }
    found
}

/// Every record's (position, time, payload), read through `read_from(from)`.
fn read_all(log: &mut EmbeddedLog, from: u64) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    log.read_from(from, &mut |record| {
        assert_eq!(record.payload.as_ptr() as usize % 16, 0, "payload not 16-aligned");
        out.push((record.position, record.time_ms, record.payload.to_vec()));
        true
    })
    .unwrap();
    out
}

fn assert_prefix_intact(log: &mut EmbeddedLog, last: u64) {
    let records = read_all(log, 1);
    assert_eq!(records.len() as u64, last);
    for (index, (position, _, bytes)) in records.iter().enumerate() {
        assert_eq!(*position, index as u64 + 1);
        assert!(bytes == &payload(*position), "payload of record {position}");
    }
}

/// The bytes from `offset` in `segments[first]` to the end of the last segment.
fn bytes_from(segments: &[PathBuf], first: usize, offset: u64) -> Vec<u8> {
    let mut out = std::fs::read(&segments[first]).unwrap()[offset as usize..].to_vec();
    for path in &segments[first + 1..] {
        out.extend(std::fs::read(path).unwrap());
    }
    out
}

#[test]
fn flipped_byte_is_found_and_quarantined() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = small_config();
    write_log(dir, &config, 60);
    let files = segments(dir);
    assert!(files.len() >= 4, "want several segments, got {}", files.len());
    let clean = verify(dir, &config).unwrap();
    assert_eq!((clean.records, clean.first_position, clean.last_position, clean.damage.clone()), (60, 1, 60, None));
    assert!(clean.events > 60);

    // Flip one payload byte of a record in the middle of the second segment.
    let victim = 1;
    let offsets = record_offsets(&files[victim]);
    let (position, offset) = offsets[offsets.len() / 2];
    let mut bytes = std::fs::read(&files[victim]).unwrap();
    bytes[offset as usize + wire::HEADER_BYTES + 5] ^= 0x10;
    std::fs::write(&files[victim], &bytes).unwrap();
    let dropped_expected = bytes_from(&files, victim, offset);

    let report = verify(dir, &config).unwrap();
    let damage = report.damage.clone().expect("verify finds the flipped byte");
    assert_eq!((damage.position, damage.offset, &damage.path), (position, offset, &files[victim]));
    assert!(damage.to_string().contains(&format!("record {position} at byte offset {offset}")), "{damage}");
    assert_eq!(report.records, position - 1);
    assert_eq!(report.last_position, position - 1);
    assert_eq!(report.bytes_after_damage, dropped_expected.len() as u64);
    assert!(report.bytes_after_damage > 0);

    let (mut log, recovery) = EmbeddedLog::open(dir, &config).unwrap();
    assert_eq!(recovery.damage.as_ref().map(|damage| damage.position), Some(position));
    assert_eq!(recovery.last_position, position - 1);
    assert_eq!(recovery.records, position - 1);
    assert_eq!(recovery.dropped_bytes, dropped_expected.len() as u64);
    assert_eq!(recovery.dropped_records, 60 - position + 1);
    let quarantined = recovery.quarantine_path.clone().expect("a quarantine file");
    assert!(quarantined.starts_with(dir.join("quarantine")));
    assert!(std::fs::read(&quarantined).unwrap() == dropped_expected, "quarantined bytes differ");
    assert_eq!(segments(dir).len(), victim + 1, "later segments are moved away");
    assert_prefix_intact(&mut log, position - 1);

    // Appending continues right after the last good record.
    let stamp = log.append_at(&payload(position), 5_000).unwrap();
    assert_eq!(stamp.position, position);
    log.sync().unwrap();
    drop(log);
    let after = verify(dir, &config).unwrap();
    assert_eq!((after.damage, after.last_position), (None, position));

    let (_, clean_reopen) = EmbeddedLog::open(dir, &config).unwrap();
    assert_eq!(
        (clean_reopen.dropped_bytes, clean_reopen.dropped_records, clean_reopen.damage, clean_reopen.quarantine_path),
        (0, 0, None, None)
    );
    assert_eq!(clean_reopen.last_position, position);
}

#[test]
fn cut_tails_are_recovered() {
    let config = Config { fsync: FsyncPolicy::Always, ..Config::for_tests() };
    // Cut inside the last frame's header, inside its payload, and one byte short.
    for (name, cut_into_last) in [("mid-header", 10u64), ("mid-payload", 40), ("one byte short", u64::MAX)] {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        write_log(dir, &config, 12);
        let file = &segments(dir)[0];
        let (last_position, last_offset) = *record_offsets(file).last().unwrap();
        assert_eq!(last_position, 12);
        let length = std::fs::metadata(file).unwrap().len();
        let cut = if cut_into_last == u64::MAX { length - 1 } else { last_offset + cut_into_last };
        let kept_tail = std::fs::read(file).unwrap()[last_offset as usize..cut as usize].to_vec();
        std::fs::OpenOptions::new().write(true).open(file).unwrap().set_len(cut).unwrap();

        let report = verify(dir, &config).unwrap();
        assert_eq!(
            report.damage.as_ref().map(|damage| (damage.position, damage.offset)),
            Some((12, last_offset)),
            "{name}"
        );
        assert_eq!(report.bytes_after_damage, cut - last_offset, "{name}");

        let (mut log, recovery) = EmbeddedLog::open(dir, &config).unwrap();
        assert_eq!(recovery.last_position, 11, "{name}");
        assert_eq!(recovery.dropped_bytes, cut - last_offset, "{name}");
        assert_eq!(recovery.dropped_records, 1, "{name}");
        assert!(std::fs::read(recovery.quarantine_path.unwrap()).unwrap() == kept_tail, "{name}: quarantined bytes");
        assert_eq!(std::fs::metadata(file).unwrap().len(), last_offset, "{name}: truncated at the damage");
        assert_prefix_intact(&mut log, 11);
        assert_eq!(log.append_at(&payload(12), 0).unwrap().position, 12);
        assert_eq!(log.durable_position(), 12, "{name}: fsync Always");
        drop(log);
        assert_eq!(verify(dir, &config).unwrap().damage, None, "{name}");
    }
}

#[test]
fn corrupt_segment_header_drops_that_segment_and_later() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = small_config();
    write_log(dir, &config, 40);
    let files = segments(dir);
    assert!(files.len() >= 3);
    let second_base = record_offsets(&files[1])[0].0;
    let mut bytes = std::fs::read(&files[1]).unwrap();
    bytes[3] ^= 0xff;
    std::fs::write(&files[1], &bytes).unwrap();
    let dropped_expected = bytes_from(&files, 1, 0);

    let report = verify(dir, &config).unwrap();
    let damage = report.damage.clone().unwrap();
    assert_eq!((damage.position, damage.offset, &damage.path), (second_base, 0, &files[1]));
    assert!(damage.reason.contains("segment"), "{damage}");
    assert_eq!(report.last_position, second_base - 1);

    let (mut log, recovery) = EmbeddedLog::open(dir, &config).unwrap();
    assert_eq!(recovery.last_position, second_base - 1);
    assert_eq!(recovery.segments, 1);
    assert_eq!(recovery.dropped_bytes, dropped_expected.len() as u64);
    assert_eq!(recovery.dropped_records, 40 - second_base + 1);
    assert!(std::fs::read(recovery.quarantine_path.unwrap()).unwrap() == dropped_expected, "quarantined bytes differ");
    assert_prefix_intact(&mut log, second_base - 1);
    assert_eq!(log.append_at(&payload(second_base), 0).unwrap().position, second_base);
    log.sync().unwrap();
    drop(log);
    assert_eq!(verify(dir, &config).unwrap().damage, None);

    // A bad header on the first segment leaves an empty log that starts again at 1.
    let first = &segments(dir)[0];
    let mut bytes = std::fs::read(first).unwrap();
    bytes[20] = 1;
    std::fs::write(first, &bytes).unwrap();
    let (mut log, recovery) = EmbeddedLog::open(dir, &config).unwrap();
    assert_eq!((recovery.last_position, recovery.segments, recovery.records), (0, 0, 0));
    assert_eq!(log.last_position(), 0);
    assert_eq!(log.append_at(&payload(1), 0).unwrap().position, 1);
}

#[test]
fn second_writer_is_locked_out() {
    let temp = tempfile::tempdir().unwrap();
    let config = Config::for_tests();
    let (log, _) = EmbeddedLog::open(temp.path(), &config).unwrap();
    let error = EmbeddedLog::open(temp.path(), &config).unwrap_err();
    assert!(matches!(error, RedexError::Locked { .. }), "{error}");
    // verify never locks.
    assert_eq!(verify(temp.path(), &config).unwrap().records, 0);
    drop(log);
    EmbeddedLog::open(temp.path(), &config).unwrap();
}

#[test]
fn oversized_record_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let config = small_config();
    let (mut log, _) = EmbeddedLog::open(temp.path(), &config).unwrap();
    let fits = vec![0u8; config.frame_bytes_max as usize - wire::HEADER_BYTES];
    assert_eq!(log.append_at(&fits, 0).unwrap().position, 1);
    let error = log.append_at(&[0u8; 1024], 0).unwrap_err();
    assert!(matches!(error, RedexError::RecordTooLarge { frame_bytes: 1056, frame_bytes_max: 1024 }), "{error}");
    assert_eq!(log.last_position(), 1, "a refused record takes no position");
}

#[test]
fn positions_and_times_never_go_backwards() {
    let temp = tempfile::tempdir().unwrap();
    let config = Config { fsync: FsyncPolicy::Manual, ..Config::for_tests() };
    let (mut log, report) = EmbeddedLog::open(temp.path(), &config).unwrap();
    assert_eq!((report.last_position, log.last_position(), log.durable_position()), (0, 0, 0));
    let first = log.append_at(&payload(1), 1_000).unwrap();
    let second = log.append_at(&payload(2), 500).unwrap();
    assert_eq!((first.position, first.time_ms), (1, 1_000));
    assert_eq!((second.position, second.time_ms), (2, 1_000), "an earlier time is clamped");
    let third = log.append(&payload(3)).unwrap();
    assert!(third.position == 3 && third.time_ms >= 1_000);
    let far_future = third.time_ms + 1_000_000;
    log.append_at(&payload(4), far_future).unwrap();
    let clamped = log.append(&payload(5)).unwrap();
    assert_eq!(clamped.time_ms, far_future, "the wall clock is clamped too");
    assert_eq!(log.durable_position(), 0, "Manual does not sync by itself");
    assert_eq!(log.sync().unwrap(), 5);
    drop(log);

    let (mut log, _) = EmbeddedLog::open(temp.path(), &config).unwrap();
    assert_eq!(log.append_at(&payload(6), 1).unwrap(), meshos::redex::Stamp { position: 6, time_ms: far_future });
    let times: Vec<u64> = read_all(&mut log, 1).iter().map(|record| record.1).collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{times:?}");
}

#[test]
fn fsync_policies_advance_durable_position() {
    let cases = [
        (FsyncPolicy::Always, [1, 2, 3, 4, 5, 6, 7]),
        (FsyncPolicy::Group { records: 3, bytes: 1 << 30 }, [0, 0, 3, 3, 3, 6, 6]),
        (FsyncPolicy::Group { records: 1000, bytes: 1 }, [1, 2, 3, 4, 5, 6, 7]),
        (FsyncPolicy::Manual, [0; 7]),
        (FsyncPolicy::Never, [0; 7]),
    ];
    for (policy, durable) in cases {
        let temp = tempfile::tempdir().unwrap();
        let config = Config { fsync: policy, ..small_config() };
        let (mut log, _) = EmbeddedLog::open(temp.path(), &config).unwrap();
        for (index, expected) in durable.iter().enumerate() {
            log.append_at(&payload(index as u64 + 1), 0).unwrap();
            assert_eq!(log.durable_position(), *expected, "{policy:?} after record {}", index + 1);
        }
        assert_eq!(log.sync().unwrap(), 7, "{policy:?}");
        assert_eq!(log.durable_position(), 7);
    }
}

#[test]
fn read_from_the_middle_across_segments() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = small_config();
    let (mut log, _) = EmbeddedLog::open(dir, &config).unwrap();
    for position in 1..=50 {
        log.append_at(&payload(position), position).unwrap();
    }
    // Unsynced, buffered records are visible to reads on the same handle.
    assert!(segments(dir).len() >= 4);
    for from in [1, 2, 17, 33, 49, 50] {
        let records = read_all(&mut log, from);
        let positions: Vec<u64> = records.iter().map(|record| record.0).collect();
        assert_eq!(positions, (from..=50).collect::<Vec<_>>(), "from {from}");
        for (position, time_ms, bytes) in records {
            assert_eq!(time_ms, position);
            assert!(bytes == payload(position), "payload of record {position}");
        }
    }
    assert_eq!(log.read_from(51, &mut |_| panic!("nothing to visit")).unwrap(), 50);
    assert!(matches!(log.read_from(52, &mut |_| true), Err(RedexError::BeyondEnd { position: 52, last: 50 })));
    let mut seen = Vec::new();
    let stopped = log
        .read_from(20, &mut |record| {
            seen.push(record.position);
            record.position < 24
        })
        .unwrap();
    assert_eq!((stopped, seen), (24, vec![20, 21, 22, 23, 24]));
    log.sync().unwrap();
    drop(log);
    let (mut log, report) = EmbeddedLog::open(dir, &config).unwrap();
    assert_eq!((report.records, report.dropped_bytes), (50, 0));
    assert_eq!(read_all(&mut log, 30).len(), 21);
}

#[test]
fn a_log_may_start_after_position_one() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = small_config();
    write_log(dir, &config, 30);
    let files = segments(dir);
    let second_base = record_offsets(&files[1])[0].0;
    // As if older segments had been archived away.
    std::fs::remove_file(&files[0]).unwrap();
    let report = verify(dir, &config).unwrap();
    assert_eq!((report.damage, report.first_position, report.last_position), (None, second_base, 30));
    let (mut log, recovery) = EmbeddedLog::open(dir, &config).unwrap();
    assert_eq!((recovery.records, recovery.last_position, recovery.dropped_bytes), (30 - second_base + 1, 30, 0));
    let error = log.read_from(1, &mut |_| true).unwrap_err();
    assert!(matches!(error, RedexError::BeforeStart { position: 1, first } if first == second_base), "{error}");
    assert_eq!(read_all(&mut log, second_base).len() as u64, 30 - second_base + 1);
    assert_eq!(log.append_at(&payload(31), 0).unwrap().position, 31);
}

#[test]
fn a_smaller_frame_limit_refuses_to_open_instead_of_dropping_good_records() {
    let dir = tempfile::tempdir().unwrap();
    let large = Config { frame_bytes_max: 1 << 16, segment_bytes_max: 1 << 20, ..small_config() };
    let (mut log, _) = EmbeddedLog::open(dir.path(), &large).unwrap();
    log.append_at(&payload(1), 1).unwrap();
    log.append_at(&vec![0u8; 4000], 2).unwrap();
    log.sync().unwrap();
    drop(log);
    let before: Vec<Vec<u8>> = segments(dir.path()).iter().map(|path| std::fs::read(path).unwrap()).collect();

    let error = EmbeddedLog::open(dir.path(), &small_config()).unwrap_err();
    assert!(matches!(error, RedexError::FrameLimitTooSmall { position: 2, frame_bytes_max: 1024, .. }), "{error}");
    assert!(error.to_string().contains("frame_bytes_max"), "{error}");
    assert!(matches!(verify(dir.path(), &small_config()), Err(RedexError::FrameLimitTooSmall { .. })));
    let after: Vec<Vec<u8>> = segments(dir.path()).iter().map(|path| std::fs::read(path).unwrap()).collect();
    assert_eq!(before, after, "nothing truncated");
    assert!(!dir.path().join("quarantine").exists(), "nothing quarantined");

    let (_, report) = EmbeddedLog::open(dir.path(), &large).unwrap();
    assert_eq!((report.last_position, report.dropped_bytes), (2, 0));
}

/// The contents of every segment file, by name: to check that a refusal changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    segments(dir)
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

/// Damage in the middle of the log (intact records after it): a flipped byte, a bad
/// segment header and a deleted middle segment. `verify` lists every damaged record;
/// opening as a single node does refuses and changes nothing; `salvage` keeps every
/// intact record at its position with its bytes, makes each lost one an empty record,
/// never renumbers, and the log opens clean and appends after the last position.
#[test]
fn damage_in_the_middle_is_refused_then_salvaged_keeping_every_intact_record_in_place() {
    use meshos::redex::embedded::{salvage, MidLogDamage};
    const RECORDS: u64 = 60;
    let config = small_config();
    type Damager = fn(&[PathBuf]) -> Vec<u64>;
    let cases: [(&str, Damager); 3] = [
        ("flipped byte", |files| {
            let (position, offset) = record_offsets(&files[1])[1];
            let mut bytes = std::fs::read(&files[1]).unwrap();
            bytes[offset as usize + wire::HEADER_BYTES + 5] ^= 0x10;
            std::fs::write(&files[1], &bytes).unwrap();
            vec![position]
        }),
        ("bad segment header", |files| {
            let lost: Vec<u64> = record_offsets(&files[2]).iter().map(|(position, _)| *position).collect();
            let mut bytes = std::fs::read(&files[2]).unwrap();
            bytes[3] ^= 0xff;
            std::fs::write(&files[2], &bytes).unwrap();
            // The records behind a bad header are intact frames: the scan finds them.
            let _ = lost;
            Vec::new()
        }),
        ("deleted middle segment", |files| {
            let lost: Vec<u64> = record_offsets(&files[2]).iter().map(|(position, _)| *position).collect();
            std::fs::remove_file(&files[2]).unwrap();
            lost
        }),
    ];
    for (name, damage) in cases {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        write_log(dir, &config, RECORDS);
        let files = segments(dir);
        assert!(files.len() >= 4, "{name}: several segments");
        let lost = damage(&files);

        let report = verify(dir, &config).unwrap();
        assert!(report.damage.is_some(), "{name}: verify finds it");
        assert!(report.intact_after_damage > 0, "{name}: intact records after the damage");
        let listed: Vec<u64> = report.damaged_positions.iter().flat_map(|(first, last)| *first..=*last).collect();
        assert_eq!(listed, lost, "{name}: every damaged record listed");

        let before = snapshot(dir);
        match EmbeddedLog::open_with(dir, &config, MidLogDamage::Refuse) {
            Err(RedexError::DamagedMidLog { intact_after, last_intact, .. }) => {
                assert_eq!(last_intact, RECORDS, "{name}");
                assert!(intact_after > 0, "{name}");
            }
            other => panic!("{name}: expected a refusal, got {:?}", other.map(|(_, report)| report)),
        }
        assert!(snapshot(dir) == before, "{name}: a refusal changes nothing");
        let error = EmbeddedLog::open_with(dir, &config, MidLogDamage::Refuse).err().unwrap().to_string();
        assert!(error.contains("meshos log salvage") && error.contains("intact records follow"), "{name}: {error}");

        let salvaged = salvage(dir, &config).unwrap();
        assert_eq!((salvaged.first_position, salvaged.last_position), (1, RECORDS), "{name}");
        assert_eq!(salvaged.holes, lost.len() as u64, "{name}");
        assert_eq!(salvaged.kept, RECORDS - lost.len() as u64, "{name}");
        let quarantined = salvaged.quarantined_to.clone().expect("the old segments kept");
        assert!(std::fs::read_dir(&quarantined).unwrap().count() > 0, "{name}");

        let (mut log, recovery) = EmbeddedLog::open_with(dir, &config, MidLogDamage::Refuse).unwrap();
        assert_eq!((recovery.damage, recovery.last_position), (None, RECORDS), "{name}");
        for (position, _, bytes) in read_all(&mut log, 1) {
            if lost.contains(&position) {
                assert!(bytes.is_empty(), "{name}: record {position} is a hole");
            } else {
                assert!(bytes == payload(position), "{name}: record {position} kept with its bytes");
            }
        }
        assert_eq!(log.append_at(&payload(RECORDS + 1), 9_999).unwrap().position, RECORDS + 1, "{name}");
        log.sync().unwrap();
        drop(log);
        let after = verify(dir, &config).unwrap();
        assert_eq!(
            (after.damage, after.invalid_payloads),
            (None, lost.len() as u64),
            "{name}: holes are empty records"
        );
        // Salvaging a sound log changes nothing.
        let again = salvage(dir, &config).unwrap();
        assert_eq!((again.holes, again.quarantined_to), (0, None), "{name}");
    }
}

/// A torn tail (no intact record after the damage) is cut even where mid-log damage
/// is refused: a crash mid-append must not stop a node.
#[test]
fn a_torn_tail_is_cut_even_when_mid_log_damage_is_refused() {
    use meshos::redex::embedded::MidLogDamage;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let config = small_config();
    write_log(dir, &config, 30);
    let last = segments(dir).pop().unwrap();
    let length = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(length - 7).unwrap();
    let (mut log, recovery) = EmbeddedLog::open_with(dir, &config, MidLogDamage::Refuse).unwrap();
    assert_eq!(recovery.last_position, 29);
    assert!(recovery.quarantine_path.is_some());
    assert_prefix_intact(&mut log, 29);
}
