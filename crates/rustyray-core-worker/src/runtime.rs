//! The embedded runtime: the owner ("core worker") and a one-node
//! scheduler in the user's process.
//!
//! [`Ray`] is the user's handle. Everything mutable hangs off its [`Inner`]:
//! the ownership table and store, the scheduler, the task table (for
//! cancellation), the worker-thread pool for sync code, the async executor,
//! and the actor table. Several runtimes in one process share nothing.
//!
//! # Task life
//!
//! `submit` registers the return object (pending) and the task state, then
//! waits for the task's reference arguments: one waker per task counts the
//! outstanding ones and enqueues the task with the scheduler when the count
//! reaches zero. The scheduler starts the task when its resources fit; sync
//! bodies run on the pool, async ones on the executor. `finish_task`
//! returns the resources, retries per the task's options, or completes the
//! return object, which wakes the dependents.
//!
//! # Shutdown
//!
//! Ordered, and run by [`Ray::shutdown`] or by dropping the last handle
//! returned by `init`: stop intake, drop queued work, cancel running tasks,
//! stop actors, fail pending objects (waking every blocked reader) and free
//! the store, join the pool's threads, and shut the executor down, joining
//! its threads.

use crate::actor::{self, ActorState, ActorTable};
use crate::codec::{Data, Value};
use crate::context::{self, Blocked, TaskContext};
use crate::error::{Error, Result, TaskFailure};
use crate::ids::{IdGen, ObjectId, TaskId};
use crate::lease::{Leased, Owner};
use crate::object_ref::{Arg, ObjectRef, RawRef};
use crate::options::{CancelOptions, TaskOptions};
use crate::options::{NodeOptions, WorkerCommand};
use crate::pool::Pool;
use crate::registry::{BoxFuture, FunctionBody, FunctionEntry, InvokeError, Registry};
use crate::resources::{self, ResourceSet};
use crate::scheduler::{Rejected, Schedulable, Scheduler};
use crate::shm::NodeStore;
use crate::store::{Peek, Store, StoreStats, ThreadWaker};
use crate::task::{ArgList, Target, TaskSpec, TaskState};
use crate::wire::service::NodeManager;
use crate::SharedStoreStats;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// How a runtime is set up. `Config::default()` gives Ray's defaults for
/// one machine.
#[derive(Debug, Clone)]
pub struct Config {
    num_cpus: Option<f64>,
    num_gpus: Option<f64>,
    resources: Vec<(String, f64)>,
    object_store_memory: Option<u64>,
    object_store_full_timeout: Duration,
    serialize_everything: bool,
    async_threads: Option<usize>,
    worker_mode: WorkerMode,
    worker_command: Option<WorkerCommand>,
    spill_dir: Option<std::path::PathBuf>,
    shared_memory_threshold: usize,
    log_dir: Option<std::path::PathBuf>,
    log_to_driver: bool,
    max_worker_threads: usize,
}

/// The most worker threads a runtime starts unless told otherwise
/// (`Config::max_worker_threads`).
pub(crate) const DEFAULT_MAX_WORKER_THREADS: usize = 4096;

/// Where tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkerMode {
    /// On threads of the driver process (the default): the fastest, no
    /// set-up, but a crashing task (an abort, a segfault) takes the driver
    /// down.
    #[default]
    Threads,
    /// In worker processes of the node: the driver's own executable
    /// started again in worker mode (see [`crate::worker_entry`]), one
    /// task at a time per process, as in Ray. A worker that dies fails
    /// only its task, which is retried per `max_retries`.
    Processes,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_cpus: None,
            num_gpus: None,
            resources: Vec::new(),
            object_store_memory: None,
            object_store_full_timeout: Duration::from_secs(10),
            serialize_everything: false,
            async_threads: None,
            worker_mode: WorkerMode::Threads,
            worker_command: None,
            spill_dir: None,
            shared_memory_threshold: crate::shm::DEFAULT_THRESHOLD,
            log_dir: None,
            log_to_driver: true,
            max_worker_threads: DEFAULT_MAX_WORKER_THREADS,
        }
    }
}

impl Config {
    /// A configuration with every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// CPUs the node offers (default: the machine's available cores).
    pub fn num_cpus(mut self, n: f64) -> Self {
        self.num_cpus = Some(n);
        self
    }

    /// GPUs the node offers (default: detected, see
    /// [`resources::detect_gpus`]).
    pub fn num_gpus(mut self, n: f64) -> Self {
        self.num_gpus = Some(n);
        self
    }

    /// A custom resource the node offers.
    pub fn resource(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.resources.push((name.into(), amount));
        self
    }

    /// The object store's capacity in bytes (default: 30% of the machine's
    /// memory, as in Ray).
    pub fn object_store_memory(mut self, bytes: u64) -> Self {
        self.object_store_memory = Some(bytes);
        self
    }

    /// How long a `put` (or a task's result) waits for room in a full store
    /// before failing with `ObjectStoreFull` (default 10 s).
    pub fn object_store_full_timeout(mut self, t: Duration) -> Self {
        self.object_store_full_timeout = t;
        self
    }

    /// Sends every task, actor call, argument, result and object through
    /// its bytes form, as worker processes will: specs are encoded and
    /// decoded by registry name, values are stored encoded. Slower; proves
    /// that every path has a bytes form.
    pub fn serialize_everything(mut self, yes: bool) -> Self {
        self.serialize_everything = yes;
        self
    }

    /// Threads of the async executor (default: min(num_cpus, 4), at least 1).
    pub fn async_threads(mut self, n: usize) -> Self {
        self.async_threads = Some(n.max(1));
        self
    }

    /// Where tasks run (default: [`WorkerMode::Threads`]).
    pub fn worker_mode(mut self, mode: WorkerMode) -> Self {
        self.worker_mode = mode;
        self
    }

    /// The program started as a worker process (default: the running
    /// executable with no arguments). Test harnesses use it to start the
    /// test binary with arguments that select its worker entry.
    pub fn worker_command(mut self, command: WorkerCommand) -> Self {
        self.worker_command = Some(command);
        self
    }

    /// Where the node spills objects when its shared memory is full, in
    /// the worker-process mode (default: a fresh directory under the
    /// system's temporary directory, removed at shutdown).
    pub fn spill_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.spill_dir = Some(dir.into());
        self
    }

    /// Where the worker processes' output is kept, one file per stream and
    /// process (`worker-<pid>.out`, `worker-<pid>.err`, made when the
    /// first line arrives; default: `rustyray-logs-<driver pid>-<runtime>`
    /// under the system's temporary directory). The files stay after
    /// shutdown, as Ray's session logs do. See [`Ray::log_dir`].
    pub fn log_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.log_dir = Some(dir.into());
        self
    }

    /// Whether the worker processes' output is also printed by the driver,
    /// each line prefixed with where it came from: `(pid=4242)`, or
    /// `(Counter pid=4242)` for an actor's process; stdout lines to the
    /// driver's stdout, stderr lines to its stderr (default: yes, as Ray's
    /// `log_to_driver`).
    pub fn log_to_driver(mut self, yes: bool) -> Self {
        self.log_to_driver = yes;
        self
    }

    /// The most threads the runtime starts for sync tasks and actor calls
    /// (default 4096). Each task blocked in `get`/`wait` holds a thread; a
    /// task blocked on a child that is still queued runs the child itself,
    /// so a recursive tree needs threads by its depth, not its size. A sync
    /// task may block (without a deadline) only while another of these
    /// threads is left unblocked; past that it fails with
    /// [`Error::ThreadLimit`] instead of waiting for work no thread may be
    /// left to run.
    pub fn max_worker_threads(mut self, n: usize) -> Self {
        self.max_worker_threads = n;
        self
    }

    /// In the worker-process mode, values whose bytes form is at least
    /// this long live in the node's shared memory (default 100 KiB, as in
    /// Ray); smaller ones travel inline. At most 16 MiB, so that inline
    /// values always fit the protocol's frames.
    pub fn shared_memory_threshold(mut self, bytes: usize) -> Self {
        self.shared_memory_threshold = bytes.min(16 << 20);
        self
    }
}

fn default_store_memory() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(8 * 1024 * 1024);
    total_kib * 1024 * 3 / 10
}

/// How many async calls may block in `get`/`wait` at once (see
/// `Inner::start`). Deeply recursive async code should `.await` instead.
const MAX_BLOCKED_ASYNC: usize = 4096;

/// How long `get` watches an object before it parks the thread.
const GET_SPIN: Duration = Duration::from_micros(30);

