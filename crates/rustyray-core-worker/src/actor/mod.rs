//! Actors — Ray's actor manager (creation, restarts, death) and the
//! actor-side task receiver (ordering and concurrency).
//!
//! # Design
//!
//! An actor is an [`ActorState`] in the runtime's [`ActorTable`] plus a
//! driver task on the async executor that owns the actor's mailbox. Calls
//! enter the mailbox in submission order; the driver takes them in that
//! order, waits for each call's reference arguments, takes one of
//! `max_concurrency` permits and dispatches the call: sync methods and the
//! constructor to the worker-thread pool, async methods to the executor.
//! With one permit (the default for sync actors) calls run one at a time in
//! submission order; async actors (1000 permits by default) interleave at
//! their awaits.
//!
//! The instance lives in a `tokio::sync::RwLock`: `&self` methods share it,
//! `&mut self` methods get it alone, so concurrent calls stay safe Rust.
//!
//! # Life
//!
//! `Pending` until the constructor ran, then `Alive`. A method that panics
//! crashes the actor, as a dying worker process does in Ray: with restarts
//! left the constructor runs again on the original arguments and the
//! crashing call is retried `max_task_retries` times; otherwise the actor is
//! `Dead` and every later call fails with [`Error::ActorDied`]. `kill`, the
//! last handle going (unless detached) and shutdown also end it. Death
//! returns the actor's resources and closes its mailbox; the driver fails
//! whatever is still queued.

use crate::codec::{DecodeScope, EncodeScope, Value};
use crate::context::{self, TaskContext};
use crate::error::{Error, Result, TaskFailure};
use crate::ids::{ActorId, TaskId};
use crate::object_ref::{Arg, RawRef};
use crate::options::{resource_request, ActorOptions};
use crate::registry::{ActorEntry, ExclusiveGuard, Instance, MethodBody, MethodEntry, SharedGuard};
use crate::resources::{ResourceSet, CPU};
use crate::runtime::{ref_ids, CatchUnwind, Inner, Outcome, Ray, Work};
use crate::store::Peek;
use crate::task::{Target, TaskSpec, TaskState};
use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, Notify, Semaphore};

mod ordered;
mod remote;

/// Ray's default concurrency for async actors.
const ASYNC_ACTOR_CONCURRENCY: u32 = 1000;

/// The runtime's actors, by id and by name.
#[derive(Debug, Default)]
pub(crate) struct ActorTable {
    actors: Mutex<HashMap<ActorId, Arc<ActorState>, crate::ids::IdHash>>,
    names: Mutex<HashMap<String, ActorId>>,
}

enum Status {
    Pending,
    Alive,
    Restarting,
    Dead(Error),
}

/// The calls an actor has started, by task id.
type Running = HashMap<TaskId, Arc<TaskState>, crate::ids::IdHash>;

struct Life {
    status: Status,
    instance: Option<Instance>,
    restarts_left: i32,
    /// Calls started and not ended, by id: ending one is a constant-time
    /// removal however many are in flight.
    running: Running,
    resources_held: bool,
}

enum Mail {
    Call(ActorCall),
    Stop,
}

struct ActorCall {
    state: Arc<TaskState>,
    method: &'static MethodEntry,
    args: Vec<Arg>,
    /// A worker sent it straight to the actor's process once, and it was
    /// lost with that process: one of its retries is spent.
    attempted: bool,
}

/// The mailbox of a sync actor, drained in order by runner jobs on the
/// worker pool (at most `max_concurrency` at once). Only the call at the
/// front may wait for its arguments; while it does, no runner runs.
///
/// Runners start one at a time: a single runner drains short calls faster
/// than many runners sharing a few CPUs. A stall watch (see [`watch`])
/// adds the next runner whenever calls wait and none started for a tick,
/// so calls that block (on each other, on I/O, on sleeps) still get the
/// full `max_concurrency` within a tick per runner.
#[derive(Default)]
struct RunQueue {
    calls: VecDeque<ActorCall>,
    /// Runner jobs started and not yet ended.
    runners: u32,
    /// Runners running a call (the others are looking for one).
    busy: u32,
    /// Calls popped so far: the stall watch's measure of progress.
    started: u64,
    /// A stall watch is armed.
    watched: bool,
    /// The front call waits for its arguments; a waker clears this.
    blocked: bool,
    /// The actor is dead: calls are refused.
    closed: bool,
    /// The last handle went: the actor ends once the queue is empty.
    stop: bool,
}

/// One actor's shared state.
pub(crate) struct ActorState {
    pub(crate) id: ActorId,
    pub(crate) class: &'static ActorEntry,
    name: Option<String>,
    detached: bool,
    placement: ResourceSet,
    lifetime: ResourceSet,
    max_concurrency: u32,
    max_task_retries: i32,
    /// Kept for restarts (emptied once a hosted actor, which never
    /// restarts here, is constructed).
    ctor_args: Mutex<Vec<Arg>>,
    life: Mutex<Life>,
    mailbox: Mutex<Option<mpsc::UnboundedSender<Mail>>>,
    /// Sync actors' mailbox (`None` for async actors, which use `mailbox`
    /// and a driver task).
    runq: Option<Mutex<RunQueue>>,
    /// Set once the constructor has run: runners may start.
    ready: AtomicBool,
    /// Bumped whenever the instance changes (restart, death): runners
    /// cache the instance and re-read it only when this moves.
    epoch: std::sync::atomic::AtomicU64,
    created: Notify,
    /// Woken when a restart ends (alive again, or dead).
    restarted: Notify,
    handles: AtomicUsize,
    /// The way to the worker process hosting the actor, in the
    /// worker-process mode (no worker while it starts or restarts, nor in
    /// the threads mode).
    link: remote::Link,
    /// A handle decoded in a worker process for an actor of its owner:
    /// calls go to the owner.
    proxy: bool,
    /// Proxies: the handles the owner keeps for this process (one per
    /// time it lent the actor here), given back when the last local handle
    /// goes.
    lent: std::sync::atomic::AtomicU32,
    /// Process actors: calls in the mailbox not yet sent to the worker
    /// (a call may skip the mailbox only when none are).
    queued: AtomicUsize,
    /// Process actors: one permit per call in flight, so the driver can
    /// wait for the last one when the actor goes out of scope.
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for ActorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorState")
            .field("id", &self.id)
            .field("class", &self.class.name)
            .finish_non_exhaustive()
    }
}

impl ActorState {
    /// The state of an actor that is already gone.
    fn tombstone(id: ActorId, class: &'static ActorEntry) -> Arc<Self> {
        let reason = Error::ActorDied {
            class: class.name.to_owned(),
            actor_id: id,
            reason: "it had died before this handle was decoded".to_owned(),
            cause: None,
        };
        Arc::new(ActorState {
            id,
            class,
            name: None,
            detached: true,
            placement: ResourceSet::new(),
            lifetime: ResourceSet::new(),
            max_concurrency: 1,
            max_task_retries: 0,
            ctor_args: Mutex::new(Vec::new()),
            life: Mutex::new(Life {
                status: Status::Dead(reason),
                instance: None,
                restarts_left: 0,
                running: Running::default(),
                resources_held: false,
            }),
            mailbox: Mutex::new(None),
            runq: None,
            ready: AtomicBool::new(false),
            epoch: std::sync::atomic::AtomicU64::new(0),
            created: Notify::new(),
            restarted: Notify::new(),
            handles: AtomicUsize::new(0),
            link: remote::Link::default(),
            proxy: false,
            lent: std::sync::atomic::AtomicU32::new(0),
            queued: AtomicUsize::new(0),
            in_flight: Arc::new(Semaphore::new(remote::IN_FLIGHT_LIMIT as usize)),
        })
    }

