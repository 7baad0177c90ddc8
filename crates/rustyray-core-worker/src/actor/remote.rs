//! Actors in worker processes — the owner's side of Ray's actor task
//! submitter, for the worker-process mode.
//!
//! Each actor gets a worker process of its own, leased from the node's
//! pool for good. The constructor and every method call travel as task
//! specs with their arguments resolved here; the worker hosts the instance
//! on its embedded runtime, where the usual machinery orders calls and
//! bounds their concurrency.
//!
//! The driver task [`drive`] takes calls from the mailbox in submission
//! order, waits for their reference arguments, and sends them to the
//! actor's current worker at once, so they arrive in order; a call whose
//! arguments are values skips the mailbox when nothing is queued before it
//! ([`try_send_now`]). Its outcome completes it on the worker's reader
//! thread. A method that panics takes its worker down with it, as a
//! crashing actor process does in Ray.
//!
//! # Restarts keep each caller's order
//!
//! [`monitor`] watches the worker. When it dies, every call that was in
//! flight on it is *lost*: kept, with its submission number, by the
//! actor's [`Link`]. Once the worker's death has been handled (every call
//! in flight on it has reported, [`Leased::ended`]), the monitor
//! retires it, restarts the actor in a new worker per `max_restarts` (the
//! constructor runs again), and sends the lost calls that may be retried
//! (per `max_task_retries`) to the new worker in submission order, before
//! any call made since; the others fail with `ActorDied`. So a caller's
//! calls run in the order it made them across any number of restarts, as
//! in Ray. The ordering itself (send lock, numbers, lost calls, bringing a
//! worker up) is [`super::ordered`], model-checked on its own.
//!
//! # Locks
//!
//! A call is numbered, encoded and written under the link's send lock, so
//! the monitor, which takes it to retire a dead worker, knows that no send
//! to that worker is still under way; a send that fails at once loses the
//! call under the same lock. The actor's `life` is taken inside the send
//! lock (when the actor comes alive with its worker), never the other way.

use super::ordered::{self, Ordered};
use super::{complete_call, fail_call, ActorCall, ActorState, CallGuard, Mail, Status};
use crate::error::{Error, TaskFailure};
use crate::lease::Leased;
use crate::runtime::{Inner, Outcome};
use crate::task::{Target, TaskSpec};
use crate::wire::{Message, WireOutcome};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// More calls than can ever be in flight: the permits that let the driver
/// wait for the last one to finish.
pub(super) const IN_FLIGHT_LIMIT: u32 = 1 << 28;

/// Starts a placed actor in a worker process of its own.
pub(super) async fn start(rt: Arc<Inner>, actor: Arc<ActorState>) {
    if actor.hold_placement(&rt) {
        match launch(&rt, &actor).await {
            Ok(w) => {
                if bring_up(&rt, &actor, &w, Status::Pending, BTreeMap::new()) {
                    rt.handle.spawn(monitor(rt.clone(), actor.clone(), w));
                } else {
                    w.kill();
                }
            }
            Err(e) => actor.die(&rt, e),
        }
    }
    actor.created.notify_waiters();
    actor.ready.store(true, Ordering::Release);
}

/// Leases a worker and runs the constructor there.
async fn launch(rt: &Arc<Inner>, actor: &Arc<ActorState>) -> crate::Result<Arc<Leased>> {
    let node = rt
        .mode
        .node()
        .cloned()
        .ok_or_else(|| Error::invalid("a process actor needs the worker-process mode"))?;
    let spec = TaskSpec {
        id: rt.ids.task(),
        target: Target::Constructor(actor.class),
        args: actor.ctor_args.lock().clone(),
        name: None,
    };
    let task_id = spec.id;
    let bytes = rt
        .resolve_values(&spec, 1)
        .and_then(|values| spec.to_wire(&values, rt.mode.shm()))?;
    drop(spec);
    let failed = |failure, message| {
        actor.died(
            "its constructor failed",
            Some(Error::Task {
                function: actor.class.name.to_owned(),
                name: None,
                task_id,
                failure,
                message,
                attempts: 1,
                cause: None,
            }),
        )
    };
    // The worker is leased for good: it never returns to the pool and
    // ends with the actor.
    let created = async {
        let w = node.lease().await?;
        let msg = Message::CreateActor {
            actor_id: actor.id,
            task_id,
            spec: bytes.0,
            max_concurrency: actor.max_concurrency,
        };
        let outcome = w
            .push(task_id, &msg, bytes.1, |o| o)
            .await
            .map_err(|reason| Error::WorkerCrashed { task_id, reason })?;
        Ok::<_, Error>((w, outcome))
    };
    let (w, outcome) = created
        .await
        .map_err(|e| actor.died("its worker process could not start it", Some(e)))?;
    let err = match outcome {
        WireOutcome::Value { .. } | WireOutcome::Stored { .. } => return Ok(w),
        WireOutcome::Pinned { .. } => actor.died(
            "its worker process answered with a value only an owner sends",
            None,
        ),
        WireOutcome::Returned(m) => failed(TaskFailure::Returned, m),
        WireOutcome::Panicked(m) => failed(TaskFailure::Panicked, m),
        WireOutcome::Failed(e) => actor.died("its constructor failed", Some(e)),
    };
    w.kill();
    Err(err)
}