/// The first id that appears twice in `ids`, if any. Ids minted close
/// together by one runtime (the usual case) are checked with a bitmap over
/// their counters; others with a hash set.
fn first_duplicate(ids: &[ObjectId]) -> Option<ObjectId> {
    let first = ids.first()?;
    let same_owner = ids.iter().all(|id| id.owner() == first.owner());
    let counters = ids.iter().map(|id| id.as_u128() as u64);
    let (lo, hi) = counters.fold((u64::MAX, 0), |(lo, hi), c| (lo.min(c), hi.max(c)));
    let span = hi - lo;
    if same_owner && span / 64 <= ids.len() as u64 {
        let mut bits = vec![0_u64; (span / 64 + 1) as usize];
        for id in ids {
            let k = (id.as_u128() as u64 - lo) as usize;
            let (word, bit) = (k / 64, 1_u64 << (k % 64));
            if bits[word] & bit != 0 {
                return Some(*id);
            }
            bits[word] |= bit;
        }
        return None;
    }
    let mut seen =
        std::collections::HashSet::with_capacity_and_hasher(ids.len(), crate::ids::IdHash::default());
    ids.iter().find(|id| !seen.insert(**id)).copied()
}

/// `now + timeout`, or no deadline when that overflows.
fn deadline_after(timeout: Duration) -> Option<(Instant, Duration)> {
    Instant::now().checked_add(timeout).map(|at| (at, timeout))
}

/// Whether a task pushed to a worker process leased it (and hands it back
/// to the pool when done) or shares it with a task blocked there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    Own,
    Borrowed,
}

/// Work the scheduler holds.
pub(crate) enum Work {
    Task(Box<TaskRun>),
    Actor(Arc<ActorState>),
    /// A worker process's request for a worker lease (see `grant`).
    Lease(Box<crate::grant::LeaseRun>),
}

impl Schedulable for Work {
    fn request(&self) -> &ResourceSet {
        match self {
            Work::Task(t) => &t.request,
            Work::Actor(a) => a.placement_request(),
            Work::Lease(l) => &l.request,
        }
    }
}

/// How far back in each queue a task blocked on a child looks for it (the
/// children a task just submitted are at the back; looking further would
/// cost the scheduler's lock more than a blocked wait saves).
const HELP_SCAN: usize = 256;

/// A function task on its way through the scheduler.
#[derive(Debug)]
pub(crate) struct TaskRun {
    spec: TaskSpec,
    entry: &'static FunctionEntry,
    state: Arc<TaskState>,
    request: ResourceSet,
    max_retries: i32,
    retry_exceptions: bool,
    attempt: u32,
}

/// The error of a task (attempt `attempt`) whose argument `i` failed.
pub(crate) fn dependency_failed(spec: &TaskSpec, i: usize, attempt: u32, cause: Error) -> Error {
    Error::Task {
        function: spec.target.name().to_owned(),
        name: spec.name.as_deref().map(str::to_owned),
        task_id: spec.id,
        failure: TaskFailure::DependencyFailed,
        message: format!("argument {i} failed: {cause}"),
        attempts: attempt,
        cause: Some(Box::new(cause)),
    }
}

/// Whether a task with `max_retries` may have another attempt after
/// attempt `attempt` (negative: as many as it takes).
pub(crate) fn attempts_left(max_retries: i32, attempt: u32) -> bool {
    max_retries < 0 || i64::from(attempt) <= i64::from(max_retries)
}

/// How one attempt ended.
pub(crate) enum Outcome {
    Value(Value),
    Returned(String),
    Panicked(String),
    Failed(Error),
    /// The worker process running it died; why.
    Crashed(String),
    /// No worker could be had for it (a worker that cannot start, no
    /// descriptors left): retried as a crash is, reported as what it is.
    NoWorker(Error),
}

impl Outcome {
    /// Whether the attempt may be tried again: it crashed, panicked or
    /// found no worker; with `retry_exceptions`, also when the task
    /// returned an error.
    pub(crate) fn is_retryable(&self, retry_exceptions: bool) -> bool {
        match self {
            Outcome::Panicked(_) | Outcome::Crashed(_) | Outcome::NoWorker(_) => true,
            Outcome::Returned(_) => retry_exceptions,
            _ => false,
        }
    }

    /// The result of a task (`function`, named `name`) whose last attempt
    /// (`attempts`) ended so.
    pub(crate) fn into_result(
        self,
        function: &str,
        name: Option<&str>,
        task_id: TaskId,
        attempts: u32,
    ) -> Result<Value> {
        let task_error = |failure, message| Error::Task {
            function: function.to_owned(),
            name: name.map(str::to_owned),
            task_id,
            failure,
            message,
            attempts,
            cause: None,
        };
        match self {
            Outcome::Value(v) => Ok(v),
            Outcome::Returned(msg) => Err(task_error(TaskFailure::Returned, msg)),
            Outcome::Panicked(msg) => Err(task_error(TaskFailure::Panicked, msg)),
            Outcome::Failed(e) | Outcome::NoWorker(e) => Err(e),
            Outcome::Crashed(reason) => Err(Error::WorkerCrashed { task_id, reason }),
        }
    }
    pub(crate) fn from_invoke(r: std::thread::Result<std::result::Result<Value, InvokeError>>) -> Self {
        match r {
            Ok(Ok(v)) => Outcome::Value(v),
            Ok(Err(InvokeError::User(msg))) => Outcome::Returned(msg),
            Ok(Err(InvokeError::System(e))) => Outcome::Failed(e),
            Err(p) => Outcome::Panicked(panic_message(p.as_ref())),
        }
    }
}

pub(crate) use rustyray_common::error::panic_message;

/// Polls a boxed future, turning a panic into `Err(message)`.
pub(crate) struct CatchUnwind<T>(pub(crate) BoxFuture<T>);

impl<T> Future for CatchUnwind<T> {
    type Output = std::thread::Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(p)),
        }
    }
}

/// The runtime's state. Reached through [`Ray`], through references and
/// handles, and through the running task's context.
pub(crate) struct Inner {
    pub(crate) ids: IdGen,
    pub(crate) store: Store,
    pub(crate) registry: Registry,
    pub(crate) sched: Scheduler<Work>,
    tasks: Mutex<HashMap<TaskId, Arc<TaskState>, crate::ids::IdHash>>,
    pub(crate) pool: Pool,
    executor: Mutex<Option<tokio::runtime::Runtime>>,
    pub(crate) handle: tokio::runtime::Handle,
    pub(crate) actors: ActorTable,
    shut_down: AtomicBool,
    /// Set (and signalled) once shutdown has finished.
    shutdown_done: (Mutex<bool>, parking_lot::Condvar),
    bytes_mode: bool,
    thread_prefix: String,
    /// Where tasks run and whom this runtime answers to.
    pub(crate) mode: Mode,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("owner", &format_args!("{:016x}", self.ids.owner()))
            .field("store", &self.store)
            .field("sched", &self.sched)
            .finish_non_exhaustive()
    }
}

/// How a runtime runs its tasks and whom it answers to: chosen once, in
/// `Inner::start`, and held for the runtime's life (as tokio's scheduler
/// `Handle` holds its flavour). What differs by mode is asked of it here,
/// not found out by testing optional fields all over the code.
pub(crate) enum Mode {
    /// Embedded: tasks and actors on this process's threads.
    Threads,
    /// A driver hosting the node daemon: tasks and actors in worker
    /// processes of the node.
    Node(NodeLink),
    /// A worker process: code here submits to, calls through and borrows
    /// from its owner, reached through the node's connection.
    Worker(Arc<crate::worker::Upstream>),
}

/// What a driver holds of the node daemon it hosts.
pub(crate) struct NodeLink {
    /// The node manager it leases worker processes from.
    manager: Arc<dyn NodeManager<Leased>>,
    /// The owner the node's workers answer to (which also borrows their
    /// objects).
    owner: Arc<Owner>,
    /// The node's shared-memory store.
    shm: Arc<NodeStore>,
    /// Where the workers' logs go.
    log_dir: std::path::PathBuf,
    /// The session directory holding the node's spill files and logs
    /// (unless both were given elsewhere).
    session_dir: Option<std::path::PathBuf>,
}

/// The node daemon a driver hosts in the worker-process mode, as the
/// embedder starts it (the `rustyray` crate passes `rustyray-raylet`'s):
/// its node manager, shared-memory store and directories.
#[doc(hidden)]
pub struct NodeParts {
    /// The node manager the owner leases workers from.
    pub manager: Arc<dyn NodeManager<Leased>>,
    /// The node's shared-memory store.
    pub store: Arc<rustyray_shm::ShmStore>,
    /// Where the workers' logs go.
    pub log_dir: std::path::PathBuf,
    /// The session directory, unless spill files and logs were both given
    /// elsewhere.
    pub session_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NodeParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeParts")
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

/// Starts the node daemon of a driver in the worker-process mode, on the
/// runtime's executor; the last argument makes the owner its workers
/// answer to, given the node's store.
#[doc(hidden)]
pub type StartNode = fn(
    NodeOptions,
    &tokio::runtime::Handle,
    &dyn Fn(&Arc<rustyray_shm::ShmStore>) -> Arc<Owner>,
) -> Result<NodeParts>;

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Threads => "Threads",
            Mode::Node(_) => "Node",
            Mode::Worker(_) => "Worker",
        })
    }
}

