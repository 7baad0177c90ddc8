//! Model tests of the store's synchronization: object completion, waiters,
//! reference counts, waiting for space and shutdown, run under `shuttle`
//! (`cargo nextest run -p rustyray-core-worker --features shuttle --lib model_`).
//!
//! Each test runs its body under shuttle's random scheduler and then under
//! its PCT scheduler. Wakers count their wake-ups in a shuttle atomic (no
//! thread parking); values freed are checked through `Store::stats()`. A
//! lost condvar wake-up shows up as a deadlock, which shuttle reports (the
//! shim's timed waits never time out before their deadline; see
//! `crate::sync`).

use super::{Peek, Store, StoreStats};
use crate::codec::Value;
use crate::error::Error;
use crate::ids::ObjectId;
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::sync::atomic::AtomicUsize;
use shuttle::thread;
use shuttle::{Config, Runner};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Duration;

/// Schedules explored per scheduler (random, then PCT) by each test.
const ITERATIONS: usize = 5_000;
/// The deepest bug (number of ordering constraints) PCT aims at.
const PCT_DEPTH: usize = 3;
/// Long enough never to expire while a model runs.
const FOREVER: Duration = Duration::from_secs(3600);

fn check(body: impl Fn() + Send + Sync + 'static) {
    let body = Arc::new(body);
    let mut config = Config::new();
    // The store's statistics counters are `Relaxed` on purpose; shuttle
    // would warn that it models them as `SeqCst`.
    config.silence_warnings = true;
    let random = Arc::clone(&body);
    let runs = Runner::new(RandomScheduler::new(ITERATIONS), config.clone()).run(move || random());
    assert_eq!(runs, ITERATIONS);
    let runs = Runner::new(PctScheduler::new(PCT_DEPTH, ITERATIONS), config).run(move || body());
    assert_eq!(runs, ITERATIONS);
}

fn oid(n: u128) -> ObjectId {
    ObjectId::from_u128(n)
}

fn stats(num_objects: u64, bytes_used: u64, num_entries: u64, capacity: u64) -> StoreStats {
    StoreStats {
        num_objects,
        bytes_used,
        num_entries,
        capacity,
    }
}

/// A waker that counts its wake-ups. When `watch` is set, it also checks at
/// each wake-up that the watched object is no longer pending: a wake-up
/// comes after the state change, and with no shard lock held (a shard lock
/// held by the waking thread would make that `peek` deadlock, which
/// shuttle reports).
struct CountingWaker {
    woken: AtomicUsize,
    watch: Option<(Arc<Store>, ObjectId)>,
}

impl CountingWaker {
    fn new(watch: Option<(Arc<Store>, ObjectId)>) -> (Arc<Self>, Waker) {
        let counter = Arc::new(Self {
            woken: AtomicUsize::new(0),
            watch,
        });
        let waker = Waker::from(Arc::clone(&counter));
        (counter, waker)
    }

    fn woken(&self) -> usize {
        self.woken.load(SeqCst)
    }
}

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some((store, id)) = &self.watch {
            assert!(
                !matches!(store.peek(*id, None), Ok(Peek::Pending)),
                "woken while the object is still pending"
            );
        }
        self.woken.fetch_add(1, SeqCst);
    }
}

/// (a) Completion against concurrent waiters: every waker that saw
/// `Pending` is woken after the object completes, and a `peek` after the
/// completion sees `Ready`.
#[test]
fn model_complete_wakes_every_waiter() {
    check(|| {
        let store = Arc::new(Store::new(64, FOREVER));
        let id = oid(1);
        store.create_pending(id).unwrap();

        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    let (counter, waker) = CountingWaker::new(Some((Arc::clone(&store), id)));
                    // Poll twice, as a future would: the second registration
                    // of the same waker must not be lost either.
                    let mut saw_pending = false;
                    for _ in 0..2 {
                        match store.peek(id, Some(&waker)).unwrap() {
                            Peek::Pending => saw_pending = true,
                            Peek::Ready(v) => {
                                assert_eq!(v.type_name(), std::any::type_name::<u64>());
                                break;
                            }
                            Peek::Failed(e) => panic!("unexpected failure {e}"),
                        }
                    }
                    (saw_pending, counter)
                })
            })
            .collect();

        let completer = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                store.reserve(8).unwrap();
                store.complete(id, Ok((Value::local(7_u64), 8)));
                assert!(matches!(store.peek(id, None), Ok(Peek::Ready(_))));
            })
        };

        // Join everyone before counting wake-ups: a wake-up may come from
        // any thread.
        completer.join().unwrap();
        let waiters: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        for (saw_pending, counter) in waiters {
            if saw_pending {
                assert!(counter.woken() >= 1, "a waiter that saw Pending was never woken");
            }
        }
        assert!(matches!(store.peek(id, None), Ok(Peek::Ready(_))));
        assert_eq!(store.stats(), stats(1, 8, 1, 64));
        store.release(id);
        assert_eq!(store.stats(), stats(0, 0, 0, 64));
    });
}

