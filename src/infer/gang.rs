//! The threads of one split image (batch 1), held for the whole image: the pool's other
//! workers spin between layers instead of going back to rayon, which puts an idle worker to
//! sleep after a few tens of microseconds and then needs 20-30 us to wake it (measured on a
//! 2-core Zen 4 VM; a layer of a student takes 100-400 us). Each layer then starts on every
//! thread at once. ONNX Runtime's intra-op pool spins between nodes the same way.
//!
//! [`with`] runs an image with a gang: it spawns one helper per other worker into a
//! `rayon::scope`, and [`current`] hands the gang to [`super::kernels::for_tasks`], whose
//! [`Gang::run`] publishes a layer's work items; the calling thread and the helpers claim them
//! one by one from a single atomic word (epoch, item count, items taken from each end: the
//! caller takes them from the front, helpers from the back, so on two threads each keeps the
//! same contiguous share of the rows from layer to layer), so a helper that never
//! started (its worker busy elsewhere) costs nothing but its share: the caller takes every
//! item nobody claimed, then waits only for the claimed ones. Helpers stop when the image ends
//! (or unwinds), so no thread spins past the image.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Bits of the state word: epoch (16) | items (16) | taken from the back (16) | taken from
/// the front (16).
const ITEM_BITS: u32 = 16;
const ITEM_MASK: u64 = (1 << ITEM_BITS) - 1;
/// The most items one [`Gang::run`] takes.
pub(super) const MAX_ITEMS: usize = ITEM_MASK as usize;
/// A helper with nothing to claim, or the owner waiting for a helper's item, for this long
/// yields its core between checks (serial work between layers, or more threads than cores).
const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(200);

/// Calls `*(data as *const F)` on item `i`.
///
/// # Safety
/// `data` must point to a live `F`.
unsafe fn trampoline<F: Fn(usize) + Sync>(data: *const (), i: usize) {
    // SAFETY: the caller's contract.
    unsafe { (*data.cast::<F>())(i) }
}

type Call = unsafe fn(*const (), usize);

pub(super) struct Gang {
    /// epoch << 48 | items << 32 | back << 16 | front: the owner takes items from the front
    /// (0, 1, ...), helpers from the back (`items - 1`, ...) when `from_ends`, else from the front.
    state: AtomicU64,
    /// Helpers claim from the back ([`SPLIT_ENDS`]).
    from_ends: bool,
    /// Items of the current epoch finished (by anyone).
    done: AtomicUsize,
    /// The current epoch's closure and its trampoline, valid while `done < items`.
    data: AtomicPtr<()>,
    call: AtomicPtr<()>,
    /// Set when the image ends: helpers return to the pool.
    quit: AtomicBool,
    /// An item panicked on a helper; the caller panics once the layer is done.
    panicked: AtomicBool,
    /// The rayon worker that runs the image (a helper job it pops itself returns at once).
    owner: AtomicUsize,
}

thread_local! {
    /// The gang of the image this thread is running, if any.
    static CURRENT: Cell<*const Gang> = const { Cell::new(std::ptr::null()) };
}

/// Whether [`with`] holds the pool's threads for split images; a benchmark hook (on by
/// default; off: each layer is handed to rayon's work stealing), stored by
/// `examples/split_bands.rs`.
#[doc(hidden)]
pub static SPIN_SPLIT: AtomicBool = AtomicBool::new(true);

/// Whether a gang's helpers take items from the back while its owner takes them from the front
/// (on by default): with two threads each then gets the same contiguous half of every layer,
/// whose input rows the same core wrote in the layer before (off: both take the next item,
/// so which core gets which rows changes from layer to layer). A benchmark hook, stored by
/// `examples/split_bands.rs`.
#[doc(hidden)]
pub static SPLIT_ENDS: AtomicBool = AtomicBool::new(true);

/// Runs `f` (one image's layers) with the pool's other workers held in a gang: layers that
/// split their work inside `f` ([`current`]) run it on all of them. Called off the pool, the
/// image moves onto a worker first. Without a second thread, or with [`SPIN_SPLIT`] off, only
/// that move happens.
pub(super) fn with<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    hold(
        f,
        SPIN_SPLIT.load(Ordering::Relaxed),
        SPLIT_ENDS.load(Ordering::Relaxed),
    )
}