    /// The local stand-in, in a worker process, for an actor of the
    /// owner: its calls are sent to the owner.
    fn proxy(id: ActorId, class: &'static ActorEntry) -> Arc<Self> {
        let mut a = Self::tombstone(id, class);
        if let Some(state) = Arc::get_mut(&mut a) {
            state.life.get_mut().status = Status::Alive;
            state.proxy = true;
        }
        a
    }

    pub(crate) fn placement_request(&self) -> &ResourceSet {
        &self.placement
    }

    fn died(&self, reason: impl Into<String>, cause: Option<Error>) -> Error {
        Error::ActorDied {
            class: self.class.name.to_owned(),
            actor_id: self.id,
            reason: reason.into(),
            cause: cause.map(Box::new),
        }
    }

    fn dead_error(&self) -> Option<Error> {
        match &self.life.lock().status {
            Status::Dead(e) => Some(e.clone()),
            _ => None,
        }
    }

    fn instance(&self) -> Result<Instance> {
        self.instance_or_restarting()?
            .ok_or_else(|| self.died("the actor has no instance", None))
    }

    /// The instance; `None` while the actor is (re)starting.
    fn instance_or_restarting(&self) -> Result<Option<Instance>> {
        let life = self.life.lock();
        match (&life.status, &life.instance) {
            (Status::Dead(e), _) => Err(e.clone()),
            (_, i) => Ok(i.clone()),
        }
    }

    /// Waits until the constructor ran (or the actor died first).
    async fn until_created(&self) {
        loop {
            let created = self.created.notified();
            tokio::pin!(created);
            created.as_mut().enable();
            if !matches!(self.life.lock().status, Status::Pending) {
                return;
            }
            created.await;
        }
    }

    /// The instance, waiting out a restart in progress (Ray queues calls
    /// made while an actor restarts).
    async fn instance_after_restart(&self) -> Result<Instance> {
        loop {
            let restarted = self.restarted.notified();
            tokio::pin!(restarted);
            restarted.as_mut().enable();
            if let Some(inst) = self.instance_or_restarting()? {
                return Ok(inst);
            }
            restarted.await;
        }
    }

    /// Runs the constructor on the calling (pool) thread.
    fn construct(self: &Arc<Self>, rt: &Arc<Inner>) -> Result<Instance> {
        let spec = TaskSpec {
            id: rt.ids.task(),
            target: Target::Constructor(self.class),
            args: self.ctor_args.lock().clone(),
            name: None,
        };
        let args = rt.resolve_args(&spec, 1)?;
        let state = TaskState::new(spec.id);
        let ctx = TaskContext::new(rt.clone(), state, ResourceSet::new(), false);
        let construct = self.class.construct;
        let outcome = context::with_sync(ctx, || {
            std::panic::catch_unwind(AssertUnwindSafe(|| construct(args)))
        });
        let fail = |failure, message| {
            Err(self.died(
                "its constructor failed",
                Some(Error::Task {
                    function: self.class.name.to_owned(),
                    name: None,
                    task_id: spec.id,
                    failure,
                    message,
                    attempts: 1,
                    cause: None,
                }),
            ))
        };
        match outcome {
            Ok(Ok(inst)) => Ok(inst),
            Ok(Err(crate::registry::InvokeError::User(m))) => fail(TaskFailure::Returned, m),
            Ok(Err(crate::registry::InvokeError::System(e))) => {
                Err(self.died("its constructor failed", Some(e)))
            }
            Err(p) => fail(TaskFailure::Panicked, crate::runtime::panic_message(p.as_ref())),
        }
    }

    /// Marks the actor dead (once): returns its resources, drops its name,
    /// closes its mailbox and fails its running calls.
    fn die(self: &Arc<Self>, rt: &Arc<Inner>, err: Error) {
        let (running, release, instance) = {
            let mut life = self.life.lock();
            if matches!(life.status, Status::Dead(_)) {
                return;
            }
            life.status = Status::Dead(err.clone());
            self.epoch.fetch_add(1, Ordering::AcqRel);
            let release = std::mem::replace(&mut life.resources_held, false);
            (std::mem::take(&mut life.running), release, life.instance.take())
        };
        tracing::debug!(actor = %self.id, class = self.class.name, error = %err, "actor died");
        if let Some(w) = self.link.take_worker() {
            w.kill();
        }
        // Calls lost with its last worker will not be sent again.
        remote::fail_lost(rt, self, self.link.take_lost());
        self.mailbox.lock().take();
        let queued = self.runq.as_ref().map(|q| {
            let mut q = q.lock();
            q.closed = true;
            std::mem::take(&mut q.calls)
        });
        // The user's state goes only now, with no lock held and the queue
        // closed: it may hold handles (even to this actor) whose drop
        // re-enters here.
        drop(instance);
        for call in queued.into_iter().flatten() {
            fail_call(rt, &call, err.clone());
        }
        fail_running(rt, running, &err);
        if let Some(name) = &self.name {
            let mut names = rt.actors.names.lock();
            if names.get(name) == Some(&self.id) {
                names.remove(name);
            }
        }
        rt.actors.actors.lock().remove(&self.id);
        if release {
            rt.release(&self.lifetime);
        }
        // Wake a driver still waiting for the constructor or a restart.
        self.created.notify_waiters();
        self.restarted.notify_waiters();
    }

    /// Handles a crash (a method panicked, or `kill` with restart):
    /// restarts the actor if it may, else kills it. Runs the constructor
    /// on the calling thread, which must be a pool thread. Returns whether
    /// the actor is alive again.
    fn crashed(self: &Arc<Self>, rt: &Arc<Inner>, reason: String, cause: Option<Error>) -> bool {
        self.begin_restart(rt, &reason, cause) && self.finish_restart(rt)
    }

    /// Marks the actor as restarting (so calls wait for the new instance),
    /// or kills it when it has no restarts left. Returns whether a restart
    /// is under way.
    fn begin_restart(self: &Arc<Self>, rt: &Arc<Inner>, reason: &str, cause: Option<Error>) -> bool {
        let old = {
            let mut life = self.life.lock();
            match life.status {
                Status::Dead(_) => return false,
                _ if life.restarts_left == 0 => {
                    drop(life);
                    self.die(rt, self.died(reason, cause));
                    return false;
                }
                _ => {}
            }
            if life.restarts_left > 0 {
                life.restarts_left -= 1;
            }
            life.status = Status::Restarting;
            self.epoch.fetch_add(1, Ordering::AcqRel);
            life.instance.take()
        };
        // Dropped outside the lock, for the reason given in `die`.
        drop(old);
        tracing::debug!(actor = %self.id, %reason, "restarting actor");
        true
    }

