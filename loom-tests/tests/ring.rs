//! loom models of `meshos::ingest::ring`: items handed from one thread to another
//! through rings of capacity 2 and 4 arrive all, once each, in order; the end of a
//! producer and of a consumer; the blocked/unblocked flag is never lost.
#![cfg(loom)]

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use meshos::ingest::ring::ring;

/// A producer pushes `0..items` (yielding while full); the consumer pops until it
/// has them all: order and count kept, nothing left over.
fn push_all_pop_all(capacity: usize, items: u32) {
    loom_tests::builder().check(move || {
        let (mut producer, mut consumer) = ring::<u32>(capacity);
        let pusher = thread::spawn(move || {
            for i in 0..items {
                let mut item = i;
                while let Err(back) = producer.try_push(item) {
                    item = back;
                    thread::yield_now();
                }
            }
        });
        let mut received = Vec::new();
        while received.len() < items as usize {
            match consumer.pop() {
                Some(item) => received.push(item),
                None => thread::yield_now(),
            }
        }
        pusher.join().unwrap();
        assert_eq!(received, (0..items).collect::<Vec<_>>());
        assert_eq!(consumer.pop(), None, "nothing duplicated");
        assert!(consumer.is_abandoned());
    });
}

#[test]
fn capacity_2_three_items() {
    push_all_pop_all(2, 3);
}

#[test]
fn capacity_2_four_items() {
    push_all_pop_all(2, 4);
}

#[test]
fn capacity_4_five_items() {
    push_all_pop_all(4, 5);
}

/// The producer pushes what fits (no retry) and goes away; the consumer pops until
/// the ring is abandoned and has received exactly what was pushed, in order.
#[test]
fn producer_drops_early() {
    loom_tests::builder().check(|| {
        let (mut producer, mut consumer) = ring::<u32>(2);
        let pusher = thread::spawn(move || {
            let mut pushed = 0;
            for i in 0..3 {
                if producer.try_push(i).is_ok() {
                    pushed += 1;
                }
            }
            pushed
        });
        let mut received = Vec::new();
        loop {
            if let Some(item) = consumer.pop() {
                received.push(item);
            } else if consumer.is_abandoned() {
                break;
            } else {
                thread::yield_now();
            }
        }
        let pushed = pusher.join().unwrap();
        assert!(pushed >= 2, "a ring of 2 takes at least 2");
        assert_eq!(received, (0..pushed).collect::<Vec<_>>());
    });
}

/// The consumer pops one item and goes away while the producer still pushes: every
/// item is dropped exactly once (the token's count returns to 1), and the producer
/// sees the ring closed once the consumer is gone.
#[test]
fn consumer_drops_with_items_left() {
    loom_tests::builder().check(|| {
        let token = Arc::new(());
        let (mut producer, mut consumer) = ring::<Arc<()>>(2);
        let item = Arc::clone(&token);
        let pusher = thread::spawn(move || {
            let mut item = item;
            for _ in 0..3 {
                match producer.try_push(Arc::clone(&item)) {
                    Ok(()) => {}
                    Err(back) => item = back,
                }
            }
            drop(item);
            producer
        });
        let first = consumer.pop();
        drop(first);
        drop(consumer);
        let producer = pusher.join().unwrap();
        assert!(producer.is_closed(), "the consumer is gone");
        drop(producer);
        assert_eq!(Arc::strong_count(&token), 1, "every item dropped exactly once");
    });
}

/// Producer: the ring is full, so it marks itself blocked; if `mark_blocked` says
/// so it sleeps until a resume, else it pushes again. Consumer: pops, and after each
/// pop resumes the producer if `take_unblocked` says so. A mark that returned true
/// is taken exactly once; every item arrives in order; a lost resume would hang.
#[test]
fn blocked_flag_is_taken_exactly_once() {
    loom_tests::builder().check(|| {
        // The reactor's "resume reading" message: a flag under a mutex, so the
        // blocked producer sleeps (two threads spinning on each other with
        // `yield_now` can starve one of them in loom's scheduler).
        let resume = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut producer, mut consumer) = ring::<u32>(2);
        producer.try_push(0).unwrap();
        producer.try_push(1).unwrap();
        let pusher = {
            let resume = Arc::clone(&resume);
            thread::spawn(move || {
                let mut item = 2;
                let mut blocks = 0;
                while let Err(back) = producer.try_push(item) {
                    item = back;
                    if producer.mark_blocked() {
                        blocks += 1;
                        let (flag, condvar) = &*resume;
                        let mut resumed = flag.lock().unwrap();
                        while !*resumed {
                            resumed = condvar.wait(resumed).unwrap();
                        }
                        *resumed = false;
                    }
                }
                blocks
            })
        };
        let mut received = Vec::new();
        let mut resumes = 0;
        while received.len() < 3 {
            match consumer.pop() {
                Some(item) => {
                    received.push(item);
                    if consumer.take_unblocked() {
                        resumes += 1;
                        let (flag, condvar) = &*resume;
                        *flag.lock().unwrap() = true;
                        condvar.notify_one();
                    }
                }
                None => thread::yield_now(),
            }
        }
        let blocks = pusher.join().unwrap();
        assert_eq!(received, vec![0, 1, 2]);
        assert!(blocks <= 1);
        if blocks == 1 {
            assert_eq!(resumes, 1, "a real block is resumed exactly once");
        } else {
            assert!(resumes <= 1, "at most one spurious resume");
        }
        assert!(!consumer.take_unblocked());
    });
}

