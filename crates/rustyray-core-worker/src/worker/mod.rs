//! Worker mode — Ray's worker process: the main loop of a process the node
//! daemon started, receiving tasks and sending back their outcomes.
//!
//! The user's own executable is the worker. [`worker_entry`], called first
//! thing in `main` (the `#[rustyray::main]` attribute does it), finds the
//! node daemon's socket in the environment, connects, and serves tasks
//! until the connection ends; then the process exits without returning to
//! the user's `main`. Started any other way, it returns at once. Because
//! the process runs the same executable, its link-time registry is the
//! driver's, entry for entry.
//!
//! A worker runs each pushed task on an embedded runtime of its own, with
//! the task's context set, so `rustyray::is_cancelled()` works and the
//! code runs exactly as it does in the threads mode: async functions on
//! its executor, sync functions on the thread that read them. Reading is
//! a role ([`reading`]): the thread that reads a sync task runs it and
//! then reads on, so a task starts and ends with no hop to another thread
//! and no thread spins waiting for tasks; should a message be needed while
//! it runs (the answer a blocked task waits for, a cancel), a standby
//! thread takes over reading. Replies are
//! written whole, under a lock, by whichever thread finishes a task. When
//! the connection ends (the driver exited or was killed) the process exits
//! at once, even in the middle of a task, so no worker outlives its
//! driver.
//!
//! Code running in a worker reaches the owner (the driver) through
//! [`Upstream`]. Tasks it submits are its own, run on workers it leases
//! from the node ([`submit`]); calls on actors go straight to the actor's
//! process when the handle carries its endpoint ([`direct`]), else through
//! the owner, which keeps their results for the worker until it releases
//! them, so references to them may leave the worker (in a result, or as
//! arguments). A task blocked in `get`/`wait` here tells the owner, which
//! lends its CPU to other tasks meanwhile, so nested task trees cannot
//! deadlock. Actors created here are created by the owner (`SpawnActor`),
//! in processes of their own; `get_actor` and `kill` go to the owner too.
//!
//! # Objects between a worker and its owner
//!
//! * An object this process makes (a put, a call's or a task's result) is
//!   its own and stays in its store (Ray's ownership). A message to the
//!   owner that names it (a result, a task argument, a value inside
//!   either) lends it ([`Upstream::share`]): the owner borrows it, one
//!   count per message, asks for its value (`Fetch`, answered `Fetched`)
//!   when someone looks at it, and gives the counts back (`Release`); the
//!   object stays here until then. Nothing waits for one not made yet.
//!   Objects whose ids carry this process's tag are its own; one lent back
//!   to it is held as its own, the lender's count given back at once.
//! * A reference inside a value the owner sends (an argument, a result, a
//!   fetched value) is lent: the owner counts a loan per message, and this
//!   process makes an entry that is fetched (`Fetch`/`Fetched`) only when
//!   code here first looks at it. Large values arrive as locations in the
//!   node's shared memory, read in place.
//! * The store entry counts what the owner keeps for this process; the
//!   last local reference gives it all back in one `Release`.
//! * Actor handles inside values the owner sends are lent the same way:
//!   the proxy here counts the loans and gives them back (`ReleaseActor`)
//!   with its last local handle.

mod direct;
pub use direct::direct_calls;
mod reading;
mod submit;
pub use submit::leased_tasks;

use crate::actor::RawActor;
use crate::codec::Value;
use crate::context::{self, TaskContext};
use crate::error::{Error, Result};
use crate::ids::{ActorId, ObjectId, TaskId};
use crate::object_ref::Arg;
use crate::object_ref::RawRef;
use crate::registry::FunctionBody;
use crate::resources::ResourceSet;
use crate::runtime::{CatchUnwind, Config, Inner, Outcome};
use crate::shm::{SharedBytes, ShmObject};
use crate::store::Peek;
use crate::task::{ArgList, Target, TaskSpec, TaskState};
use crate::wire::env::{
    ARENA as ARENA_ENV, SHM_THRESHOLD as THRESHOLD_ENV, WORKER_SOCKET as WORKER_ENV,
    WORKER_TOKEN as TOKEN_ENV,
};
use crate::wire::{self, FrameDecoder, Message, Role, WireOutcome};
use parking_lot::Mutex;
use reading::{Inbox, Reading};
use rustyray_shm::ShmClient;
use rustyray_transport::{Address, Conn};
use std::collections::HashMap;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// Runs the worker loop and exits the process when this process was
/// started as a worker by a node daemon; returns at once otherwise.
///
/// Call it first thing in `main` (or put `#[rustyray::main]` on `main`) of
/// every program that runs with [`crate::WorkerMode::Processes`]:
///
/// ```ignore
/// rustyray::worker_entry();
/// // The driver's code: only reached when not started as a worker. The
/// // facade's `init_with` starts the node daemon the processes mode needs.
/// let ray = rustyray::init_with(rustyray::Config::new().worker_mode(rustyray::WorkerMode::Processes));
/// ```
pub fn worker_entry() {
    let Some(socket) = std::env::var_os(WORKER_ENV) else {
        return;
    };
    // The first reader runs sync tasks, which may run their queued
    // children on its stack: a stack of the pool's size, marked.
    let socket = socket.to_string_lossy().into_owned();
    match crate::pool::spawn_with_stack("rustyray-reader", move || exit_when_served(serve(&socket))) {
        Ok(h) => {
            let _ = h.join();
            std::process::exit(1)
        }
        Err(e) => exit_when_served(Err(Error::from_io("starting the worker's reader", &e))),
    }
}

/// Whether this process was started as a worker.
pub(crate) fn started_as_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// The connection's writing side, shared by the threads that finish tasks.
#[derive(Clone)]
struct Replies(Arc<Mutex<Conn>>);

impl Replies {
    fn send(&self, msg: &Message) {
        let written = wire::encode_frame(msg)
            .map_err(|e| e.to_string())
            .and_then(|frame| self.0.lock().write_all(&frame).map_err(|e| e.to_string()));
        if let Err(e) = written {
            // The driver is gone (or the frame cannot be built, which the
            // driver would see as a lost task anyway): nothing is left to
            // serve.
            eprintln!(
                "rustyray worker process {}: cannot reply: {e}",
                std::process::id()
            );
            std::process::exit(1);
        }
    }

    fn done(&self, task_id: TaskId, outcome: WireOutcome) {
        self.send(&Message::TaskDone { task_id, outcome });
    }
}