    /// Runs the constructor again (on the calling pool thread) and brings
    /// the actor back. Returns whether it is alive.
    fn finish_restart(self: &Arc<Self>, rt: &Arc<Inner>) -> bool {
        match self.construct(rt) {
            Ok(inst) => {
                let alive = {
                    let mut life = self.life.lock();
                    let restarting = matches!(life.status, Status::Restarting);
                    if restarting {
                        life.status = Status::Alive;
                        life.instance = Some(inst);
                        self.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    restarting
                };
                self.restarted.notify_waiters();
                alive
            }
            Err(e) => {
                self.die(rt, e);
                false
            }
        }
    }

    /// Takes the placed actor's resources for its life: keeps the lifetime
    /// resources and lends back the rest of the placement. False (and all
    /// returned) when the actor died meanwhile.
    fn hold_placement(&self, rt: &Arc<Inner>) -> bool {
        {
            let mut life = self.life.lock();
            if matches!(life.status, Status::Dead(_)) {
                drop(life);
                rt.release(&self.placement);
                return false;
            }
            life.resources_held = true;
        }
        let mut extra = self.placement.clone();
        extra.sub(&self.lifetime);
        rt.release(&extra);
        true
    }

    fn submit(self: &Arc<Self>, rt: &Arc<Inner>, call: ActorCall) {
        if let Some(q) = &self.runq {
            let refused = {
                let mut q = q.lock();
                if q.closed {
                    Some(call)
                } else {
                    q.calls.push_back(call);
                    None
                }
            };
            match refused {
                Some(call) => {
                    let err = self
                        .dead_error()
                        .unwrap_or_else(|| self.died("it was stopped", None));
                    fail_call(rt, &call, err);
                }
                None => kick(rt, self),
            }
            return;
        }
        let in_process = rt.mode.node().is_some();
        let call = if in_process {
            match remote::try_send_now(rt, self, call) {
                Some(call) => call,
                None => return,
            }
        } else {
            call
        };
        let refused = {
            let mailbox = self.mailbox.lock();
            if in_process {
                self.queued.fetch_add(1, Ordering::AcqRel);
            }
            match mailbox.as_ref() {
                Some(tx) => match tx.send(Mail::Call(call)) {
                    Ok(()) => None,
                    Err(mpsc::error::SendError(Mail::Call(c))) => Some(c),
                    Err(mpsc::error::SendError(Mail::Stop)) => None,
                },
                None => Some(call),
            }
        };
        if refused.is_some() && in_process {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(call) = refused {
            let err = self
                .dead_error()
                .unwrap_or_else(|| self.died("its mailbox is closed", None));
            fail_call(rt, &call, err);
        }
    }
}

/// Fails calls that are running: flags them (sync calls see
/// `is_cancelled()`), aborts async ones, and completes their objects.
fn fail_running(rt: &Inner, running: Running, err: &Error) {
    for call in running.into_values() {
        call.mark_cancelled();
        call.abort_running();
        rt.store.complete(call.id.return_object(), Err(err.clone()));
    }
}

fn fail_call(rt: &Arc<Inner>, call: &ActorCall, err: Error) {
    rt.store.complete(call.state.id.return_object(), Err(err));
    call.state.finish();
    rt.forget_task(call.state.id);
}

/// Starts a placed actor: runs its constructor on the pool, or in a
/// worker process of its own in the worker-process mode.
pub(crate) fn start_actor(rt: &Arc<Inner>, actor: Arc<ActorState>) {
    if rt.mode.node().is_some() {
        rt.handle.spawn(remote::start(rt.clone(), actor));
        return;
    }
    let rt2 = rt.clone();
    let job = Box::new(move || {
        let rt = rt2;
        if !actor.hold_placement(&rt) {
            return;
        }
        match actor.construct(&rt) {
            Ok(inst) => {
                let mut life = actor.life.lock();
                if matches!(life.status, Status::Pending) {
                    life.status = Status::Alive;
                    life.instance = Some(inst);
                }
            }
            Err(e) => actor.die(&rt, e),
        }
        actor.created.notify_waiters();
        actor.ready.store(true, Ordering::Release);
        kick(&rt, &actor);
    });
    let _ = rt.pool.execute(job);
}

/// How long queued calls may see no call start before the stall watch
/// adds a runner.
const STALL_TICK: std::time::Duration = std::time::Duration::from_millis(1);

/// Starts a runner job for a sync actor's queued calls when none is
/// looking for one, and arms the stall watch when more could run.
fn kick(rt: &Arc<Inner>, actor: &Arc<ActorState>) {
    let Some(q) = &actor.runq else { return };
    if !actor.ready.load(Ordering::Acquire) {
        return;
    }
    let (start, arm, stop_now) = {
        let mut q = q.lock();
        if q.closed || q.blocked {
            (false, false, false)
        } else {
            let free = q.runners - q.busy;
            let start = q.runners == 0 && !q.calls.is_empty();
            q.runners += u32::from(start);
            let waiting = q.calls.len() as u32 > free;
            let arm = waiting && !q.watched && q.runners < actor.max_concurrency && q.runners > 0;
            q.watched |= arm;
            (start, arm, q.stop && q.calls.is_empty() && q.runners == 0)
        }
    };
    if stop_now {
        let e = actor.died("all handles to it were dropped", None);
        actor.die(rt, e);
        return;
    }
    if start {
        start_runner(rt, actor);
    }
    if arm {
        rt.handle.spawn(watch(rt.clone(), actor.clone()));
    }
}

fn start_runner(rt: &Arc<Inner>, actor: &Arc<ActorState>) {
    let (rt2, actor2) = (rt.clone(), actor.clone());
    let _ = rt.pool.execute(Box::new(move || run_queue(&rt2, &actor2)));
}

/// The stall watch of a sync actor with `max_concurrency` above one: while
/// calls wait, it adds a runner each tick in which no call started (every
/// runner is inside a long or blocked call), up to the actor's
/// concurrency. It ends when nothing waits or no runner may be added.
async fn watch(rt: Arc<Inner>, actor: Arc<ActorState>) {
    let Some(q) = &actor.runq else { return };
    let mut seen = q.lock().started;
    loop {
        tokio::time::sleep(STALL_TICK).await;
        let add = {
            let mut q = q.lock();
            let free = q.runners - q.busy;
            let waiting = q.calls.len() as u32 > free;
            if q.closed || q.blocked || !waiting || q.runners == 0 || q.runners >= actor.max_concurrency {
                q.watched = false;
                return;
            }
            let stalled = q.started == seen;
            seen = q.started;
            q.runners += u32::from(stalled);
            stalled
        };
        if add {
            start_runner(&rt, &actor);
        }
    }
}

/// Wakes a sync actor whose front call waited for its arguments.
struct RunnerWake {
    rt: Arc<Inner>,
    actor: Arc<ActorState>,
}

impl std::task::Wake for RunnerWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(q) = &self.actor.runq {
            q.lock().blocked = false;
        }
        kick(&self.rt, &self.actor);
    }
}

/// Whether a call may start: its arguments are complete, or it was
/// cancelled (its own object completed). Registers `waker` otherwise.
fn call_ready(rt: &Inner, call: &ActorCall, waker: &std::task::Waker) -> bool {
    // The waker on the call's own object is only there so that a cancel
    // (which completes it) wakes us; the caller may have dropped that
    // object, so its state says nothing: the flag decides.
    let _ = rt.store.peek(call.state.id.return_object(), Some(waker));
    let pending = |id| matches!(rt.store.peek(id, Some(waker)), Ok(Peek::Pending));
    let mut ids = call.args.iter().filter_map(|a| match a {
        Arg::Ref(r) => Some(r.id()),
        Arg::Value(_) => None,
    });
    call.state.is_cancelled() || ids.all(|id| !pending(id))
}

/// A runner: takes the sync actor's calls in order and runs them on this
/// pool thread until the queue is empty or its front call must wait.
fn run_queue(rt: &Arc<Inner>, actor: &Arc<ActorState>) {
    let Some(q) = &actor.runq else { return };
    let mut waker = None;
    let mut had_call = false;
    let mut cached: Option<(u64, Instance)> = None;
    loop {
        // The instance first, outside the queue lock: a restart in progress
        // is waited out here, so calls are never popped into it. It is
        // re-read only when the actor's epoch moved.
        let epoch = actor.epoch.load(Ordering::Acquire);
        let inst = match &cached {
            Some((e, i)) if *e == epoch => Some(i.clone()),
            _ => {
                let fresh = match actor.instance_or_restarting() {
                    Ok(Some(i)) => Some(i),
                    Ok(None) => rt.handle.block_on(actor.instance_after_restart()).ok(),
                    Err(_) => None,
                };
                cached = fresh.clone().map(|i| (epoch, i));
                fresh
            }
        };
        let popped = {
            let mut q = q.lock();
            if std::mem::take(&mut had_call) {
                q.busy -= 1;
            }
            let front_ready = match (q.calls.front(), &inst) {
                _ if q.closed || q.blocked => None,
                (None, _) | (_, None) => None,
                (Some(c), _) if c.args.iter().all(|a| matches!(a, Arg::Value(_))) => Some(true),
                (Some(c), _) => {
                    let w = waker.get_or_insert_with(|| {
                        std::task::Waker::from(Arc::new(RunnerWake {
                            rt: rt.clone(),
                            actor: actor.clone(),
                        }))
                    });
                    Some(call_ready(rt, c, w))
                }
            };
            match (front_ready, inst) {
                (Some(true), Some(inst)) => q.calls.pop_front().map(|call| {
                    q.busy += 1;
                    q.started += 1;
                    had_call = true;
                    // Queue for the instance lock while still holding the
                    // queue lock: the lock is granted first come, first
                    // served, so calls take it in submission order even
                    // when several runners race.
                    let lock = queue_for_lock(inst, call.method.body.is_exclusive());
                    (call, lock)
                }),
                (Some(false), _) => {
                    q.blocked = true;
                    None
                }
                _ => None,
            }
            .or_else(|| {
                q.runners -= 1;
                None
            })
        };
        let Some((mut call, lock)) = popped else {
            // Ending the actor once its last handle went is `kick`'s job.
            kick(rt, actor);
            return;
        };
        let held = match lock {
            Ok(held) => held,
            Err(waiting) => rt.handle.block_on(waiting),
        };
        if !call.state.start(1) {
            call.state.finish();
            rt.forget_task(call.state.id);
            continue;
        }
        let guard = CallGuard::running(rt, actor, &call.state, None);
        let spec = TaskSpec {
            id: call.state.id,
            target: Target::Method(actor.id, call.method),
            args: std::mem::take(&mut call.args),
            name: None,
        };
        execute_sync(rt, actor, &call, spec, held, guard);
    }
}

