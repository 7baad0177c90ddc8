//! The ordering core of a process actor's calls — what keeps each caller's
//! submission order across restarts (Ray's actor task submitter with its
//! sequence numbers and resend queue), apart from processes and sockets
//! so that it can be model-checked (`model_tests` below, under shuttle).
//!
//! # Design
//!
//! Calls are sent under the send lock ([`Ordered::send`]), numbered in
//! submission order, to the worker of the moment. A call lost with a
//! worker that died is kept by its number ([`Ordered::lose`]). The monitor,
//! once every call in flight on the dead worker has reported, retires it
//! under the send lock ([`Ordered::retire`]: no send to it is under way
//! after that, so every call lost with it is kept), takes the lost calls,
//! and brings a new worker up ([`Ordered::bring_up`]): under the send
//! lock, the lost calls are sent again in number order before the new
//! worker is let in for calls made since.
//!
//! # Locks
//!
//! `state` (the send lock), then `lost`; the caller's own locks (an
//! actor's `life`) may be taken inside either, never the other way round.

use crate::sync::Mutex;
use std::collections::BTreeMap;

/// What the ordering core needs of a worker.
pub(super) trait Worker: Clone {
    /// Whether two handles are the same worker.
    fn same(&self, other: &Self) -> bool;
    /// Whether the worker is known to be dead.
    fn is_dead(&self) -> bool;
}

/// A process actor's calls on their way to its worker: see the module
/// documentation. `W` is the worker handle, `C` a call lost with one.
pub(super) struct Ordered<W, C> {
    state: Mutex<State<W>>,
    /// Calls lost with a worker that died, by submission number.
    lost: Mutex<BTreeMap<u64, C>>,
}

struct State<W> {
    /// The worker calls go to (`None` while the actor starts, restarts or
    /// is dead).
    worker: Option<W>,
    /// The next call's submission number.
    next_seq: u64,
}