/// Watches an actor's worker; restarts the actor (or ends it) when the
/// worker dies, and sends the calls lost with it again, in order.
async fn monitor(rt: Arc<Inner>, actor: Arc<ActorState>, mut w: Arc<Leased>) {
    loop {
        w.ended().await;
        // No send to `w` is under way once it is retired, so every call
        // lost with it is in `lost` now.
        actor.link.retire(&w);
        let lost = actor.link.take_lost();
        if !actor.begin_restart(&rt, "its worker process died", None) {
            return fail_lost(&rt, &actor, lost);
        }
        let fresh = match launch(&rt, &actor).await {
            Ok(fresh) => fresh,
            Err(e) => {
                actor.die(&rt, e);
                return fail_lost(&rt, &actor, lost);
            }
        };
        let alive = bring_up(&rt, &actor, &fresh, Status::Restarting, lost);
        actor.restarted.notify_waiters();
        if !alive {
            fresh.kill();
            return;
        }
        w = fresh;
    }
}

/// Ends calls lost with a worker that will not be replaced.
pub(super) fn fail_lost(rt: &Arc<Inner>, actor: &Arc<ActorState>, lost: BTreeMap<u64, Lost>) {
    for (_, Lost { flight, outcome }) in lost {
        flight.fail(rt, actor, outcome);
    }
}

/// The way from a process actor's callers to its worker: the worker its
/// calls go to now, their submission numbers, and the calls lost with the
/// last one that died (see [`super::ordered`]).
pub(super) type Link = Ordered<Arc<Leased>, Lost>;

impl ordered::Worker for Arc<Leased> {
    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(self, other)
    }

    fn is_dead(&self) -> bool {
        Leased::is_dead(self)
    }
}

/// Makes the actor alive on `fresh`, if it is still in status `from`
/// (starting or restarting; a kill meanwhile made it dead): sends the lost
/// calls that may be retried to it, in submission order, fails the others,
/// and lets new calls go to it. The status changes under the send lock,
/// with the worker (a `die` sees the worker to kill, or this sees the actor
/// dead). Returns whether the actor is alive; otherwise every lost call is
/// failed and `fresh` is the caller's to kill.
fn bring_up(
    rt: &Arc<Inner>,
    actor: &Arc<ActorState>,
    fresh: &Arc<Leased>,
    from: Status,
    lost: BTreeMap<u64, Lost>,
) -> bool {
    let admit = || {
        let mut life = actor.life.lock();
        let expected = std::mem::discriminant(&life.status) == std::mem::discriminant(&from);
        if expected {
            life.status = Status::Alive;
            actor.epoch.fetch_add(1, Ordering::AcqRel);
        }
        expected
    };
    let resend = |lost: Lost, w: &Arc<Leased>| {
        let Lost { mut flight, outcome } = lost;
        let retries_left = flight.retries_left;
        if retries_left == 0 || flight.call.state.is_cancelled() {
            return Some(Lost { flight, outcome });
        }
        flight.retries_left -= i32::from(retries_left > 0);
        flight.attempt += 1;
        flight.push(rt, actor, w);
        None
    };
    let (alive, failed) = match actor.link.bring_up(fresh, admit, lost, resend) {
        Ok(failed) => (true, failed),
        Err(all) => (false, all),
    };
    for Lost { flight, outcome } in failed {
        flight.fail(rt, actor, outcome);
    }
    alive
}

/// Keeps a call lost with its worker for the monitor, or fails it from the
/// executor if the actor is already dead (no monitor will come).
fn lose(rt: &Arc<Inner>, actor: &Arc<ActorState>, flight: InFlight, outcome: Outcome) {
    let seq = flight.seq;
    let dead = || actor.dead_error().is_some();
    if let Some(Lost { flight, outcome }) = actor.link.lose(seq, Lost { flight, outcome }, dead) {
        flight.fail_later(rt, actor, outcome);
    }
}

/// A call sent to the actor's worker: all it takes to send it again.
struct InFlight {
    call: ActorCall,
    send: Outgoing,
    guard: CallGuard,
    /// Its submission number (the order to send it again in).
    seq: u64,
    attempt: u32,
    /// Sends left after this one (-1: no limit).
    retries_left: i32,
}

