//! Park/wake handoff between many producers and one consumer, without lost wake-ups.
//!
//! The producers (the reactor pushing into per-connection rings) call
//! [`Signal::notify`] after a push; the one consumer (the sequencer) drains every
//! ring and calls [`Signal::wait`] when all of them looked empty. `wait` must not
//! sleep through a push that its last look missed, and `notify` must be cheap while
//! the consumer is busy (the common case under load).
//!
//! State: one `AtomicU8` with three values, `EMPTY` (no news), `NOTIFIED` (a token:
//! something was pushed since the consumer last took it) and `SLEEPING` (the
//! consumer is about to sleep or asleep on the condvar), plus a shutdown flag, a
//! `Mutex<()>` and a `Condvar`. Protocol:
//! 1. `notify`: `fence(SeqCst)` (orders the caller's push before what follows), then
//!    one load; if the state is `NOTIFIED` it returns: no store, no lock. This is
//!    the busy path: the token stays set until the consumer next calls `wait`.
//! 2. Otherwise `notify` swaps the state to `NOTIFIED`; only if it replaced
//!    `SLEEPING` does it take the mutex and `notify_one`.
//! 3. `wait` first checks shutdown, then takes the token (`NOTIFIED` to `EMPTY`,
//!    then `fence(SeqCst)`) and returns `Notified` at once if there was one: the
//!    caller looks at its rings again.
//! 4. Otherwise it takes the mutex and moves `EMPTY` to `SLEEPING` by
//!    compare-exchange. It fails only if a notify set `NOTIFIED` in between: it
//!    takes that token and returns `Notified`.
//! 5. Holding the mutex it loops: shutdown set: `ShutDown`; state `NOTIFIED` (a
//!    notifier replaced `SLEEPING`): `Notified`; deadline passed: `TimedOut`; else
//!    `Condvar::wait` (spurious wake-ups just loop). On leaving it swaps the state
//!    to `EMPTY` under the mutex (a token that raced with a timeout turns the
//!    outcome into `Notified`) and issues `fence(SeqCst)`.
//! 6. `shutdown` sets the flag, then takes the mutex and `notify_all`s.
//!
//! Why no wake-up is lost: a push followed by `notify` either finds `NOTIFIED` or
//! sets it. If it sets it over `SLEEPING`, the consumer holds the mutex from step 4
//! until `Condvar::wait` releases it, so the notifier's lock-then-`notify_one` comes
//! after the consumer sleeps (or after it left) and wakes it. If it sets it over
//! `EMPTY`, the consumer's next step 3 or 4 finds the token. If it found `NOTIFIED`
//! (step 1), that token was not yet taken when the notifier read it, so the
//! notifier's fence precedes the fence the consumer issues after taking it
//! (`SeqCst` fence order), and the consumer's next look at the rings sees the push.
//! The same argument holds when the `NOTIFIED` read was set by another notifier
//! after the consumer's last take: the take that removes it comes later still.
//! Shutdown: the flag is read under the mutex before every sleep, and `shutdown`
//! takes the mutex after setting it, so a sleeping consumer is always woken.
//!
//! Invariants: exactly one consumer calls `wait` (a second one is detected in step 4
//! and panics); notifiers never block except for the short critical section in step
//! 2; items pushed before `shutdown` stay in their rings: after `ShutDown` the
//! consumer drains once more. Under `--cfg loom` timeouts are not modelled: a
//! `Some` timeout never sleeps and returns `TimedOut` when nothing is pending
//! (an immediate spurious return).

use crate::sync::{fence, Arc, AtomicBool, AtomicU8, Condvar, Mutex, MutexGuard, Ordering};
use std::sync::PoisonError;

#[cfg(not(loom))]
use std::time::{Duration, Instant};

/// No news since the consumer last took the token.
const EMPTY: u8 = 0;
/// A notify happened since the consumer last took the token.
const NOTIFIED: u8 = 1;
/// The consumer holds, or is waiting on, the condvar.
const SLEEPING: u8 = 2;

/// Why [`Signal::wait`] returned. In every case the consumer looks at its rings again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A producer notified (possibly before this call: the token was pending).
    Notified,
    /// The timeout passed with no notify (under loom: immediately).
    TimedOut,
    /// [`Signal::shutdown`] was called: drain the rings once more and stop.
    ShutDown,
}