impl Mode {
    /// The node manager, in a driver hosting a node daemon.
    pub(crate) fn node(&self) -> Option<&Arc<dyn NodeManager<Leased>>> {
        match self {
            Mode::Node(n) => Some(&n.manager),
            Mode::Threads | Mode::Worker(_) => None,
        }
    }

    /// The node's shared-memory store, in a driver hosting the node.
    pub(crate) fn shm(&self) -> Option<&Arc<NodeStore>> {
        match self {
            Mode::Node(n) => Some(&n.shm),
            Mode::Threads | Mode::Worker(_) => None,
        }
    }

    /// The way to the owner, in a worker process.
    pub(crate) fn upstream(&self) -> Option<&Arc<crate::worker::Upstream>> {
        match self {
            Mode::Worker(up) => Some(up),
            Mode::Threads | Mode::Node(_) => None,
        }
    }

    /// The owner the node's workers answer to, in a driver hosting the
    /// node.
    pub(crate) fn owner(&self) -> Option<&Arc<Owner>> {
        match self {
            Mode::Node(n) => Some(&n.owner),
            Mode::Threads | Mode::Worker(_) => None,
        }
    }

    /// Gives back the `count` counts this process borrowed object `id`
    /// with to its owner (its last reference here went): a worker's owner
    /// is its uplink, a driver's the worker that owns the object.
    pub(crate) fn give_back(&self, id: ObjectId, count: u32) {
        match self {
            Mode::Worker(up) => up.released(id, count),
            Mode::Node(n) => n.owner.give_back(id, count),
            Mode::Threads => {}
        }
    }

    /// The node's session directory, in a driver hosting the node.
    pub(crate) fn session_dir(&self) -> Option<&std::path::Path> {
        match self {
            Mode::Node(n) => n.session_dir.as_deref(),
            Mode::Threads | Mode::Worker(_) => None,
        }
    }

    /// Where the workers' logs go, in a driver hosting the node.
    pub(crate) fn log_dir(&self) -> Option<&std::path::Path> {
        match self {
            Mode::Node(n) => Some(&n.log_dir),
            Mode::Threads | Mode::Worker(_) => None,
        }
    }
}

/// Shuts the runtime down when the last handle returned by `init` goes.
#[derive(Debug)]
struct OwnerGuard(Arc<Inner>);

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        self.0.shutdown_now();
    }
}

/// A handle on a runtime: the user's entry point (Ray's `ray` module).
///
/// Clones share the runtime. The runtime shuts down on [`Ray::shutdown`] or
/// when the last clone of the handle returned by [`init`] is dropped; the
/// handle [`current`] gives inside a task does not keep it up.
#[derive(Clone, Debug)]
pub struct Ray {
    inner: Arc<Inner>,
    _owner: Option<Arc<OwnerGuard>>,
}

/// Starts an embedded runtime with the default [`Config`].
pub fn init() -> Result<Ray> {
    init_with(Config::default())
}

/// Starts an embedded runtime.
pub fn init_with(config: Config) -> Result<Ray> {
    init_hosting(config, None)
}

/// Starts an embedded runtime; in the worker-process mode `node` starts
/// the node daemon it hosts (the `rustyray` crate's `init_with` passes
/// the raylet's).
#[doc(hidden)]
pub fn init_hosting(config: Config, node: Option<StartNode>) -> Result<Ray> {
    if crate::worker::started_as_worker() {
        // Running the user's main in a worker would start workers of its
        // own, without end.
        return Err(Error::invalid(
            "this process was started as a worker process, but its main did not call \
             rustyray::worker_entry() first (or use #[rustyray::main])",
        ));
    }
    let inner = Inner::start_as(config, None, node)?;
    Ok(Ray {
        _owner: Some(Arc::new(OwnerGuard(inner.clone()))),
        inner,
    })
}

/// The runtime running the current task or actor call.
pub fn current() -> Result<Ray> {
    context::current()
        .map(|c| Ray::non_owning(c.rt.clone()))
        .ok_or_else(|| Error::invalid("rustyray::current() called outside a task or actor call"))
}

/// Whether the current task has been cancelled: sync tasks check this to
/// stop early. False outside a task.
pub fn is_cancelled() -> bool {
    context::current().is_some_and(|c| c.task.is_cancelled())
}

/// What [`Ray::wait`] returns: `(ready, not_ready)`.
pub type WaitResult<T> = (Vec<ObjectRef<T>>, Vec<ObjectRef<T>>);

/// What runs once some objects are complete (see [`Inner::when_complete`]).
type Then = Box<dyn FnOnce(&Arc<Inner>) + Send>;

/// Waits for some objects, then runs what waits for them.
struct DepWaiter {
    remaining: AtomicUsize,
    then: Mutex<Option<Then>>,
    rt: Arc<Inner>,
}

impl DepWaiter {
    fn done_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(then) = self.then.lock().take() {
                then(&self.rt);
            }
        }
    }
}

impl Wake for DepWaiter {
    fn wake(self: Arc<Self>) {
        self.done_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.done_one();
    }
}

impl Inner {
    #[cfg(test)]
    pub(crate) fn start(config: Config) -> Result<Arc<Inner>> {
        Inner::start_as(config, None, None)
    }