/// Four items through two slots, the producer blocking whenever `mark_blocked` says
/// so and sleeping until resumed: every block is resumed (no hang), items in order.
#[test]
fn blocked_flag_repeated_blocks() {
    loom_tests::builder().check(|| {
        let resume = Arc::new((Mutex::new(0u32), Condvar::new()));
        let (mut producer, mut consumer) = ring::<u32>(2);
        let pusher = {
            let resume = Arc::clone(&resume);
            thread::spawn(move || {
                let mut blocks = 0;
                for i in 0..4 {
                    let mut item = i;
                    while let Err(back) = producer.try_push(item) {
                        item = back;
                        if producer.mark_blocked() {
                            blocks += 1;
                            let (pending, condvar) = &*resume;
                            let mut pending = pending.lock().unwrap();
                            while *pending == 0 {
                                pending = condvar.wait(pending).unwrap();
                            }
                            *pending -= 1;
                        }
                    }
                }
                blocks
            })
        };
        let mut received = Vec::new();
        let mut resumes = 0;
        while received.len() < 4 {
            match consumer.pop() {
                Some(item) => {
                    received.push(item);
                    if consumer.take_unblocked() {
                        resumes += 1;
                        let (pending, condvar) = &*resume;
                        *pending.lock().unwrap() += 1;
                        condvar.notify_one();
                    }
                }
                None => thread::yield_now(),
            }
        }
        let blocks = pusher.join().unwrap();
        assert_eq!(received, vec![0, 1, 2, 3]);
        assert!(resumes >= blocks, "{resumes} resumes for {blocks} blocks");
    });
}

/// A producer with a byte budget (the reactor's `queue_bytes_max`): items weigh 2,
/// the budget is 3, so the ring (4 slots) holds one item at a time unless it is
/// empty. The producer blocks with `mark_blocked_while` on its own budget rule and
/// sleeps until resumed; the consumer resumes it after pops when `take_unblocked`
/// says so. Every item arrives, in order, and no block is left unresumed (a hang).
#[test]
fn blocked_on_a_byte_budget_is_resumed() {
    loom_tests::builder().check(|| {
        const WEIGHT: usize = 2;
        const BUDGET: usize = 3;
        let resume = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut producer, mut consumer) = ring::<u32>(4);
        let pusher = {
            let resume = Arc::clone(&resume);
            thread::spawn(move || {
                // Bytes in the ring as the producer knows them: its pushes minus what
                // the ring's length says was popped.
                let fits = |len: usize| len == 0 || (len + 1) * WEIGHT <= BUDGET;
                for item in 0..3u32 {
                    loop {
                        if fits(producer.len()) && producer.try_push(item).is_ok() {
                            break;
                        }
                        if producer.mark_blocked_while(|len| !fits(len)) {
                            let (flag, condvar) = &*resume;
                            let mut resumed = flag.lock().unwrap();
                            while !*resumed {
                                resumed = condvar.wait(resumed).unwrap();
                            }
                            *resumed = false;
                        }
                    }
                }
            })
        };
        let mut received = Vec::new();
        while received.len() < 3 {
            match consumer.pop() {
                Some(item) => {
                    received.push(item);
                    if consumer.take_unblocked() {
                        let (flag, condvar) = &*resume;
                        *flag.lock().unwrap() = true;
                        condvar.notify_one();
                    }
                }
                None => thread::yield_now(),
            }
        }
        pusher.join().unwrap();
        assert_eq!(received, vec![0, 1, 2]);
        assert_eq!(consumer.pop(), None);
    });
}