/// A lock request already in the instance lock's queue.
type QueuedLock = Pin<Box<dyn Future<Output = Held> + Send>>;

/// Takes the instance lock if it is free, else joins its FIFO queue (by
/// polling the request once) and returns the request to finish waiting on.
fn queue_for_lock(inst: Instance, exclusive: bool) -> std::result::Result<Held, QueuedLock> {
    let free = if exclusive {
        inst.clone().try_write_owned().map(Held::Exclusive).ok()
    } else {
        inst.clone().try_read_owned().map(Held::Shared).ok()
    };
    if let Some(h) = free {
        return Ok(h);
    }
    let mut waiting: QueuedLock = Box::pin(lock(inst, exclusive));
    match waiting
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(h) => Ok(h),
        Poll::Pending => Err(waiting),
    }
}

/// The actor could not be placed.
pub(crate) fn creation_failed(rt: &Arc<Inner>, actor: &Arc<ActorState>, err: Error) {
    let e = actor.died("it could not be placed", Some(err));
    actor.die(rt, e);
}

/// Kills every actor (runtime shutdown).
pub(crate) fn shut_down_all(rt: &Arc<Inner>) {
    let all: Vec<_> = rt.actors.actors.lock().drain().map(|(_, a)| a).collect();
    for a in all {
        let e = a.died("the runtime shut down", Some(Error::Shutdown));
        a.die(rt, e);
    }
}

/// Waits until a call's dependencies are complete, or until the call's own
/// object is (a cancel completes it), so a cancelled call never holds up
/// the calls behind it.
struct DepsOrCancelled<'a> {
    rt: &'a Inner,
    deps: Vec<crate::ids::ObjectId>,
    state: &'a TaskState,
}

impl Future for DepsOrCancelled<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // See `call_ready`: the own object's waker catches a cancel; the
        // flag decides.
        let _ = self
            .rt
            .store
            .peek(self.state.id.return_object(), Some(cx.waker()));
        let pending = |id| matches!(self.rt.store.peek(id, Some(cx.waker())), Ok(Peek::Pending));
        if self.state.is_cancelled() || self.deps.iter().all(|d| !pending(*d)) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The instance, locked for one call.
enum Held {
    Shared(SharedGuard),
    Exclusive(ExclusiveGuard),
}

/// Locks the instance for a call, in the order calls arrive: tokio's
/// `RwLock` grants waiters first come, first served.
async fn lock(inst: Instance, exclusive: bool) -> Held {
    if exclusive {
        Held::Exclusive(inst.write_owned().await)
    } else {
        Held::Shared(inst.read_owned().await)
    }
}

