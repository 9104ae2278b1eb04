//! A bounded lock-free single-producer single-consumer ring, allocated once.
//!
//! One ring per connection (or per source) carries items from the reactor (the
//! [`Producer`]) to the sequencer (the [`Consumer`]). Its purpose is back-pressure
//! without loss: a full ring refuses the item (`try_push` returns it), the reactor
//! stops reading that socket (so TCP pushes back on the sender) and resumes when the
//! sequencer has made room (the blocked flag below). Nothing is ever dropped.
//!
//! Layout: `capacity` slots (a power of two, at least 2) of
//! `UnsafeCell<MaybeUninit<T>>` and two free-running counters, `tail` (items ever
//! pushed, written only by the producer) and `head` (items ever popped, written only
//! by the consumer), each on its own cache line. Slot of counter `n` is
//! `n & (capacity - 1)`; counters wrap (`wrapping_add`/`wrapping_sub`).
//!
//! Invariants:
//! 1. `0 <= tail - head <= capacity` (asserted in debug builds on every load).
//! 2. Slots `head..tail` hold initialised items; all others are uninitialised.
//! 3. Only the producer writes a slot (between `head + capacity` and `tail`, which it
//!    owns), only the consumer reads one (at `head`, before `tail`). Ownership passes
//!    by the counters: the producer's `Release` store of `tail` publishes the item it
//!    wrote, the consumer's `Acquire` load of `tail` sees it; the consumer's
//!    `Release` store of `head` hands the emptied slot back, the producer's `Acquire`
//!    load of `head` sees that the read is finished before it writes again.
//! 4. Each side keeps its own counter locally and a cached copy of the other's, so a
//!    push or pop touches the other side's cache line only when the cache says
//!    full/empty. No allocation after [`ring`].
//! 5. Dropping the ring (both ends gone) drops the items still in it, exactly once.
//!
//! The blocked flag (the way back to the reactor), a Dekker handshake with `SeqCst`
//! fences:
//! 1. The producer, after `try_push` failed, calls [`Producer::mark_blocked`]: it
//!    sets `blocked` (by swap: every write of the flag is an RMW), issues `fence(SeqCst)` and loads `head` again. If the ring is
//!    still full it returns `true`: the reactor deregisters read interest. If room
//!    appeared meanwhile it takes the flag back and returns `false`: push again.
//! 2. The consumer, after one or more pops, calls [`Consumer::take_unblocked`]: it
//!    issues `fence(SeqCst)` and loads `blocked`; if set, it swaps it to `false` and
//!    returns `true` exactly once: the sequencer wakes the reactor to resume reading.
//! 3. Why nothing is lost: of the two fences, one comes first in the `SeqCst` order.
//!    If the producer's does, the consumer's load sees `blocked`; if the consumer's
//!    does, the producer's load of `head` sees the pop and it does not block. A mark
//!    that returned `true` is therefore taken by the first `take_unblocked` after a
//!    pop that follows it. A flag taken back concurrently with a `take_unblocked` may
//!    give one spurious resume, which is harmless (read interest is already there).

use std::mem::MaybeUninit;

use crate::sync::{fence, Arc, AtomicBool, AtomicUsize, Ordering, UnsafeCell};

/// Keeps a value on its own cache line pair (128 bytes: adjacent-line prefetch), so
/// the producer's and the consumer's counters never share one.
#[repr(align(128))]
struct CachePadded<T>(T);

