//! Tasks submitted by code in a worker process, owned by it and run on
//! workers it leases from the node — Ray's normal task submitter.
//!
//! # Design
//!
//! A task submitted here is this process's own: its result lives in this
//! process's store, and this process retries it. The task waits in a queue
//! per resource shape. While a shape has queued tasks, this process asks
//! its owner-side node for a lease on a worker of that shape
//! (`RequestLease`, one request out per shape at a time; a grant while
//! tasks are still queued asks for the next). A granted lease names the
//! leased worker's endpoint; tasks go there straight (`LeasedTask`, one at
//! a time per lease), and their outcomes come straight back (`TaskDone`
//! on the connection back, or `Answered` through the owner for a value
//! that is large or names objects). A lease whose shape has no task left
//! is returned at once (`ReturnLease`).
//!
//! A task blocked in `get`/`wait` on a child of its own that is still
//! queued here runs the child on its own thread instead (as the threads
//! mode does, and rayon's `join`), so a recursive tree needs processes in
//! proportion to its depth, not its size.
//!
//! # State and locks
//!
//! One lock ([`Submitter::state`]) holds the queues, the requests out, the
//! leases and where each task is ([`Place`]); it is never held while
//! sending, encoding, or touching the store. Each transition takes the
//! task out of one place and puts it in another under that lock, so a
//! task is pushed, run here, cancelled or failed over exactly once.
//!
//! # Failure
//!
//! When the connection to a leased worker ends, its task is retried (one
//! attempt spent) per its `max_retries`, or fails with `WorkerCrashed`; a
//! task whose code returned an error or panicked is retried when
//! `retry_exceptions` allows. A lease refused as unschedulable fails the
//! tasks of its shape; one refused because no worker could be had spends
//! an attempt of each. A cancel takes a queued task out of its queue, and
//! reaches a pushed one where it runs (`force` ends that process).

use super::direct::PeerOut;
use super::Upstream;
use crate::codec::Value;
use crate::context::{self, TaskContext};
use crate::error::{Error, Result};
use crate::ids::{ObjectId, TaskId};
use crate::object_ref::{Arg, RawRef};
use crate::registry::{FunctionBody, FunctionEntry};
use crate::resources::ResourceSet;
use crate::runtime::{Inner, Outcome};
use crate::task::{ArgList, Target, TaskSpec, TaskState};
use crate::wire::{self, Message, WireOutcome};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Tasks this process pushed to workers it leased, ever (see
/// [`leased_tasks`]).
static LEASED_TASKS: AtomicU64 = AtomicU64::new(0);

/// How many tasks this process has pushed straight to worker processes it
/// leased, skipping its owner. A diagnostic: tests and benchmarks check
/// with it that the driver is off the path.
pub fn leased_tasks() -> u64 {
    LEASED_TASKS.load(Ordering::Relaxed)
}

/// The tasks this process submitted and the leases they run on.
#[derive(Default)]
pub(crate) struct Submitter {
    state: Mutex<State>,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Submitter")
            .field("tasks", &s.tasks.len())
            .field("leases", &s.leases.len())
            .finish()
    }
}

#[derive(Default)]
struct State {
    shapes: HashMap<ResourceSet, Shape>,
    /// Lease requests out: the shape each is for.
    requests: HashMap<TaskId, ResourceSet, crate::ids::IdHash>,
    /// Leases held.
    leases: HashMap<TaskId, Arc<Lease>, crate::ids::IdHash>,
    /// Where each task submitted here and not finished is.
    tasks: HashMap<TaskId, Place, crate::ids::IdHash>,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Waiting for the results of this process's own work it names.
    Resolving,
    /// In its shape's queue.
    Queued,
    /// Pushed on a lease.
    Pushed(TaskId),
    /// Running on a thread of this process (a blocked parent runs it).
    Here,
}

#[derive(Default)]
struct Shape {
    queue: VecDeque<Box<Pending>>,
    /// A lease request is out.
    requested: bool,
    /// The leases held for this shape.
    leases: Vec<Arc<Lease>>,
}