impl<W, C> Default for Ordered<W, C> {
    fn default() -> Self {
        Ordered {
            state: Mutex::new(State {
                worker: None,
                next_seq: 0,
            }),
            lost: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<W: Worker, C> Ordered<W, C> {
    /// The worker calls go to now, if any.
    pub(super) fn worker(&self) -> Option<W> {
        self.state.lock().worker.clone()
    }

    /// Stops sending calls to any worker (the actor died).
    pub(super) fn take_worker(&self) -> Option<W> {
        self.state.lock().worker.take()
    }

    /// Sends a call under the send lock: `send` gets the worker and the
    /// call's submission number. `None` (nothing sent, no number taken)
    /// when no live worker is up.
    pub(super) fn send<R>(&self, send: impl FnOnce(&W, u64) -> R) -> Option<R> {
        let mut state = self.state.lock();
        let w = state.worker.clone().filter(|w| !w.is_dead())?;
        let seq = state.next_seq;
        state.next_seq += 1;
        Some(send(&w, seq))
    }

    /// Keeps call `seq`, lost with its worker, for the monitor; gives it
    /// back when `dead` says no monitor will come (the actor died for good),
    /// to be failed by the caller. `dead` is asked under the lock that
    /// [`Self::take_lost`] takes, so a call kept is always taken by someone.
    pub(super) fn lose(&self, seq: u64, call: C, dead: impl FnOnce() -> bool) -> Option<C> {
        let mut lost = self.lost.lock();
        if dead() {
            return Some(call);
        }
        lost.insert(seq, call);
        None
    }

    /// Stops sending calls to `w`, which died. Once this returns, no send
    /// to `w` is under way.
    pub(super) fn retire(&self, w: &W) {
        let mut state = self.state.lock();
        if state.worker.as_ref().is_some_and(|c| c.same(w)) {
            state.worker = None;
        }
    }

    /// Takes every call kept as lost.
    pub(super) fn take_lost(&self) -> BTreeMap<u64, C> {
        std::mem::take(&mut *self.lost.lock())
    }

    /// Brings `fresh` up, if `admit` (asked under the send lock) agrees:
    /// sends each of `lost` again with `resend`, in submission order, then
    /// lets new calls go to `fresh`. `resend` gives back a call it does
    /// not send again (no retries left), for the caller to fail. Returns
    /// the calls to fail: those given back, or, when not admitted, all of
    /// `lost` (`Err`).
    pub(super) fn bring_up(
        &self,
        fresh: &W,
        admit: impl FnOnce() -> bool,
        lost: BTreeMap<u64, C>,
        mut resend: impl FnMut(C, &W) -> Option<C>,
    ) -> Result<Vec<C>, Vec<C>> {
        let mut state = self.state.lock();
        if !admit() {
            return Err(lost.into_values().collect());
        }
        let failed = lost.into_values().filter_map(|c| resend(c, fresh)).collect();
        state.worker = Some(fresh.clone());
        Ok(failed)
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod model_tests {
    //! Model tests of per-caller order across a restart, under shuttle
    //! (`cargo nextest run -p rustyray-core-worker --features shuttle --lib
    //! model_`). The workers are in memory: a worker's inbox is the order in
    //! which calls reach it, and its death hands every call still in its
    //! inbox to `lose`, as the node's reader does for a dead process.

    use super::{Ordered, Worker};
    use shuttle::scheduler::{PctScheduler, RandomScheduler};
    use shuttle::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use shuttle::thread;
    use shuttle::{Config, Runner};
    use std::sync::Arc;

    const ITERATIONS: usize = 3_000;
    const CALLS: u64 = 4;

    /// A worker in memory: the calls that reached it, in order, and how
    /// many of them it ran before it died.
    #[derive(Default)]
    struct FakeWorker {
        inbox: shuttle::sync::Mutex<Vec<u64>>,
        dead: AtomicBool,
    }

    #[derive(Clone)]
    struct W(Arc<FakeWorker>);

    impl Worker for W {
        fn same(&self, other: &Self) -> bool {
            Arc::ptr_eq(&self.0, &other.0)
        }
        fn is_dead(&self) -> bool {
            self.0.dead.load(SeqCst)
        }
    }

    impl W {
        /// Delivers call `seq`; a worker found dead afterwards loses it at
        /// once (as `push_then` fails a task sent to a worker found dead).
        fn push(&self, seq: u64, link: &Ordered<W, u64>) {
            self.0.inbox.lock().unwrap().push(seq);
            if self.is_dead() {
                let mut inbox = self.0.inbox.lock().unwrap();
                if let Some(at) = inbox.iter().position(|s| *s == seq) {
                    inbox.remove(at);
                    drop(inbox);
                    let _ = link.lose(seq, seq, || false);
                }
            }
        }
    }

    /// One caller makes `CALLS` calls while the first worker dies after
    /// running `ran` of what reached it and a monitor brings a second one
    /// up: every call runs exactly once, and in submission order.
    fn restart_keeps_order(ran: usize) {
        let link = Arc::new(Ordered::<W, u64>::default());
        let first = W(Arc::default());
        let second = W(Arc::default());
        assert!(link
            .bring_up(&first, || true, Default::default(), |c, _| Some(c))
            .is_ok());
        let caller = {
            let link = Arc::clone(&link);
            thread::spawn(move || {
                let mut made = 0;
                while made < CALLS {
                    // No live worker: wait for the restart, as the actor's
                    // driver does.
                    if link.send(|w, seq| w.push(seq, &link)).is_some() {
                        made += 1;
                    } else {
                        thread::yield_now();
                    }
                }
            })
        };
        // The first worker dies: the calls it had not run are lost (its
        // reader fails them), then the monitor restarts the actor.
        let ran_first: Vec<u64> = {
            // Whatever reached the worker before it died is in its inbox;
            // the first `ran` of those ran (their results came back), the
            // rest are lost. A call pushed after the death loses itself.
            let mut inbox = first.0.inbox.lock().unwrap();
            first.0.dead.store(true, SeqCst);
            let keep = ran.min(inbox.len());
            let lost: Vec<u64> = inbox.drain(keep..).collect();
            let ran_first: Vec<u64> = inbox.drain(..).collect();
            drop(inbox);
            for seq in lost {
                let _ = link.lose(seq, seq, || false);
            }
            ran_first
        };
        link.retire(&first);
        let lost = link.take_lost();
        let failed = link
            .bring_up(
                &second,
                || true,
                lost,
                |seq, w| {
                    w.push(seq, &link);
                    None
                },
            )
            .expect("admitted");
        assert!(failed.is_empty());
        caller.join().unwrap();
        let ran_second = second.0.inbox.lock().unwrap().clone();
        let all: Vec<u64> = ran_first.iter().chain(&ran_second).copied().collect();
        assert_eq!(
            all,
            (0..CALLS).collect::<Vec<_>>(),
            "calls ran out of order or not exactly once: first {ran_first:?}, second {ran_second:?}"
        );
    }

    fn check(body: impl Fn() + Send + Sync + 'static) {
        let body = Arc::new(body);
        let random = Arc::clone(&body);
        Runner::new(RandomScheduler::new(ITERATIONS), Config::new()).run(move || random());
        Runner::new(PctScheduler::new(3, ITERATIONS), Config::new()).run(move || body());
    }

    #[test]
    fn model_calls_keep_their_order_when_the_worker_dies_having_run_none() {
        check(|| restart_keeps_order(0));
    }

    #[test]
    fn model_calls_keep_their_order_when_the_worker_dies_having_run_some() {
        check(|| restart_keeps_order(2));
    }
}
