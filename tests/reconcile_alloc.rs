//! No heap allocation inside a reconcile pass outside its arena: a counting global
//! allocator sees zero allocations during warm passes, converged and disturbed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use meshos::config::Config;
use meshos::event::{EventKind, NodeHealth, NodeStatus, ReplicaState};
use meshos::reconcile::{Reconciler, Scope};
use meshos::sim::fixtures::{converged_cluster, node_name, Feeder};
use meshos::state::checkpoint;
use meshos::state::State;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarding the caller's layout to the system allocator unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc`/`dealloc`: the caller's pointer and layout, unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made while `work` runs (the test runs single-threaded in this file).
fn allocations_during(work: impl FnOnce()) -> u64 {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    work();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn disturbed(base: &State, corrupt_every: usize, down: Option<u32>) -> State {
    let mut feeder = Feeder::new(&Config::for_tests(), base.nodes.len() as u32);
    feeder.state = base.clone();
    feeder.set_seqs(base.nodes.origin_seq_last.clone());
    feeder.time_ms = base.now_ms;
    for row in (0..base.replicas.len()).step_by(corrupt_every) {
        let blob = base.blobs.hash[base.replicas.blob[row].index()];
        feeder.push(base.replicas.node[row].0, EventKind::ReplicaUpdate { blob, state: ReplicaState::Corrupt });
    }
    if let Some(node) = down {
        feeder.push(0, EventKind::NodeHealth(NodeHealth::Status { node: node_name(node), status: NodeStatus::Down }));
    }
    feeder.flush();
    feeder.state
}

#[test]
fn passes_allocate_nothing_outside_the_arena() {
    let base = converged_cluster(&Config::for_tests(), 100, 3_000, 3);
    let mut reconciler = Reconciler::new();

    // Warm up: the arena and the planner's scratch reach their working size.
    let mut warm = disturbed(&base, 50, Some(3));
    reconciler.pass(&mut warm, Scope::Full);
    reconciler.pass(&mut warm, Scope::Incremental);

    let mut steady = base.clone();
    let count = allocations_during(|| {
        for _ in 0..10 {
            assert!(reconciler.pass(&mut steady, Scope::Full).is_empty());
            assert!(reconciler.pass(&mut steady, Scope::Incremental).is_empty());
        }
    });
    assert_eq!(count, 0, "converged passes allocated");

    for (corrupt_every, down) in [(100, None), (50, Some(7)), (1_000, Some(11))] {
        let mut churned = disturbed(&base, corrupt_every, down);
        let mut emitted = 0;
        let count = allocations_during(|| {
            emitted = reconciler.pass(&mut churned, Scope::Full).len();
        });
        assert!(emitted > 0, "the disturbed cluster needs actions");
        assert_eq!(count, 0, "a pass emitting {emitted} actions allocated {count} times");
    }

    // A state loaded from a checkpoint has its working lists' room reserved again
    // (`State::rebuild_indexes`): its passes allocate nothing either. (In this test,
    // not another: the counter is global and tests run on parallel threads.)
    let config = Config::for_tests();
    for scope in [Scope::Incremental, Scope::Full] {
        let churned = disturbed(&base, 100, Some(7));
        let bytes = checkpoint::encode_into(&churned, rkyv::util::AlignedVec::new()).unwrap();
        let mut loaded = checkpoint::decode(std::path::Path::new("memory"), &bytes, &config).unwrap();
        let mut emitted = 0;
        let count = allocations_during(|| {
            emitted = reconciler.pass(&mut loaded, scope).len();
        });
        assert!(emitted > 0, "the loaded disturbed cluster needs actions");
        assert_eq!(count, 0, "a {scope:?} pass over a loaded state allocated {count} times");
    }
}