/// A task submitted here, not finished.
struct Pending {
    state: Arc<TaskState>,
    spec: TaskSpec,
    /// The spec's bytes form, made at submission (to find what it names),
    /// until its first push.
    named: Option<Value>,
    entry: &'static FunctionEntry,
    request: ResourceSet,
    max_retries: i32,
    retry_exceptions: bool,
    attempt: u32,
}

/// A worker leased for one shape.
struct Lease {
    id: TaskId,
    shape: ResourceSet,
    pid: u32,
    endpoint: String,
    out: Arc<PeerOut>,
    /// Tasks pushed and not answered (changed under the state's lock).
    inflight: AtomicUsize,
    /// How many tasks may be out on it at once (see [`Lease::settle`]).
    depth: AtomicUsize,
    /// What one task has taken lately, in nanoseconds (a moving average).
    per_task_ns: AtomicU64,
    /// The tasks pushed on it, each with what its spec names (kept alive
    /// until the answer), when it went, and how many were ahead of it.
    running: Mutex<HashMap<TaskId, Sent, crate::ids::IdHash>>,
    /// The connection failed: what is pushed from now on fails over.
    gone: std::sync::atomic::AtomicBool,
}

/// A task out on a lease.
struct Sent {
    task: Box<Pending>,
    _named: Value,
    at: std::time::Instant,
    ahead: usize,
}

/// Writes at least this long do not go out from a reader thread.
const LARGE_WRITE: usize = 64 << 10;

/// The most tasks out on one lease at once.
const MAX_DEPTH: usize = 256;

/// How much work (by the tasks' recent times) may wait on one lease behind
/// the task that runs: what a task pushed behind others may wait, at most,
/// when another worker could have taken it.
const PIPELINE_BUDGET: std::time::Duration = std::time::Duration::from_millis(4);

/// A task shorter than this (its round trip shared by those out with it)
/// lets its lease take more at once: the round trip, not the task, is the
/// cost then.
const SHORT_TASK: std::time::Duration = std::time::Duration::from_millis(1);

impl Lease {
    /// Learns from one answered task how many may be out at once: as many
    /// as [`PIPELINE_BUDGET`] holds at the tasks' recent time each (up to
    /// [`MAX_DEPTH`], growing at most twofold per answer); a long task
    /// brings it back to one, so long tasks never queue behind each other
    /// on one worker while another could run them (Ray's one task in
    /// flight per worker).
    fn settle(&self, sent: &Sent) {
        let per = sent.at.elapsed() / u32::try_from(sent.ahead + 1).unwrap_or(u32::MAX);
        if per >= SHORT_TASK {
            self.depth.store(1, Ordering::Relaxed);
            self.per_task_ns.store(0, Ordering::Relaxed);
            return;
        }
        let per = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX).max(1);
        let avg = match self.per_task_ns.load(Ordering::Relaxed) {
            0 => per,
            avg => (avg * 3 + per) / 4,
        };
        self.per_task_ns.store(avg, Ordering::Relaxed);
        let budget = u64::try_from(PIPELINE_BUDGET.as_nanos()).unwrap_or(u64::MAX);
        let fits = usize::try_from(budget / avg).unwrap_or(MAX_DEPTH);
        let depth = self.depth.load(Ordering::Relaxed);
        let next = fits.clamp(1, MAX_DEPTH).min(depth * 2);
        self.depth.store(next, Ordering::Relaxed);
    }
}

/// What to do once the state's lock is let go.
enum Action {
    Push(Arc<Lease>, Box<Pending>, usize),
    Request(TaskId, ResourceSet),
    Return(TaskId),
}