/// A call lost with its worker, and what became of it there.
pub(super) struct Lost {
    flight: InFlight,
    outcome: Outcome,
}

impl InFlight {
    /// Sends the call to `w`; its outcome completes it on `w`'s reader
    /// thread, or makes it lost when `w` dies. Called with the send lock
    /// held.
    fn push(self, rt: &Arc<Inner>, actor: &Arc<ActorState>, w: &Arc<Leased>) {
        let (msg, loan) = match self.send.message(rt, actor) {
            Ok(m) => m,
            Err(e) => return self.fail_later(rt, actor, Outcome::Failed(e)),
        };
        let (task_id, state) = (self.call.state.id, self.call.state.clone());
        let (rt2, actor2, w2) = (rt.clone(), actor.clone(), w.clone());
        w.push_then(
            task_id,
            &msg,
            loan,
            // Converted here, on the reader thread: what the value names is
            // taken before the worker's next message (a release) is read.
            Box::new(move |r| match r.map(|o| Outcome::from_wire(o, &rt2)) {
                Ok(Outcome::Panicked(m)) => {
                    // A panic ends the worker; its monitor sends this call
                    // again, or fails it.
                    w2.condemn();
                    lose(&rt2, &actor2, self, Outcome::Panicked(m));
                }
                Ok(o) => {
                    complete_call(&rt2, &actor2, &self.call, self.attempt, o);
                    drop(self);
                }
                Err(reason) if w2.is_dead() => lose(&rt2, &actor2, self, Outcome::Crashed(reason)),
                // The worker lives: the message could not go (too large).
                Err(reason) => self.fail_later(&rt2, &actor2, Outcome::Failed(Error::invalid(reason))),
            }),
        );
        // A call's task state counts one attempt however often it is sent.
        state.set_remote(1, w.clone(), false);
    }

    /// Fails the call from the executor, off the thread that holds the send
    /// lock (completing an object may run code that sends again).
    fn fail_later(self, rt: &Arc<Inner>, actor: &Arc<ActorState>, outcome: Outcome) {
        let (rt2, actor) = (rt.clone(), actor.clone());
        rt.handle.spawn(async move { self.fail(&rt2, &actor, outcome) });
    }

    /// Ends the call with the outcome of its last attempt: a crash of its
    /// worker is the actor's death.
    fn fail(self, rt: &Arc<Inner>, actor: &Arc<ActorState>, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Crashed(reason) => Outcome::Failed(actor.dead_error().unwrap_or_else(|| {
                actor.died(
                    "its worker process died",
                    Some(Error::WorkerCrashed {
                        task_id: self.call.state.id,
                        reason,
                    }),
                )
            })),
            o => o,
        };
        complete_call(rt, actor, &self.call, self.attempt, outcome);
        drop(self.guard);
    }
}

impl ActorState {
    /// The worker hosting the actor, waiting out a start or restart in
    /// progress.
    async fn worker(&self) -> crate::Result<Arc<Leased>> {
        loop {
            let restarted = self.restarted.notified();
            tokio::pin!(restarted);
            restarted.as_mut().enable();
            if let Status::Dead(e) = &self.life.lock().status {
                return Err(e.clone());
            }
            if let Some(w) = self.link.worker() {
                if !w.is_dead() {
                    return Ok(w);
                }
            }
            restarted.await;
        }
    }
}

/// The actor's driver: takes calls in order and sends them to its worker.
pub(super) async fn drive(rt: Arc<Inner>, actor: Arc<ActorState>, mut rx: mpsc::UnboundedReceiver<Mail>) {
    actor.until_created().await;
    while let Some(mail) = rx.recv().await {
        let call = match mail {
            Mail::Call(c) => c,
            Mail::Stop => break,
        };
        // Counted as queued until sent (or failed): see `try_send_now`.
        let _sent = Dequeued(&actor);
        let Some(call) = super::ready_call(&rt, &actor, call).await else {
            continue;
        };
        let Ok(permit) = actor.in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut next = Some((call, permit));
        while let Some((call, permit)) = next.take() {
            if let Err(e) = actor.worker().await {
                fail_call(&rt, &call, e);
                break;
            }
            // The worker may have died since: then wait for its restart.
            next = send_call(&rt, &actor, call, permit);
        }
    }
    // Out of scope: let the calls in flight finish, then end.
    let _all = actor.in_flight.acquire_many(IN_FLIGHT_LIMIT).await;
    let e = actor.died("all handles to it were dropped", None);
    actor.die(&rt, e);
    rx.close();
    while let Ok(mail) = rx.try_recv() {
        if let Mail::Call(call) = mail {
            let _sent = Dequeued(&actor);
            let e = actor
                .dead_error()
                .unwrap_or_else(|| actor.died("it was stopped", None));
            fail_call(&rt, &call, e);
        }
    }
}

