//! `Authorizer::decide` runs for every connection the proxy accepts, so it must not touch the heap:
//! a counting global allocator checks that thousands of decisions over the 1,000-policy set of
//! `benches/support/policy_set.rs` (allowed, denied by DENY, denied for want of an ALLOW, dry-run,
//! audited) allocate nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use ferry::policy::{Decision, Reason, Verdict};

#[path = "../benches/support/policy_set.rs"]
mod policy_set;

use policy_set::TARGET;

/// The system allocator, counting the allocations of threads that asked for it.
struct Counting;

thread_local! {
    // Per thread, so the test harness's other threads do not count; `const` so that reading them
    // from inside the allocator does not itself allocate.
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // `try_with`: a thread being torn down may still allocate after its locals are gone.
    let _ = ENABLED.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller's `layout` obligations are passed on as they are.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns how many allocations this thread made during it.
fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    ENABLED.with(|on| on.set(true));
    f();
    ENABLED.with(|on| on.set(false));
    ALLOCATIONS.with(|n| n.get())
}

/// Rounds over every case: a few thousand decisions.
const ROUNDS: usize = 500;

#[test]
fn the_counter_sees_an_allocation() {
    // Without this, a broken counter would make the real test pass.
    let n = allocations_during(|| drop(black_box(Box::new(7u64))));
    assert_eq!(n, 1);
}

#[test]
fn deciding_allocates_nothing() {
    let a = policy_set::authorizer();
    let cases = policy_set::cases();
    let conns: Vec<_> = cases.iter().map(|c| c.connection()).collect();
    // Checked before the loop, because naming the deciding policy allocates.
    let decided: Vec<Decision> = cases
        .iter()
        .zip(&conns)
        .map(|(case, conn)| {
            let d = a.decide(TARGET, conn);
            case.check(&a, &d);
            d
        })
        .collect();
    // Every kind of decision is in the mix, so a shortcut through the evaluator cannot pass.
    let has = |f: &dyn Fn(&Decision) -> bool| decided.iter().any(f);
    assert!(has(&|d| d.enforced.reason == Reason::AllowMatched));
    assert!(has(&|d| d.enforced.reason == Reason::DenyMatched));
    assert!(has(&|d| d.enforced.reason == Reason::NoAllowMatched));
    assert!(has(&|d| d.dry_run.is_some_and(|o| o.verdict != d.enforced.verdict)));
    assert!(has(&|d| d.audit.is_some() && d.enforced.verdict == Verdict::Allow));
    assert!(has(&|d| d.audit.is_some() && d.enforced.verdict == Verdict::Deny));

    let mut decisions = 0usize;
    let n = allocations_during(|| {
        for _ in 0..ROUNDS {
            for (conn, want) in conns.iter().zip(&decided) {
                let d = a.decide(black_box(TARGET), black_box(conn));
                assert!(d == *want, "decisions must not change between calls");
                decisions += 1;
            }
        }
    });
    assert_eq!(decisions, ROUNDS * cases.len());
    assert_eq!(n, 0, "{n} allocations in {decisions} decisions");
}