/// The state both ends share through an `Arc`.
struct Shared<T> {
    /// Items ever pushed; written only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// Items ever popped; written only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Set by the producer when it stopped reading because the ring was full.
    blocked: CachePadded<AtomicBool>,
    producer_alive: AtomicBool,
    consumer_alive: AtomicBool,
    /// `capacity - 1`; `capacity` is a power of two.
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: `Shared` moves `T` values between threads (hence `T: Send`) and is reached
// from two threads through `Arc`. Its slots are accessed under the SPSC protocol of
// the module docs: a slot is written only by the single producer while it owns it and
// read only by the single consumer after the `Release`/`Acquire` handoff of `tail`,
// so no slot is ever accessed by both at once; everything else is atomic.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above; `&Shared` exposes no access to a slot except through the
// `&mut Producer` / `&mut Consumer` methods, which follow the protocol.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn capacity(&self) -> usize {
        self.mask + 1
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both ends are gone; the last `Arc` drop orders their final stores before
        // this, so relaxed loads see the final counters.
        let head = self.head.0.load(Ordering::Relaxed);
        let tail = self.tail.0.load(Ordering::Relaxed);
        let len = tail.wrapping_sub(head);
        assert!(len <= self.capacity(), "ring counters out of range: {len}");
        for offset in 0..len {
            let slot = &self.slots[head.wrapping_add(offset) & self.mask];
            // SAFETY: slots `head..tail` hold initialised items (invariant 2), each
            // dropped once here, and no other reference to the ring exists.
            slot.with_mut(|item| unsafe { (*item).assume_init_drop() });
        }
    }
}

/// The pushing end (the reactor's side of one connection). `Send`, not `Clone`.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// Local copy of `shared.tail` (only this end writes it).
    tail: usize,
    /// Last value of `shared.head` loaded; the true head is at or after it.
    head_cache: usize,
}

/// The popping end (the sequencer's side of one connection). `Send`, not `Clone`.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Local copy of `shared.head` (only this end writes it).
    head: usize,
    /// Last value of `shared.tail` loaded; the true tail is at or after it.
    tail_cache: usize,
}

/// Creates a ring of `capacity` slots, allocated here and never again.
///
/// # Panics
/// If `capacity` is not a power of two of at least 2 (or is absurdly large).
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    ring_starting_at(capacity, 0)
}

/// [`ring`] with both counters starting at `start` (tests use it to cross the wrap).
fn ring_starting_at<T>(capacity: usize, start: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity >= 2 && capacity.is_power_of_two(), "ring capacity must be a power of two >= 2, got {capacity}");
    assert!(capacity <= usize::MAX / 4, "ring capacity {capacity} too large");
    let slots: Box<[UnsafeCell<MaybeUninit<T>>]> =
        (0..capacity).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect();
    let shared = Arc::new(Shared {
        tail: CachePadded(AtomicUsize::new(start)),
        head: CachePadded(AtomicUsize::new(start)),
        blocked: CachePadded(AtomicBool::new(false)),
        producer_alive: AtomicBool::new(true),
        consumer_alive: AtomicBool::new(true),
        mask: capacity - 1,
        slots,
    });
    let producer = Producer { shared: Arc::clone(&shared), tail: start, head_cache: start };
    let consumer = Consumer { shared, head: start, tail_cache: start };
    (producer, consumer)
}