/// [`with`], with [`SPIN_SPLIT`]'s and [`SPLIT_ENDS`]'s values passed in.
fn hold<R: Send>(f: impl FnOnce() -> R + Send, spin: bool, from_ends: bool) -> R {
    let threads = rayon::current_num_threads();
    let nested = CURRENT.with(|c| !c.get().is_null());
    if threads < 2 || nested || !spin {
        // From outside the pool every split would hand its work to the pool and block on a
        // condition variable; run the image on a worker so each split is a cheap join.
        return if rayon::current_thread_index().is_none() {
            rayon::scope(|_| f())
        } else {
            f()
        };
    }
    let gang = Gang {
        state: AtomicU64::new(0),
        from_ends,
        done: AtomicUsize::new(0),
        data: AtomicPtr::new(std::ptr::null_mut()),
        call: AtomicPtr::new(std::ptr::null_mut()),
        quit: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
        owner: AtomicUsize::new(usize::MAX),
    };
    let gang = &gang;
    // The scope ends only when every helper has returned, so none outlives `gang`.
    rayon::scope(move |s| {
        let owner = rayon::current_thread_index().expect("a scope runs on a worker");
        gang.owner.store(owner, Ordering::Relaxed);
        for _ in 1..threads {
            s.spawn(move |_| gang.help());
        }
        struct Release<'a>(&'a Gang);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(std::ptr::null()));
                self.0.quit.store(true, Ordering::Release);
            }
        }
        CURRENT.with(|c| c.set(gang));
        let _release = Release(gang);
        f()
    })
}

/// Calls `f` with the gang of the image the calling thread runs, if any.
pub(super) fn current<R>(f: impl FnOnce(Option<&Gang>) -> R) -> R {
    let p = CURRENT.with(|c| c.get());
    // SAFETY: `with` sets the pointer on this thread for the duration of its scope only and
    // clears it before the gang goes away; the reference does not leave `f`, which runs
    // inside that scope.
    f((!p.is_null()).then(|| unsafe { &*p }))
}

