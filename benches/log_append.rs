//! Embedded log throughput: appends per record size with and without an fsync per
//! batch of 16 records, and a full replay of a log of about 1M events (2000 records
//! of about 40 KiB) through `read_from`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use meshos::config::{Config, FsyncPolicy};
use meshos::redex::embedded::EmbeddedLog;
use meshos::redex::Redex;

const BATCH_RECORDS: usize = 16;
const PAYLOAD_SIZES_BYTES: [usize; 3] = [256, 4 << 10, 64 << 10];

fn append(c: &mut Criterion) {
    for (name, policy) in [("fsync_per_16", FsyncPolicy::Manual), ("no_fsync", FsyncPolicy::Never)] {
        let mut group = c.benchmark_group(format!("log_append/{name}"));
        group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        for payload_bytes in PAYLOAD_SIZES_BYTES {
            let payload = vec![0xA5u8; payload_bytes];
            group.throughput(Throughput::Bytes((payload_bytes * BATCH_RECORDS) as u64));
            let temp = tempfile::tempdir().unwrap();
            let config = Config { fsync: policy, ..Config::for_tests() };
            let (mut log, _) = EmbeddedLog::open(temp.path(), &config).unwrap();
            group.bench_function(format!("{payload_bytes}B_x16"), |bench| {
                bench.iter(|| {
                    for _ in 0..BATCH_RECORDS {
                        black_box(log.append_at(&payload, 0).unwrap());
                    }
                    if policy == FsyncPolicy::Manual {
                        log.sync().unwrap();
                    }
                })
            });
        }
        group.finish();
    }
}

fn replay(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_replay");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let records = 2000u64;
    let payload = vec![0x5Au8; 40 << 10];
    group.throughput(Throughput::Bytes(records * payload.len() as u64));
    let temp = tempfile::tempdir().unwrap();
    let config = Config { fsync: FsyncPolicy::Never, ..Config::for_tests() };
    let (mut log, _) = EmbeddedLog::open(temp.path(), &config).unwrap();
    for _ in 0..records {
        log.append_at(&payload, 0).unwrap();
    }
    log.sync().unwrap();
    group.bench_function("2000x40KiB_read_from_1", |bench| {
        bench.iter_batched(
            || (),
            |()| {
                let mut bytes = 0usize;
                let last = log
                    .read_from(1, &mut |record| {
                        bytes += record.payload.len();
                        true
                    })
                    .unwrap();
                assert_eq!(last, records);
                black_box(bytes)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, append, replay);
criterion_main!(benches);