/// The park/wake handoff of the module docs; shared through `sync::Arc`.
pub struct Signal {
    state: AtomicU8,
    shut_down: AtomicBool,
    mutex: Mutex<()>,
    condvar: Condvar,
}

impl Signal {
    /// A signal with no pending token, not shut down.
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal {
            state: AtomicU8::new(EMPTY),
            shut_down: AtomicBool::new(false),
            mutex: Mutex::new(()),
            condvar: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data, so a poisoned lock is still sound to use.
        self.mutex.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Producer side, after a push (or a batch of pushes). Costs one `SeqCst` fence
    /// and one load while a token is pending (the consumer is busy); a swap when it
    /// is not; the mutex only when the consumer sleeps (steps 1 and 2).
    pub fn notify(&self) {
        // Step 1: the caller's push (a Release store of a ring's tail) comes before
        // the load below in the SeqCst fence order.
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) == NOTIFIED {
            return;
        }
        // Step 2. AcqRel: the swap is an RMW, so it reads the latest state.
        if self.state.swap(NOTIFIED, Ordering::AcqRel) == SLEEPING {
            let _guard = self.lock();
            self.condvar.notify_one();
        }
    }

    /// Takes a pending token (step 3); `true` if there was one.
    fn take_token(&self) -> bool {
        if self.state.load(Ordering::Relaxed) != NOTIFIED {
            return false;
        }
        // Only the consumer moves the state away from NOTIFIED, so this swap always
        // replaces NOTIFIED.
        let previous = self.state.swap(EMPTY, Ordering::AcqRel);
        debug_assert_eq!(previous, NOTIFIED, "two consumers on one Signal");
        // The consumer's fence: its next look at the rings sees every push whose
        // notify read this token (module docs, "why no wake-up is lost").
        fence(Ordering::SeqCst);
        true
    }