/// The actor's driver: takes calls in order and dispatches them.
async fn drive(rt: Arc<Inner>, actor: Arc<ActorState>, mut rx: mpsc::UnboundedReceiver<Mail>) {
    actor.until_created().await;
    let permits = Arc::new(Semaphore::new(actor.max_concurrency as usize));
    while let Some(mail) = rx.recv().await {
        let call = match mail {
            Mail::Call(c) => c,
            Mail::Stop => break,
        };
        let Some(call) = ready_call(&rt, &actor, call).await else {
            continue;
        };
        if call.state.is_cancelled() {
            call.state.finish();
            rt.forget_task(call.state.id);
            continue;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let inst = match actor.instance_after_restart().await {
            Ok(i) => i,
            Err(e) => {
                fail_call(&rt, &call, e);
                continue;
            }
        };
        // Taking the lock here, before the next call is looked at, is what
        // orders calls: a `&mut self` call submitted before a `&self` one
        // starts (and finishes) first.
        let held = lock(inst, call.method.body.is_exclusive()).await;
        if !call.state.start(1) {
            rt.forget_task(call.state.id);
            continue;
        }
        dispatch(&rt, &actor, call, permit, held);
    }
    // Out of scope (or dead): let running calls finish, then end.
    let _all = permits.acquire_many(actor.max_concurrency).await;
    let e = actor.died("all handles to it were dropped", None);
    actor.die(&rt, e);
    rx.close();
    while let Ok(mail) = rx.try_recv() {
        if let Mail::Call(call) = mail {
            let e = actor
                .dead_error()
                .unwrap_or_else(|| actor.died("it was stopped", None));
            fail_call(&rt, &call, e);
        }
    }
}

/// A call taken from the mailbox, once its reference arguments are
/// complete (or it was cancelled); `None` when the actor is dead, which
/// fails the call.
async fn ready_call(rt: &Arc<Inner>, actor: &ActorState, call: ActorCall) -> Option<ActorCall> {
    if let Some(e) = actor.dead_error() {
        fail_call(rt, &call, e);
        return None;
    }
    let deps = ref_ids(&call.args);
    if !deps.is_empty() {
        DepsOrCancelled {
            rt,
            deps,
            state: &call.state,
        }
        .await;
    }
    Some(call)
}

/// Ends a call: forgets it and frees its permit. Runs on every path,
/// abort included.
struct CallGuard {
    rt: Arc<Inner>,
    actor: Arc<ActorState>,
    state: Arc<TaskState>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl CallGuard {
    /// Records a started call among the actor's running calls; the guard
    /// ends it.
    fn running(
        rt: &Arc<Inner>,
        actor: &Arc<ActorState>,
        state: &Arc<TaskState>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> CallGuard {
        actor.life.lock().running.insert(state.id, state.clone());
        CallGuard {
            rt: rt.clone(),
            actor: actor.clone(),
            state: state.clone(),
            _permit: permit,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let id = self.state.id;
        self.actor.life.lock().running.remove(&id);
        // A call dropped before completing was cancelled or killed; its
        // object already says so unless this is the first word. A call
        // that completed may still be waiting for room for its value
        // (`Inner::publish`).
        if !self.state.is_done() {
            self.rt
                .store
                .complete(id.return_object(), Err(Error::TaskCancelled(id)));
            self.state.finish();
        }
        self.rt.forget_task(id);
    }
}

/// Completes a call's object from its outcome.
fn complete_call(rt: &Arc<Inner>, actor: &ActorState, call: &ActorCall, attempts: u32, outcome: Outcome) {
    let id = call.state.id;
    // Done from here on: its object is completed now or, for a value
    // waiting for room, by the blocking pool.
    call.state.finish();
    let result = if call.state.is_cancelled() {
        Err(actor.dead_error().unwrap_or(Error::TaskCancelled(id)))
    } else {
        match outcome {
            Outcome::Value(v) => return rt.publish(id.return_object(), v),
            Outcome::Returned(m) => Err(call_error(call, attempts, TaskFailure::Returned, m)),
            Outcome::Panicked(m) => Err(actor.dead_error().unwrap_or_else(|| {
                actor.died(
                    "a method panicked",
                    Some(call_error(call, attempts, TaskFailure::Panicked, m)),
                )
            })),
            Outcome::Failed(e) | Outcome::NoWorker(e) => Err(e),
            Outcome::Crashed(reason) => Err(Error::WorkerCrashed { task_id: id, reason }),
        }
    };
    rt.store.complete(id.return_object(), result);
}

fn call_error(call: &ActorCall, attempts: u32, failure: TaskFailure, message: String) -> Error {
    Error::Task {
        function: call.method.name.to_owned(),
        name: None,
        task_id: call.state.id,
        failure,
        message,
        attempts,
        cause: None,
    }
}

/// Runs one attempt of a sync method on the calling (pool) thread.
fn run_sync(rt: &Arc<Inner>, call: &ActorCall, spec: &TaskSpec, attempt: u32, held: &mut Held) -> Outcome {
    let args = match rt.resolve_args(spec, attempt) {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(e),
    };
    let ctx = TaskContext::new(rt.clone(), call.state.clone(), ResourceSet::new(), false);
    let body = call.method.body;
    Outcome::from_invoke(context::with_sync(ctx, || {
        std::panic::catch_unwind(AssertUnwindSafe(|| match (body, held) {
            (MethodBody::SyncRef(f), Held::Shared(g)) => f(&***g, args),
            (MethodBody::SyncMut(f), Held::Exclusive(g)) => f(&mut ***g, args),
            _ => Err(Error::invalid("method body and instance lock disagree").into()),
        }))
    }))
}

/// Runs one attempt of an async method.
async fn run_async(rt: &Arc<Inner>, call: &ActorCall, spec: &TaskSpec, attempt: u32, held: Held) -> Outcome {
    let args = match rt.resolve_args(spec, attempt) {
        Ok(a) => a,
        Err(e) => return Outcome::Failed(e),
    };
    let fut = match (call.method.body, held) {
        (MethodBody::AsyncRef(f), Held::Shared(g)) => f(g, args),
        (MethodBody::AsyncMut(f), Held::Exclusive(g)) => f(g, args),
        _ => return Outcome::Failed(Error::invalid("method body and instance lock disagree")),
    };
    let ctx = TaskContext::new(rt.clone(), call.state.clone(), ResourceSet::new(), true);
    Outcome::from_invoke(context::with_async(ctx, CatchUnwind(fut)).await)
}

/// Runs a sync call on the calling (pool) thread, restarting the actor and
/// retrying the call per its options when it panics.
fn execute_sync(
    rt: &Arc<Inner>,
    actor: &Arc<ActorState>,
    call: &ActorCall,
    mut spec: TaskSpec,
    mut held: Held,
    guard: CallGuard,
) {
    let _guard = guard;
    let exclusive = call.method.body.is_exclusive();
    let mut retries_left = actor.max_task_retries;
    let mut attempt = 1;
    loop {
        let outcome = run_sync(rt, call, &spec, attempt, &mut held);
        if let Outcome::Panicked(msg) = &outcome {
            drop(held);
            let cause = call_error(call, attempt, TaskFailure::Panicked, msg.clone());
            let reason = format!("{} panicked: {msg}", call.method.name);
            let alive = actor.crashed(rt, reason, Some(cause));
            let retry = alive && retries_left != 0 && !call.state.is_cancelled();
            let relocked = match (retry, actor.instance()) {
                (true, Ok(inst)) => Some(lock_blocking(rt, inst, exclusive)),
                _ => None,
            };
            if let Some(h) = relocked {
                held = h;
                retries_left -= i32::from(retries_left > 0);
                attempt += 1;
                continue;
            }
        }
        // Arguments go before the result is published.
        spec.args.clear();
        complete_call(rt, actor, call, attempt, outcome);
        break;
    }
}

/// Locks the instance from a pool thread: at once when it is free (the
/// usual case), else by waiting on the executor.
fn lock_blocking(rt: &Inner, inst: Instance, exclusive: bool) -> Held {
    let free = if exclusive {
        inst.clone().try_write_owned().map(Held::Exclusive).ok()
    } else {
        inst.clone().try_read_owned().map(Held::Shared).ok()
    };
    free.unwrap_or_else(|| rt.handle.block_on(lock(inst, exclusive)))
}

fn dispatch(
    rt: &Arc<Inner>,
    actor: &Arc<ActorState>,
    mut call: ActorCall,
    permit: tokio::sync::OwnedSemaphorePermit,
    held: Held,
) {
    let guard = CallGuard::running(rt, actor, &call.state, Some(permit));
    let spec = TaskSpec {
        id: call.state.id,
        target: Target::Method(actor.id, call.method),
        args: std::mem::take(&mut call.args),
        name: None,
    };
    let exclusive = call.method.body.is_exclusive();
    let (rt, actor) = (rt.clone(), actor.clone());
    if matches!(call.method.body, MethodBody::SyncRef(_) | MethodBody::SyncMut(_)) {
        let pool = rt.clone();
        let job = Box::new(move || execute_sync(&rt, &actor, &call, spec, held, guard));
        let _ = pool.pool.execute(job);
    } else {
        let state = call.state.clone();
        let fut = {
            let rt = rt.clone();
            async move {
                let _guard = guard;
                let mut spec = spec;
                let mut held = Some(held);
                let mut retries_left = actor.max_task_retries;
                let mut attempt = 1;
                loop {
                    let Some(h) = held.take() else { break };
                    let outcome = run_async(&rt, &call, &spec, attempt, h).await;
                    if let Outcome::Panicked(msg) = &outcome {
                        let cause = call_error(&call, attempt, TaskFailure::Panicked, msg.clone());
                        let reason = format!("{} panicked: {msg}", call.method.name);
                        let alive = on_pool(&rt, {
                            let (rt, actor) = (rt.clone(), actor.clone());
                            move || actor.crashed(&rt, reason, Some(cause))
                        })
                        .await
                        .unwrap_or(false);
                        if alive && retries_left != 0 && !call.state.is_cancelled() {
                            if let Ok(inst) = actor.instance() {
                                held = Some(lock(inst, exclusive).await);
                                retries_left -= i32::from(retries_left > 0);
                                attempt += 1;
                                continue;
                            }
                        }
                    }
                    // Arguments go before the result is published.
                    spec.args.clear();
                    complete_call(&rt, &actor, &call, attempt, outcome);
                    break;
                }
            }
        };
        let h = rt.handle.spawn(fut);
        state.set_abort(1, h.abort_handle());
    }
}

/// Runs `f` on the worker pool and awaits its result.
async fn on_pool<R: Send + 'static>(rt: &Arc<Inner>, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.pool
        .execute(Box::new(move || {
            let _ = tx.send(f());
        }))
        .ok()?;
    rx.await.ok()
}

// ----- handles ---------------------------------------------------------

struct HandleInner {
    actor: Arc<ActorState>,
    ray: Ray,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        let last = self.actor.handles.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && self.actor.proxy {
            release_proxy(self.ray.inner(), &self.actor);
        } else if last && !self.actor.detached {
            if let Some(q) = &self.actor.runq {
                q.lock().stop = true;
                kick(self.ray.inner(), &self.actor);
            } else if let Some(tx) = self.actor.mailbox.lock().as_ref() {
                let _ = tx.send(Mail::Stop);
            }
        }
    }
}

/// The last local handle of a proxy went: forgets it and gives the owner
/// back the handles it kept for this process.
fn release_proxy(rt: &Arc<Inner>, actor: &Arc<ActorState>) {
    let lent = {
        let mut table = rt.actors.actors.lock();
        // A loan that arrived meanwhile made a new handle (under this
        // lock): the proxy stays, with that loan counted.
        if actor.handles.load(Ordering::Acquire) != 0 {
            return;
        }
        if table.get(&actor.id).is_some_and(|a| Arc::ptr_eq(a, actor)) {
            table.remove(&actor.id);
            // Under the table lock, as a new proxy learns its route.
            if let Some(up) = rt.mode.upstream() {
                up.routes.forget(actor.id);
            }
        }
        actor.lent.swap(0, Ordering::AcqRel)
    };
    if let (1.., Some(up)) = (lent, rt.mode.upstream()) {
        up.routes.release_after_calls(rt, up, actor.id, lent);
    }
}

/// In a worker process: forgets the route to actor `id` unless a proxy
/// here still holds it (its calls went, after the proxy did).
pub(crate) fn forget_route_unless_held(rt: &Arc<Inner>, id: ActorId) {
    let table = rt.actors.actors.lock();
    if let (false, Some(up)) = (table.contains_key(&id), rt.mode.upstream()) {
        up.routes.forget(id);
    }
}

/// In a worker process: takes a handle on the owner's actor `id`, which a
/// message lent this process (counted, and given back by
/// `release_proxy`).
pub(crate) fn borrow_actor(rt: &Arc<Inner>, named: &crate::wire::NamedActor) -> Result<RawActor> {
    let (id, class) = (named.id, rt.registry.class(&named.class)?);
    let mut table = rt.actors.actors.lock();
    let actor = table
        .entry(id)
        .or_insert_with(|| {
            // A new proxy takes the way straight to the actor, if the owner
            // gave one; it keeps it (or the owner's way, once that fails)
            // for as long as it lives, so its calls keep their order.
            if let Some(up) = rt.mode.upstream() {
                up.routes.learn(named);
            }
            ActorState::proxy(id, class)
        })
        .clone();
    actor.lent.fetch_add(1, Ordering::AcqRel);
    // Under the table lock, so `release_proxy` sees the new handle.
    let handle = RawActor::new(actor, rt);
    drop(table);
    Ok(handle)
}

/// In a worker process: the owner told the way to actor `named`, alive in
/// another worker process, after calls went to it through the owner
/// (`Route`). Learnt while a proxy lives here (under the table lock, as a
/// new proxy learns its route); calls take it once those through the
/// owner are answered (see `Routes::call`).
pub(crate) fn learn_route(rt: &Arc<Inner>, named: &crate::wire::NamedActor) {
    let table = rt.actors.actors.lock();
    if let (true, Some(up)) = (table.contains_key(&named.id), rt.mode.upstream()) {
        up.routes.learn(named);
    }
}

/// In the owner: a handle on its actor `id`, named in a value a worker
/// sent, kept with the value; `None` when the actor is gone (the value's
/// handle then decodes as dead).
pub(crate) fn hold_actor(rt: &Arc<Inner>, id: ActorId) -> Option<RawActor> {
    let actor = rt.actors.actors.lock().get(&id).cloned()?;
    Some(RawActor::new(actor, rt))
}

/// Creates an actor that code in a worker process asked for, as this
/// owner's own: placed, restarted and ended exactly like one the driver
/// made.
pub(crate) fn spawn_for_worker(rt: &Arc<Inner>, spec: &Value, opts: &ActorOptions) -> Result<RawActor> {
    let spec = TaskSpec::from_bytes(spec, rt, &rt.registry)?;
    let Target::Constructor(class) = spec.target else {
        return Err(Error::invalid(format!(
            "{} is not a constructor",
            spec.target.name()
        )));
    };
    create_raw(&Ray::non_owning(rt.clone()), class, opts, spec.args)
}

/// The handle of the named actor `name` (Ray's `ray.get_actor`).
pub(crate) fn named(rt: &Arc<Inner>, name: &str) -> Result<RawActor> {
    let id = rt.actors.names.lock().get(name).copied();
    let actor = id.and_then(|id| rt.actors.actors.lock().get(&id).cloned());
    match actor {
        Some(a) => Ok(RawActor::new(a, rt)),
        None => Err(Error::ActorNotFound {
            name: name.to_owned(),
        }),
    }
}

/// Ends actor `id`, created by code in worker process `pid`, which died:
/// an actor is owned by the process that created it and, unless
/// detached, goes with it (Ray's actor fate-sharing). Its calls fail with
/// `ActorDied` naming the owner.
pub(crate) fn owner_died(rt: &Arc<Inner>, id: ActorId, pid: u32) {
    let actor = rt.actors.actors.lock().get(&id).cloned();
    if let Some(actor) = actor {
        let e = actor.died(format!("its owner, worker process {pid}, died"), None);
        actor.die(rt, e);
    }
}

/// Whether this owner still has actor `id`.
pub(crate) fn is_live(rt: &Inner, id: ActorId) -> bool {
    rt.actors.actors.lock().contains_key(&id)
}

/// Kills this owner's actor `id` for code in a worker process.
pub(crate) fn kill_for_worker(rt: &Arc<Inner>, id: ActorId, no_restart: bool) {
    if let Some(handle) = hold_actor(rt, id) {
        let _ = Ray::non_owning(rt.clone()).kill_raw(&handle, no_restart);
    }
}

/// The actor handle a kept-alive handle is, if it is one.
pub(crate) fn kept_actor(keep: &crate::codec::KeepAlive) -> Option<RawActor> {
    keep.clone().downcast::<HandleInner>().ok().map(RawActor)
}

/// An untyped actor handle. Clones share one count on the actor; the actor
/// ends (after its queued calls) when the last handle goes, unless it is
/// detached.
#[derive(Clone)]
pub struct RawActor(Arc<HandleInner>);

impl std::fmt::Debug for RawActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawActor({}, {:?})", self.0.actor.class.name, self.0.actor.id)
    }
}