    /// Starts a runtime: a worker process's, answering to `upstream`, or
    /// else as `config` says (with the node daemon `node` starts, in the
    /// worker-process mode).
    pub(crate) fn start_as(
        config: Config,
        upstream: Option<Arc<crate::worker::Upstream>>,
        node: Option<StartNode>,
    ) -> Result<Arc<Inner>> {
        let registry = Registry::build()?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let num_cpus = config.num_cpus.unwrap_or(cores as f64);
        let num_gpus = config
            .num_gpus
            .unwrap_or_else(|| f64::from(resources::detect_gpus()));
        let mut total = ResourceSet::new();
        total.set(resources::CPU, num_cpus)?;
        total.set(resources::GPU, num_gpus)?;
        for (n, v) in &config.resources {
            total.set(n, *v)?;
        }
        let ids = IdGen::new();
        let thread_prefix = format!("rr{:06x}", ids.owner() & 0xff_ffff);
        let async_threads = config
            .async_threads
            .unwrap_or_else(|| (num_cpus.ceil() as usize).clamp(1, 4));
        let name = format!("{thread_prefix}-a");
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if config.worker_mode == WorkerMode::Processes || upstream.is_some() {
            // Connections to the worker processes (a worker's: to other
            // workers).
            builder.enable_io();
        }
        let executor = builder
            .worker_threads(async_threads)
            // Async code that calls a blocking `get`/`wait` moves its executor
            // thread's work to a blocking thread for as long as it waits; the
            // cap bounds how many such waits can be outstanding at once.
            .max_blocking_threads(MAX_BLOCKED_ASYNC)
            .thread_name(name)
            .enable_time()
            .build()
            .map_err(|e| Error::Io {
                what: "starting the async executor".to_owned(),
                message: e.to_string(),
            })?;
        let min_threads = (num_cpus.ceil() as usize).max(1);
        let store_memory = config.object_store_memory.unwrap_or_else(default_store_memory);
        let mut owner = None;
        let mode = match (upstream, config.worker_mode) {
            (Some(up), _) => Mode::Worker(up),
            (None, WorkerMode::Threads) => Mode::Threads,
            (None, WorkerMode::Processes) => {
                let Some(start_node) = node else {
                    return Err(Error::invalid(
                        "the worker-process mode needs the node daemon: start the runtime with \
                         rustyray::init_with (the rustyray crate), not the core worker's",
                    ));
                };
                let command = match config.worker_command {
                    Some(c) => c,
                    None => WorkerCommand::current_exe()?,
                };
                let capacity = usize::try_from(store_memory)
                    .map_err(|_| Error::invalid("object_store_memory does not fit this machine"))?;
                let opts = NodeOptions {
                    command,
                    prestart: min_threads,
                    name: thread_prefix.clone(),
                    spill_dir: config.spill_dir,
                    log_dir: config.log_dir,
                    log_to_driver: config.log_to_driver,
                    capacity,
                    threshold: config.shared_memory_threshold,
                };
                let threshold = config.shared_memory_threshold;
                let made = std::cell::OnceCell::new();
                let parts = start_node(opts, executor.handle(), &|store| {
                    made.get_or_init(|| Owner::new(NodeStore::over(store.clone(), threshold)))
                        .clone()
                })?;
                let Some(made) = made.into_inner() else {
                    parts.manager.shut_down();
                    parts.manager.close();
                    return Err(Error::invalid("the node daemon did not name its owner"));
                };
                let shm = made.shm().clone();
                owner = Some(made.clone());
                Mode::Node(NodeLink {
                    manager: parts.manager,
                    owner: made,
                    shm,
                    log_dir: parts.log_dir,
                    session_dir: parts.session_dir,
                })
            }
        };
        let inner = Arc::new(Inner {
            store: Store::new(store_memory, config.object_store_full_timeout),
            registry,
            sched: Scheduler::new(total),
            tasks: Mutex::new(HashMap::default()),
            pool: Pool::new(
                format!("{thread_prefix}-w"),
                min_threads,
                config.max_worker_threads,
            ),
            handle: executor.handle().clone(),
            executor: Mutex::new(Some(executor)),
            actors: ActorTable::default(),
            shut_down: AtomicBool::new(false),
            shutdown_done: (Mutex::new(false), parking_lot::Condvar::new()),
            bytes_mode: config.serialize_everything,
            thread_prefix,
            ids,
            mode,
        });
        if let Some(owner) = owner {
            owner.set_runtime(&inner);
            // Objects borrowed from workers are asked of them when first
            // looked at.
            let lender = owner.clone();
            inner.store.set_fetch(Box::new(move |id| lender.fetch(id)));
        }
        Ok(inner)
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.shut_down.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    /// Erases a value for this runtime: local, or encoded when everything
    /// goes through bytes.
    pub(crate) fn make_value<T: Data>(&self, v: T) -> Result<Value> {
        if self.bytes_mode {
            Value::encode(&v)
        } else {
            Ok(Value::local(v))
        }
    }

    /// A reference on object `id`, which something this process received
    /// names. In a driver, an object of a live worker's own that is not
    /// here yet is taken all the same (its entry made, not fetched yet):
    /// the worker lent it to another worker, whose message naming it was
    /// read before the owner's `Lend` that counts the loan (the two come on
    /// different connections). One of a worker that died is taken as
    /// failed with `OwnerDied`, so what names it still arrives.
    pub(crate) fn acquire_named(self: &Arc<Self>, id: ObjectId) -> Result<RawRef> {
        RawRef::acquire(id, self.clone()).or_else(|e| match self.mode.owner() {
            Some(owner) if owner.knows(id.owner()) => {
                self.store.expect_lent(id)?;
                Ok(RawRef::adopt(id, self.clone()))
            }
            Some(owner) if owner.had_worker(id.owner()) => {
                self.store.expect_lent(id)?;
                let r = RawRef::adopt(id, self.clone());
                self.store.complete(id, Err(owner.owner_died(id)));
                Ok(r)
            }
            _ => Err(e),
        })
    }

    /// Holds the objects and actors a received value names, for as long as
    /// the value lives. In a worker process they are lent with the message
    /// (counted until released; objects are fetched when first looked at),
    /// except its own lent back, held as its own. In the driver they are
    /// its own, or borrowed already (the sending worker's own, see
    /// `Leased::borrow_lent`), or named ahead of their lender's `Lend`
    /// ([`Inner::acquire_named`]).
    pub(crate) fn hold_received(
        self: &Arc<Self>,
        ids: &[ObjectId],
        actors: &[crate::wire::NamedActor],
    ) -> Result<Vec<crate::codec::KeepAlive>> {
        let up = self.mode.upstream();
        let mut keep = Vec::with_capacity(ids.len() + actors.len());
        // Every entry is taken even after a failure: a loan not taken is
        // given back at once, the rest when `keep` drops.
        let mut failed = None;
        for &id in ids {
            let r = match up {
                // Its own object, lent back by the owner (which borrows it
                // from here): held here as any of its own, and the owner's
                // count goes back at once (this process keeps it alive).
                Some(up) if id.owner() == self.ids.owner() => {
                    let r = RawRef::acquire(id, self.clone());
                    up.released(id, 1);
                    r
                }
                Some(up) => self
                    .store
                    .borrow(id)
                    .map(|()| RawRef::adopt(id, self.clone()))
                    .inspect_err(|_| up.released(id, 1)),
                None => self.acquire_named(id),
            };
            match r {
                Ok(r) => keep.push(r.keep_alive()),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        for a in actors {
            let handle = match up {
                Some(up) => actor::borrow_actor(self, a)
                    .inspect_err(|_| up.released_actor(a.id, 1))
                    .map(Some),
                None => Ok(actor::hold_actor(self, a.id)),
            };
            match handle {
                Ok(h) => keep.extend(h.map(|h| h.keep_alive())),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(keep),
        }
    }

    /// Makes room for a value about to enter the store (see [`Self::measure`]).
    /// Waiting for room on an executor thread first hands the executor's
    /// other work to another thread.
    pub(crate) fn admit(&self, v: Value) -> Result<(Value, u64)> {
        let (v, size) = self.measure(v)?;
        if !self.store.try_reserve(size) {
            let on_executor = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if on_executor {
                tokio::task::block_in_place(|| self.store.reserve(size))?;
            } else {
                self.store.reserve(size)?;
            }
        }
        Ok((v, size))
    }

    /// A value in the form this store keeps it (large ones of the
    /// worker-process mode moved to shared memory), with the room it takes
    /// in the store's memory; no room is reserved. Encoding and sizing run
    /// the value's `Serialize`, which is user code: a panic there becomes a
    /// serialization error.
    pub(crate) fn measure(&self, v: Value) -> Result<(Value, u64)> {
        let measured = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(Value, u64)> {
            let v = if self.bytes_mode { v.to_encoded()? } else { v };
            let size = v.size()? as u64;
            // Large values of the worker-process mode live in the node's
            // shared memory, which has its own capacity (and spills).
            if let Some(node) = self.mode.shm() {
                if v.stored().is_some() {
                    return Ok((v, 0));
                }
                if size >= node.threshold as u64 {
                    if let Some(o) = node.store_value(&v)? {
                        let type_name = v.type_name().to_owned();
                        return Ok((Value::from_stored(o, type_name), 0));
                    }
                }
            }
            Ok((v, size))
        }));
        measured
            .map_err(|p| Error::Serialization(format!("Serialize panicked: {}", panic_message(p.as_ref()))))?
    }

    /// Completes the pending object `id` with a task's or call's value.
    /// A thread reading a worker's connection never waits for room: when
    /// there is none, the wait goes to the blocking pool, so the messages
    /// behind (a `Release` that frees the room, say) are read meanwhile.
    /// Other threads wait here, which holds back the work that made the
    /// value, as Ray's workers wait for room in a full store.
    pub(crate) fn publish(self: &Arc<Self>, id: ObjectId, v: Value) {
        if !crate::wire::service::on_reader() {
            let admitted = self.admit(v);
            self.store.complete(id, admitted);
            return;
        }
        self.publish_now(id, v);
    }

    /// [`Inner::publish`] as a reader thread does it: never waiting here
    /// for room.
    pub(crate) fn publish_now(self: &Arc<Self>, id: ObjectId, v: Value) {
        match self.measure(v) {
            Ok((v, size)) if self.store.try_reserve(size) => self.store.complete(id, Ok((v, size))),
            Ok((v, size)) => self.complete_later(id, v, size),
            Err(e) => self.store.complete(id, Err(e)),
        }
    }

    /// Completes the pending object `id` with `v` once `size` bytes of
    /// room are reserved for it, on a thread of the blocking pool; fails it
    /// with `ObjectStoreFull` if no room comes within the store's timeout.
    fn complete_later(self: &Arc<Self>, id: ObjectId, v: Value, size: u64) {
        let rt = self.clone();
        self.handle.spawn_blocking(move || {
            let admitted = rt.store.reserve(size).map(|()| (v, size));
            rt.store.complete(id, admitted);
        });
    }

    // ----- submission -------------------------------------------------

    /// Registers a task's state and return object; links it to the task
    /// submitting it, for recursive cancellation.
    pub(crate) fn new_task(self: &Arc<Self>) -> Result<(Arc<TaskState>, RawRef)> {
        self.check_open()?;
        let id = self.ids.task();
        self.store.create_pending(id.return_object())?;
        let ret = RawRef::adopt(id.return_object(), self.clone());
        let state = TaskState::new(id);
        if let Some(parent) = context::current() {
            if Arc::ptr_eq(&parent.rt, self) {
                parent.task.add_child(&state);
            }
        }
        self.tasks.lock().insert(id, state.clone());
        Ok((state, ret))
    }

    /// Registers a task created with an id minted elsewhere (a call a
    /// worker process sent), for cancellation.
    pub(crate) fn register_task(&self, state: &Arc<TaskState>) {
        self.tasks.lock().insert(state.id, state.clone());
    }

    pub(crate) fn forget_task(&self, id: TaskId) {
        self.tasks.lock().remove(&id);
    }

    /// Submits a function task.
    pub(crate) fn submit_task(
        self: &Arc<Self>,
        entry: &'static FunctionEntry,
        args: Vec<Arg>,
        opts: &TaskOptions,
    ) -> Result<RawRef> {
        if let Some(up) = self.mode.upstream() {
            return up.submit_task(self, entry, args, opts);
        }
        let request = opts.request(&entry.options)?;
        let (max_retries, retry_exceptions) = opts.retries(&entry.options);
        let (state, ret) = self.new_task()?;
        let run = TaskRun {
            spec: TaskSpec {
                id: state.id,
                target: Target::Function(entry),
                args,
                name: opts.name.as_deref().map(Arc::from),
            },
            entry,
            state,
            request,
            max_retries,
            retry_exceptions,
            attempt: 1,
        };
        let deps = ref_ids(&run.spec.args);
        self.when_ready(&deps, Work::Task(Box::new(run)));
        Ok(ret)
    }

    /// Enqueues `work` once every object in `deps` is complete.
    pub(crate) fn when_ready(self: &Arc<Self>, deps: &[ObjectId], work: Work) {
        if deps.iter().all(|d| self.store.is_complete(*d)) {
            self.enqueue(work);
            return;
        }
        self.when_complete(deps, move |rt| rt.enqueue(work));
    }

    /// Runs `then` once every object in `ids` is complete: on the thread
    /// that completes the last, or this one if all are.
    pub(crate) fn when_complete(
        self: &Arc<Self>,
        ids: &[ObjectId],
        then: impl FnOnce(&Arc<Inner>) + Send + 'static,
    ) {
        let waiter = Arc::new(DepWaiter {
            remaining: AtomicUsize::new(1),
            then: Mutex::new(Some(Box::new(then))),
            rt: self.clone(),
        });
        let waker = Waker::from(waiter.clone());
        // In a worker process an object may complete with a message.
        self.will_wait();
        for d in ids {
            waiter.remaining.fetch_add(1, Ordering::AcqRel);
            match self.store.peek(*d, Some(&waker)) {
                Ok(Peek::Pending) => {}
                _ => waiter.done_one(),
            }
        }
        waiter.done_one();
    }

    /// Hands work to the scheduler and starts what may run.
    pub(crate) fn enqueue(self: &Arc<Self>, work: Work) {
        match self.sched.submit(work) {
            Ok(start) => self.start_all(start),
            Err(Rejected::Infeasible(w)) => {
                let err = Error::Unschedulable {
                    what: match &w {
                        Work::Task(t) => format!("task {}", t.entry.name),
                        Work::Actor(a) => format!("actor {}", a.class.name),
                        Work::Lease(l) => l.describe(),
                    },
                    requested: w.request().to_string(),
                    available: self.sched.total().to_string(),
                };
                self.fail_work(w, err);
            }
            Err(Rejected::Closed(w)) => self.fail_work(w, Error::Shutdown),
        }
    }

    fn fail_work(self: &Arc<Self>, w: Work, err: Error) {
        match w {
            Work::Task(t) => {
                self.store.complete(t.state.id.return_object(), Err(err));
                t.state.finish();
                self.forget_task(t.state.id);
            }
            Work::Actor(a) => actor::creation_failed(self, &a, err),
            Work::Lease(l) => crate::grant::failed(&l, err),
        }
    }

    pub(crate) fn start_all(self: &Arc<Self>, work: Vec<Work>) {
        for w in work {
            match w {
                Work::Task(t) => self.start_task(t),
                Work::Actor(a) => actor::start_actor(self, a),
                Work::Lease(l) => crate::grant::start(self, l),
            }
        }
    }

    /// Returns resources to the scheduler and starts what now fits.
    pub(crate) fn release(self: &Arc<Self>, res: &ResourceSet) {
        let start = self.sched.release(res);
        self.start_all(start);
    }

    /// A blocked task lends its CPU back.
    pub(crate) fn lend_back(self: &Arc<Self>, cpu: &ResourceSet) {
        self.release(cpu);
    }

    /// A blocked task takes its CPU back.
    pub(crate) fn take_back(&self, cpu: &ResourceSet) {
        self.sched.take(cpu);
    }

    // ----- execution --------------------------------------------------

    /// Starts a task the scheduler granted its resources: a sync one in the
    /// threads mode on a pool thread, the rest here.
    fn start_task(self: &Arc<Self>, run: Box<TaskRun>) {
        if self.mode.node().is_none() && matches!(run.entry.body, FunctionBody::Sync(_)) {
            let rt = self.clone();
            // A closed pool means shutdown, which fails the object.
            let _ = self.pool.execute(Box::new(move || rt.run_task(run)));
            return;
        }
        self.run_task(run);
    }

    /// Runs one attempt of a task whose resources are held: a sync one on
    /// this thread, an async one on the executor, either in a worker
    /// process in the processes mode.
    fn run_task(self: &Arc<Self>, run: Box<TaskRun>) {
        if !run.state.start(run.attempt) {
            // Cancelled while waiting: its object already says so.
            self.forget_task(run.state.id);
            self.release(&run.request);
            return;
        }
        if let Some(node) = self.mode.node() {
            self.start_in_process(node.clone(), run);
            return;
        }
        match run.entry.body {
            FunctionBody::Sync(f) => {
                let outcome = match self.resolve_args(&run.spec, run.attempt) {
                    Ok(args) => {
                        let ctx =
                            TaskContext::new(self.clone(), run.state.clone(), run.request.cpu_only(), false);
                        Outcome::from_invoke(context::with_sync(ctx, || {
                            std::panic::catch_unwind(AssertUnwindSafe(|| f(args)))
                        }))
                    }
                    Err(e) => Outcome::Failed(e),
                };
                self.finish_task(run, outcome);
            }
            FunctionBody::Async(f) => {
                let rt = self.clone();
                let state = run.state.clone();
                let state_attempt = run.attempt;
                let fut = async move {
                    let mut guard = AsyncTaskGuard {
                        rt: rt.clone(),
                        run: Some(run),
                    };
                    let outcome = match guard.run.as_ref().map(|r| rt.resolve_args(&r.spec, r.attempt)) {
                        Some(Ok(args)) => {
                            let (state, cpu) = match guard.run.as_ref() {
                                Some(r) => (r.state.clone(), r.request.cpu_only()),
                                None => return,
                            };
                            let ctx = TaskContext::new(rt.clone(), state, cpu, true);
                            Outcome::from_invoke(context::with_async(ctx, CatchUnwind(f(args))).await)
                        }
                        Some(Err(e)) => Outcome::Failed(e),
                        None => return,
                    };
                    if let Some(run) = guard.run.take() {
                        rt.finish_task(run, outcome);
                    }
                };
                let attempt = state_attempt;
                let h = self.handle.spawn(fut);
                state.set_abort(attempt, h.abort_handle());
            }
        }
    }

    /// Runs one attempt of a task in a worker process: leases a worker
    /// (an idle one at once, else a new one on the executor), resolves the
    /// arguments here (the owner's store holds them), pushes the spec with
    /// the values inline, and finishes the task on the worker's reader
    /// thread when the outcome comes back.
    fn start_in_process(self: &Arc<Self>, node: Arc<dyn NodeManager<Leased>>, run: Box<TaskRun>) {
        match node.try_lease() {
            Ok(Some(w)) => self.push_task(node, w, run, Lease::Own),
            Ok(None) => {
                let rt = self.clone();
                self.handle.spawn(async move {
                    match node.lease().await {
                        Ok(w) => rt.push_task(node, w, run, Lease::Own),
                        // No worker could be had: said as what it is
                        // (a failed start, no descriptors left), not as
                        // a crash of a worker that never ran the task.
                        Err(e) => rt.finish_task(run, Outcome::NoWorker(e)),
                    }
                });
            }
            Err(e) => self.finish_task(run, Outcome::Failed(e)),
        }
    }

    fn push_task(
        self: &Arc<Self>,
        node: Arc<dyn NodeManager<Leased>>,
        w: Arc<Leased>,
        run: Box<TaskRun>,
        lease: Lease,
    ) {
        let (id, attempt) = (run.state.id, run.attempt);
        let spec = self
            .resolve_values(&run.spec, attempt)
            .and_then(|values| run.spec.to_wire(&values, self.mode.shm()));
        let give_back = move |w: Arc<Leased>| match lease {
            Lease::Own => node.give_back(w),
            Lease::Borrowed => w.share(false),
        };
        let (spec, loan) = match spec {
            Ok(s) if !run.state.is_cancelled() => s,
            Ok(_) => {
                give_back(w);
                self.finish_task(run, Outcome::Failed(Error::TaskCancelled(id)));
                return;
            }
            Err(e) => {
                give_back(w);
                self.finish_task(run, Outcome::Failed(e));
                return;
            }
        };
        let state = run.state.clone();
        let msg = crate::wire::Message::PushTask {
            task_id: id,
            actor: None,
            spec,
            cpu: run.request.get(crate::resources::CPU),
        };
        w.running_cpu(id, Some(run.request.cpu_only()));
        let (rt, leased) = (self.clone(), w.clone());
        w.push_then(
            id,
            &msg,
            loan,
            Box::new(move |r| {
                run.state.clear_remote();
                // A task that ended while blocked (its worker died) takes
                // its lent CPU back before its resources are returned.
                if let Some(cpu) = leased.running_cpu(id, None) {
                    rt.take_back(&cpu);
                }
                let outcome = match r {
                    Ok(o) => {
                        give_back(leased);
                        Outcome::from_wire(o, &rt)
                    }
                    Err(reason) => {
                        if lease == Lease::Borrowed {
                            leased.share(false);
                        }
                        Outcome::Crashed(reason)
                    }
                };
                rt.finish_task(run, outcome);
            }),
        );
        // After the push, so a cancel in between reaches the worker. A
        // forced cancel kills the process only if the task has it alone.
        state.set_remote(attempt, w, lease == Lease::Own);
    }

    /// Produces the argument list of one attempt: through the bytes form
    /// when configured, with reference arguments replaced by their values.
    pub(crate) fn resolve_args(self: &Arc<Self>, spec: &TaskSpec, attempt: u32) -> Result<ArgList> {
        let decoded;
        let spec = if self.bytes_mode {
            let bytes = spec.to_bytes()?;
            decoded = TaskSpec::from_bytes(&bytes, self, &self.registry)?;
            &decoded
        } else {
            spec
        };
        let values = self.resolve_values(spec, attempt)?;
        Ok(ArgList::new(values, self.clone(), spec.target.name()))
    }

    /// The values of a spec's arguments, reference arguments replaced by
    /// their (ready) values.
    pub(crate) fn resolve_values(&self, spec: &TaskSpec, attempt: u32) -> Result<Vec<Value>> {
        let name = spec.target.name();
        let mut values = Vec::with_capacity(spec.args.len());
        for (i, a) in spec.args.iter().enumerate() {
            values.push(match a {
                Arg::Value(v) => v.clone(),
                Arg::Ref(r) => match self.store.peek(r.id(), None)? {
                    Peek::Ready(v) => v,
                    Peek::Failed(cause) => return Err(dependency_failed(spec, i, attempt, cause)),
                    Peek::Pending => {
                        return Err(Error::invalid(format!(
                            "{name}: argument {i} was not ready when the task started"
                        )))
                    }
                },
            });
        }
        Ok(values)
    }

    /// Ends one attempt: returns resources, then retries or completes the
    /// return object.
    pub(crate) fn finish_task(self: &Arc<Self>, mut run: Box<TaskRun>, outcome: Outcome) {
        let cancelled = run.state.is_cancelled();
        let retry = !cancelled
            && attempts_left(run.max_retries, run.attempt)
            && self.check_open().is_ok()
            && outcome.is_retryable(run.retry_exceptions);
        let start = self.sched.release(&run.request);
        if retry {
            tracing::debug!(task = %run.state.id, attempt = run.attempt, "retrying task");
            run.attempt += 1;
            run.state.back_to_waiting();
            self.enqueue(Work::Task(run));
            self.start_all(start);
            return;
        }
        let id = run.state.id;
        let result = if cancelled {
            Err(Error::TaskCancelled(id))
        } else {
            outcome.into_result(run.entry.name, run.spec.name.as_deref(), id, run.attempt)
        };
        // The arguments go before the result is published, so whoever sees
        // the result also sees them released.
        run.spec.args.clear();
        match result {
            Ok(v) => self.publish(id.return_object(), v),
            Err(e) => self.store.complete(id.return_object(), Err(e)),
        }
        run.state.finish();
        self.forget_task(id);
        drop(run);
        self.start_all(start);
    }

    // ----- objects ----------------------------------------------------

    pub(crate) fn put_value(self: &Arc<Self>, v: Value) -> Result<RawRef> {
        self.check_open()?;
        // In a worker process too the object stays here: the owner gets it
        // only if a reference to it leaves the process (`Upstream::share`).
        let (v, size) = self.admit(v)?;
        let id = self.ids.object();
        self.store.insert_ready(id, v, size)?;
        Ok(RawRef::adopt(id, self.clone()))
    }

    fn check_ref(self: &Arc<Self>, raw: &RawRef) -> Result<()> {
        if Arc::ptr_eq(raw.runtime(), self) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "object {} belongs to another runtime",
                raw.id()
            )))
        }
    }

    /// A thread of this process is about to wait for an object. In a worker
    /// process the answer comes as a message: makes sure a thread reads
    /// the connection meanwhile (see `worker::reading`).
    pub(crate) fn will_wait(&self) {
        if let Some(up) = self.mode.upstream() {
            up.reading.claim();
        }
    }

    /// Lets a sync task block (without a deadline) only while a pool
    /// thread is left that is not blocked, to run what it may wait for;
    /// the slot it holds while blocked is returned. Other callers (the
    /// driver, async code, waits with a deadline, which end by themselves)
    /// need none.
    fn may_block(&self, deadline: bool) -> Result<Option<crate::pool::BlockSlot>> {
        if deadline || context::current().is_none_or(|c| c.is_async()) {
            return Ok(None);
        }
        self.pool
            .block_slot()
            .map(Some)
            .map_err(|limit| Error::ThreadLimit { limit })
    }

    /// Runs the task that produces `id` on this thread, if it waits to run
    /// (for resources or for a thread) and this thread may: a pool thread
    /// running a sync task in the threads mode, with stack to spare, whose
    /// CPU covers the task's request. A task blocked on a child that is
    /// still queued so runs the child instead of waiting for a thread to
    /// (as rayon's `join` does), and a recursive tree of tasks needs
    /// threads in proportion to its depth, not its size. Returns whether it
    /// ran the task.
    ///
    /// The child's request moves from the blocked task to it: taken before
    /// the blocked task's CPU is lent back, so nothing else starts on that
    /// CPU meanwhile, and returned when the child ends.
    fn help(self: &Arc<Self>, id: ObjectId) -> bool {
        match &self.mode {
            Mode::Threads => {}
            // A worker process runs its own queued child (see
            // `worker::submit`).
            Mode::Worker(up) => return up.help(self, id),
            Mode::Node(_) => return false,
        }
        let Some(ctx) = context::current() else {
            return false;
        };
        if ctx.is_async() || !crate::pool::has_stack_to_spare() {
            return false;
        }
        let Some(run) = self.take_queued(id, ctx.cpu(), true) else {
            return false;
        };
        let _blocked = context::Blocked::enter(None);
        self.run_task(run);
        true
    }

    /// Takes the task that makes `id` out of the scheduler's queue if it
    /// waits there (near the back) and its request fits in `cpu` (and it
    /// is sync, with `sync_only`), granting it its request.
    fn take_queued(&self, id: ObjectId, cpu: &ResourceSet, sync_only: bool) -> Option<Box<TaskRun>> {
        let task = id.task();
        // Most waits are on a task that runs already: no queue to look in.
        if !self.tasks.lock().get(&task).is_some_and(|s| s.is_waiting()) {
            return None;
        }
        let work = self.sched.take_queued(HELP_SCAN, |w| match w {
            Work::Task(t) => {
                t.state.id == task
                    && t.request.fits_in(cpu)
                    && (!sync_only || matches!(t.entry.body, FunctionBody::Sync(_)))
            }
            Work::Actor(_) | Work::Lease(_) => false,
        })?;
        match work {
            Work::Task(run) => Some(run),
            Work::Actor(_) | Work::Lease(_) => None,
        }
    }

    /// The owner's side of the same rule for a task blocked in worker
    /// process `w`, waiting for `on` with `cpu` to lend: if the task that
    /// makes `on` is still queued and fits in `cpu`, it is pushed to `w`
    /// (which runs it on another thread while the blocked task waits), its
    /// request taken before the blocked task's CPU is lent back. Runs on
    /// `w`'s reader thread.
    pub(crate) fn help_worker(self: &Arc<Self>, on: ObjectId, cpu: &ResourceSet, w: &Arc<Leased>) {
        let Some(node) = self.mode.node().cloned() else {
            return;
        };
        if w.is_dead() {
            return;
        }
        let Some(run) = self.take_queued(on, cpu, false) else {
            return;
        };
        if !run.state.start(run.attempt) {
            self.forget_task(run.state.id);
            self.release(&run.request);
            return;
        }
        // Counted before the reader reads on: the worker is not leased to
        // another task, nor killed by a forced cancel, while this runs.
        w.share(true);
        // The push encodes and writes (maybe a large frame): not on the
        // reader thread, which must never wait on another process.
        let (rt, w) = (self.clone(), w.clone());
        self.handle
            .spawn_blocking(move || rt.push_task(node, w, run, Lease::Borrowed));
    }

    /// Waits for an object's value, lending the current task's CPU back
    /// while it blocks.
    pub(crate) fn get_value(
        self: &Arc<Self>,
        raw: &RawRef,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Value> {
        self.check_ref(raw)?;
        let id = raw.id();
        match self.store.peek(id, None)? {
            Peek::Ready(v) => return Ok(v),
            Peek::Failed(e) => return Err(e),
            Peek::Pending => {}
        }
        // Its task may still wait to run: then it runs here (again, should
        // it fail and be retried), unless the wait has a deadline the task
        // could outlast.
        while deadline.is_none() && self.help(id) {
            match self.store.peek(id, None)? {
                Peek::Ready(v) => return Ok(v),
                Peek::Failed(e) => return Err(e),
                Peek::Pending => {}
            }
        }
        let _slot = self.may_block(deadline.is_some())?;
        self.will_wait();
        // A short wait first: a small task or call on another thread often
        // completes within microseconds, sparing two thread wake-ups.
        let spin_start = Instant::now();
        let spin = deadline.map_or(GET_SPIN, |(at, _)| {
            at.saturating_duration_since(spin_start).min(GET_SPIN)
        });
        while spin_start.elapsed() < spin {
            std::hint::spin_loop();
            match self.store.peek(id, None)? {
                Peek::Ready(v) => return Ok(v),
                Peek::Failed(e) => return Err(e),
                Peek::Pending => {}
            }
        }
        let block = || {
            let _blocked = Blocked::enter(Some(id));
            let waker = ThreadWaker::current();
            loop {
                match self.store.peek(id, Some(&waker))? {
                    Peek::Ready(v) => return Ok(v),
                    Peek::Failed(e) => return Err(e),
                    Peek::Pending => {}
                }
                match deadline {
                    None => std::thread::park(),
                    Some((at, timeout)) => {
                        let now = Instant::now();
                        if now >= at {
                            self.store.forget_waker(id, &waker);
                            return Err(Error::GetTimeout {
                                object_id: id,
                                timeout,
                            });
                        }
                        std::thread::park_timeout(at - now);
                    }
                }
            }
        };
        match context::current() {
            Some(ctx) if ctx.is_async() => tokio::task::block_in_place(block),
            _ => block(),
        }
    }

    /// Ray's `wait`: the first `num_returns` complete objects (in input
    /// order) and the rest, once enough are complete or the timeout passes.
    pub(crate) fn wait_raw<'a>(
        self: &Arc<Self>,
        refs: impl ExactSizeIterator<Item = &'a RawRef>,
        num_returns: usize,
        timeout: Option<Duration>,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        if refs.len() == 0 {
            // As Ray: waiting on nothing returns at once, whatever
            // `num_returns` says.
            return Ok((Vec::new(), Vec::new()));
        }
        if num_returns == 0 || num_returns > refs.len() {
            return Err(Error::invalid(format!(
                "num_returns must be between 1 and the number of refs ({}), got {num_returns}",
                refs.len()
            )));
        }
        let mut ids = Vec::with_capacity(refs.len());
        for r in refs {
            self.check_ref(r)?;
            ids.push(r.id());
        }
        if let Some(dup) = first_duplicate(&ids) {
            return Err(Error::invalid(format!(
                "wait requires unique refs; {dup} appears twice"
            )));
        }
        let ids = &ids[..];
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let split = |waker: Option<&Waker>| -> Result<Option<(Vec<usize>, Vec<usize>)>> {
            let mut ready = Vec::new();
            let mut rest = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let done = !matches!(self.store.peek(*id, waker)?, Peek::Pending);
                if done && ready.len() < num_returns {
                    ready.push(i);
                } else {
                    rest.push(i);
                }
            }
            Ok((ready.len() == num_returns).then_some((ready, rest)))
        };
        // Fast path: one pass over the shards; enough are often complete.
        let done = self.store.completed(ids)?;
        if done.iter().filter(|d| **d).count() >= num_returns {
            let mut ready = Vec::with_capacity(num_returns);
            let mut rest = Vec::with_capacity(ids.len() - num_returns);
            for (i, d) in done.into_iter().enumerate() {
                if d && ready.len() < num_returns {
                    ready.push(i);
                } else {
                    rest.push(i);
                }
            }
            return Ok((ready, rest));
        }
        // Tasks among them that still wait to run may run here, in order,
        // until enough are complete.
        let mut complete = done.iter().filter(|d| **d).count();
        let may_help = timeout.is_none()
            && matches!(self.mode, Mode::Threads)
            && context::current().is_some_and(|c| !c.is_async());
        for (&id, was_done) in ids.iter().zip(&done).filter(|_| may_help) {
            if complete >= num_returns {
                break;
            }
            if !was_done && self.help(id) && self.store.is_complete(id) {
                complete += 1;
            }
        }
        let _slot = if complete < num_returns {
            self.may_block(timeout.is_some())?
        } else {
            None
        };
        // The first object still pending is the one a worker's owner may
        // make here (see `Blocked`).
        let first_pending = ids.iter().zip(&done).find(|(_, d)| !**d).map(|(id, _)| *id);
        self.will_wait();
        let run = || {
            let _blocked = Blocked::enter(first_pending);
            let waker = ThreadWaker::current();
            loop {
                if let Some(out) = split(Some(&waker))? {
                    for id in ids {
                        self.store.forget_waker(*id, &waker);
                    }
                    return Ok(out);
                }
                match deadline {
                    None => std::thread::park(),
                    Some(at) => {
                        let now = Instant::now();
                        if now >= at {
                            for id in ids {
                                self.store.forget_waker(*id, &waker);
                            }
                            let mut ready = Vec::new();
                            let mut rest = Vec::new();
                            for (i, id) in ids.iter().enumerate() {
                                if self.store.is_complete(*id) && ready.len() < num_returns {
                                    ready.push(i);
                                } else {
                                    rest.push(i);
                                }
                            }
                            return Ok((ready, rest));
                        }
                        std::thread::park_timeout(at - now);
                    }
                }
            }
        };
        match context::current() {
            Some(ctx) if ctx.is_async() => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    // ----- cancellation -----------------------------------------------

    pub(crate) fn cancel(self: &Arc<Self>, id: ObjectId, opts: CancelOptions) -> Result<()> {
        let state = self.tasks.lock().get(&id.task()).cloned();
        if let Some(state) = state {
            self.cancel_state(&state, opts.recursive, opts.force);
        }
        Ok(())
    }

    fn cancel_state(self: &Arc<Self>, state: &Arc<TaskState>, recursive: bool, force: bool) {
        if state.mark_cancelled() {
            return;
        }
        state.abort_running();
        state.cancel_remote(force);
        if let Some(up) = self.mode.upstream() {
            up.cancel(self, state.id, force);
        }
        self.store
            .complete(state.id.return_object(), Err(Error::TaskCancelled(state.id)));
        if recursive {
            for child in state.children() {
                self.cancel_state(&child, true, force);
            }
        }
    }

    // ----- shutdown ---------------------------------------------------

    /// Shuts down a runtime a unit test started without a `Ray` handle.
    #[cfg(test)]
    pub(crate) fn shutdown_for_tests(self: &Arc<Self>) {
        self.shutdown_now();
    }

    fn shutdown_now(self: &Arc<Self>) {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            // Another thread is shutting down: wait for it to finish, unless
            // this is one of the runtime's own threads (which it joins).
            let own_thread = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with(&self.thread_prefix));
            if !own_thread {
                let (done, cv) = &self.shutdown_done;
                let mut done = done.lock();
                while !*done {
                    cv.wait(&mut done);
                }
            }
            return;
        }
        tracing::debug!(runtime = %self.thread_prefix, "shutting down");
        // 1. Drop queued work.
        let queued = self.sched.close();
        drop(queued);
        // 2. Cancel running tasks.
        let running: Vec<_> = self.tasks.lock().drain().map(|(_, s)| s).collect();
        for s in &running {
            s.mark_cancelled();
            s.abort_running();
        }
        drop(running);
        // 3. Stop actors, then the worker processes.
        actor::shut_down_all(self);
        if let Some(node) = self.mode.node() {
            node.shut_down();
        }
        // 4. Fail pending objects, wake readers, free values.
        self.store.shut_down();
        // 5. Join the pool's threads.
        self.pool.shut_down();
        // 6. Stop the executor and join its threads.
        if let Some(exec) = self.executor.lock().take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                exec.shutdown_background();
            } else {
                exec.shutdown_timeout(Duration::from_secs(10));
            }
        }
        // Values completed while stopping are freed too.
        self.store.shut_down();
        actor::shut_down_all(self);
        if let Some(node) = self.mode.node() {
            node.close();
        }
        let (done, cv) = &self.shutdown_done;
        *done.lock() = true;
        cv.notify_all();
    }
}