    /// Consumer side, when every ring looked empty: returns at once if a notify came
    /// since the last call, else sleeps until a notify, the timeout (`None`: no
    /// timeout; `Some(0)`: never sleeps) or shutdown. Only one thread may wait.
    pub fn wait(&self, timeout_ms: Option<u64>) -> WaitOutcome {
        if self.is_shut_down() {
            return WaitOutcome::ShutDown;
        }
        if self.take_token() {
            return WaitOutcome::Notified;
        }
        if timeout_ms == Some(0) {
            return WaitOutcome::TimedOut;
        }
        #[cfg(not(loom))]
        let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));

        let mut guard = self.lock();
        // Step 4.
        match self.state.compare_exchange(EMPTY, SLEEPING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(NOTIFIED) => {
                drop(guard);
                let taken = self.take_token();
                debug_assert!(taken, "two consumers on one Signal");
                return WaitOutcome::Notified;
            }
            Err(state) => panic!("Signal::wait: two consumers (state {state})"),
        }
        // Step 5.
        let outcome = loop {
            if self.shut_down.load(Ordering::Acquire) {
                break WaitOutcome::ShutDown;
            }
            if self.state.load(Ordering::Acquire) == NOTIFIED {
                break WaitOutcome::Notified;
            }
            match timeout_ms {
                None => {
                    guard = self.condvar.wait(guard).unwrap_or_else(PoisonError::into_inner);
                }
                Some(_) => {
                    #[cfg(loom)]
                    break WaitOutcome::TimedOut;
                    #[cfg(not(loom))]
                    {
                        let deadline = deadline.expect("a deadline for a timeout");
                        let now = Instant::now();
                        if now >= deadline {
                            break WaitOutcome::TimedOut;
                        }
                        guard =
                            self.condvar.wait_timeout(guard, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
                    }
                }
            }
        };
        let previous = self.state.swap(EMPTY, Ordering::AcqRel);
        assert!(previous == SLEEPING || previous == NOTIFIED, "Signal state {previous} while the consumer slept");
        fence(Ordering::SeqCst);
        drop(guard);
        if outcome == WaitOutcome::TimedOut && previous == NOTIFIED {
            WaitOutcome::Notified
        } else {
            outcome
        }
    }

    /// Wakes the consumer for good: every later `wait` returns `ShutDown`. Items
    /// already pushed stay in their rings for the consumer's last drain.
    pub fn shutdown(&self) {
        // Release: pushes before shutdown happen before a `wait` that sees the flag.
        self.shut_down.store(true, Ordering::Release);
        let _guard = self.lock();
        self.condvar.notify_all();
    }

    /// True once `shutdown` was called.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ingest::ring::ring;
    use std::time::{Duration, Instant};

    #[test]
    fn a_notify_before_wait_is_not_lost() {
        let signal = Signal::new();
        signal.notify();
        signal.notify();
        assert_eq!(signal.wait(None), WaitOutcome::Notified);
        assert_eq!(signal.wait(Some(0)), WaitOutcome::TimedOut, "one token");
    }

    #[test]
    fn wait_times_out() {
        let signal = Signal::new();
        let start = Instant::now();
        assert_eq!(signal.wait(Some(30)), WaitOutcome::TimedOut);
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(signal.wait(Some(0)), WaitOutcome::TimedOut);
    }

    #[test]
    fn notify_wakes_a_sleeping_consumer() {
        let signal = Signal::new();
        let notifier = {
            let signal = Arc::clone(&signal);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                signal.notify();
            })
        };
        let start = Instant::now();
        assert_eq!(signal.wait(Some(10_000)), WaitOutcome::Notified);
        assert!(start.elapsed() < Duration::from_secs(5));
        notifier.join().unwrap();
    }

    #[test]
    fn shutdown_wakes_a_sleeping_consumer_and_sticks() {
        let signal = Signal::new();
        let stopper = {
            let signal = Arc::clone(&signal);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                signal.shutdown();
            })
        };
        assert_eq!(signal.wait(None), WaitOutcome::ShutDown);
        stopper.join().unwrap();
        assert!(signal.is_shut_down());
        signal.notify();
        assert_eq!(signal.wait(None), WaitOutcome::ShutDown);
    }

    /// Three producers, one ring each, one consumer sleeping whenever all rings look
    /// empty, with and without timeouts: every item arrives, in order per ring.
    fn producers_and_a_sleeping_consumer(timeout_ms: Option<u64>) {
        const RINGS: usize = 3;
        const ITEMS: u64 = 100_000;
        let signal = Signal::new();
        let mut consumers = Vec::new();
        let mut threads = Vec::new();
        for source in 0..RINGS {
            let (mut producer, consumer) = ring::<u64>(8);
            consumers.push(consumer);
            let signal = Arc::clone(&signal);
            threads.push(std::thread::spawn(move || {
                for i in 0..ITEMS {
                    let mut item = i;
                    while let Err(back) = producer.try_push(item) {
                        item = back;
                        std::thread::yield_now();
                    }
                    if i % 7 == source as u64 {
                        // Sometimes let the consumer fall asleep.
                        std::thread::yield_now();
                    }
                    signal.notify();
                }
                drop(producer);
                signal.notify();
            }));
        }
        let mut next = [0u64; RINGS];
        let (mut waits, mut timeouts) = (0u64, 0u64);
        loop {
            let mut got_any = false;
            for (source, consumer) in consumers.iter_mut().enumerate() {
                while let Some(item) = consumer.pop() {
                    assert_eq!(item, next[source], "ring {source} out of order");
                    next[source] += 1;
                    got_any = true;
                }
            }
            if consumers.iter().all(|consumer| consumer.is_abandoned()) {
                break;
            }
            if !got_any {
                waits += 1;
                if signal.wait(timeout_ms) == WaitOutcome::TimedOut {
                    timeouts += 1;
                }
            }
        }
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(next, [ITEMS; RINGS]);
        eprintln!("{RINGS} x {ITEMS} items: {waits} waits, {timeouts} timed out");
    }

    #[test]
    fn producers_and_a_sleeping_consumer_without_timeout() {
        producers_and_a_sleeping_consumer(None);
    }

    #[test]
    fn producers_and_a_sleeping_consumer_with_timeout() {
        producers_and_a_sleeping_consumer(Some(1));
    }
}