impl Submitter {
    /// Submits a function task, owned here.
    pub(crate) fn submit(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        entry: &'static FunctionEntry,
        args: Vec<Arg>,
        opts: &crate::options::TaskOptions,
    ) -> Result<RawRef> {
        let request = opts.request(&entry.options)?;
        let (max_retries, retry_exceptions) = opts.retries(&entry.options);
        let (state, ret) = rt.new_task()?;
        let spec = TaskSpec {
            id: state.id,
            target: Target::Function(entry),
            args,
            name: opts.name.as_deref().map(Arc::from),
        };
        let named = match spec.to_bytes() {
            Ok(n) => n,
            Err(e) => {
                rt.forget_task(state.id);
                return Err(e);
            }
        };
        // Every object the task names (by reference or inside a value)
        // that is this process's own work still out is waited for before
        // the task is queued: a task holds no lease while it waits.
        let deps: Vec<ObjectId> = named
            .nested_object_ids()
            .into_iter()
            .filter(|id| Upstream::is_out(rt, *id))
            .collect();
        let pending = Box::new(Pending {
            spec,
            named: Some(named),
            state,
            entry,
            request,
            max_retries,
            retry_exceptions,
            attempt: 1,
        });
        let id = pending.state.id;
        if deps.is_empty() {
            self.state.lock().tasks.insert(id, Place::Queued);
            self.enqueue(up, rt, pending, true);
        } else {
            self.state.lock().tasks.insert(id, Place::Resolving);
            let up = rt.mode.upstream().cloned();
            rt.when_complete(&deps, move |rt| {
                if let Some(up) = up {
                    // Off the thread that completed the object (a reader).
                    let (rt2, up2) = (rt.clone(), up.clone());
                    let job = Box::new(move || up2.submitter.resolved(&up2, &rt2, pending));
                    rt.pool.execute_or_run(job);
                }
            });
        }
        Ok(ret)
    }

    /// The objects a resolving task waited for are complete: it is queued.
    fn resolved(&self, up: &Upstream, rt: &Arc<Inner>, pending: Box<Pending>) {
        let id = pending.state.id;
        {
            let mut s = self.state.lock();
            if s.tasks.get(&id) != Some(&Place::Resolving) {
                return;
            }
            s.tasks.insert(id, Place::Queued);
        }
        self.enqueue(up, rt, pending, true);
    }

    /// Queues a task (at the back, or the front for a retry) and starts
    /// what may start. `may_block`: the caller may wait on other messages
    /// (it is not a reader thread).
    fn enqueue(&self, up: &Upstream, rt: &Arc<Inner>, pending: Box<Pending>, may_block: bool) {
        let actions = {
            let mut s = self.state.lock();
            let shape = pending.request.clone();
            let q = s.shapes.entry(shape.clone()).or_default();
            if pending.attempt > 1 {
                q.queue.push_front(pending);
            } else {
                q.queue.push_back(pending);
            }
            pump(&mut s, rt, &shape)
        };
        self.act(up, rt, actions, may_block);
    }

    fn act(&self, up: &Upstream, rt: &Arc<Inner>, actions: Vec<Action>, may_block: bool) {
        // The frames of consecutive pushes on one lease go in one write.
        let mut batch: Option<(Arc<Lease>, Vec<u8>, u64)> = None;
        for a in actions {
            if let Action::Push(lease, task, ahead) = a {
                let Some(frame) = self.prepare(up, rt, &lease, task, ahead, may_block) else {
                    continue;
                };
                match &mut batch {
                    Some((l, frames, n)) if Arc::ptr_eq(l, &lease) => {
                        frames.extend_from_slice(&frame);
                        *n += 1;
                    }
                    _ => {
                        if let Some((l, frames, n)) = batch.replace((lease, frame, 1)) {
                            self.write_from(up, rt, l, frames, n, may_block);
                        }
                    }
                }
                continue;
            }
            if let Some((l, frames, n)) = batch.take() {
                self.write_from(up, rt, l, frames, n, may_block);
            }
            match a {
                Action::Push(..) => {}
                Action::Request(lease_id, shape) => up.replies.send(&Message::RequestLease {
                    lease_id,
                    resources: shape.iter().map(|(n, v)| (n.to_owned(), v)).collect(),
                }),
                Action::Return(lease_id) => up.replies.send(&Message::ReturnLease {
                    lease_id,
                    broken: false,
                }),
            }
        }
        if let Some((l, frames, n)) = batch {
            self.write_from(up, rt, l, frames, n, may_block);
        }
    }