/// `f(i, chunk)` for each `len`-long chunk of `out` (the last may be shorter): on the image's
/// gang when `split` and there is one, else on rayon's pool when `split`, else in order here.
pub(super) fn for_chunks_mut<T: Send>(
    out: &mut [T],
    len: usize,
    split: bool,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(len > 0, "chunks of 0");
    if !split {
        out.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    let (total, n) = (out.len(), out.len().div_ceil(len));
    let base = SendPtr(out.as_mut_ptr());
    let held = current(|gang| {
        let gang = gang.filter(|_| (2..=MAX_ITEMS).contains(&n))?;
        gang.run(n, &|i| {
            let start = i * len;
            let end = (start + len).min(total);
            // SAFETY: `run` hands out each index once, so the chunks are disjoint ranges of
            // `out`, which stays borrowed until `run` returns (after every item).
            let chunk = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
            f(i, chunk)
        });
        Some(())
    });
    if held.is_none() {
        use rayon::prelude::*;
        out.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// A pointer the gang's items share (each writes its own range).
struct SendPtr<T>(*mut T);
// SAFETY: only used by `for_chunks_mut`, whose items write disjoint ranges.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The element `i` places on (a method, so closures capture the whole wrapper).
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

impl Gang {
    /// Runs `f(0)`, ..., `f(items - 1)` on the calling thread and the helpers, and returns when
    /// all have finished. Must be called by the thread that owns the gang.
    pub(super) fn run<F: Fn(usize) + Sync>(&self, items: usize, f: &F) {
        assert!(
            items <= MAX_ITEMS,
            "{items} work items (at most {MAX_ITEMS})"
        );
        if items == 0 {
            return;
        }
        self.data
            .store((f as *const F).cast_mut().cast(), Ordering::Relaxed);
        self.call
            .store(trampoline::<F> as Call as *mut (), Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        // Only a new value matters (so a stale claim's compare-exchange fails): it wraps.
        let epoch = ((self.state.load(Ordering::Relaxed) >> (3 * ITEM_BITS)) + 1) & ITEM_MASK;
        // Publishes the closure: a helper's claim (Acquire) of this epoch sees the stores above.
        self.state.store(
            epoch << (3 * ITEM_BITS) | (items as u64) << (2 * ITEM_BITS),
            Ordering::Release,
        );
        let mut mine = None;
        while let Some(i) = self.claim(false) {
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                mine.get_or_insert(e);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
        // Items claimed by helpers borrow `f` and this layer's buffers: wait for them even when
        // one of ours panicked.
        let waiting = Instant::now();
        let mut checks = 0u32;
        while self.done.load(Ordering::Acquire) < items {
            // A helper descheduled mid-item (more threads than cores) needs this core back.
            checks += 1;
            if checks.is_multiple_of(64) && waiting.elapsed() > SPIN_BEFORE_YIELD {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Some(e) = mine {
            resume_unwind(e);
        }
        if self.panicked.load(Ordering::Relaxed) {
            panic!("a split layer's work item panicked on another thread");
        }
    }

    /// Claims an unclaimed item of the current epoch: the first (`back` false) or the last.
    fn claim(&self, back: bool) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let items = (s >> (2 * ITEM_BITS)) & ITEM_MASK;
            let (taken_back, front) = ((s >> ITEM_BITS) & ITEM_MASK, s & ITEM_MASK);
            if front + taken_back >= items {
                return None;
            }
            let (item, bump) = if back {
                (items - 1 - taken_back, 1 << ITEM_BITS)
            } else {
                (front, 1)
            };
            match self
                .state
                .compare_exchange_weak(s, s + bump, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(item as usize),
                Err(now) => s = now,
            }
        }
    }

    /// A helper: claims and runs items until the image ends.
    fn help(&self) {
        let me = rayon::current_thread_index();
        if me.is_none() || me == Some(self.owner.load(Ordering::Relaxed)) {
            // The owner popped its own helper job (it waits in the scope's end, or in a join
            // inside the image): spinning here would never end.
            return;
        }
        let mut idle = Instant::now();
        let mut checks = 0u32;
        while !self.quit.load(Ordering::Acquire) {
            if let Some(i) = self.claim(self.from_ends) {
                // SAFETY: the claim succeeded for this epoch, so its closure is live until
                // `done` reaches its item count, which needs this item's increment below.
                let (data, call) = (
                    self.data.load(Ordering::Relaxed),
                    self.call.load(Ordering::Relaxed),
                );
                // SAFETY: `call` was stored as a `Call` by `run` (the same epoch's).
                let call: Call = unsafe { std::mem::transmute::<*mut (), Call>(call) };
                // SAFETY: `data` is that epoch's live closure, of the trampoline's type.
                if catch_unwind(AssertUnwindSafe(|| unsafe { call(data, i) })).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
                self.done.fetch_add(1, Ordering::Release);
                idle = Instant::now();
                checks = 0;
                continue;
            }
            checks += 1;
            if checks.is_multiple_of(64) && idle.elapsed() > SPIN_BEFORE_YIELD {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work that takes `d` (a wake-up of the other worker takes tens of microseconds).
    fn busy(d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Every item of every layer runs exactly once, on more than one thread over many
    /// layers, and `run` returns only when all are done (each layer reads the last one's
    /// counts).
    #[test]
    fn each_item_runs_once_and_the_helpers_take_part() {
        for (threads, ends) in [(2, false), (2, true), (3, false), (3, true)] {
            let (counts, last): (Vec<AtomicUsize>, Vec<AtomicUsize>) = (0..64)
                .map(|_| (AtomicUsize::new(0), AtomicUsize::new(usize::MAX)))
                .unzip();
            let helped = AtomicUsize::new(0);
            pool(threads).install(|| {
                hold(
                    || {
                        let me = rayon::current_thread_index();
                        for layer in 1..=300 {
                            let items = 1 + layer % 64;
                            current(|g| {
                                g.expect("a gang inside `with`").run(items, &|i| {
                                    assert_eq!(counts[i].load(Ordering::Relaxed), layer - 1);
                                    busy(Duration::from_micros(3));
                                    counts[i].fetch_add(1, Ordering::Relaxed);
                                    if rayon::current_thread_index() != me {
                                        helped.fetch_add(1, Ordering::Relaxed);
                                    }
                                    last[i].store(layer, Ordering::Relaxed);
                                })
                            });
                            for c in &counts[items..] {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            assert!(last[..items]
                                .iter()
                                .all(|l| l.load(Ordering::Relaxed) == layer));
                        }
                    },
                    true,
                    ends,
                )
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 300));
            assert!(
                helped.load(Ordering::Relaxed) > 0,
                "{threads} threads (helpers from the back: {ends}): no item ran on a helper"
            );
        }
    }

    /// A panic in an item, on the owner or on a helper, reaches the caller of `with` once
    /// the layer's other items are done, and the pool runs the next gang as before.
    #[test]
    fn a_panicking_item_panics_the_image_and_the_pool_recovers() {
        let pool = pool(2);
        for bad in [0, 7] {
            let finished = AtomicUsize::new(0);
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.install(|| {
                    hold(
                        || {
                            current(|g| {
                                g.unwrap().run(8, &|i| {
                                    if i == bad {
                                        panic!("item {i}");
                                    }
                                    busy(Duration::from_micros(200));
                                    finished.fetch_add(1, Ordering::Relaxed);
                                })
                            })
                        },
                        true,
                        true,
                    )
                })
            }));
            assert!(r.is_err(), "item {bad}'s panic was lost");
            assert_eq!(finished.load(Ordering::Relaxed), 7, "items left running");
            let sum = AtomicUsize::new(0);
            pool.install(|| {
                let add = |i| _ = sum.fetch_add(i, Ordering::Relaxed);
                hold(|| current(|g| g.unwrap().run(5, &add)), true, true)
            });
            assert_eq!(sum.load(Ordering::Relaxed), 10);
        }
    }

    /// `for_chunks_mut` on a gang writes each chunk once with its own index, the last one
    /// short, as the sequential loop does.
    #[test]
    fn chunks_on_a_gang_match_the_sequential_loop() {
        let fill = |i: usize, c: &mut [usize]| {
            busy(Duration::from_micros(20));
            c.iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v += 1000 * i + j);
        };
        let mut want = vec![0usize; 1003];
        for_chunks_mut(&mut want, 10, false, fill);
        let mut got = vec![0usize; 1003];
        pool(2).install(|| hold(|| for_chunks_mut(&mut got, 10, true, fill), true, true));
        assert_eq!(got, want);
        assert_eq!(want[1002], 100 * 1000 + 2);
    }

    /// On one thread, nested, or with spinning off, `hold` runs `f` without a new gang.
    #[test]
    fn no_gang_without_a_second_thread_when_nested_or_off() {
        pool(1).install(|| hold(|| current(|g| assert!(g.is_none())), true, true));
        pool(2).install(|| {
            hold(
                || {
                    let outer = current(|g| g.map(|g| g as *const Gang as usize)).expect("a gang");
                    let inner = hold(
                        || current(|g| g.map(|g| g as *const Gang as usize)),
                        true,
                        true,
                    );
                    assert_eq!(inner, Some(outer));
                },
                true,
                true,
            )
        });
        assert!(pool(2).install(|| hold(|| current(|g| g.is_none()), false, true)));
        // Called off the pool, the image moves onto a worker (with a gang or without).
        for spin in [true, false] {
            assert!(hold(|| rayon::current_thread_index().is_some(), spin, true));
        }
    }

    /// With helpers taking items from the back, the owner's items of a layer are a prefix
    /// (0, 1, ...) and the helper's the rest, on two threads: each keeps one contiguous share
    /// of the rows, layer after layer.
    #[test]
    fn from_the_ends_each_thread_takes_a_contiguous_share() {
        let mut helped = 0;
        for _ in 0..200 {
            let who: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(usize::MAX)).collect();
            let owner = pool(2).install(|| {
                hold(
                    || {
                        current(|g| {
                            g.unwrap().run(8, &|i| {
                                busy(Duration::from_micros(20));
                                let me = rayon::current_thread_index().unwrap();
                                who[i].store(me, Ordering::Relaxed);
                            })
                        });
                        rayon::current_thread_index().unwrap()
                    },
                    true,
                    true,
                )
            });
            let mine: Vec<bool> = who
                .iter()
                .map(|w| w.load(Ordering::Relaxed) == owner)
                .collect();
            let k = mine.iter().take_while(|&&m| m).count();
            assert!(mine[k..].iter().all(|&m| !m), "owner's items {mine:?}");
            helped += usize::from(k < 8);
        }
        assert!(helped > 0, "no layer had a helper's item");
    }
}