/// The way from code running in a worker process to its owner: calls on
/// the owner's actors go there, and their outcomes come back into this
/// process's store.
pub(crate) struct Upstream {
    replies: Replies,
    /// Calls sent and not answered yet.
    pending: Mutex<HashMap<TaskId, Arc<TaskState>, crate::ids::IdHash>>,
    /// This process's own objects the owner borrows (a message to it named
    /// them), one count per time they were lent, until its `Release`.
    lent_up: Mutex<crate::lease::Counts<ObjectId, RawRef>>,
    /// Who reads the connection.
    pub(crate) reading: Reading,
    /// The node's arena, when the node handed one over.
    shm: Option<ShmClient>,
    /// Values at least this long go to shared memory.
    threshold: usize,
    /// Values waiting for their allocation (`ObjectSlot`).
    slots: Mutex<HashMap<u128, std::sync::mpsc::Sender<Result<u64>>>>,
    /// Calls that go straight to the actor's process.
    pub(crate) routes: direct::Routes,
    /// This process's endpoint and connections to other workers, once
    /// listening.
    peers: std::sync::OnceLock<Arc<direct::Peers>>,
    /// Tasks submitted here, run on leased workers.
    submitter: submit::Submitter,
    /// Tasks whose blocking the owner knows under another id: a task run
    /// on a lease (the lease's), a child run by its blocked parent (the
    /// parent's).
    reported: Mutex<HashMap<TaskId, Reported, crate::ids::IdHash>>,
    /// The sync tasks pushed here on each lease, run one at a time.
    on_lease: Mutex<HashMap<TaskId, LeaseHere, crate::ids::IdHash>>,
    /// Tasks cancelled by the worker that leased this one before their
    /// push arrived (the newest [`EARLY_CANCELS`]).
    early_cancels: Mutex<EarlyCancels>,
}

/// A spec's bytes as its message carries them, and the objects of this
/// process's own it names, lent to the owner (see [`Upstream::share`]).
pub(crate) struct SharedSpec {
    pub(crate) bytes: Vec<u8>,
    pub(crate) lent: Vec<ObjectId>,
}

/// How many early cancels a worker remembers.
const EARLY_CANCELS: usize = 1024;

/// The newest [`EARLY_CANCELS`] tasks cancelled before they came: a set to
/// look in, and their order to forget the oldest.
#[derive(Default)]
struct EarlyCancels {
    set: std::collections::HashSet<TaskId>,
    order: std::collections::VecDeque<TaskId>,
}

/// The id the owner knows a task's blocking under, and whether the task
/// holds one of its lease's runners here (a sync task on a lease, or a
/// child such a task runs itself): only those count in [`LeaseHere`].
#[derive(Debug, Clone, Copy)]
struct Reported {
    under: TaskId,
    on_runner: bool,
}

/// The sync tasks another worker pushed here on one lease: they run one
/// at a time, on the lease's CPU. A task that blocks hands that CPU to the
/// next one queued (a runner on another thread); only when none is queued
/// is its blocking reported to the owner (under the lease's id), which
/// lends the CPU elsewhere meanwhile.
#[derive(Default)]
struct LeaseHere {
    queue: std::collections::VecDeque<Box<dyn FnOnce() + Send>>,
    /// Threads running the queue.
    runners: usize,
    /// Tasks of the lease blocked now.
    blocked: usize,
    /// The owner was told the lease blocks.
    reported: bool,
}