impl RawActor {
    fn new(actor: Arc<ActorState>, rt: &Arc<Inner>) -> Self {
        actor.handles.fetch_add(1, Ordering::AcqRel);
        RawActor(Arc::new(HandleInner {
            actor,
            ray: Ray::non_owning(rt.clone()),
        }))
    }

    /// The actor's id.
    pub fn id(&self) -> ActorId {
        self.0.actor.id
    }

    /// The actor's registered class name.
    pub fn class_name(&self) -> &'static str {
        self.0.actor.class.name
    }

    /// The actor as a value's list of actors names it on the wire, with
    /// the way to its process when calls may go there straight.
    pub(crate) fn named(&self) -> crate::wire::NamedActor {
        let actor = &self.0.actor;
        let rt = self.0.ray.inner();
        let route = if actor.proxy {
            rt.mode.upstream().and_then(|up| up.routes.route_of(actor.id))
        } else {
            remote::route(actor)
        };
        crate::wire::NamedActor {
            id: self.id(),
            class: self.class_name().to_owned(),
            route,
        }
    }

    /// This handle as something a value keeps alive.
    pub(crate) fn keep_alive(&self) -> crate::codec::KeepAlive {
        self.0.clone()
    }

    /// The runtime the actor lives in.
    pub fn ray(&self) -> &Ray {
        &self.0.ray
    }

    /// Submits a method call. Calls from one handle (and from all handles
    /// of one process) run in submission order.
    pub fn call(&self, method: &'static MethodEntry, args: Vec<Arg>) -> Result<RawRef> {
        let actor = &self.0.actor;
        if method.class != actor.class.name {
            return Err(Error::invalid(format!(
                "{} is not a method of {}",
                method.name, actor.class.name
            )));
        }
        let rt = self.0.ray.inner();
        if actor.proxy {
            let upstream = rt
                .mode
                .upstream()
                .ok_or_else(|| Error::invalid("an owner's actor outside a worker process"))?;
            return upstream.call_actor(rt, actor.id, method, args);
        }
        let (state, ret) = rt.new_task()?;
        actor.submit(
            rt,
            ActorCall {
                state,
                method,
                args,
                attempted: false,
            },
        );
        Ok(ret)
    }
}

