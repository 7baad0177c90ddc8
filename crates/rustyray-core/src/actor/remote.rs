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
//! actor's current worker at once, so they arrive in order; a task per
//! call waits for its outcome. [`monitor`] watches the worker: when it
//! dies, the actor restarts in a new worker per `max_restarts` (the
//! constructor runs again) or dies. A call that was in flight is sent again
//! to the restarted actor per `max_task_retries`, else it fails with
//! `ActorDied`. A method that panics takes its worker down with it, as a
//! crashing actor process does in Ray.

use super::{complete_call, fail_call, ActorCall, ActorState, CallGuard, Mail, Status};
use crate::error::{Error, TaskFailure};
use crate::node::WorkerProc;
use crate::runtime::{Inner, Outcome};
use crate::task::{Target, TaskSpec};
use crate::wire::{Message, WireOutcome};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// More calls than can ever be in flight: the permits that let the driver
/// wait for the last one to finish.
pub(super) const IN_FLIGHT_LIMIT: u32 = 1 << 28;

/// Starts a placed actor in a worker process of its own.
pub(super) async fn start(rt: Arc<Inner>, actor: Arc<ActorState>) {
    if actor.hold_placement(&rt) {
        match launch(&rt, &actor).await {
            Ok(w) => {
                let alive = {
                    let mut life = actor.life.lock();
                    let pending = matches!(life.status, Status::Pending);
                    if pending {
                        life.status = Status::Alive;
                        *actor.remote.lock() = Some(w.clone());
                    }
                    pending
                };
                if alive {
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
async fn launch(rt: &Arc<Inner>, actor: &Arc<ActorState>) -> crate::Result<Arc<WorkerProc>> {
    let node = rt
        .node
        .clone()
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
        .and_then(|values| spec.to_wire(&values, rt.shm.as_ref()))?;
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
    let (w, outcome) = node
        .create_actor(actor.id, task_id, bytes, actor.max_concurrency)
        .await
        .map_err(|reason| {
            actor.died(
                "its worker process could not start it",
                Some(Error::WorkerCrashed { task_id, reason }),
            )
        })?;
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
/// worker dies.
async fn monitor(rt: Arc<Inner>, actor: Arc<ActorState>, mut w: Arc<WorkerProc>) {
    loop {
        w.dead().await;
        {
            let mut current = actor.remote.lock();
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &w)) {
                *current = None;
            }
        }
        if !actor.begin_restart(&rt, "its worker process died", None) {
            return;
        }
        match launch(&rt, &actor).await {
            Ok(fresh) => {
                let alive = {
                    let mut life = actor.life.lock();
                    let restarting = matches!(life.status, Status::Restarting);
                    if restarting {
                        life.status = Status::Alive;
                        *actor.remote.lock() = Some(fresh.clone());
                        actor.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    restarting
                };
                actor.restarted.notify_waiters();
                if !alive {
                    fresh.kill();
                    return;
                }
                w = fresh;
            }
            Err(e) => {
                actor.die(&rt, e);
                return;
            }
        }
    }
}

impl ActorState {
    /// The worker hosting the actor, waiting out a restart in progress;
    /// with `prev`, a worker other than that one (the one a call was lost
    /// with).
    async fn worker(&self, prev: Option<&Arc<WorkerProc>>) -> crate::Result<Arc<WorkerProc>> {
        loop {
            let restarted = self.restarted.notified();
            tokio::pin!(restarted);
            restarted.as_mut().enable();
            if let Status::Dead(e) = &self.life.lock().status {
                return Err(e.clone());
            }
            let current = self.remote.lock().clone();
            if let Some(w) = current {
                if !w.is_dead() && prev.is_none_or(|p| !Arc::ptr_eq(p, &w)) {
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
        let w = match actor.worker(None).await {
            Ok(w) => w,
            Err(e) => {
                fail_call(&rt, &call, e);
                continue;
            }
        };
        send_call(&rt, &actor, call, &w, permit);
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
    let w = match actor.remote.lock().clone() {
        Some(w) if !w.is_dead() => w,
        _ => return Some(call),
    };
    let Ok(permit) = actor.in_flight.clone().try_acquire_owned() else {
        return Some(call);
    };
    send_call(rt, actor, call, &w, permit);
    None
}

/// Sends a call whose arguments are ready to the actor's worker; its
/// outcome completes it on the worker's reader thread (a crash goes to
/// `finish`, which may wait for a restart).
fn send_call(
    rt: &Arc<Inner>,
    actor: &Arc<ActorState>,
    mut call: ActorCall,
    w: &Arc<WorkerProc>,
    permit: tokio::sync::OwnedSemaphorePermit,
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
        Ok(_) if call.state.is_cancelled() => {
            let e = Error::TaskCancelled(call.state.id);
            return complete_call(rt, actor, &call, 1, Outcome::Failed(e));
        }
        Ok(v) => v,
        Err(e) => return complete_call(rt, actor, &call, 1, Outcome::Failed(e)),
    };
    let send = Outgoing { spec, values };
    let (msg, loan) = match send.message(rt, actor) {
        Ok(m) => m,
        Err(e) => return complete_call(rt, actor, &call, 1, Outcome::Failed(e)),
    };
    let task_id = call.state.id;
    let state = call.state.clone();
    let (rt2, actor2, w2) = (rt.clone(), actor.clone(), w.clone());
    w.push_then(
        task_id,
        &msg,
        loan,
        // Converted here, on the reader thread: what the value names is
        // taken before the worker's next message (a release) is read.
        Box::new(move |r| match r.map(|o| Outcome::from_wire(o, &rt2)) {
            Ok(o) if !matches!(o, Outcome::Panicked(_)) => {
                complete_call(&rt2, &actor2, &call, 1, o);
                drop(guard);
            }
            other => {
                let handle = rt2.handle.clone();
                handle.spawn(finish(rt2, actor2, call, send, w2, other, guard));
            }
        }),
    );
    state.set_remote(1, w.clone(), false);
}

/// What a call sends: its spec (target) and its argument values, encoded
/// anew for each worker it goes to (shared-memory arguments are pinned for
/// that worker).
struct Outgoing {
    spec: TaskSpec,
    values: Vec<crate::Value>,
}

type Pending =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::result::Result<Outcome, String>> + Send>>;

impl Outgoing {
    fn message(&self, rt: &Arc<Inner>, actor: &ActorState) -> crate::Result<(Message, crate::shm::Loan)> {
        let (spec, loan) = self.spec.to_wire(&self.values, rt.shm.as_ref())?;
        let msg = Message::PushTask {
            task_id: self.spec.id,
            actor: Some(actor.id),
            spec,
        };
        Ok((msg, loan))
    }

    fn to(&self, rt: &Arc<Inner>, actor: &ActorState, w: &Arc<WorkerProc>) -> crate::Result<Pending> {
        let (msg, loan) = self.message(rt, actor)?;
        let rt = rt.clone();
        Ok(Box::pin(w.push(self.spec.id, &msg, loan, move |o| {
            Outcome::from_wire(o, &rt)
        })))
    }
}

/// Waits for a call's outcome; sends it again to the restarted actor when
/// its worker died and the call may be retried.
async fn finish(
    rt: Arc<Inner>,
    actor: Arc<ActorState>,
    call: ActorCall,
    send: Outgoing,
    mut w: Arc<WorkerProc>,
    first: std::result::Result<Outcome, String>,
    _guard: CallGuard,
) {
    let mut retries_left = actor.max_task_retries;
    let mut attempt = 1;
    let mut pending: Option<Pending> = None;
    let mut first = Some(first);
    loop {
        let result = match (first.take(), pending.take()) {
            (Some(r), _) => r,
            (None, Some(p)) => p.await,
            (None, None) => Err("no attempt in flight".to_owned()),
        };
        let outcome = result.unwrap_or_else(Outcome::Crashed);
        let crashed = matches!(outcome, Outcome::Panicked(_) | Outcome::Crashed(_));
        if crashed {
            // A panic ends the worker; calls made from now on must go to
            // the restarted actor, not to it.
            w.condemn();
        }
        if crashed && retries_left != 0 && !call.state.is_cancelled() {
            if let Ok(fresh) = actor.worker(Some(&w)).await {
                if let Ok(p) = send.to(&rt, &actor, &fresh) {
                    retries_left -= i32::from(retries_left > 0);
                    attempt += 1;
                    call.state.set_remote(1, fresh.clone(), false);
                    pending = Some(p);
                    w = fresh;
                    continue;
                }
            }
        }
        let outcome = match outcome {
            Outcome::Crashed(reason) => Outcome::Failed(actor.dead_error().unwrap_or_else(|| {
                actor.died(
                    "its worker process died",
                    Some(Error::WorkerCrashed {
                        task_id: call.state.id,
                        reason,
                    }),
                )
            })),
            o => o,
        };
        complete_call(&rt, &actor, &call, attempt, outcome);
        return;
    }
}