impl LeaseHere {
    /// Runners not blocked.
    fn active(&self) -> usize {
        self.runners.saturating_sub(self.blocked)
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("pending", &self.pending.lock().len())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Lends the owner each object of this process's own that `ids` names
    /// (those whose ids carry this runtime's tag), one count per entry, for
    /// a message about to go that names them: the owner borrows them from
    /// here, asks for their values when they are looked at (`Fetch`), and
    /// gives each count back (`Release`). Returns the ids lent; a message
    /// that does not go after all gives them back with
    /// [`Upstream::unshare`].
    pub(crate) fn share(&self, rt: &Arc<Inner>, ids: &[ObjectId]) -> Result<Vec<ObjectId>> {
        let mine = rt.ids.owner();
        let own: Vec<ObjectId> = ids.iter().copied().filter(|id| id.owner() == mine).collect();
        if own.is_empty() {
            return Ok(own);
        }
        // Taken before any is counted: a missing one lends nothing.
        let held = own
            .iter()
            .map(|&id| RawRef::acquire(id, rt.clone()))
            .collect::<Result<Vec<_>>>()?;
        let mut spare = Vec::new();
        {
            let mut lent = self.lent_up.lock();
            for r in held {
                spare.extend(lent.lend(r.id(), r));
            }
        }
        // Dropped outside the lock.
        drop(spare);
        Ok(own)
    }

    /// Takes back what [`Upstream::share`] lent for a message that did not
    /// go.
    pub(crate) fn unshare(&self, ids: &[ObjectId]) {
        for &id in ids {
            self.lent_back(id, 1);
        }
    }

    /// The owner gave back `count` counts on object `id` of this process's
    /// own (`Release`).
    fn lent_back(&self, id: ObjectId, count: u32) {
        let last = self.lent_up.lock().release(id, count);
        drop(last);
    }

    /// Answers the owner's `Fetch` of an object of this process's own once
    /// it is made, from a pool thread (a large value waits for its slot in
    /// shared memory, which a reader thread hands over).
    fn serve_fetch(&self, rt: &Arc<Inner>, id: ObjectId) {
        let keep = match RawRef::acquire(id, rt.clone()) {
            Ok(r) => r,
            Err(_) => {
                self.replies.send(&Message::Fetched {
                    id,
                    outcome: WireOutcome::Failed(Error::ObjectLost(id)),
                });
                return;
            }
        };
        rt.when_complete(&[id], move |rt| {
            let rt2 = rt.clone();
            let job = Box::new(move || {
                let Some(up) = rt2.mode.upstream() else { return };
                // The value lives until the answer is out: what it names
                // is lent with it.
                let (outcome, _sent) = match rt2.store.peek(id, None) {
                    Ok(Peek::Ready(v)) => (up.to_owner(&rt2, &v), Some(v)),
                    Ok(Peek::Failed(e)) | Err(e) => (WireOutcome::Failed(e), None),
                    Ok(Peek::Pending) => (WireOutcome::Failed(Error::ObjectLost(id)), None),
                };
                up.replies.send(&Message::Fetched { id, outcome });
                drop(keep);
            });
            // A pool that is closed means the process is ending; its owner
            // sees that as the owner's death.
            drop(rt.pool.execute(job));
        });
    }

    /// This process's endpoint and connections to other workers.
    fn peers(&self) -> Option<&Arc<direct::Peers>> {
        self.peers.get()
    }

    /// Whether `id` is this process's own object not made yet: the result
    /// of its own work still out (a call, straight to the actor or through
    /// the owner, or a task submitted here), or answered and waiting for
    /// room in the store.
    pub(crate) fn is_out(rt: &Inner, id: ObjectId) -> bool {
        id.owner() == rt.ids.owner() && !rt.store.is_complete(id)
    }

    /// Records (`Some`) or forgets the id task `task` blocks under.
    fn report_as(&self, task: TaskId, under: Option<Reported>) {
        let mut r = self.reported.lock();
        match under {
            Some(u) => r.insert(task, u),
            None => r.remove(&task),
        };
    }

    /// The id the owner knows task `task`'s blocking under.
    fn reported_as(&self, task: TaskId) -> Reported {
        self.reported.lock().get(&task).copied().unwrap_or(Reported {
            under: task,
            on_runner: false,
        })
    }

    /// Remembers that task `task` was cancelled before it came.
    fn cancel_early(&self, task: TaskId) {
        let mut c = self.early_cancels.lock();
        if !c.set.insert(task) {
            return;
        }
        c.order.push_back(task);
        // Those already taken keep their place in the order until they
        // are the oldest: the order is bounded all the same.
        while c.order.len() > EARLY_CANCELS {
            if let Some(old) = c.order.pop_front() {
                c.set.remove(&old);
            }
        }
    }

    /// Whether task `task` was cancelled before it came (forgetting it).
    fn cancelled_early(&self, task: TaskId) -> bool {
        self.early_cancels.lock().set.remove(&task)
    }

    /// Whether task `task` runs here on a lease.
    fn is_leased_here(&self, task: TaskId) -> bool {
        self.reported.lock().contains_key(&task)
    }

    /// An answer to this process's own work sent straight to another
    /// worker (a task on a lease, or a call on an actor).
    fn answered(&self, rt: &Arc<Inner>, task_id: TaskId, from: u32, outcome: WireOutcome) {
        if let Err(outcome) = self.submitter.answered(self, rt, task_id, from, outcome) {
            self.routes.answered(rt, task_id, *outcome);
        }
    }

    /// Runs the task that makes `id` on this thread, if it is queued here
    /// and the current task (sync, with stack to spare) may run it on its
    /// CPU while it would block. Returns whether it ran one.
    pub(crate) fn help(&self, rt: &Arc<Inner>, id: ObjectId) -> bool {
        let Some(ctx) = context::current() else {
            return false;
        };
        if ctx.is_async() || !crate::pool::has_stack_to_spare() {
            return false;
        }
        let under = self.reported_as(ctx.task.id);
        self.submitter.help(self, rt, id, ctx.cpu(), under)
    }

    /// Sends call `state` on the owner's actor `actor_id` through the
    /// owner (`CallActor`), its answer pending here; counted as relayed,
    /// so a route to the actor waits for it.
    pub(super) fn send_relayed(
        &self,
        state: &Arc<TaskState>,
        actor_id: ActorId,
        spec: SharedSpec,
        attempted: bool,
    ) {
        self.pending.lock().insert(state.id, state.clone());
        self.routes.relaying(state.id, actor_id);
        self.replies.send(&Message::CallActor {
            actor_id,
            task_id: state.id,
            spec: spec.bytes,
            refs: spec.lent,
            attempted,
        });
    }

    /// A value as it goes to the owner when that needs no message back: it
    /// is below the shared-memory threshold and names no object (which
    /// might have to be shared first). `None` otherwise.
    fn small(&self, v: &Value) -> Option<WireOutcome> {
        if v.encoded_len().ok()? >= self.threshold {
            return None;
        }
        match inline(v) {
            WireOutcome::Value { refs, actors, .. } if !refs.is_empty() || !actors.is_empty() => None,
            out => Some(out),
        }
    }

    /// A value as it goes to the owner (see [`Upstream::encode`]), after
    /// sharing the objects it names.
    fn to_owner(&self, rt: &Arc<Inner>, v: &Value) -> WireOutcome {
        let value = self.encode(v);
        if let WireOutcome::Value { refs, .. } = &value {
            if let Err(e) = self.share(rt, refs) {
                return WireOutcome::Failed(e);
            }
        }
        value
    }

    /// Submits a task of this process's own, run on a worker it leases
    /// (see `submit`); its result's object here completes when that worker
    /// answers.
    pub(crate) fn submit_task(
        &self,
        rt: &Arc<Inner>,
        entry: &'static crate::registry::FunctionEntry,
        args: Vec<Arg>,
        opts: &crate::options::TaskOptions,
    ) -> Result<RawRef> {
        self.submitter.submit(self, rt, entry, args, opts)
    }

    /// Code here cancelled its task or call `task_id`: the process running
    /// it is asked to cancel it too (the actor's process, for a call sent
    /// straight there; the owner, for what went through it).
    pub(crate) fn cancel(&self, rt: &Arc<Inner>, task_id: TaskId, force: bool) {
        if self.routes.cancel(task_id, force) || self.submitter.cancel(rt, task_id, force) {
            return;
        }
        if self.pending.lock().contains_key(&task_id) {
            self.replies.send(&Message::CancelTask { task_id, force });
        }
    }

    /// The task `task_id` blocks (`true`) or resumes: its owner lends or
    /// takes back its CPU.
    pub(crate) fn blocked(
        self: &Arc<Self>,
        rt: &Arc<Inner>,
        task_id: TaskId,
        blocked: bool,
        on: Option<ObjectId>,
    ) {
        if blocked {
            // Nothing this process holds back may be what the task waits
            // for.
            if let Some(p) = self.peers() {
                p.holding.flush_all();
            }
        }
        let Reported { under, on_runner } = self.reported_as(task_id);
        let task_id = under;
        // A task that holds one of its lease's runners may hand the lease
        // on; anything else reports as it is.
        let report = on_runner
            .then(|| self.lease_blocked(rt, under, blocked))
            .flatten()
            .unwrap_or(true);
        if !report {
            return;
        }
        self.replies.send(&if blocked {
            Message::Blocked { task_id, on }
        } else {
            Message::Unblocked { task_id }
        });
    }

    /// A task of lease `lease` here blocks or resumes: `None` when `lease`
    /// is not a lease here (report as usual), else whether to report it.
    fn lease_blocked(self: &Arc<Self>, rt: &Arc<Inner>, lease: TaskId, blocked: bool) -> Option<bool> {
        let mut start = false;
        let report = {
            let mut h = self.on_lease.lock();
            let l = h.get_mut(&lease)?;
            if blocked {
                l.blocked += 1;
                if l.active() > 0 {
                    false
                } else if !l.queue.is_empty() {
                    // The next task takes the CPU.
                    l.runners += 1;
                    start = true;
                    false
                } else {
                    !std::mem::replace(&mut l.reported, true)
                }
            } else {
                l.blocked = l.blocked.saturating_sub(1);
                l.reported && l.active() > 0 && {
                    l.reported = false;
                    true
                }
            }
        };
        if start {
            self.start_runner(rt, lease);
        }
        Some(report)
    }

    /// Queues a sync task pushed on lease `lease`; starts a runner if none
    /// is running.
    fn run_on_lease(self: &Arc<Self>, rt: &Arc<Inner>, lease: TaskId, job: Box<dyn FnOnce() + Send>) {
        let (start, resumed) = {
            let mut h = self.on_lease.lock();
            let l = h.entry(lease).or_default();
            l.queue.push_back(job);
            if l.active() == 0 {
                l.runners += 1;
                (true, std::mem::take(&mut l.reported))
            } else {
                (false, false)
            }
        };
        if resumed {
            self.replies.send(&Message::Unblocked { task_id: lease });
        }
        if start {
            self.start_runner(rt, lease);
        }
    }

    fn start_runner(self: &Arc<Self>, rt: &Arc<Inner>, lease: TaskId) {
        let up = self.clone();
        rt.pool.execute_or_run(Box::new(move || up.run_lease(lease)));
    }

    /// A runner: runs the lease's queued tasks until none is left.
    fn run_lease(&self, lease: TaskId) {
        loop {
            let (job, report) = {
                let mut h = self.on_lease.lock();
                let Some(l) = h.get_mut(&lease) else { return };
                // A task that resumed while another runner took the lease
                // on: one of them stops at its next task.
                let next = if l.active() > 1 { None } else { l.queue.pop_front() };
                match next {
                    Some(job) => (Some(job), false),
                    None => {
                        l.runners -= 1;
                        let report = l.active() == 0 && l.blocked > 0 && !l.reported;
                        if report {
                            l.reported = true;
                        }
                        if l.runners == 0 && l.blocked == 0 {
                            h.remove(&lease);
                        }
                        (None, report)
                    }
                }
            };
            match job {
                Some(job) => job(),
                None => {
                    if report {
                        self.replies.send(&Message::Blocked {
                            task_id: lease,
                            on: None,
                        });
                    }
                    return;
                }
            }
        }
    }

    /// The last reference here to object `id` went: the owner drops the
    /// `count` counts it kept on it for this process.
    pub(crate) fn released(&self, id: ObjectId, count: u32) {
        self.replies.send(&Message::Release { id, count });
    }

    /// The last handle here to the owner's actor `actor` went: the owner
    /// drops the `count` handles it kept for this process.
    pub(crate) fn released_actor(&self, actor: ActorId, count: u32) {
        self.replies.send(&Message::ReleaseActor { actor, count });
    }

    /// The value of an object in the node's shared memory that the owner
    /// pinned for this process: a view of the arena, whose pin goes back
    /// (with an `Unpin`) when the last view goes.
    fn shared_value(&self, type_name: String, id: u128, offset: u64, len: u64) -> Result<Value> {
        let shm = self.shm.as_ref().ok_or_else(|| {
            Error::Protocol("a shared-memory value, but no arena was handed over".to_owned())
        })?;
        let (offset, len) = match (usize::try_from(offset), usize::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(Error::Protocol("a shared-memory value out of range".to_owned())),
        };
        let replies = self.replies.clone();
        let view = shm
            .view(
                offset,
                len,
                Box::new(move || replies.send(&Message::Unpin { id })),
            )
            .map_err(|e| Error::Protocol(format!("a bad shared-memory value: {e}")))?;
        Ok(Value::from_shared(SharedBytes::Worker(view), type_name))
    }

    /// How a value goes to the owner: a large one is written into an
    /// allocation the node makes for it, the rest inline (with the ids of
    /// the references it holds, which the owner keeps alive with it).
    fn encode(&self, v: &Value) -> WireOutcome {
        // A user type's `Serialize` may panic: that is this value's error.
        std::panic::catch_unwind(AssertUnwindSafe(|| self.encode_inner(v))).unwrap_or_else(|p| {
            WireOutcome::Failed(Error::Serialization(format!(
                "Serialize panicked: {}",
                crate::runtime::panic_message(p.as_ref())
            )))
        })
    }

    fn encode_inner(&self, v: &Value) -> WireOutcome {
        if let (Some(shm), Ok(len)) = (&self.shm, v.encoded_len()) {
            if len >= self.threshold {
                match self.store(shm, v, len) {
                    Ok(Some(stored)) => return stored,
                    // Holds references: inline, with them.
                    Ok(None) => {}
                    Err(e) => return WireOutcome::Failed(e),
                }
            }
        }
        inline(v)
    }

    /// Writes a value into an allocation the node makes for it. `None`
    /// when the value holds object references (it travels inline).
    fn store(&self, shm: &ShmClient, v: &Value, len: usize) -> Result<Option<WireOutcome>> {
        let id = crate::ids::random_token();
        let (tx, rx) = std::sync::mpsc::channel();
        self.slots.lock().insert(id, tx);
        self.replies.send(&Message::CreateObject { id, len: len as u64 });
        // A reader thread hands over the answer; a closed channel means
        // the connection ended, and the process with it.
        self.reading.claim();
        let offset = rx.recv().map_err(|_| Error::Connection {
            what: "waiting for an allocation".to_owned(),
            message: "the node daemon is gone".to_owned(),
        })??;
        let written = usize::try_from(offset)
            .map_err(|_| Error::Protocol("an allocation out of range".to_owned()))
            .and_then(|offset| {
                shm.write_with(offset, len, |buf| v.encode_into(buf))
                    .map_err(|e| Error::Io {
                        what: "writing a value into shared memory".to_owned(),
                        message: e.to_string(),
                    })
            })
            .and_then(|r| r);
        match written {
            Ok(true) => Ok(Some(WireOutcome::Stored {
                type_name: v.type_name().to_owned(),
                id,
                len: len as u64,
            })),
            other => {
                self.replies.send(&Message::AbortObject { id });
                other.map(|_| None)
            }
        }
    }

    /// Sends a call on the owner's actor `actor_id`; its object, local to
    /// this process, completes when the owner answers.
    pub(crate) fn call_actor(
        &self,
        rt: &Arc<Inner>,
        actor_id: ActorId,
        method: &'static crate::registry::MethodEntry,
        args: Vec<Arg>,
    ) -> Result<RawRef> {
        let args = match self.routes.call(self, rt, actor_id, method, args)? {
            Ok(ret) => return Ok(ret),
            Err(args) => args,
        };
        let (state, ret) = rt.new_task()?;
        let spec = TaskSpec {
            id: state.id,
            target: Target::Method(actor_id, method),
            args,
            name: None,
        };
        // `_named` keeps what the spec names alive until the call is out.
        let (_named, shared) = self
            .spec_for_owner(rt, &spec)
            .inspect_err(|_| rt.forget_task(state.id))?;
        self.send_relayed(&state, actor_id, shared, false);
        Ok(ret)
    }

    /// A spec as the owner receives it: values inline, references as ids,
    /// after lending the owner the objects of this process's own that it
    /// names. The returned value keeps what it names alive; hold it until
    /// the message is sent.
    fn spec_for_owner(&self, rt: &Arc<Inner>, spec: &TaskSpec) -> Result<(Value, SharedSpec)> {
        let named = spec.to_bytes()?;
        let shared = self.shared_bytes(rt, &named)?;
        Ok((named, shared))
    }

    /// The bytes of an encoded spec, once the objects of this process's
    /// own that it names are lent to the owner.
    fn shared_bytes(&self, rt: &Arc<Inner>, named: &Value) -> Result<SharedSpec> {
        let Some(bytes) = named.bytes().map(<[u8]>::to_vec) else {
            return Err(Error::serialization("a task spec without bytes"));
        };
        let lent = self.share(rt, &named.nested_object_ids())?;
        Ok(SharedSpec { bytes, lent })
    }

    /// Asks the owner something it answers with `ObjectReady`, and waits
    /// for the answer.
    /// `lent`: what the request lends the owner, taken back if it cannot
    /// go.
    fn ask(
        &self,
        rt: &Arc<Inner>,
        lent: &[ObjectId],
        request: impl FnOnce(TaskId) -> Message,
    ) -> Result<Value> {
        let (state, ret) = rt.new_task().inspect_err(|_| self.unshare(lent))?;
        self.pending.lock().insert(state.id, state.clone());
        self.replies.send(&request(state.id));
        rt.get_value(&ret, None)
    }

    /// Has the owner create an actor (see `Message::SpawnActor`); returns
    /// a handle to it once the owner made it.
    pub(crate) fn spawn_actor(
        &self,
        rt: &Arc<Inner>,
        class: &'static crate::registry::ActorEntry,
        opts: &crate::options::ActorOptions,
        args: Vec<Arg>,
    ) -> Result<RawActor> {
        let spec = TaskSpec {
            id: rt.ids.task(),
            target: Target::Constructor(class),
            args,
            name: None,
        };
        let (_named, spec) = self.spec_for_owner(rt, &spec)?;
        let lent = spec.lent.clone();
        self.ask(rt, &lent, |task_id| Message::SpawnActor {
            task_id,
            spec: spec.bytes,
            refs: spec.lent,
            options: opts.clone(),
        })?
        .take(rt)
    }

    /// Has the owner look up the named actor `name`.
    pub(crate) fn get_actor(&self, rt: &Arc<Inner>, name: &str) -> Result<RawActor> {
        self.ask(rt, &[], |task_id| Message::GetActor {
            task_id,
            name: name.to_owned(),
        })?
        .take(rt)
    }

    /// Has the owner kill its actor `actor`.
    pub(crate) fn kill_actor(&self, actor: ActorId, no_restart: bool) {
        self.replies.send(&Message::KillActor { actor, no_restart });
    }

    /// The owner's answer to a call.
    fn ready(&self, rt: &Arc<Inner>, task_id: TaskId, outcome: WireOutcome) {
        let Some(state) = self.pending.lock().remove(&task_id) else {
            // A duplicate: what it lends is taken and given back at once.
            drop(Outcome::from_wire(outcome, rt));
            return;
        };
        self.routes.relay_answered(task_id);
        complete(rt, task_id.return_object(), outcome);
        state.finish();
        rt.forget_task(task_id);
    }
}

/// Completes object `id` here with an answer (to a call, or to a
/// `Fetch`), on the thread reading it: never waiting here for room in the
/// store (the messages behind, an owner's `Release` freeing objects of
/// this process's own, are read meanwhile; see `Inner::publish_now`).
fn complete(rt: &Arc<Inner>, id: ObjectId, outcome: WireOutcome) {
    let result = match Outcome::from_wire(outcome, rt) {
        Outcome::Value(v) => return rt.publish_now(id, v),
        Outcome::Failed(e) | Outcome::NoWorker(e) => Err(e),
        Outcome::Returned(m) | Outcome::Panicked(m) | Outcome::Crashed(m) => Err(Error::invalid(m)),
    };
    rt.store.complete(id, result);
}

/// A worker process's state, shared by its reader thread and the threads
/// that finish tasks.
struct Worker {
    rt: Arc<Inner>,
    /// Function tasks running here, for cancellation.
    running: Mutex<HashMap<TaskId, Arc<TaskState>, crate::ids::IdHash>>,
    /// The actors this worker hosts, by their owner's id (one, in practice).
    actors: Mutex<HashMap<ActorId, RawActor, crate::ids::IdHash>>,
    /// Actor calls in progress: the owner's task id → the local call's
    /// object.
    calls: Mutex<HashMap<TaskId, RawRef, crate::ids::IdHash>>,
    /// The way to the owner.
    up: Arc<Upstream>,
}

fn serve(socket: &str) -> Result<()> {
    let token = std::env::var(TOKEN_ENV)
        .ok()
        .and_then(|t| u128::from_str_radix(&t, 16).ok())
        .ok_or_else(|| Error::Handshake(format!("{TOKEN_ENV} is missing or malformed")))?;
    let threshold = std::env::var(THRESHOLD_ENV)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(crate::shm::DEFAULT_THRESHOLD);
    let shm = ShmClient::from_env(ARENA_ENV).map_err(|e| Error::Io {
        what: "mapping the node's shared memory".to_owned(),
        message: e.to_string(),
    })?;
    let addr = Address::Unix(socket.to_owned());
    // Two connections, one per direction (see `Role::WorkerUp`): the node's
    // messages arrive on the first, this worker's go out on the second.
    let connect = |role: Role| -> Result<(Conn, FrameDecoder)> {
        let mut stream =
            Conn::connect(&addr).map_err(|e| Error::from_io("connecting to the node daemon", &e))?;
        let mut dec = FrameDecoder::default();
        wire::connect_handshake_blocking(&mut stream, &mut dec, role, token)?;
        Ok((stream, dec))
    };
    let (stream, dec) = connect(Role::Worker)?;
    let (up, _) = connect(Role::WorkerUp)?;
    let replies = Replies(Arc::new(Mutex::new(up)));
    let up = Arc::new(Upstream {
        replies: replies.clone(),
        pending: Mutex::default(),
        lent_up: Mutex::default(),
        reading: Reading::new(),
        shm,
        threshold,
        slots: Mutex::default(),
        routes: direct::Routes::default(),
        peers: std::sync::OnceLock::new(),
        submitter: submit::Submitter::default(),
        reported: Mutex::default(),
        on_lease: Mutex::default(),
        early_cancels: Mutex::default(),
    });
    let rt = Inner::start_as(Config::default(), Some(up.clone()), None)?;
    // Objects the owner lent are asked for when first looked at.
    rt.store
        .set_fetch(Box::new(move |id| replies.send(&Message::Fetch { id })));
    let worker = Arc::new(Worker {
        rt,
        up,
        running: Mutex::default(),
        actors: Mutex::default(),
        calls: Mutex::default(),
    });
    // Other workers call the actor hosted here straight at this endpoint;
    // the owner hands it out with the actor's handles.
    let peers = direct::Peers::start(&worker, token)?;
    worker.up.replies.send(&Message::Listening {
        endpoint: peers.endpoint().to_owned(),
        tag: worker.rt.ids.owner(),
    });
    let _ = worker.up.peers.set(peers);
    // A claim with no standby thread starts a new reader.
    let weak = Arc::downgrade(&worker);
    worker.up.reading.set_spawn(Box::new(move || {
        let w = weak.clone();
        crate::pool::spawn_with_stack("rustyray-reader", move || {
            if let Some(w) = w.upgrade() {
                exit_when_served(serve_messages(&w, None));
            }
        })
        .map(drop)
    }));
    let up = worker.up.clone();
    std::thread::Builder::new()
        .name("rustyray-watch".to_owned())
        .spawn(move || up.reading.watch())
        .map_err(|e| Error::Io {
            what: "starting the reading watchdog".to_owned(),
            message: e.to_string(),
        })?;
    serve_messages(&worker, Some(Inbox { stream, dec }))
}

/// One reader's loop (see [`reading`]): reads and handles messages,
/// running sync tasks itself. Starts with `first` (the connection's
/// reading side) or stands by for it. Returns when the connection ends.
fn serve_messages(worker: &Arc<Worker>, first: Option<Inbox>) -> Result<()> {
    let reading = &worker.up.reading;
    let mut inbox = first.unwrap_or_else(|| reading.take());
    loop {
        match read(&mut inbox.stream, &mut inbox.dec)? {
            Some(Message::PushTask {
                task_id,
                actor: None,
                spec,
                cpu,
            }) => {
                if let Some(job) = run_task(worker, task_id, spec, cpu) {
                    reading.leave(inbox);
                    job();
                    inbox = reading.retake().unwrap_or_else(|| reading.take());
                }
            }
            Some(Message::PushTask {
                task_id,
                actor: Some(actor_id),
                spec,
                ..
            }) => call_actor(worker, task_id, actor_id, spec),
            Some(Message::CreateActor {
                actor_id,
                task_id,
                spec,
                max_concurrency,
            }) => create_actor(worker, actor_id, task_id, spec, max_concurrency),
            Some(Message::ObjectReady { task_id, outcome }) => {
                if let Some(up) = worker.rt.mode.upstream() {
                    up.ready(&worker.rt, task_id, outcome);
                }
            }
            Some(Message::Fetched { id, outcome }) => complete(&worker.rt, id, outcome),
            // The owner asks for, or gives back, an object of this
            // process's own that it borrows.
            Some(Message::Fetch { id }) => worker.up.serve_fetch(&worker.rt, id),
            Some(Message::Release { id, count }) => worker.up.lent_back(id, count),
            Some(Message::Route { actor }) => crate::actor::learn_route(&worker.rt, &actor),
            Some(Message::Answered {
                task_id,
                from,
                outcome,
            }) => {
                worker.up.answered(&worker.rt, task_id, from, outcome);
                // Calls held back behind this one's answer go now (written
                // by the holding thread: this one reads).
                if let Some(p) = worker.up.peers() {
                    p.holding.hurry();
                }
            }
            Some(Message::LeaseGranted {
                lease_id,
                pid,
                endpoint,
            }) => submit::Submitter::granted(&worker.up, &worker.rt, lease_id, pid, endpoint),
            Some(Message::LeaseRefused { lease_id, error }) => {
                worker
                    .up
                    .submitter
                    .refused(&worker.up, &worker.rt, lease_id, error);
            }
            Some(Message::ObjectSlot { id, slot }) => {
                if let Some(tx) = worker.up.slots.lock().remove(&id) {
                    let _ = tx.send(slot);
                }
            }
            Some(Message::CancelTask { task_id, .. }) => {
                cancel_here(worker, task_id);
            }
            Some(Message::Ping { nonce }) => worker.up.replies.send(&Message::Pong { nonce }),
            Some(Message::Shutdown) | None => return Ok(()),
            Some(other) => return Err(Error::Protocol(format!("unexpected message {other:?}"))),
        }
    }
}

/// Cancels a task or actor call running here; false when none is.
fn cancel_here(worker: &Worker, task_id: TaskId) -> bool {
    let state = worker.running.lock().get(&task_id).cloned();
    let found = state.is_some();
    if let Some(s) = state {
        s.mark_cancelled();
        s.abort_running();
    }
    let call = worker.calls.lock().get(&task_id).cloned();
    let called = call.is_some();
    if let Some(r) = call {
        let _ = worker.rt.cancel(r.id(), crate::options::CancelOptions::default());
    }
    found || called
}

/// Ends the process once a reader saw the connection end (or fail).
fn exit_when_served(served: Result<()>) -> ! {
    let code = match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rustyray worker process {}: {e}", std::process::id());
            1
        }
    };
    std::process::exit(code)
}