/// Where the outcome of a call made for a worker process goes.
pub(crate) type Reply = Box<dyn FnOnce(Result<Value>) + Send>;

/// Actor `actor_id` of this owner as a worker would be lent it, with the
/// way to its process, while it is alive in one; `None` otherwise.
pub(crate) fn routed_for_worker(rt: &Arc<Inner>, actor_id: ActorId) -> Option<crate::wire::NamedActor> {
    let actor = rt.actors.actors.lock().get(&actor_id).cloned()?;
    let route = remote::route(&actor)?;
    Some(crate::wire::NamedActor {
        id: actor_id,
        class: actor.class.name.to_owned(),
        route: Some(route),
    })
}

/// Runs a call a worker process sent for one of this owner's actors, and
/// hands its outcome to `reply` once it completes. The result is the
/// worker's: the call's object here lives until it is answered.
pub(crate) fn call_for_worker(
    rt: &Arc<Inner>,
    actor_id: ActorId,
    task_id: TaskId,
    spec: &Value,
    attempted: bool,
    reply: Reply,
) {
    let submitted = (|| -> Result<RawRef> {
        let spec = TaskSpec::from_bytes(spec, rt, &rt.registry)?;
        let Target::Method(_, method) = spec.target else {
            return Err(Error::invalid(format!("{} is not a method", spec.target.name())));
        };
        let actor = rt
            .actors
            .actors
            .lock()
            .get(&actor_id)
            .cloned()
            .ok_or_else(|| Error::ActorDied {
                class: method.class.to_owned(),
                actor_id,
                reason: "it is not an actor of this owner (or it is gone)".to_owned(),
                cause: None,
            })?;
        rt.check_open()?;
        // A call failed over from a direct route may find its result here
        // already, borrowed from the worker: the call completes that one.
        rt.store.join_pending(task_id.return_object())?;
        let ret = RawRef::adopt(task_id.return_object(), rt.clone());
        let state = TaskState::new(task_id);
        rt.register_task(&state);
        actor.submit(
            rt,
            ActorCall {
                state,
                method,
                args: spec.args,
                attempted,
            },
        );
        Ok(ret)
    })();
    match submitted {
        Ok(r) => reply_when_done(rt, r, reply),
        Err(e) => reply(Err(e)),
    }
}

/// Hands the value (or error) of `r` to `reply` once it completes, from
/// the thread that completes it.
pub(crate) fn reply_when_done(rt: &Arc<Inner>, r: RawRef, reply: Reply) {
    let waker = std::task::Waker::from(Arc::new(WhenDone {
        rt: rt.clone(),
        call: Mutex::new(Some((r.clone(), reply))),
    }));
    if !matches!(rt.store.peek(r.id(), Some(&waker)), Ok(Peek::Pending)) {
        waker.wake();
    }
}

/// Hands a call's outcome over once its object completes.
struct WhenDone {
    rt: Arc<Inner>,
    call: Mutex<Option<(RawRef, Reply)>>,
}

impl std::task::Wake for WhenDone {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let (result, reply) = {
            let mut call = self.call.lock();
            let Some((r, _)) = call.as_ref() else { return };
            let result = match self.rt.store.peek(r.id(), None) {
                Ok(Peek::Pending) => return,
                Ok(Peek::Ready(v)) => Ok(v),
                Ok(Peek::Failed(e)) | Err(e) => Err(e),
            };
            match call.take() {
                Some((_, reply)) => (result, reply),
                None => return,
            }
        };
        reply(result);
    }
}

impl Serialize for RawActor {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        EncodeScope::note(|| self.0.clone());
        (self.0.actor.id, self.0.actor.class.name).serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawActor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (id, class) = <(ActorId, String)>::deserialize(d)?;
        if let Some(Ok(handle)) = DecodeScope::replayed().map(|k| k.downcast::<HandleInner>()) {
            if handle.actor.id == id {
                return Ok(RawActor(handle));
            }
        }
        let rt = DecodeScope::runtime().ok_or_else(|| {
            DecodeScope::fail::<D::Error>(Error::serialization(
                "an actor handle can only be decoded by a RustyRay runtime",
            ))
        })?;
        let actor = rt.actors.actors.lock().get(&id).cloned();
        let actor = match actor {
            Some(a) => a,
            // In a worker process: an actor of the owner, reached through it.
            None if rt.mode.upstream().is_some() => {
                let class = rt.registry.class(&class).map_err(DecodeScope::fail)?;
                let proxy = ActorState::proxy(id, class);
                rt.actors.actors.lock().entry(id).or_insert(proxy).clone()
            }
            // The actor is gone: the handle still decodes, as in Ray, and
            // its calls fail with ActorDied.
            None => {
                let class = rt.registry.class(&class).map_err(DecodeScope::fail)?;
                ActorState::tombstone(id, class)
            }
        };
        Ok(RawActor::new(actor, &rt))
    }
}

/// A Rust type usable as an actor class. Implemented by
/// `#[rustyray::actor]`.
pub trait ActorClass: Send + Sync + Sized + 'static {
    /// The generated typed method stubs, reached through
    /// [`ActorHandle`]'s `Deref`.
    type Stub: ActorStub;
    /// The class's registry entry.
    fn entry() -> &'static ActorEntry;
}

/// Typed method stubs over a [`RawActor`]. Implemented by
/// `#[rustyray::actor]`.
pub trait ActorStub: Clone + Send + Sync + 'static {
    /// Wraps a raw handle.
    fn from_raw(raw: RawActor) -> Self;
    /// The raw handle.
    fn raw(&self) -> &RawActor;
}

/// A typed handle on an actor of class `A` (Ray's `ActorHandle`). Its
/// methods (generated from the class's `impl`) submit calls and return
/// [`crate::ObjectRef`]s. Clone + Send + Sync + serde: pass it to tasks and
/// other actors.
pub struct ActorHandle<A: ActorClass> {
    stub: A::Stub,
    _a: PhantomData<fn() -> A>,
}

impl<A: ActorClass> ActorHandle<A> {
    /// Wraps a raw handle, checking its class.
    pub fn from_raw(raw: RawActor) -> Result<Self> {
        if raw.class_name() != A::entry().name {
            return Err(Error::TypeMismatch {
                expected: A::entry().name.to_owned(),
                found: raw.class_name().to_owned(),
            });
        }
        Ok(ActorHandle {
            stub: A::Stub::from_raw(raw),
            _a: PhantomData,
        })
    }

    /// The untyped handle.
    pub fn raw(&self) -> &RawActor {
        self.stub.raw()
    }

    /// The actor's id.
    pub fn id(&self) -> ActorId {
        self.raw().id()
    }
}

impl<A: ActorClass> std::ops::Deref for ActorHandle<A> {
    type Target = A::Stub;
    fn deref(&self) -> &A::Stub {
        &self.stub
    }
}

impl<A: ActorClass> Clone for ActorHandle<A> {
    fn clone(&self) -> Self {
        ActorHandle {
            stub: self.stub.clone(),
            _a: PhantomData,
        }
    }
}

impl<A: ActorClass> std::fmt::Debug for ActorHandle<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActorHandle<{}>({})", A::entry().name, self.id())
    }
}

impl<A: ActorClass> Serialize for ActorHandle<A> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.raw().serialize(s)
    }
}

impl<'de, A: ActorClass> Deserialize<'de> for ActorHandle<A> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = RawActor::deserialize(d)?;
        ActorHandle::from_raw(raw).map_err(serde::de::Error::custom)
    }
}

/// Creates an actor of class `A` (what `A::remote` and
/// `A::options().remote` call).
pub fn create_actor<A: ActorClass>(ray: &Ray, opts: &ActorOptions, args: Vec<Arg>) -> Result<ActorHandle<A>> {
    let raw = create_raw(ray, A::entry(), opts, args)?;
    ActorHandle::from_raw(raw)
}