    /// Writes the frames of `n` tasks on a lease; a failed write breaks
    /// the lease (its tasks are retried or fail). A reader thread hands a
    /// large write to a pool thread: two workers that lease each other
    /// must never both wait, on their readers, for the other to read.
    fn write_from(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        lease: Arc<Lease>,
        frames: Vec<u8>,
        n: u64,
        may_block: bool,
    ) {
        if may_block || frames.len() < LARGE_WRITE {
            self.write(up, rt, &lease, &frames, n);
            return;
        }
        let Some(up2) = rt.mode.upstream().cloned() else {
            return;
        };
        let rt2 = rt.clone();
        let job = Box::new(move || up2.submitter.write(&up2, &rt2, &lease, &frames, n));
        rt.pool.execute_or_run(job);
    }

    fn write(&self, up: &Upstream, rt: &Arc<Inner>, lease: &Arc<Lease>, frames: &[u8], n: u64) {
        let sent = lease.out.write(frames);
        if sent {
            LEASED_TASKS.fetch_add(n, Ordering::Relaxed);
        } else {
            self.broken(up, rt, lease);
        }
    }

    /// Readies a task's push on a lease: its frame, the task recorded as
    /// out there. `None` when the task is done with otherwise (cancelled,
    /// failed). `may_block`: the caller is not a reader thread.
    fn prepare(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        lease: &Arc<Lease>,
        mut task: Box<Pending>,
        ahead: usize,
        may_block: bool,
    ) -> Option<Vec<u8>> {
        let id = task.state.id;
        if !task.state.start(task.attempt) {
            // Cancelled while queued: its object already says so.
            self.done(rt, task);
            self.settled(up, rt, lease, may_block);
            return None;
        }
        let named = match task.named.take().map_or_else(|| task.spec.to_bytes(), Ok) {
            Ok(n) => n,
            Err(e) => {
                self.finish(up, rt, task, Outcome::Failed(e), may_block);
                self.settled(up, rt, lease, may_block);
                return None;
            }
        };
        let lent = named.nested_object_ids();
        // What is this process's own is lent to the owner, which lends it
        // on to the leased worker with the rest (`Lend`).
        let frame = up.shared_bytes(rt, &named).and_then(|shared| {
            wire::encode_frame(&Message::LeasedTask {
                lease_id: lease.id,
                task_id: id,
                spec: shared.bytes,
                refs: crate::runtime::ref_ids(&task.spec.args),
                cpu: task.request.get(crate::resources::CPU),
            })
            .map_err(|e| {
                up.unshare(&shared.lent);
                Error::Protocol(format!("a task too large to send: {e}"))
            })
        });
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                self.finish(up, rt, task, Outcome::Failed(e), may_block);
                self.settled(up, rt, lease, may_block);
                return None;
            }
        };
        let actors: Vec<_> = named.nested_actors().iter().map(|a| a.id()).collect();
        if !lent.is_empty() || !actors.is_empty() {
            up.replies.send(&Message::Lend {
                to: lease.pid,
                refs: lent,
                actors,
            });
        }
        lease.running.lock().insert(
            id,
            Sent {
                task,
                _named: named,
                at: std::time::Instant::now(),
                ahead,
            },
        );
        // Recorded before the check: a lease that broke meanwhile either
        // took this task with the others or left it for this check.
        if lease.gone.load(Ordering::Acquire) {
            let lost = lease.running.lock().remove(&id);
            if let Some(sent) = lost {
                let reason = format!("worker process {} died", lease.pid);
                self.finish(up, rt, sent.task, Outcome::Crashed(reason), may_block);
            }
            return None;
        }
        Some(frame)
    }

    /// A task on a lease ended (or never went): the lease has room for the
    /// next queued task, or is returned when none is left.
    fn settled(&self, up: &Upstream, rt: &Arc<Inner>, lease: &Lease, may_block: bool) {
        let actions = {
            let mut s = self.state.lock();
            if !s.leases.contains_key(&lease.id) {
                return;
            }
            let idle = lease.inflight.fetch_sub(1, Ordering::Relaxed) == 1;
            if idle && s.shapes.get(&lease.shape).is_none_or(|q| q.queue.is_empty()) {
                // Nothing left to do: the next task may be long, and
                // learns anew.
                lease.depth.store(1, Ordering::Relaxed);
            }
            pump(&mut s, rt, &lease.shape)
        };
        self.act(up, rt, actions, may_block);
    }

    /// The owner granted lease `lease_id`: connects to the worker (on a pool
    /// thread: the connection back is waited for) and starts tasks on it.
    pub(crate) fn granted(up: &Arc<Upstream>, rt: &Arc<Inner>, lease_id: TaskId, pid: u32, endpoint: String) {
        let (up, rt2) = (up.clone(), rt.clone());
        let job = Box::new(move || up.submitter.connect(&up, &rt2, lease_id, pid, endpoint));
        rt.pool.execute_or_run(job);
    }

    fn connect(&self, up: &Upstream, rt: &Arc<Inner>, lease_id: TaskId, pid: u32, endpoint: String) {
        let out = match up.peers() {
            Some(p) => match p.out_to(&endpoint, pid) {
                Ok(o) if p.wait_back(&endpoint, &o) => Ok(o),
                Ok(_) => {
                    p.drop_out(&endpoint);
                    Err(format!("worker process {pid} never connected back"))
                }
                Err(e) => Err(e.to_string()),
            },
            None => Err("this process has no endpoint".to_owned()),
        };
        let (shape, held) = {
            let s = self.state.lock();
            (
                s.requests.get(&lease_id).cloned(),
                s.leases.contains_key(&lease_id),
            )
        };
        if held {
            // A duplicate of a grant in use: ignored.
            return;
        }
        let Some(shape) = shape else {
            // Not asked for (a duplicate): given back.
            up.replies.send(&Message::ReturnLease {
                lease_id,
                broken: out.is_err(),
            });
            return;
        };
        match out {
            Ok(out) => {
                let lease = Arc::new(Lease {
                    id: lease_id,
                    shape: shape.clone(),
                    pid,
                    endpoint,
                    out,
                    inflight: AtomicUsize::new(0),
                    depth: AtomicUsize::new(1),
                    per_task_ns: AtomicU64::new(0),
                    running: Mutex::new(HashMap::default()),
                    gone: std::sync::atomic::AtomicBool::new(false),
                });
                let actions = {
                    let mut s = self.state.lock();
                    // Checked again here: of two copies of one grant, the
                    // second finds the request gone and is dropped.
                    if s.requests.remove(&lease_id).is_none() {
                        return;
                    }
                    s.leases.insert(lease_id, lease.clone());
                    let q = s.shapes.entry(shape.clone()).or_default();
                    q.requested = false;
                    q.leases.push(lease);
                    pump(&mut s, rt, &shape)
                };
                self.act(up, rt, actions, true);
            }
            Err(reason) => {
                // The front task spends an attempt, so a worker that keeps
                // failing cannot hold the queue forever.
                let front = {
                    let mut s = self.state.lock();
                    // A second copy of a grant in use: nothing to undo.
                    if s.requests.remove(&lease_id).is_none() {
                        return;
                    }
                    let q = s.shapes.entry(shape.clone()).or_default();
                    q.requested = false;
                    q.queue.pop_front()
                };
                up.replies.send(&Message::ReturnLease {
                    lease_id,
                    broken: true,
                });
                match front {
                    Some(task) => self.finish(up, rt, task, Outcome::Crashed(reason), true),
                    None => self.pump_shape(up, rt, &shape, true),
                }
            }
        }
    }

    fn pump_shape(&self, up: &Upstream, rt: &Arc<Inner>, shape: &ResourceSet, may_block: bool) {
        let actions = pump(&mut self.state.lock(), rt, shape);
        self.act(up, rt, actions, may_block);
    }

    /// The owner refused lease `lease_id`: the tasks of its shape fail (the
    /// shape is unschedulable) or spend an attempt (no worker could be had).
    pub(crate) fn refused(&self, up: &Upstream, rt: &Arc<Inner>, lease_id: TaskId, error: Error) {
        let unschedulable = matches!(error, Error::Unschedulable { .. } | Error::Shutdown);
        let (shape, queued): (ResourceSet, Vec<Box<Pending>>) = {
            let mut s = self.state.lock();
            let Some(shape) = s.requests.remove(&lease_id) else {
                return;
            };
            let q = s.shapes.entry(shape.clone()).or_default();
            q.requested = false;
            let taken = if unschedulable {
                q.queue.drain(..).collect()
            } else {
                // A worker that could not be had this time: the front task
                // spends an attempt (so this cannot go on forever), the
                // rest stay queued for the leases held or the next one.
                q.queue.pop_front().into_iter().collect()
            };
            (shape, taken)
        };
        for task in queued {
            let outcome = if unschedulable {
                // Named as the task, as the owner's own scheduler names it.
                Outcome::Failed(match &error {
                    Error::Unschedulable {
                        requested, available, ..
                    } => Error::Unschedulable {
                        what: format!("task {}", task.entry.name),
                        requested: requested.clone(),
                        available: available.clone(),
                    },
                    other => other.clone(),
                })
            } else {
                Outcome::NoWorker(error.clone())
            };
            self.finish(up, rt, task, outcome, false);
        }
        // What is left asks again.
        self.pump_shape(up, rt, &shape, false);
    }

    /// The outcome of a task pushed on a lease (straight back, or through
    /// the owner); handed back when no task here waits for it.
    pub(crate) fn answered(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        task_id: TaskId,
        from: u32,
        outcome: WireOutcome,
    ) -> std::result::Result<(), Box<WireOutcome>> {
        // Only from the worker it is out on now: an answer of an earlier
        // attempt, from a worker that died since, is not this one's.
        let lease = {
            let s = self.state.lock();
            match s.tasks.get(&task_id) {
                Some(Place::Pushed(lease)) => s.leases.get(lease).filter(|l| l.pid == from).cloned(),
                _ => None,
            }
        };
        let Some(lease) = lease else {
            return Err(Box::new(outcome));
        };
        let sent = lease.running.lock().remove(&task_id);
        let Some(sent) = sent else {
            return Err(Box::new(outcome));
        };
        lease.settle(&sent);
        let Sent { task, _named, .. } = sent;
        self.finish(up, rt, task, Outcome::from_wire(outcome, rt), false);
        drop(_named);
        self.settled(up, rt, &lease, false);
        Ok(())
    }

    /// The connection to the worker at `endpoint` ended: its leases end,
    /// and their tasks are retried or fail.
    pub(crate) fn peer_gone(&self, up: &Upstream, rt: &Arc<Inner>, endpoint: &str) {
        let gone: Vec<Arc<Lease>> = self
            .state
            .lock()
            .leases
            .values()
            .filter(|l| l.endpoint == endpoint)
            .cloned()
            .collect();
        for lease in gone {
            self.broken(up, rt, &lease);
        }
    }

    /// A lease's connection failed: the lease ends (its worker is not
    /// reused) and its task is retried or fails.
    fn broken(&self, up: &Upstream, rt: &Arc<Inner>, lease: &Arc<Lease>) {
        let shape = {
            let mut s = self.state.lock();
            if s.leases.remove(&lease.id).is_none() {
                return;
            }
            let q = s.shapes.entry(lease.shape.clone()).or_default();
            q.leases.retain(|l| !Arc::ptr_eq(l, lease));
            lease.gone.store(true, Ordering::Release);
            lease.shape.clone()
        };
        up.replies.send(&Message::ReturnLease {
            lease_id: lease.id,
            broken: true,
        });
        // In the order they went, so retries keep it.
        let mut lost: Vec<Sent> = lease.running.lock().drain().map(|(_, s)| s).collect();
        lost.sort_by_key(|s| std::cmp::Reverse(s.at));
        for sent in lost {
            let reason = format!("worker process {} died", lease.pid);
            self.finish(up, rt, sent.task, Outcome::Crashed(reason), false);
        }
        self.pump_shape(up, rt, &shape, false);
    }

    /// Code here cancelled task `task_id`: a queued one leaves its queue, a
    /// pushed one is cancelled where it runs. False when it is not one of
    /// this process's leased tasks.
    pub(crate) fn cancel(&self, rt: &Arc<Inner>, task_id: TaskId, force: bool) -> bool {
        let mut s = self.state.lock();
        match s.tasks.get(&task_id).copied() {
            Some(Place::Queued) => {
                let mut found = None;
                for q in s.shapes.values_mut() {
                    if let Some(i) = q.queue.iter().position(|t| t.state.id == task_id) {
                        found = q.queue.remove(i);
                        break;
                    }
                }
                if found.is_some() {
                    s.tasks.remove(&task_id);
                }
                drop(s);
                if let Some(task) = found {
                    task.state.finish();
                    rt.forget_task(task_id);
                }
                true
            }
            Some(Place::Pushed(lease)) => {
                let lease = s.leases.get(&lease).cloned();
                drop(s);
                if let Some(lease) = lease {
                    let frame = wire::encode_frame(&Message::CancelTask { task_id, force });
                    if let Ok(frame) = frame {
                        lease.out.write(&frame);
                    }
                }
                true
            }
            // A resolving task is dropped when it would be queued; one
            // running here sees its flag.
            Some(Place::Resolving | Place::Here) => true,
            None => false,
        }
    }

    /// Runs the task that makes `id` on this thread if it is queued here, is
    /// sync and fits in `cpu` (the blocked caller's); returns whether it
    /// ran. `report_as` is the id the caller's blocking is reported under.
    pub(crate) fn help(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        id: ObjectId,
        cpu: &ResourceSet,
        report_as: super::Reported,
    ) -> bool {
        let task_id = id.task();
        let task = {
            let mut s = self.state.lock();
            if s.tasks.get(&task_id) != Some(&Place::Queued) {
                return false;
            }
            let mut found = None;
            for q in s.shapes.values_mut() {
                let fits = |t: &Pending| {
                    t.state.id == task_id
                        && t.request.fits_in(cpu)
                        && matches!(t.entry.body, FunctionBody::Sync(_))
                };
                if let Some(i) = q.queue.iter().rposition(|t| fits(t)) {
                    found = q.queue.remove(i);
                    break;
                }
            }
            if found.is_some() {
                s.tasks.insert(task_id, Place::Here);
            }
            found
        };
        let Some(task) = task else { return false };
        if !task.state.start(task.attempt) {
            self.done(rt, task);
            return true;
        }
        let f = match task.entry.body {
            FunctionBody::Sync(f) => f,
            // Not taken (only sync tasks are): back to its queue.
            FunctionBody::Async(_) => {
                task.state.back_to_waiting();
                self.state.lock().tasks.insert(task_id, Place::Queued);
                self.enqueue(up, rt, task, true);
                return false;
            }
        };
        up.report_as(task_id, Some(report_as));
        let ctx = TaskContext::new(rt.clone(), task.state.clone(), task.request.cpu_only(), false);
        let outcome = context::with_sync(ctx, || match resolve(rt, &task.spec, task.attempt) {
            Ok(args) => Outcome::from_invoke(std::panic::catch_unwind(AssertUnwindSafe(|| f(args)))),
            Err(e) => Outcome::Failed(e),
        });
        up.report_as(task_id, None);
        self.finish(up, rt, task, outcome, true);
        true
    }

    /// Ends one attempt: retries the task (queued again, at the front) or
    /// completes its object.
    fn finish(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        mut task: Box<Pending>,
        outcome: Outcome,
        may_block: bool,
    ) {
        let cancelled = task.state.is_cancelled();
        let retry = !cancelled
            && crate::runtime::attempts_left(task.max_retries, task.attempt)
            && rt.check_open().is_ok()
            && outcome.is_retryable(task.retry_exceptions);
        let id = task.state.id;
        if retry {
            tracing::debug!(task = %id, attempt = task.attempt, "retrying task");
            task.attempt += 1;
            task.state.back_to_waiting();
            self.state.lock().tasks.insert(id, Place::Queued);
            self.enqueue(up, rt, task, may_block);
            return;
        }
        let result = if cancelled {
            Err(Error::TaskCancelled(id))
        } else {
            match outcome.into_result(task.entry.name, task.spec.name.as_deref(), id, task.attempt) {
                // A reader never waits for room: the wait goes elsewhere.
                Ok(v) if !may_block => {
                    task.spec.args.clear();
                    rt.publish_now(id.return_object(), v);
                    self.done(rt, task);
                    return;
                }
                Ok(v) => rt.admit(v),
                Err(e) => Err(e),
            }
        };
        task.spec.args.clear();
        rt.store.complete(id.return_object(), result);
        self.done(rt, task);
    }

    /// Forgets a task that ended.
    #[allow(clippy::boxed_local)]
    fn done(&self, rt: &Arc<Inner>, task: Box<Pending>) {
        let id = task.state.id;
        self.state.lock().tasks.remove(&id);
        task.state.finish();
        rt.forget_task(id);
    }
}