/// Reads the next message, blocking.
fn read(stream: &mut Conn, dec: &mut FrameDecoder) -> Result<Option<Message>> {
    wire::read_message_blocking(stream, dec).map_err(Error::from)
}

/// Sends a task's outcome when dropped: on completion with the outcome
/// set, or (for an aborted async task) as cancelled.
struct Finish {
    task_id: TaskId,
    worker: Arc<Worker>,
    outcome: Option<WireOutcome>,
    /// The value sent, dropped only after the reply: the references it
    /// holds must reach the owner before their releases do.
    _sent: Option<Value>,
    /// The connection back to the worker that pushed the task on a lease;
    /// `None` for a task the owner pushed.
    to: Option<Arc<direct::PeerOut>>,
    /// The outcome goes to that worker through the owner (it is large or
    /// names objects).
    through_owner: bool,
}

impl Finish {
    fn new(worker: &Arc<Worker>, task_id: TaskId, to: Option<Arc<direct::PeerOut>>) -> Finish {
        Finish {
            task_id,
            worker: worker.clone(),
            outcome: None,
            _sent: None,
            to,
            through_owner: false,
        }
    }

    fn complete(mut self, outcome: Outcome) {
        self.outcome = Some(match outcome {
            Outcome::Value(v) => {
                let small = self.to.as_ref().and_then(|_| self.worker.up.small(&v));
                let wire = match small {
                    Some(wire) => wire,
                    None => {
                        self.through_owner = self.to.is_some();
                        self.worker.up.to_owner(&self.worker.rt, &v)
                    }
                };
                self._sent = Some(v);
                wire
            }
            other => other.into_wire(),
        });
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.worker.running.lock().remove(&self.task_id);
        let outcome = self
            .outcome
            .take()
            .unwrap_or(WireOutcome::Failed(Error::TaskCancelled(self.task_id)));
        let up = &self.worker.up;
        match &self.to {
            Some(to) if self.through_owner => up.replies.send(&Message::Answer {
                to: to.pid(),
                task_id: self.task_id,
                outcome,
            }),
            Some(to) => direct::answer_leased(to, self.task_id, outcome),
            None => up.replies.done(self.task_id, outcome),
        }
        up.report_as(self.task_id, None);
    }
}