/// Finishes an async task that is dropped before it completes (aborted by
/// `cancel`, or dropped at shutdown).
struct AsyncTaskGuard {
    rt: Arc<Inner>,
    run: Option<Box<TaskRun>>,
}

impl Drop for AsyncTaskGuard {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            let id = run.state.id;
            self.rt
                .finish_task(run, Outcome::Failed(Error::TaskCancelled(id)));
        }
    }
}

pub(crate) fn ref_ids(args: &[Arg]) -> Vec<ObjectId> {
    let mut ids: Vec<ObjectId> = args
        .iter()
        .filter_map(|a| match a {
            Arg::Ref(r) => Some(r.id()),
            Arg::Value(_) => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl Ray {
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// A handle that does not keep the runtime up.
    pub(crate) fn non_owning(inner: Arc<Inner>) -> Ray {
        Ray { inner, _owner: None }
    }

    /// Stores a value and returns a reference to it (Ray's `ray.put`).
    /// Waits for room when the store is full; fails with
    /// [`Error::ObjectStoreFull`] after the configured timeout.
    pub fn put<T: Data>(&self, value: T) -> Result<ObjectRef<T>> {
        let v = self.inner.make_value(value)?;
        Ok(self.inner.put_value(v)?.typed())
    }

    /// Stores a copy of `value`, keeping the original (what Ray's `put`
    /// does). Large plain-data vectors (`Vec<u8>`, `Vec<i64>`, `Vec<f64>`,
    /// ...) are copied into a buffer recycled from a freed object when one
    /// is kept, which avoids faulting in fresh memory.
    pub fn put_copy<T: Data + Clone>(&self, value: &T) -> Result<ObjectRef<T>> {
        // A large value of the worker-process mode is written straight
        // into shared memory: its only copy.
        if let Some(node) = self.inner.mode.shm() {
            if let Some(object) = node.store_borrowed(value)? {
                self.inner.check_open()?;
                let v = Value::from_stored(object, std::any::type_name::<T>());
                let id = self.inner.ids.object();
                self.inner.store.insert_ready(id, v, 0)?;
                return Ok(RawRef::adopt(id, self.inner.clone()).typed());
            }
        }
        let copy = crate::codec::recycled_copy(value, &self.inner.store).unwrap_or_else(|| value.clone());
        self.put(copy)
    }

    /// Waits for an object and returns a copy of its value (Ray's
    /// `ray.get`). Inside a task, the task's CPU is lent back while it
    /// waits.
    pub fn get<T: Data>(&self, r: &ObjectRef<T>) -> Result<T> {
        self.inner.get_value(r.raw(), None)?.take(&self.inner)
    }

    /// `get` with a timeout: [`Error::GetTimeout`] if the object is not
    /// ready in time.
    pub fn get_timeout<T: Data>(&self, r: &ObjectRef<T>, timeout: Duration) -> Result<T> {
        self.inner
            .get_value(r.raw(), deadline_after(timeout))?
            .take(&self.inner)
    }

    /// Gets several objects, in order. Fails with the first error.
    pub fn get_many<T: Data>(&self, refs: &[ObjectRef<T>]) -> Result<Vec<T>> {
        refs.iter().map(|r| self.get(r)).collect()
    }

    /// `get_many` with one timeout for all.
    pub fn get_many_timeout<T: Data>(&self, refs: &[ObjectRef<T>], timeout: Duration) -> Result<Vec<T>> {
        let deadline = deadline_after(timeout);
        refs.iter()
            .map(|r| self.inner.get_value(r.raw(), deadline)?.take(&self.inner))
            .collect()
    }

    /// Ray's `ray.wait`: returns `(ready, not_ready)` once `num_returns`
    /// of `refs` are complete (values or errors) or `timeout` passes. Both
    /// lists keep the input order; `ready` holds at most `num_returns`.
    /// `refs` must be unique and `1 <= num_returns <= refs.len()`; an empty
    /// `refs` returns `([], [])` at once, as in Ray.
    pub fn wait<T>(
        &self,
        refs: &[ObjectRef<T>],
        num_returns: usize,
        timeout: Option<Duration>,
    ) -> Result<WaitResult<T>> {
        let (ready, rest) = self
            .inner
            .wait_raw(refs.iter().map(ObjectRef::raw), num_returns, timeout)?;
        Ok((
            ready.into_iter().map(|i| refs[i].clone()).collect(),
            rest.into_iter().map(|i| refs[i].clone()).collect(),
        ))
    }

    /// Cancels the task that produces `r` and, recursively, the tasks it
    /// submitted (Ray's `ray.cancel` with its defaults). Queued tasks never
    /// run, running async tasks are aborted at their next await, running
    /// sync tasks see [`is_cancelled`]; `get` then fails with
    /// [`Error::TaskCancelled`]. Finished tasks and `put` objects are not
    /// affected.
    pub fn cancel<T>(&self, r: &ObjectRef<T>) -> Result<()> {
        self.cancel_with(r, CancelOptions::default())
    }

    /// `cancel` with explicit [`CancelOptions`].
    pub fn cancel_with<T>(&self, r: &ObjectRef<T>, opts: CancelOptions) -> Result<()> {
        self.inner.check_ref(r.raw())?;
        self.inner.cancel(r.id(), opts)
    }

    /// Counters of the object store.
    pub fn store_stats(&self) -> StoreStats {
        self.inner.store.stats()
    }

    /// The node's total resources.
    pub fn cluster_resources(&self) -> ResourceSet {
        self.inner.sched.total().clone()
    }

    /// The resources not held by running tasks and actors.
    pub fn available_resources(&self) -> ResourceSet {
        self.inner.sched.available()
    }

    /// The registry index this runtime uses.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Threads of the worker pool alive now.
    pub fn pool_threads(&self) -> usize {
        self.inner.pool.live_threads()
    }

    /// The prefix of every thread this runtime starts (`rrXXXXXX-w` for
    /// workers, `rrXXXXXX-a` for the async executor).
    pub fn thread_prefix(&self) -> &str {
        &self.inner.thread_prefix
    }

    /// The node's shared-memory store, in the worker-process mode: its
    /// use, and what it spilled and restored.
    pub fn shared_store_stats(&self) -> Option<SharedStoreStats> {
        self.inner.mode.shm().map(|s| s.store.stats())
    }

    /// The process ids of the node's live worker processes (empty in the
    /// threads mode).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.inner.mode.node().map(|n| n.live()).unwrap_or_default()
    }

    /// The node's session directory (Ray's `session_*` folder): spill files
    /// and worker logs live under it unless [`Config::spill_dir`] and
    /// [`Config::log_dir`] put them elsewhere. `None` in the threads mode,
    /// which writes nothing to disk. A session whose process died is
    /// removed by the next runtime that starts on the machine.
    pub fn session_dir(&self) -> Option<&std::path::Path> {
        self.inner.mode.session_dir()
    }

    /// The directory of the worker processes' log files (see
    /// [`Config::log_dir`]); `None` in the threads mode, where tasks print
    /// straight to the driver's own output.
    pub fn log_dir(&self) -> Option<&std::path::Path> {
        self.inner.mode.log_dir()
    }

    /// Whether values go through their bytes form (see
    /// [`Config::serialize_everything`]).
    pub fn serializes_everything(&self) -> bool {
        self.inner.bytes_mode
    }

    /// Shuts the runtime down (see the module docs for the order). Later
    /// calls on this runtime fail with [`Error::Shutdown`]. Cannot be called
    /// from inside a task.
    pub fn shutdown(&self) -> Result<()> {
        if context::current().is_some() {
            return Err(Error::invalid(
                "shutdown cannot be called from inside a task or actor call",
            ));
        }
        self.inner.shutdown_now();
        Ok(())
    }

    /// Whether the runtime has shut down.
    pub fn is_shut_down(&self) -> bool {
        self.inner.check_open().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::first_duplicate;
    use crate::ids::ObjectId;

    fn id(owner: u64, n: u64) -> ObjectId {
        ObjectId::from_u128((u128::from(owner) << 64) | u128::from(n))
    }

    #[test]
    fn duplicates_are_found_on_both_paths() {
        // Close together: the bitmap path.
        let dense: Vec<_> = (100..200).map(|n| id(7, n)).collect();
        assert_eq!(first_duplicate(&dense), None);
        let mut with_dup = dense.clone();
        with_dup.push(id(7, 150));
        assert_eq!(first_duplicate(&with_dup), Some(id(7, 150)));
        // Far apart or from two owners: the hash path.
        let sparse = vec![id(7, 1), id(7, 1 << 40), id(8, 1)];
        assert_eq!(first_duplicate(&sparse), None);
        let sparse_dup = vec![id(7, 1), id(8, 1), id(7, 1 << 40), id(8, 1)];
        assert_eq!(first_duplicate(&sparse_dup), Some(id(8, 1)));
        assert_eq!(first_duplicate(&[]), None);
    }
}