/// Under the state's lock: starts queued tasks of `shape` on its leases
/// with room (the least busy first), asks for another lease while tasks
/// are left, and returns the leases left with nothing to do.
fn pump(s: &mut State, rt: &Inner, shape: &ResourceSet) -> Vec<Action> {
    let mut actions = Vec::new();
    let State {
        shapes,
        requests,
        leases,
        tasks,
    } = s;
    let Some(q) = shapes.get_mut(shape) else {
        return actions;
    };
    while !q.queue.is_empty() {
        let room = q
            .leases
            .iter()
            .filter(|l| l.inflight.load(Ordering::Relaxed) < l.depth.load(Ordering::Relaxed))
            .min_by_key(|l| l.inflight.load(Ordering::Relaxed));
        let Some(lease) = room.cloned() else { break };
        if let Some(task) = q.queue.pop_front() {
            let ahead = lease.inflight.fetch_add(1, Ordering::Relaxed);
            tasks.insert(task.state.id, Place::Pushed(lease.id));
            actions.push(Action::Push(lease, task, ahead));
        }
    }
    if q.queue.is_empty() {
        q.leases.retain(|l| {
            let idle = l.inflight.load(Ordering::Relaxed) == 0;
            if idle {
                leases.remove(&l.id);
                actions.push(Action::Return(l.id));
            }
            !idle
        });
    } else if !q.requested {
        q.requested = true;
        let lease_id = rt.ids.task();
        requests.insert(lease_id, shape.clone());
        actions.push(Action::Request(lease_id, shape.clone()));
    }
    if q.queue.is_empty() && q.leases.is_empty() && !q.requested {
        shapes.remove(shape);
    }
    actions
}

/// The argument values of a task run here: reference arguments waited for.
pub(super) fn resolve(rt: &Arc<Inner>, spec: &TaskSpec, attempt: u32) -> Result<ArgList> {
    let name = spec.target.name();
    let mut values = Vec::with_capacity(spec.args.len());
    for (i, a) in spec.args.iter().enumerate() {
        values.push(match a {
            Arg::Value(v) => v.clone(),
            Arg::Ref(r) => rt
                .get_value(r, None)
                .map_err(|cause| crate::runtime::dependency_failed(spec, i, attempt, cause))?,
        });
    }
    Ok(ArgList::new(values, rt.clone(), name))
}