/// The CPU a pushed task holds, as a set.
fn cpu_set(cpu: f64) -> ResourceSet {
    let mut set = ResourceSet::new();
    if cpu > 0.0 {
        // Out of range is the owner's error, not this task's: no CPU then.
        let _ = set.set(crate::resources::CPU, cpu);
    }
    set
}

/// Starts a function task another worker pushed on a lease it holds here;
/// its outcome goes back to that worker (`back`). Reference arguments are
/// waited for first (fetched from their owner), then a sync task runs on a
/// pool thread (this thread reads the connection), an async one on the
/// executor.
fn run_leased(
    worker: &Arc<Worker>,
    back: &Arc<direct::PeerOut>,
    lease_id: TaskId,
    task_id: TaskId,
    spec: Vec<u8>,
    refs: Vec<ObjectId>,
    cpu: f64,
) {
    let rt = &worker.rt;
    let mut finish = Finish::new(worker, task_id, Some(back.clone()));
    let decoded = (|| {
        // The references passed as arguments were lent here (`Lend`); the
        // ones inside values are taken as the spec decodes.
        let keep = rt.hold_received(&refs, &[])?;
        let spec = TaskSpec::from_bytes(&Value::from_bytes(spec, "TaskSpec"), rt, &rt.registry)?;
        drop(keep);
        match spec.target {
            Target::Function(entry) => Ok((entry, spec)),
            other => Err(Error::Protocol(format!("{} is not a function", other.name()))),
        }
    })();
    let (entry, spec) = match decoded {
        Ok(x) => x,
        Err(e) => {
            finish.outcome = Some(WireOutcome::Failed(e));
            return;
        }
    };
    let state = TaskState::new(task_id);
    worker.running.lock().insert(task_id, state.clone());
    // A sync task's blocking is the lease's: it holds one of the lease's
    // runners. An async task holds no thread: its waits go unreported.
    let sync = matches!(entry.body, FunctionBody::Sync(_));
    worker.up.report_as(
        task_id,
        Some(Reported {
            under: if sync { lease_id } else { task_id },
            on_runner: sync,
        }),
    );
    if worker.up.cancelled_early(task_id) {
        state.mark_cancelled();
    }
    state.start(1);
    rt.when_complete(&refs, move |rt| {
        if state.is_cancelled() {
            // Dropped unsent: reported cancelled.
            drop(finish);
            return;
        }
        match entry.body {
            FunctionBody::Sync(f) => {
                let ctx = TaskContext::new(rt.clone(), state.clone(), cpu_set(cpu), false);
                let rt2 = rt.clone();
                let job = Box::new(move || {
                    if state.is_cancelled() {
                        // Cancelled while queued here: reported so, unrun.
                        drop(finish);
                        return;
                    }
                    let outcome = context::with_sync(ctx, || match submit::resolve(&rt2, &spec, 1) {
                        Ok(args) => {
                            Outcome::from_invoke(std::panic::catch_unwind(AssertUnwindSafe(|| f(args))))
                        }
                        Err(e) => Outcome::Failed(e),
                    });
                    finish.complete(outcome);
                });
                if let Some(up) = rt.mode.upstream() {
                    up.run_on_lease(rt, lease_id, job);
                }
            }
            FunctionBody::Async(f) => {
                let ctx = TaskContext::new(rt.clone(), state.clone(), cpu_set(cpu), true);
                let rt2 = rt.clone();
                let h = rt.handle.spawn(async move {
                    let outcome = match submit::resolve(&rt2, &spec, 1) {
                        Ok(args) => {
                            Outcome::from_invoke(context::with_async(ctx, CatchUnwind(f(args))).await)
                        }
                        Err(e) => Outcome::Failed(e),
                    };
                    finish.complete(outcome);
                });
                state.set_abort(1, h.abort_handle());
            }
        }
    });
}