impl<T> Producer<T> {
    /// Appends `item`, or gives it back if the ring is full (the caller then calls
    /// [`Producer::mark_blocked`] and stops reading its source). Never blocks.
    pub fn try_push(&mut self, item: T) -> Result<(), T> {
        let capacity = self.shared.capacity();
        if self.tail.wrapping_sub(self.head_cache) == capacity {
            // Acquire: pairs with the consumer's Release store of `head`, so its
            // read of the slot we are about to reuse is finished (invariant 3).
            self.head_cache = self.shared.head.0.load(Ordering::Acquire);
            let len = self.tail.wrapping_sub(self.head_cache);
            debug_assert!(len <= capacity, "ring length {len} over {capacity}");
            if len == capacity {
                return Err(item);
            }
        }
        let slot = &self.shared.slots[self.tail & self.shared.mask];
        // SAFETY: the slot at `tail` is outside `head..tail` (the ring is not full),
        // so it is uninitialised and the consumer does not touch it until the
        // Release store of `tail` below publishes it (invariants 2 and 3).
        slot.with_mut(|cell| unsafe { (*cell).write(item) });
        self.tail = self.tail.wrapping_add(1);
        // Release: publishes the item written above to the consumer's Acquire load.
        self.shared.tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Records that this end stopped reading because the ring was full, then checks
    /// again. Returns `true` if the ring is still full: the caller must stop reading
    /// (deregister read interest) until the consumer's [`Consumer::take_unblocked`]
    /// says to resume, which it is then guaranteed to do after its next pop. Returns
    /// `false` if room appeared meanwhile: push again instead (at worst one spurious
    /// resume follows, which is harmless).
    #[must_use = "false means the ring has room again: push instead of blocking"]
    pub fn mark_blocked(&mut self) -> bool {
        let capacity = self.shared.capacity();
        self.mark_blocked_while(|len| len == capacity)
    }

    /// [`Producer::mark_blocked`] for a producer that stops for its own reason as well
    /// as a full ring (a byte budget over the items in the ring): after setting the
    /// flag and the fence, `still_blocked` gets the ring's current length and says
    /// whether the producer must still stop. It must return true for a full ring and
    /// may depend only on that length and the producer's own data, because the
    /// consumer's side of the handshake is its pops: a pop is the only thing that can
    /// change the answer, and every pop is followed by `take_unblocked`.
    #[must_use = "false means there is room again: push instead of blocking"]
    pub fn mark_blocked_while(&mut self, still_blocked: impl FnOnce(usize) -> bool) -> bool {
        // Set + SeqCst fence + load: the Dekker handshake of the module docs. The set
        // is a swap, not a store: every write of `blocked` is then a read-modify-write,
        // so all of them are totally ordered, each reading the one before (loom 0.7
        // does not order a plain store after an RMW it did not read, and reports a
        // lost flag that C11 rules out).
        self.shared.blocked.0.swap(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.head_cache = self.shared.head.0.load(Ordering::Acquire);
        let len = self.tail.wrapping_sub(self.head_cache);
        debug_assert!(len <= self.shared.capacity());
        let blocked = still_blocked(len);
        debug_assert!(blocked || len < self.shared.capacity(), "a full ring must block");
        if !blocked {
            // Take the flag back; if the consumer already took it, it will signal a
            // resume we do not need.
            self.shared.blocked.0.swap(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Items in the ring now (a snapshot; only grows by this end's pushes).
    pub fn len(&self) -> usize {
        // Acquire: a `head` newer than the cache; only its value matters here.
        let head = self.shared.head.0.load(Ordering::Acquire);
        let len = self.tail.wrapping_sub(head);
        debug_assert!(len <= self.shared.capacity());
        len
    }

    /// True if the ring is empty now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// True once the consumer is gone: nothing pushed from now on will be read.
    pub fn is_closed(&self) -> bool {
        // Acquire: pairs with the consumer's Release in its Drop.
        !self.shared.consumer_alive.load(Ordering::Acquire)
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        // Release: every push (tail store) happens before a consumer that sees the
        // producer gone (is_abandoned), so it then sees the final tail.
        self.shared.producer_alive.store(false, Ordering::Release);
    }
}

impl<T> Consumer<T> {
    /// Removes the oldest item, or `None` if the ring is empty. Never blocks.
    pub fn pop(&mut self) -> Option<T> {
        if self.head == self.tail_cache {
            // Acquire: pairs with the producer's Release store of `tail`, so the
            // items up to it are fully written (invariant 3).
            self.tail_cache = self.shared.tail.0.load(Ordering::Acquire);
            debug_assert!(self.tail_cache.wrapping_sub(self.head) <= self.shared.capacity());
            if self.head == self.tail_cache {
                return None;
            }
        }
        let slot = &self.shared.slots[self.head & self.shared.mask];
        // SAFETY: `head < tail` (seen with Acquire above or at an earlier load), so
        // the slot holds an initialised item the producer will not touch until the
        // Release store of `head` below; it is read out exactly once (invariants 2, 3).
        let item = slot.with(|cell| unsafe { (*cell).assume_init_read() });
        self.head = self.head.wrapping_add(1);
        // Release: the read above finishes before the producer reuses the slot.
        self.shared.head.0.store(self.head, Ordering::Release);
        Some(item)
    }

    /// After one or more pops: returns `true` exactly once per [`Producer::mark_blocked`]
    /// that returned `true`, meaning the producer stopped reading and must be told to
    /// resume. Costs one `SeqCst` fence and one load when the flag is clear.
    pub fn take_unblocked(&mut self) -> bool {
        // The consumer half of the Dekker handshake: the pop's head store, this
        // fence, then the load of `blocked`.
        fence(Ordering::SeqCst);
        if !self.shared.blocked.0.load(Ordering::Relaxed) {
            return false;
        }
        self.shared.blocked.0.swap(false, Ordering::Relaxed)
    }

    /// Items in the ring now (a snapshot; only shrinks by this end's pops).
    pub fn len(&self) -> usize {
        let tail = self.shared.tail.0.load(Ordering::Acquire);
        let len = tail.wrapping_sub(self.head);
        debug_assert!(len <= self.shared.capacity());
        len
    }

    /// True if the ring is empty now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// True once the producer is gone and every item it pushed has been popped: this
    /// ring will never yield another item.
    pub fn is_abandoned(&self) -> bool {
        // Acquire on the flag first: pairs with the producer's Release in its Drop,
        // so the tail loaded next is its final one.
        if self.shared.producer_alive.load(Ordering::Acquire) {
            return false;
        }
        self.shared.tail.0.load(Ordering::Acquire) == self.head
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        // Release: pairs with the producer's Acquire in is_closed.
        self.shared.consumer_alive.store(false, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::sync::Arc as StdArc;

    fn assert_send<S: Send>() {}

    #[test]
    fn ends_are_send() {
        assert_send::<Producer<Vec<u8>>>();
        assert_send::<Consumer<Vec<u8>>>();
    }

    #[test]
    fn fills_to_capacity_then_refuses_and_keeps_order() {
        for capacity in [2, 4, 8] {
            let (mut producer, mut consumer) = ring::<u32>(capacity);
            assert_eq!(producer.capacity(), capacity);
            assert_eq!(consumer.capacity(), capacity);
            assert!(consumer.is_empty() && producer.is_empty());
            assert_eq!(consumer.pop(), None);
            for i in 0..capacity as u32 {
                producer.try_push(i).unwrap();
            }
            assert_eq!(producer.try_push(99), Err(99));
            assert_eq!(producer.len(), capacity);
            assert_eq!(consumer.len(), capacity);
            assert_eq!(consumer.pop(), Some(0));
            producer.try_push(100).unwrap();
            assert_eq!(producer.try_push(101), Err(101));
            let drained: Vec<u32> = std::iter::from_fn(|| consumer.pop()).collect();
            let mut expected: Vec<u32> = (1..capacity as u32).collect();
            expected.push(100);
            assert_eq!(drained, expected);
            assert!(consumer.is_empty());
        }
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn capacity_one_is_refused() {
        let _ = ring::<u8>(1);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn capacity_zero_is_refused() {
        let _ = ring::<u8>(0);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn capacity_not_power_of_two_is_refused() {
        let _ = ring::<u8>(3);
    }

    #[test]
    fn counters_wrap_around_usize() {
        let (mut producer, mut consumer) = ring_starting_at::<u64>(4, usize::MAX - 5);
        let mut next_pop = 0u64;
        for i in 0..40u64 {
            producer.try_push(i).unwrap();
            if i % 3 == 2 {
                while let Some(item) = consumer.pop() {
                    assert_eq!(item, next_pop);
                    next_pop += 1;
                }
            }
            assert!(producer.len() <= 4);
        }
        while let Some(item) = consumer.pop() {
            assert_eq!(item, next_pop);
            next_pop += 1;
        }
        assert_eq!(next_pop, 40);
    }

    /// Counts its drops.
    struct Counted(StdArc<StdAtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn leftover_items_are_dropped_exactly_once() {
        let drops = StdArc::new(StdAtomicUsize::new(0));
        let (mut producer, mut consumer) = ring::<Counted>(8);
        for _ in 0..6 {
            assert!(producer.try_push(Counted(drops.clone())).is_ok());
        }
        drop(consumer.pop().unwrap());
        drop(consumer.pop().unwrap());
        assert_eq!(drops.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(producer);
        assert!(!consumer.is_abandoned(), "4 items are still there");
        assert_eq!(drops.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(consumer);
        assert_eq!(drops.load(std::sync::atomic::Ordering::Relaxed), 6);
    }

    #[test]
    fn leftover_items_across_the_wrap_are_dropped() {
        let drops = StdArc::new(StdAtomicUsize::new(0));
        let (mut producer, mut consumer) = ring::<Counted>(4);
        for _ in 0..3 {
            assert!(producer.try_push(Counted(drops.clone())).is_ok());
        }
        for _ in 0..3 {
            drop(consumer.pop().unwrap());
        }
        for _ in 0..4 {
            assert!(producer.try_push(Counted(drops.clone())).is_ok());
        }
        drop(consumer);
        assert!(producer.is_closed());
        drop(producer);
        assert_eq!(drops.load(std::sync::atomic::Ordering::Relaxed), 7);
    }

    #[test]
    fn abandoned_only_when_producer_gone_and_empty() {
        let (mut producer, mut consumer) = ring::<u8>(2);
        producer.try_push(1).unwrap();
        assert!(!consumer.is_abandoned());
        drop(producer);
        assert!(!consumer.is_abandoned());
        assert_eq!(consumer.pop(), Some(1));
        assert!(consumer.is_abandoned());
    }

    #[test]
    fn blocked_flag_round_trip() {
        let (mut producer, mut consumer) = ring::<u8>(2);
        producer.try_push(1).unwrap();
        producer.try_push(2).unwrap();
        assert_eq!(producer.try_push(3), Err(3));
        assert!(producer.mark_blocked(), "still full: block");
        assert_eq!(consumer.pop(), Some(1));
        assert!(consumer.take_unblocked());
        assert!(!consumer.take_unblocked(), "exactly once");
        // Room now: marking again takes the flag back.
        assert!(!producer.mark_blocked());
        assert!(!consumer.take_unblocked());
    }

    #[test]
    fn stress_one_million_items_through_64_slots_in_order() {
        const ITEMS: u64 = 1_000_000;
        let (mut producer, mut consumer) = ring::<u64>(64);
        let pusher = std::thread::spawn(move || {
            let mut full_count = 0u64;
            for i in 0..ITEMS {
                let mut item = i;
                loop {
                    match producer.try_push(item) {
                        Ok(()) => break,
                        Err(back) => {
                            item = back;
                            full_count += 1;
                            std::hint::spin_loop();
                        }
                    }
                }
            }
            full_count
        });
        let mut expected = 0u64;
        while expected < ITEMS {
            match consumer.pop() {
                Some(item) => {
                    assert_eq!(item, expected, "order kept");
                    expected += 1;
                }
                None => {
                    assert!(!consumer.is_abandoned(), "lost items");
                    std::hint::spin_loop();
                }
            }
        }
        let full_count = pusher.join().unwrap();
        assert_eq!(consumer.pop(), None, "nothing duplicated");
        assert!(consumer.is_abandoned());
        eprintln!("stress: {ITEMS} items, producer saw full {full_count} times");
    }

    #[test]
    fn stress_blocked_flag_never_loses_a_resume() {
        // The producer blocks (waits for a resume message) whenever mark_blocked says
        // so; the consumer sends a resume whenever take_unblocked says so. A lost
        // resume would hang this test.
        const ITEMS: u32 = 200_000;
        let (mut producer, mut consumer) = ring::<u32>(2);
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
        let pusher = std::thread::spawn(move || {
            let mut blocks = 0u32;
            for i in 0..ITEMS {
                let mut item = i;
                while let Err(back) = producer.try_push(item) {
                    item = back;
                    if producer.mark_blocked() {
                        blocks += 1;
                        resume_rx.recv().unwrap();
                    }
                }
            }
            blocks
        });
        let mut expected = 0u32;
        let mut resumes = 0u32;
        while expected < ITEMS {
            if let Some(item) = consumer.pop() {
                assert_eq!(item, expected);
                expected += 1;
            } else {
                std::thread::yield_now();
            }
            if consumer.take_unblocked() {
                resumes += 1;
                let _ = resume_tx.send(());
            }
        }
        let blocks = pusher.join().unwrap();
        assert!(resumes >= blocks, "{resumes} resumes for {blocks} blocks");
    }
}