/// What an observer saw of an object's final state.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ready(String),
    Failed(Error),
}

fn outcome(store: &Store, id: ObjectId) -> Option<Outcome> {
    match store.peek(id, None).unwrap() {
        Peek::Pending => None,
        Peek::Ready(v) => Some(Outcome::Ready(v.type_name().to_owned())),
        Peek::Failed(e) => Some(Outcome::Failed(e)),
    }
}

/// (b) The first completion wins: two values and an error race to
/// complete one object. It ends in exactly one final state, never changes
/// once an observer saw it, and the losers' reservations are returned, so
/// `bytes_used` is the winner's size.
#[test]
fn model_first_completion_wins() {
    check(|| {
        let store = Arc::new(Store::new(64, FOREVER));
        let id = oid(2);
        store.create_pending(id).unwrap();

        let mut completers = Vec::new();
        for (value, size) in [(Value::local(1_u64), 8), (Value::local(2_i32), 4)] {
            let store = Arc::clone(&store);
            completers.push(thread::spawn(move || {
                store.reserve(size).unwrap();
                store.complete(id, Ok((value, size)));
            }));
        }
        {
            let store = Arc::clone(&store);
            completers.push(thread::spawn(move || {
                store.complete(id, Err(Error::InvalidArgument("lost".into())));
            }));
        }

        // Observe meanwhile: once final, the state never changes, and the
        // counters stay within bounds.
        let mut seen = None;
        for _ in 0..3 {
            let now = outcome(&store, id);
            if seen.is_some() {
                assert_eq!(now, seen, "a completed object changed state");
            }
            seen = now;
            let s = store.stats();
            assert!(
                s.num_objects <= 1 && s.bytes_used <= 12 && s.num_entries == 1,
                "{s:?}"
            );
        }

        for c in completers {
            c.join().unwrap();
        }
        let last = outcome(&store, id).expect("complete after every completion");
        if let Some(seen) = seen {
            assert_eq!(last, seen, "a completed object changed state");
        }
        let expected = match &last {
            Outcome::Ready(t) if t == std::any::type_name::<u64>() => stats(1, 8, 1, 64),
            Outcome::Ready(t) if t == std::any::type_name::<i32>() => stats(1, 4, 1, 64),
            Outcome::Ready(t) => panic!("unexpected value of type {t}"),
            Outcome::Failed(_) => stats(0, 0, 1, 64),
        };
        assert_eq!(store.stats(), expected);
        store.release(id);
        assert_eq!(store.stats(), stats(0, 0, 0, 64));
    });
}

/// (c) Reference counts: holders add and drop references concurrently with
/// the completion and with the creator dropping its own. A holder's `peek`
/// never finds the object lost; once everyone released, the entry and its
/// value are gone; and a holder's waker registered on the pending object is
/// woken (by the completion, or by the last release of a pending object).
#[test]
fn model_refcounts_free_exactly_when_last_ref_goes() {
    check(|| {
        let store = Arc::new(Store::new(64, FOREVER));
        let id = oid(3);
        store.create_pending(id).unwrap();
        // One handle for each holder thread, handed over before it starts.
        store.add_ref(id).unwrap();
        store.add_ref(id).unwrap();

        let holders: Vec<_> = (0..2)
            .map(|_| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    let (counter, waker) = CountingWaker::new(None);
                    let saw_pending = matches!(store.peek(id, Some(&waker)), Ok(Peek::Pending));
                    // Clone the handle, drop one clone, look again, drop the other.
                    store.add_ref(id).expect("add_ref while holding a reference");
                    assert!(
                        store.stats().num_entries == 1,
                        "entry miscounted while referenced"
                    );
                    assert!(store.peek(id, None).is_ok(), "object lost while referenced");
                    store.release(id);
                    assert!(store.peek(id, None).is_ok(), "object lost while referenced");
                    store.release(id);
                    (saw_pending, counter)
                })
            })
            .collect();
        let completer = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                store.reserve(8).unwrap();
                store.complete(id, Ok((Value::local(5_u64), 8)));
            })
        };
        store.release(id);

        // Join everyone before counting wake-ups: the last release, which
        // wakes the waiters of a pending object, may be any thread's.
        completer.join().unwrap();
        let holders: Vec<_> = holders.into_iter().map(|h| h.join().unwrap()).collect();
        for (saw_pending, counter) in holders {
            if saw_pending {
                assert!(
                    counter.woken() >= 1,
                    "a waiter on a pending object was never woken"
                );
            }
        }
        assert_eq!(store.stats(), stats(0, 0, 0, 64));
        assert!(matches!(store.peek(id, None), Err(Error::ObjectLost(x)) if x == id));
        assert!(matches!(store.add_ref(id), Err(Error::ObjectLost(_))));
    });
}