/// Starts a pushed function task: an async one on the executor; a sync
/// one is returned, for the reading thread to run.
fn run_task(
    worker: &Arc<Worker>,
    task_id: TaskId,
    spec: Vec<u8>,
    cpu: f64,
) -> Option<Box<dyn FnOnce() + Send>> {
    let rt = &worker.rt;
    let mut finish = Finish::new(worker, task_id, None);
    let (entry, args) = match decode(worker, spec) {
        Ok(x) => x,
        Err(e) => {
            finish.outcome = Some(WireOutcome::Failed(e));
            return None;
        }
    };
    let state = TaskState::new(task_id);
    worker.running.lock().insert(task_id, state.clone());
    state.start(1);
    let ctx = TaskContext::new(rt.clone(), state.clone(), cpu_set(cpu), false);
    match entry.body {
        FunctionBody::Sync(f) => Some(Box::new(move || {
            let outcome = Outcome::from_invoke(context::with_sync(ctx, || {
                std::panic::catch_unwind(AssertUnwindSafe(|| f(args)))
            }));
            finish.complete(outcome);
        })),
        FunctionBody::Async(f) => {
            let ctx = TaskContext::new(rt.clone(), state.clone(), cpu_set(cpu), true);
            let h = rt.handle.spawn(async move {
                let outcome = Outcome::from_invoke(context::with_async(ctx, CatchUnwind(f(args))).await);
                finish.complete(outcome);
            });
            state.set_abort(1, h.abort_handle());
            None
        }
    }
}