/// Hosts an actor on this (worker process's) runtime for its owner: no
/// restarts here (the owner restarts the whole process), detached (the
/// worker holds the handle until it exits). Returns once the constructor
/// ran.
pub(crate) async fn host(
    ray: &Ray,
    class: &'static ActorEntry,
    args: Vec<Arg>,
    max_concurrency: u32,
) -> Result<RawActor> {
    let opts = ActorOptions {
        max_concurrency: Some(max_concurrency),
        max_restarts: Some(0),
        max_task_retries: Some(0),
        detached: true,
        ..ActorOptions::default()
    };
    let raw = create_raw_with(ray, class, &opts, args, true)?;
    let actor = raw.0.actor.clone();
    actor.until_created().await;
    // Arguments in shared memory stay pinned while held: let them go.
    actor.ctor_args.lock().clear();
    match actor.dead_error() {
        Some(e) => Err(e),
        None => Ok(raw),
    }
}

fn create_raw(
    ray: &Ray,
    class: &'static ActorEntry,
    opts: &ActorOptions,
    args: Vec<Arg>,
) -> Result<RawActor> {
    create_raw_with(ray, class, opts, args, false)
}

/// Creates an actor; a `hosted` one (in a worker process, for its owner,
/// who placed it) takes no resources here.
fn create_raw_with(
    ray: &Ray,
    class: &'static ActorEntry,
    opts: &ActorOptions,
    args: Vec<Arg>,
    hosted: bool,
) -> Result<RawActor> {
    let rt = ray.inner();
    rt.check_open()?;
    // In a worker process, the owner creates the actor, as its own.
    if let (false, Some(up)) = (hosted, rt.mode.upstream()) {
        return up.spawn_actor(rt, class, opts, args);
    }
    let d = &class.options;
    let explicit_cpus = opts.num_cpus.or(d.num_cpus);
    let lifetime = if hosted {
        ResourceSet::new()
    } else {
        resource_request(
            explicit_cpus.unwrap_or(0.0),
            opts.num_gpus.unwrap_or(d.num_gpus),
            d.resources,
            &opts.resources,
        )?
    };
    let mut placement = lifetime.clone();
    if explicit_cpus.is_none() && !hosted {
        // Ray's default: one CPU to be placed, none held while alive.
        placement.set(CPU, 1.0)?;
    }
    let max_concurrency = opts
        .max_concurrency
        .or(d.max_concurrency)
        .unwrap_or(if class.is_async {
            ASYNC_ACTOR_CONCURRENCY
        } else {
            1
        })
        .max(1);
    let (tx, rx) = mpsc::unbounded_channel();
    // In the worker-process mode, actors live in worker processes.
    let in_process = rt.mode.node().is_some();
    let actor = Arc::new(ActorState {
        id: rt.ids.actor(),
        class,
        name: opts.name.clone(),
        detached: opts.detached,
        placement,
        lifetime,
        max_concurrency,
        max_task_retries: opts.max_task_retries.unwrap_or(d.max_task_retries),
        ctor_args: Mutex::new(args),
        life: Mutex::new(Life {
            status: Status::Pending,
            instance: None,
            restarts_left: opts.max_restarts.or(d.max_retries).unwrap_or(0),
            running: Running::default(),
            resources_held: false,
        }),
        mailbox: Mutex::new(if class.is_async || in_process {
            Some(tx)
        } else {
            None
        }),
        runq: (!class.is_async && !in_process).then(|| Mutex::new(RunQueue::default())),
        ready: AtomicBool::new(false),
        epoch: std::sync::atomic::AtomicU64::new(0),
        created: Notify::new(),
        restarted: Notify::new(),
        handles: AtomicUsize::new(0),
        link: remote::Link::default(),
        proxy: false,
        lent: std::sync::atomic::AtomicU32::new(0),
        queued: AtomicUsize::new(0),
        in_flight: Arc::new(Semaphore::new(remote::IN_FLIGHT_LIMIT as usize)),
    });
    if let Some(name) = &opts.name {
        let mut names = rt.actors.names.lock();
        if let Some(existing) = names.get(name) {
            let existing = rt.actors.actors.lock().get(existing).cloned();
            if let Some(existing) = existing {
                if opts.get_if_exists {
                    return Ok(RawActor::new(existing, rt));
                }
                return Err(Error::invalid(format!(
                    "the actor name {name:?} is already taken"
                )));
            }
        }
        names.insert(name.clone(), actor.id);
    }
    rt.actors.actors.lock().insert(actor.id, actor.clone());
    let handle = RawActor::new(actor.clone(), rt);
    if in_process {
        rt.handle.spawn(remote::drive(rt.clone(), actor.clone(), rx));
    } else if class.is_async {
        rt.handle.spawn(drive(rt.clone(), actor.clone(), rx));
    }
    let deps = ref_ids(&actor.ctor_args.lock());
    rt.when_ready(&deps, Work::Actor(actor));
    Ok(handle)
}

impl Ray {
    /// Looks up a named actor (Ray's `ray.get_actor`). In a worker
    /// process the owner looks it up.
    pub fn get_actor<A: ActorClass>(&self, name: &str) -> Result<ActorHandle<A>> {
        let rt = self.inner();
        let raw = match rt.mode.upstream() {
            Some(up) => up.get_actor(rt, name)?,
            None => named(rt, name)?,
        };
        ActorHandle::from_raw(raw)
    }

    /// Kills an actor (Ray's `ray.kill` with `no_restart=True`): queued and
    /// running calls fail with [`Error::ActorDied`], and so do later ones.
    pub fn kill<A: ActorClass>(&self, handle: &ActorHandle<A>) -> Result<()> {
        self.kill_raw(handle.raw(), true)
    }

    /// Kills an actor; with `no_restart == false` and restarts left, the
    /// actor is restarted instead, as if it had crashed.
    pub fn kill_raw(&self, handle: &RawActor, no_restart: bool) -> Result<()> {
        let rt = self.inner();
        let actor = handle.0.actor.clone();
        if actor.proxy {
            if let Some(up) = rt.mode.upstream() {
                up.kill_actor(actor.id, no_restart);
            }
            return Ok(());
        }
        if no_restart {
            let e = actor.died("it was killed", None);
            actor.die(rt, e);
            return Ok(());
        }
        let running = std::mem::take(&mut actor.life.lock().running);
        fail_running(rt, running, &actor.died("it was killed and restarted", None));
        if rt.mode.node().is_some() {
            // A process actor: its monitor restarts it once its process is
            // gone; calls made from now on wait for that. Without a
            // process, a start or restart is already under way.
            let worker = actor.link.worker();
            if let Some(w) = worker {
                w.condemn();
            }
            return Ok(());
        }
        // Calls made from now on go to the restarted actor.
        if !actor.begin_restart(rt, "it was killed", None) {
            return Ok(());
        }
        let rt2 = rt.clone();
        rt.pool
            .execute(Box::new(move || {
                actor.finish_restart(&rt2);
            }))
            .map_err(|_| Error::Shutdown)
    }
}

/// For generated code: the actor's state as its class.
pub fn instance_ref<A: 'static>(state: &(dyn Any + Send + Sync)) -> Result<&A> {
    state.downcast_ref::<A>().ok_or_else(|| class_mismatch::<A>())
}

/// For generated code: the actor's state as its class, mutably.
pub fn instance_mut<A: 'static>(state: &mut (dyn Any + Send + Sync)) -> Result<&mut A> {
    state.downcast_mut::<A>().ok_or_else(|| class_mismatch::<A>())
}

fn class_mismatch<A>() -> Error {
    Error::TypeMismatch {
        expected: std::any::type_name::<A>().to_owned(),
        found: "an instance of another class".to_owned(),
    }
}

/// For generated code: wraps a freshly constructed instance.
pub fn new_instance<A: Send + Sync + 'static>(a: A) -> Instance {
    Arc::new(tokio::sync::RwLock::new(Box::new(a)))
}