/// (d) Waiting for space: the store holds one object and is full; two
/// `reserve`s wait for room, which the release of that object (and then of
/// each other's) makes. Both must succeed: a lost wake-up leaves a thread
/// waiting forever, which shuttle reports as a deadlock.
#[test]
fn model_reserve_waits_for_released_space() {
    check(|| {
        let store = Arc::new(Store::new(8, FOREVER));
        let first = oid(4);
        store.reserve(8).unwrap();
        store.insert_ready(first, Value::local(1_u64), 8).unwrap();
        assert_eq!(store.stats(), stats(1, 8, 1, 8));

        let writers: Vec<_> = [oid(5), oid(6)]
            .into_iter()
            .map(|id| {
                let store = Arc::clone(&store);
                thread::spawn(move || {
                    store.reserve(8).expect("reserve after space is freed");
                    store.insert_ready(id, Value::local(2_u64), 8).unwrap();
                    store.release(id);
                })
            })
            .collect();
        let releaser = {
            let store = Arc::clone(&store);
            thread::spawn(move || store.release(first))
        };

        releaser.join().unwrap();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(store.stats(), stats(0, 0, 0, 8));
    });
}

/// Shutdown against new objects and readers: whatever `create_pending` or
/// `insert_ready` returns, once `shut_down` has returned no object is left,
/// every value is freed, and a reader that saw the object pending is woken
/// (so a blocked `get` returns `Shutdown`).
#[test]
fn model_shut_down_leaves_nothing_behind() {
    check(|| {
        let store = Arc::new(Store::new(64, FOREVER));
        let (pending, put) = (oid(7), oid(8));

        let creator = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                let (counter, waker) = CountingWaker::new(None);
                let saw_pending = store.create_pending(pending).is_ok()
                    && matches!(store.peek(pending, Some(&waker)), Ok(Peek::Pending));
                (saw_pending, counter)
            })
        };
        let putter = {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                if store.reserve(8).is_ok() {
                    let _ = store.insert_ready(put, Value::local(3_u64), 8);
                }
            })
        };
        store.shut_down();

        let (saw_pending, counter) = creator.join().unwrap();
        putter.join().unwrap();
        // Anything created before the shutdown was drained by it; anything
        // after was refused.
        assert_eq!(store.stats(), stats(0, 0, 0, 64));
        if saw_pending {
            assert!(
                counter.woken() >= 1,
                "a reader of a pending object was not woken at shutdown"
            );
        }
        assert!(matches!(store.peek(pending, None), Err(Error::Shutdown)));
        // The handles' owners release them later: nothing left to free.
        store.release(pending);
        store.release(put);
        assert_eq!(store.stats(), stats(0, 0, 0, 64));
    });
}

/// Borrower counts (a worker process's side of ownership): loans arrive
/// (`borrow`, one per message that lends the object) while local handles
/// go (`release`); whenever the last handle goes, the loans counted so far
/// are handed back. Every loan must be handed back exactly once, even when
/// a loan arrives just as the entry is going (it is counted in a new
/// entry, handed back with that one).
#[test]
fn model_every_loan_is_given_back_exactly_once() {
    check(|| {
        let store = Arc::new(Store::new(64, FOREVER));
        let id = oid(11);
        let given_back = Arc::new(AtomicUsize::new(0));
        let borrowers: Vec<_> = (0..3)
            .map(|_| {
                let (store, given_back) = (Arc::clone(&store), Arc::clone(&given_back));
                thread::spawn(move || {
                    // A message lends the object: one count here, one loan.
                    store.borrow(id).expect("borrow");
                    // A copy of the handle comes and goes meanwhile.
                    store.add_ref(id).expect("add_ref");
                    if let Some(n) = store.release(id) {
                        given_back.fetch_add(n as usize, SeqCst);
                    }
                    if let Some(n) = store.release(id) {
                        given_back.fetch_add(n as usize, SeqCst);
                    }
                })
            })
            .collect();
        for b in borrowers {
            b.join().unwrap();
        }
        assert_eq!(given_back.load(SeqCst), 3, "a loan was lost or given back twice");
        assert_eq!(store.stats(), stats(0, 0, 0, 64));
    });
}