/// Decodes a pushed spec; checks that the owner resolved every argument
/// to a value.
fn decode_spec(worker: &Worker, spec: Vec<u8>) -> Result<TaskSpec> {
    let rt = &worker.rt;
    let shared = |t, id, o, l| worker.up.shared_value(t, id, o, l);
    let spec = TaskSpec::from_wire(
        &Value::from_bytes(spec, "TaskSpec"),
        rt,
        &rt.registry,
        Some(&shared),
    )?;
    if let Some(Arg::Ref(r)) = spec.args.iter().find(|a| matches!(a, Arg::Ref(_))) {
        return Err(Error::Protocol(format!(
            "{}: argument {} was not resolved by the owner",
            spec.target.name(),
            r.id()
        )));
    }
    Ok(spec)
}

/// Decodes a pushed function task into its function and arguments.
fn decode(worker: &Worker, spec: Vec<u8>) -> Result<(&'static crate::registry::FunctionEntry, ArgList)> {
    let rt = &worker.rt;
    let spec = decode_spec(worker, spec)?;
    let Target::Function(entry) = spec.target else {
        return Err(Error::Protocol(format!(
            "{} is not a function",
            spec.target.name()
        )));
    };
    let values = spec.args.into_iter().filter_map(Arg::into_value).collect();
    Ok((entry, ArgList::new(values, rt.clone(), entry.name)))
}

/// Hosts the owner's actor: runs its constructor, answers when it ran.
fn create_actor(
    worker: &Arc<Worker>,
    actor_id: ActorId,
    task_id: TaskId,
    spec: Vec<u8>,
    max_concurrency: u32,
) {
    let rt = &worker.rt;
    let (w, ray) = (worker.clone(), crate::Ray::non_owning(rt.clone()));
    let spec = decode_spec(worker, spec);
    if let Ok(TaskSpec {
        target: Target::Constructor(class),
        ..
    }) = &spec
    {
        // Before the constructor runs: its lines are the actor's.
        crate::wire::announce_actor(class.name);
    }
    rt.handle.spawn(async move {
        let hosted = match spec {
            Ok(TaskSpec {
                target: Target::Constructor(class),
                args,
                ..
            }) => crate::actor::host(&ray, class, args, max_concurrency).await,
            Ok(other) => Err(Error::Protocol(format!(
                "{} is not a constructor",
                other.target.name()
            ))),
            Err(e) => Err(e),
        };
        let outcome = match hosted {
            Ok(raw) => {
                w.actors.lock().insert(actor_id, raw);
                WireOutcome::Value {
                    type_name: String::new(),
                    bytes: Vec::new(),
                    refs: Vec::new(),
                    actors: Vec::new(),
                }
            }
            Err(e) => local_failure(e),
        };
        w.up.replies.done(task_id, outcome);
    });
}

/// Runs one call on the hosted actor. Calls are submitted here in the
/// order they arrive, which is the owner's submission order; the hosted
/// actor keeps it. A method that panics ends the process, as the owner
/// expects of a crashing actor.
fn call_actor(worker: &Arc<Worker>, task_id: TaskId, actor_id: ActorId, spec: Vec<u8>) {
    let submitted = decode_spec(worker, spec).and_then(|spec| call_hosted(worker, actor_id, spec));
    match submitted {
        Ok(r) => reply_when_done(worker, task_id, r, None),
        Err(e) => worker.up.replies.done(task_id, WireOutcome::Failed(e)),
    }
}

/// Submits a call, decoded, to the actor hosted here.
fn call_hosted(worker: &Worker, actor_id: ActorId, spec: TaskSpec) -> Result<RawRef> {
    let Target::Method(_, method) = spec.target else {
        return Err(Error::Protocol(format!("{} is not a method", spec.target.name())));
    };
    let actor = worker
        .actors
        .lock()
        .get(&actor_id)
        .cloned()
        .ok_or_else(|| Error::Protocol(format!("this worker does not host actor {actor_id}")))?;
    actor.call(method, spec.args)
}

/// Answers actor call `task_id` once its local object `r` completes: to
/// the owner, or on the connection back to the worker process that made
/// the call (`to`).
fn reply_when_done(worker: &Arc<Worker>, task_id: TaskId, r: RawRef, to: Option<Arc<direct::PeerOut>>) {
    worker.calls.lock().insert(task_id, r.clone());
    // The reply goes out from whichever thread completes the call (no hop
    // through the executor).
    let reply = Arc::new(ReplyWhenDone {
        worker: worker.clone(),
        task_id,
        call: Mutex::new(Some(r.clone())),
        to,
    });
    let waker = std::task::Waker::from(reply.clone());
    if !matches!(worker.rt.store.peek(r.id(), Some(&waker)), Ok(Peek::Pending)) {
        reply.reply(true);
    }
}

