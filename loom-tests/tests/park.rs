//! loom models of `meshos::ingest::park::Signal` driving real rings: the consumer
//! loop (drain every ring; if all were empty, wait) receives every item, once, in
//! order, and never sleeps through a push (a lost wake-up deadlocks, which loom
//! reports); shutdown while a producer is active never hangs the consumer and loses
//! nothing pushed before it.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use meshos::ingest::park::{Signal, WaitOutcome};
use meshos::ingest::ring::{ring, Consumer, Producer};

/// Pushes `items` (yielding while full), notifying after each push.
fn push_and_notify(mut producer: Producer<u32>, signal: &Signal, items: std::ops::Range<u32>) {
    for i in items {
        let mut item = i;
        while let Err(back) = producer.try_push(item) {
            item = back;
            thread::yield_now();
        }
        signal.notify();
    }
}

/// Pops everything now in the ring into `received`; true if anything came.
fn drain(consumer: &mut Consumer<u32>, received: &mut Vec<u32>) -> bool {
    let before = received.len();
    while let Some(item) = consumer.pop() {
        received.push(item);
    }
    received.len() > before
}

/// One producer pushes and notifies; the consumer drains and waits (no timeout)
/// until it has every item.
fn park_wake(capacity: usize, items: u32) {
    loom_tests::builder().check(move || {
        let signal = Signal::new();
        let (producer, mut consumer) = ring::<u32>(capacity);
        let pusher = {
            let signal = Arc::clone(&signal);
            thread::spawn(move || push_and_notify(producer, &signal, 0..items))
        };
        let mut received = Vec::new();
        loop {
            drain(&mut consumer, &mut received);
            if received.len() == items as usize {
                break;
            }
            assert_eq!(signal.wait(None), WaitOutcome::Notified);
        }
        pusher.join().unwrap();
        assert_eq!(received, (0..items).collect::<Vec<_>>());
        assert_eq!(consumer.pop(), None, "nothing duplicated");
    });
}

#[test]
fn park_wake_two_items() {
    park_wake(2, 2);
}

#[test]
fn park_wake_three_items_through_two_slots() {
    park_wake(2, 3);
}

/// Two producers, one ring each, one consumer: a notify from either is never lost.
#[test]
fn park_wake_two_producers() {
    loom_tests::builder().check(|| {
        let signal = Signal::new();
        let mut consumers = Vec::new();
        let mut pushers = Vec::new();
        for source in 0..2u32 {
            let (producer, consumer) = ring::<u32>(2);
            consumers.push(consumer);
            let signal = Arc::clone(&signal);
            pushers.push(thread::spawn(move || push_and_notify(producer, &signal, source * 10..source * 10 + 1)));
        }
        let mut received = [Vec::new(), Vec::new()];
        loop {
            for (consumer, received) in consumers.iter_mut().zip(received.iter_mut()) {
                drain(consumer, received);
            }
            if received.iter().all(|items| items.len() == 1) {
                break;
            }
            assert_eq!(signal.wait(None), WaitOutcome::Notified);
        }
        for pusher in pushers {
            pusher.join().unwrap();
        }
        assert_eq!(received, [vec![0], vec![10]]);
    });
}

/// A producer pushes and notifies while another thread shuts the signal down. The
/// consumer waits without timeout: it gets every item or `ShutDown`, never hangs;
/// after `ShutDown` one last drain, then (with the producer done) nothing is lost.
#[test]
fn shutdown_while_a_producer_is_active() {
    loom_tests::builder().check(|| {
        let signal = Signal::new();
        let (producer, mut consumer) = ring::<u32>(2);
        let pusher = {
            let signal = Arc::clone(&signal);
            thread::spawn(move || push_and_notify(producer, &signal, 0..2))
        };
        let stopper = {
            let signal = Arc::clone(&signal);
            thread::spawn(move || signal.shutdown())
        };
        let mut received = Vec::new();
        let mut shut_down = false;
        loop {
            drain(&mut consumer, &mut received);
            if received.len() == 2 {
                break;
            }
            match signal.wait(None) {
                WaitOutcome::Notified => {}
                WaitOutcome::ShutDown => {
                    drain(&mut consumer, &mut received);
                    shut_down = true;
                    break;
                }
                WaitOutcome::TimedOut => panic!("no timeout was asked for"),
            }
        }
        assert!(shut_down || received.len() == 2);
        pusher.join().unwrap();
        stopper.join().unwrap();
        // Nothing lost: what the consumer did not take is still in the ring.
        drain(&mut consumer, &mut received);
        assert_eq!(received, vec![0, 1]);
        assert!(consumer.is_abandoned());
    });
}

/// The producer pushes item 0, shuts the signal down itself, then pushes item 1.
/// A consumer that sees `ShutDown` finds item 0 in its last drain (pushed before the
/// shutdown), whatever the interleaving.
#[test]
fn items_pushed_before_shutdown_are_poppable_after_it() {
    loom_tests::builder().check(|| {
        let signal = Signal::new();
        let (mut producer, mut consumer) = ring::<u32>(2);
        let pusher = {
            let signal = Arc::clone(&signal);
            thread::spawn(move || {
                producer.try_push(0).unwrap();
                signal.notify();
                signal.shutdown();
                producer.try_push(1).unwrap();
                signal.notify();
            })
        };
        let mut received = Vec::new();
        loop {
            drain(&mut consumer, &mut received);
            if received.len() == 2 {
                break;
            }
            if signal.wait(None) == WaitOutcome::ShutDown {
                drain(&mut consumer, &mut received);
                assert_eq!(received.first(), Some(&0), "item 0 came before shutdown");
                break;
            }
        }
        pusher.join().unwrap();
        drain(&mut consumer, &mut received);
        assert_eq!(received, vec![0, 1]);
    });
}

/// The timeout path under loom: a `Some` timeout never sleeps (loom has no time), so
/// the consumer polls, yielding between polls; it still receives every item once.
#[test]
fn wait_with_timeout_polls() {
    loom_tests::builder().check(|| {
        let signal = Signal::new();
        let (producer, mut consumer) = ring::<u32>(2);
        let pusher = {
            let signal = Arc::clone(&signal);
            thread::spawn(move || push_and_notify(producer, &signal, 0..2))
        };
        let mut received = Vec::new();
        loop {
            drain(&mut consumer, &mut received);
            if received.len() == 2 {
                break;
            }
            match signal.wait(Some(5)) {
                WaitOutcome::Notified => {}
                WaitOutcome::TimedOut => thread::yield_now(),
                WaitOutcome::ShutDown => panic!("nobody shut down"),
            }
        }
        pusher.join().unwrap();
        assert_eq!(received, vec![0, 1]);
    });
}