/// Marks a call taken from the mailbox as no longer queued (once it was
/// sent or failed).
struct Dequeued<'a>(&'a ActorState);

impl Drop for Dequeued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends a call from the caller's thread, skipping the mailbox, when
/// nothing is queued before it (so calls still reach the worker in
/// submission order), its arguments are values, and the actor's worker is
/// up. Gives the call back otherwise.
pub(super) fn try_send_now(rt: &Arc<Inner>, actor: &Arc<ActorState>, call: ActorCall) -> Option<ActorCall> {
    if actor.queued.load(Ordering::Acquire) != 0 || call.args.iter().any(|a| matches!(a, crate::Arg::Ref(_)))
    {
        return Some(call);
    }
    let Ok(permit) = actor.in_flight.clone().try_acquire_owned() else {
        return Some(call);
    };
    send_call(rt, actor, call, permit).map(|(call, _)| call)
}

/// Sends a call whose arguments are ready to the actor's worker, numbered
/// in submission order; gives it back when no worker is up (the actor
/// starts or restarts).
fn send_call(
    rt: &Arc<Inner>,
    actor: &Arc<ActorState>,
    call: ActorCall,
    permit: OwnedSemaphorePermit,
) -> Option<(ActorCall, OwnedSemaphorePermit)> {
    let mut unsent = Some((call, permit));
    actor.link.send(|w, seq| {
        if let Some((call, permit)) = unsent.take() {
            send_numbered(rt, actor, call, permit, w, seq);
        }
    });
    unsent
}

/// Sends call number `seq` to `w`, under the send lock.
fn send_numbered(
    rt: &Arc<Inner>,
    actor: &Arc<ActorState>,
    mut call: ActorCall,
    permit: OwnedSemaphorePermit,
    w: &Arc<Leased>,
    seq: u64,
) {
    if !call.state.start(1) {
        rt.forget_task(call.state.id);
        return;
    }
    let guard = CallGuard::running(rt, actor, &call.state, Some(permit));
    let mut spec = TaskSpec {
        id: call.state.id,
        target: Target::Method(actor.id, call.method),
        args: std::mem::take(&mut call.args),
        name: None,
    };
    let values = rt.resolve_values(&spec, 1);
    // The spec keeps its target; the values are sent (again, on a retry)
    // from `values`.
    spec.args.clear();
    let values = match values {
        Ok(_) if call.state.is_cancelled() => Err(Error::TaskCancelled(call.state.id)),
        other => other,
    };
    // A call a worker sent straight to the actor's process, lost with it,
    // has spent an attempt.
    let retries_left = match actor.max_task_retries {
        n if call.attempted && n > 0 => n - 1,
        n => n,
    };
    let flight = InFlight {
        call,
        send: Outgoing {
            spec,
            values: Vec::new(),
        },
        guard,
        seq,
        attempt: 1,
        retries_left,
    };
    match values {
        Ok(values) => InFlight {
            send: Outgoing {
                values,
                ..flight.send
            },
            ..flight
        }
        .push(rt, actor, w),
        Err(e) => flight.fail_later(rt, actor, Outcome::Failed(e)),
    }
}

/// What a call sends: its spec (target) and its argument values, encoded
/// anew for each worker it goes to (shared-memory arguments are pinned for
/// that worker).
struct Outgoing {
    spec: TaskSpec,
    values: Vec<crate::Value>,
}

impl Outgoing {
    fn message(&self, rt: &Arc<Inner>, actor: &ActorState) -> crate::Result<(Message, crate::shm::Loan)> {
        let (spec, loan) = self.spec.to_wire(&self.values, rt.mode.shm())?;
        let msg = Message::PushTask {
            task_id: self.spec.id,
            actor: Some(actor.id),
            spec,
            cpu: 0.0,
        };
        Ok((msg, loan))
    }
}

/// The way to the process hosting `actor` now, for a worker to send its
/// calls straight there: while the actor is alive in a worker process that
/// accepts `Peer` connections.
pub(super) fn route(actor: &ActorState) -> Option<crate::wire::ActorRoute> {
    if !matches!(actor.life.lock().status, Status::Alive) {
        return None;
    }
    let w = actor.link.worker()?;
    Some(crate::wire::ActorRoute {
        endpoint: w.endpoint()?.to_owned(),
        pid: w.pid(),
        max_task_retries: actor.max_task_retries,
    })
}