/// Sends an actor call's outcome once its local object completes.
struct ReplyWhenDone {
    worker: Arc<Worker>,
    task_id: TaskId,
    /// The call's object, until the reply is sent.
    call: Mutex<Option<RawRef>>,
    /// The connection back to the worker process that made the call, when
    /// it came straight from there.
    to: Option<Arc<direct::PeerOut>>,
}

impl std::task::Wake for ReplyWhenDone {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.reply(false);
    }
}

impl ReplyWhenDone {
    /// Sends the outcome once the call completed. On the thread that reads
    /// the connection (`on_reader`), a reply that must wait for a message
    /// (a large value's allocation, or sharing what it names) is sent from
    /// a pool thread instead: only a reader could read that message.
    fn reply(self: &Arc<Self>, on_reader: bool) {
        let w = &self.worker;
        let result = {
            let mut call = self.call.lock();
            let Some(r) = call.as_ref() else { return };
            let result = match w.rt.store.peek(r.id(), None) {
                Ok(Peek::Pending) => return,
                Ok(Peek::Ready(v)) => Ok(v),
                Ok(Peek::Failed(e)) | Err(e) => Err(e),
            };
            *call = None;
            result
        };
        w.calls.lock().remove(&self.task_id);
        // The value lives until the reply is out: the references it holds
        // must reach the owner before their releases do.
        let (outcome, _sent, large) = match result {
            Ok(v) => match w.up.small(&v) {
                Some(outcome) => (outcome, Some(v), false),
                None if on_reader => {
                    let me = self.clone();
                    let job = Box::new(move || {
                        let outcome = me.encode(&v);
                        me.send(outcome, true);
                    });
                    w.rt.pool.execute_or_run(job);
                    return;
                }
                None => (self.encode(&v), Some(v), true),
            },
            // A worker that made the call straight here gets the error as
            // the owner would have made it of this one.
            Err(e) if self.to.is_some() => {
                let crashed = matches!(local_failure(e.clone()), WireOutcome::Panicked(_));
                self.send(WireOutcome::Failed(e), false);
                if crashed {
                    self.flush();
                    std::process::exit(1);
                }
                return;
            }
            Err(e) => (local_failure(e), None, false),
        };
        let crashed = matches!(outcome, WireOutcome::Panicked(_));
        self.send(outcome, large);
        if crashed {
            self.flush();
            std::process::exit(1);
        }
    }

    /// A value as the caller receives it (a value that is not small goes
    /// as the owner receives it).
    fn encode(&self, v: &Value) -> WireOutcome {
        self.worker.up.to_owner(&self.worker.rt, v)
    }

    /// Sends the answer to the caller: a small one straight back; one that
    /// is not (`large`: it may lie in shared memory, name objects or actors)
    /// through the owner, which lends what it holds to the caller.
    fn send(&self, outcome: WireOutcome, large: bool) {
        let up = &self.worker.up;
        match &self.to {
            Some(to) if large => {
                // The answers held for the caller go first (unless a write
                // under way takes them: answers keep no order among
                // themselves).
                to.drain();
                up.replies.send(&Message::Answer {
                    to: to.pid(),
                    task_id: self.task_id,
                    outcome,
                });
                direct::answered_through_owner(to);
            }
            Some(to) => direct::answer(to, self.task_id, outcome),
            None => up.replies.done(self.task_id, outcome),
        }
    }

    /// Writes the answers held back for every caller (the process is
    /// about to end).
    fn flush(&self) {
        if let Some(p) = self.worker.up.peers() {
            p.flush_every();
        }
    }
}

/// How a local error looks to the owner: user errors and panics keep
/// their kind (a panic that killed the hosted actor is reported as the
/// panic), anything else is a failure.
fn local_failure(e: Error) -> WireOutcome {
    let task = match &e {
        Error::ActorDied { cause: Some(c), .. } => c.as_ref(),
        other => other,
    };
    match task {
        Error::Task {
            failure: crate::error::TaskFailure::Returned,
            message,
            ..
        } => WireOutcome::Returned(message.clone()),
        Error::Task {
            failure: crate::error::TaskFailure::Panicked,
            message,
            ..
        } => WireOutcome::Panicked(message.clone()),
        _ => WireOutcome::Failed(e),
    }
}

/// A value's bytes inline, with what they name.
fn inline(v: &Value) -> WireOutcome {
    match v.to_encoded() {
        Ok(enc) => {
            let (refs, actors) = enc.named();
            WireOutcome::Value {
                type_name: enc.type_name().to_owned(),
                bytes: enc.bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                refs,
                actors,
            }
        }
        Err(e) => WireOutcome::Failed(e),
    }
}

impl Outcome {
    /// The outcome as a worker reports it.
    pub(crate) fn into_wire(self) -> WireOutcome {
        match self {
            Outcome::Value(v) => inline(&v),
            Outcome::Returned(m) => WireOutcome::Returned(m),
            Outcome::Panicked(m) => WireOutcome::Panicked(m),
            Outcome::Failed(e) | Outcome::NoWorker(e) => WireOutcome::Failed(e),
            Outcome::Crashed(m) => WireOutcome::Failed(Error::invalid(m)),
        }
    }

    /// The outcome a worker reported.
    pub(crate) fn from_wire(w: WireOutcome, rt: &Arc<Inner>) -> Self {
        match w {
            WireOutcome::Value {
                type_name,
                bytes,
                refs,
                actors,
            } if refs.is_empty() && actors.is_empty() => Outcome::Value(Value::from_bytes(bytes, type_name)),
            // The objects and actors it names are kept alive with it.
            WireOutcome::Value {
                type_name,
                bytes,
                refs,
                actors,
            } => match rt.hold_received(&refs, &actors) {
                Ok(keep) => Outcome::Value(Value::from_bytes_keeping(bytes, type_name, keep)),
                Err(e) => Outcome::Failed(Error::invalid(format!(
                    "the value holds a reference this process cannot keep: {e}"
                ))),
            },
            WireOutcome::Stored { type_name, id, len } => match (rt.mode.shm(), usize::try_from(len)) {
                (Some(node), Ok(len)) => Outcome::Value(Value::from_stored(
                    ShmObject {
                        node: node.clone(),
                        id,
                        len,
                    },
                    type_name,
                )),
                _ => Outcome::Failed(Error::Protocol(
                    "a shared-memory result without a node store".to_owned(),
                )),
            },
            // Only an owner sends these, and only to a worker.
            WireOutcome::Pinned {
                type_name,
                id,
                offset,
                len,
            } => match rt.mode.upstream() {
                Some(up) => match up.shared_value(type_name, id, offset, len) {
                    Ok(v) => Outcome::Value(v),
                    Err(e) => Outcome::Failed(e),
                },
                None => Outcome::Failed(Error::Protocol("a pinned value sent to an owner".to_owned())),
            },
            WireOutcome::Returned(m) => Outcome::Returned(m),
            WireOutcome::Panicked(m) => Outcome::Panicked(m),
            WireOutcome::Failed(e) => Outcome::Failed(e),
        }
    }
}
