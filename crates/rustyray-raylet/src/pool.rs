//! The node daemon's worker-process pool — Ray's raylet `WorkerPool`.
//!
//! # Design
//!
//! In the worker-process mode the driver hosts the node daemon: a
//! listening Unix socket in the abstract namespace (nothing on the file
//! system to leave behind), a random token, and a pool of worker
//! processes. A worker process is the user's own executable started again
//! with the socket's name and the token in its environment;
//! `rustyray::worker_entry` at the top of its `main` connects back, and the
//! handshake routes the connection to the start that is waiting for that
//! process id.
//!
//! The pool is started ahead of time (one worker per CPU), and a worker is
//! leased for one task at a time and handed back when the task is done, so
//! consecutive tasks reuse warm processes. The owner's scheduler has
//! already reserved the task's resources when it asks for a lease; a lease
//! with no idle worker starts a new one.
//!
//! Each worker, once connected, gets its owner's peer
//! ([`OwnerService::attach`]); a lease hands the owner that peer. The node
//! keeps the worker's connection and its shared-memory side (allocations
//! for large results, `CreateObject`; pins, `Unpin`; sealing what the
//! worker wrote) and passes every other message to the peer
//! ([`WorkerPeer::handle`]), on the worker's reader thread.
//!
//! # State and locks
//!
//! `Pool::state` (one mutex) holds the idle workers, every live worker by
//! process id, and the starts waiting for their connection. Each
//! [`WorkerProc`] has its own locks: `out` (the connection's writing side;
//! a frame is written whole under it, by the thread that sends it),
//! `pins` and `writers` (what it holds in shared memory), and its `Child`.
//! Each worker has a reader thread that owns the reading side; no lock is
//! held while a handler runs, and nothing is held across an await.
//!
//! # Failure
//!
//! A worker's death shows as its connection ending: the reader marks it
//! dead, reaps the process, releases what it held in shared memory, then
//! tells the owner ([`WorkerPeer::lost`]), which fails every task in
//! flight on it (retried per `max_retries`, else `WorkerCrashed`). A
//! worker that exits before connecting fails the lease with an error that
//! names its exit status. Shutdown kills and reaps every worker; a driver
//! that dies without shutting down closes the workers' connections, and
//! each worker exits when it sees its connection end.

use crate::session::Session;
use crate::worker_logs::WorkerLogs;
use parking_lot::Mutex;
use rustyray_common::error::{Error, Result};
use rustyray_common::options::WorkerCommand;
use rustyray_proto::env::{
    ARENA as ARENA_ENV, SHM_THRESHOLD as THRESHOLD_ENV, WORKER_SOCKET as WORKER_ENV,
    WORKER_TOKEN as TOKEN_ENV,
};
use rustyray_proto::service::{BoxFuture, NodeManager, OwnerService, WorkerLink, WorkerPeer};
use rustyray_proto::{self as wire, FrameDecoder, Message, Role, WireOutcome};
use rustyray_shm::ShmStore;
use rustyray_transport::{Address, Conn, Listener};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a new worker process may take to connect.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a start checks whether its process already exited.
const STARTUP_CHECK: Duration = Duration::from_millis(10);

/// The largest frame a connection may send before its handshake is done
/// (a `Hello` is under 100 bytes), so no one can make the node buffer a
/// large frame without the token.
const HELLO_MAX: u32 = 256;

/// What a connection that has not finished its handshake may cost.
#[derive(Debug, Clone, Copy)]
struct HandshakeLimits {
    /// How long it may take before it is closed.
    timeout: Duration,
    /// How many may be in their handshake at once; more are closed as they
    /// arrive.
    max: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: Duration::from_secs(10),
            max: 64,
        }
    }
}

/// How long shutdown waits for the last output of the workers it stopped
/// (longer only when a process a worker started keeps the output open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// A worker connection's writing side.
struct Out {
    stream: Conn,
    /// Whole frames held back by a corked thread, sent before any later
    /// frame.
    held: Vec<u8>,
}

impl Out {
    /// Writes the held frames.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let written = std::io::Write::write_all(&mut self.stream, &self.held);
        self.held.clear();
        written
    }
}

/// Write coalescing on a worker's reader thread.
///
/// A reader that finds several messages in one read answers each of them
/// with a frame or two to other workers (a relayed actor call, a result
/// going back to its caller). Sent one by one, every frame costs a system
/// call here and a wake-up and a read on the other side. While a reader
/// handles messages it has already read, its frames are held back per
/// worker instead, and sent when it runs out of messages and is about to
/// read again: one write per worker per batch. Other threads never hold
/// frames back, and a frame they write goes after the held ones, so every
/// connection keeps its order.
///
/// Only handlers that never wait on another process run corked (the
/// reader flushes before any other; a result or put that finds no room in
/// the owner's store waits on the blocking pool, see `rustyray_proto::service::on_reader`), so a
/// held frame can never be one that a wait depends on.
mod cork {
    use super::WorkerProc;
    use std::cell::RefCell;
    use std::sync::{Arc, Weak};

    /// Bytes held back for one worker before they are sent anyway.
    pub(super) const HOLD_MAX: usize = 64 * 1024;

    /// The workers a corked thread holds frames for. Dropping it sends
    /// them, so a thread that unwinds (a handler panicked) or ends still
    /// sends what it held.
    struct Held(Vec<Arc<WorkerProc>>);

    impl Drop for Held {
        fn drop(&mut self) {
            for w in self.0.drain(..) {
                w.flush();
            }
        }
    }

    thread_local! {
        /// `Some` while this thread is corked.
        static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
    }

    /// Starts holding this thread's frames back (until [`flush`]).
    pub(super) fn start() {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if h.is_none() {
                *h = Some(Held(Vec::new()));
            }
        });
    }

    /// Whether a frame for `w` is to be held back: this thread is corked
    /// (and `w` is recorded for the flush when it holds nothing yet).
    pub(super) fn hold(w: &Weak<WorkerProc>, first: bool) -> bool {
        HELD.with(|h| match h.try_borrow_mut().as_deref_mut() {
            Ok(Some(held)) => {
                if first {
                    match w.upgrade() {
                        Some(w) => held.0.push(w),
                        None => return false,
                    }
                }
                true
            }
            _ => false,
        })
    }

    /// Sends every frame this thread held back and stops holding.
    pub(super) fn flush() {
        // Taken out first: flushing writes, and a write asks `hold`.
        let held = HELD.with(|h| h.borrow_mut().take());
        drop(held);
    }
}

/// One worker process and its connection.
pub(crate) struct WorkerProc {
    pid: u32,
    child: Mutex<Option<Child>>,
    /// The connection's writing side: frames are written whole, by the
    /// thread that sends them, or held back while a reader thread is
    /// corked (see [`cork`]).
    out: Mutex<Out>,
    /// This worker, for a corked thread to find it again when it flushes.
    me: std::sync::Weak<WorkerProc>,
    /// The thread reading the worker's messages.
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
    dead: AtomicBool,
    /// Set once the worker's death has been handled: every task in flight
    /// on it has run its completion.
    ended: AtomicBool,
    /// Tasks pushed here to share the process with a task blocked in it
    /// (see `Inner::help_worker`): while any runs, the worker is not leased
    /// to another task and a forced cancel does not kill it.
    shared_tasks: std::sync::atomic::AtomicUsize,
    /// Woken when the worker is found dead, and again when it has ended.
    died: tokio::sync::Notify,
    /// Shared-memory objects pinned for this worker, with their counts;
    /// `None` once the worker is gone and its pins were released.
    pins: Mutex<Option<HashMap<u128, u32>>>,
    /// Allocations this worker is writing large results into.
    writers: Mutex<HashMap<u128, rustyray_shm::Writer>>,
}

impl std::fmt::Debug for WorkerProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProc")
            .field("pid", &self.pid)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl WorkerProc {
    /// Worker process `pid` (`child`, when this process started it),
    /// whose messages go out on `stream`.
    fn new(pid: u32, child: Option<Child>, stream: Conn) -> Arc<Self> {
        Arc::new_cyclic(|me| WorkerProc {
            pid,
            child: Mutex::new(child),
            out: Mutex::new(Out {
                stream,
                held: Vec::new(),
            }),
            me: me.clone(),
            reader: Mutex::new(None),
            dead: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            shared_tasks: std::sync::atomic::AtomicUsize::new(0),
            died: tokio::sync::Notify::new(),
            pins: Mutex::new(Some(HashMap::new())),
            writers: Mutex::new(HashMap::new()),
        })
    }

    /// Writes one message. A failed write condemns the worker (see
    /// [`Self::write_failed`]); a message too large to send is refused
    /// whole (`false`).
    fn send(&self, msg: &Message) -> bool {
        match self.frame(msg) {
            Some(frame) => {
                self.write(&frame);
                true
            }
            None => false,
        }
    }

    /// A message's frame; `None` (logged) when it cannot be sent, e.g. it
    /// is over the size limit.
    fn frame(&self, msg: &Message) -> Option<Vec<u8>> {
        wire::encode_frame(msg)
            .map_err(
                |e| tracing::warn!(pid = self.pid, error = %e, "cannot send a message to a worker process"),
            )
            .ok()
    }

    /// Writes a frame whole, after any frames held back before it; on a
    /// corked thread it is held back too. A failed write condemns the
    /// worker (see [`Self::write_failed`]).
    fn write(&self, frame: &[u8]) {
        failpoint!("node::send", |_| self
            .write_failed(&std::io::Error::other("failpoint node::send")));
        let mut out = self.out.lock();
        let small = frame.len() < cork::HOLD_MAX;
        if small && out.held.len() < cork::HOLD_MAX && cork::hold(&self.me, out.held.is_empty()) {
            out.held.extend_from_slice(frame);
            return;
        }
        let written = if small && !out.held.is_empty() {
            // One write for both.
            out.held.extend_from_slice(frame);
            out.flush()
        } else {
            // A large frame is never copied into the held bytes.
            out.flush()
                .and_then(|()| std::io::Write::write_all(&mut out.stream, frame))
        };
        drop(out);
        if let Err(e) = written {
            self.write_failed(&e);
        }
    }

    /// Writes the frames held back for this worker.
    fn flush(&self) {
        let flushed = self.out.lock().flush();
        if let Err(e) = flushed {
            self.write_failed(&e);
        }
    }

    /// A frame could not be written: the worker's state is unknown from
    /// here on (it may never see a task it was sent), so it is treated as
    /// dead and killed, and what it ran is failed or retried.
    fn write_failed(&self, e: &std::io::Error) {
        if !self.is_dead() {
            tracing::warn!(pid = self.pid, error = %e, "cannot write to worker process; killing it");
        }
        self.condemn();
    }

    /// Whether the worker is known to be dead.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Counts a task that shares the process with a task blocked in it
    /// (`true`), or its end (`false`).
    pub(crate) fn share(&self, begins: bool) {
        if begins {
            self.shared_tasks.fetch_add(1, Ordering::AcqRel);
        } else {
            self.shared_tasks.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits until the worker's death has been handled: every task that
    /// was in flight on it has run its completion (its outcomes read before
    /// the connection ended, the rest failed).
    pub(crate) async fn ended(&self) {
        loop {
            let died = self.died.notified();
            tokio::pin!(died);
            died.as_mut().enable();
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            died.await;
        }
    }

    /// Marks the worker's death as handled and wakes who waits for it.
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.died.notify_waiters();
    }

    /// Treats the worker as dead from now on (it reported a crash and is
    /// exiting) and kills it: nothing more is sent to it, and whoever
    /// watches it learns at once.
    pub(crate) fn condemn(&self) {
        self.dead.store(true, Ordering::Release);
        self.died.notify_waiters();
        self.kill();
    }

    /// Kills the process (SIGKILL); its connection ends, which fails what
    /// it was running.
    pub(crate) fn kill(&self) {
        if let Some(c) = self.child.lock().as_mut() {
            let _ = c.kill();
        }
    }

    /// Releases what the worker held in shared memory: its pins, and the
    /// allocations of results it did not finish.
    fn release_shared(&self, store: &ShmStore) {
        let pins = self.pins.lock().take().unwrap_or_default();
        for (id, n) in pins {
            for _ in 0..n {
                let _ = store.unpin(id);
            }
        }
        self.writers.lock().clear();
    }

    /// Kills the process if it still runs and waits for it to be gone.
    fn reap(&self) {
        let child = self.child.lock().take();
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl WorkerLink for WorkerProc {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn write(&self, frame: &[u8]) {
        WorkerProc::write(self, frame);
    }

    fn hold_pins(&self, ids: Vec<u128>) -> std::result::Result<(), Vec<u128>> {
        // Under the lock `release_shared` empties for good: pins for a
        // worker already gone go back to the caller.
        let mut held = self.pins.lock();
        let Some(held) = held.as_mut() else {
            return Err(ids);
        };
        for id in ids {
            *held.entry(id).or_insert(0) += 1;
        }
        Ok(())
    }

    fn is_dead(&self) -> bool {
        WorkerProc::is_dead(self)
    }

    fn share(&self, begins: bool) {
        WorkerProc::share(self, begins);
    }

    fn is_shared(&self) -> bool {
        self.shared_tasks.load(Ordering::Acquire) > 0
    }

    fn kill(&self) {
        WorkerProc::kill(self);
    }

    fn condemn(&self) {
        WorkerProc::condemn(self);
    }

    fn ended(&self) -> BoxFuture<'_, ()> {
        Box::pin(WorkerProc::ended(self))
    }
}

/// A started worker's two connections: the one the node writes to it
/// (`down`), and the one it writes to the node (`up`, with its decoder).
struct Connection {
    down: Conn,
    up: Conn,
    up_dec: FrameDecoder,
}

/// A start waiting for its worker's two connections.
struct Starting {
    done: oneshot::Sender<Result<Connection>>,
    down: Option<Conn>,
    up: Option<(Conn, FrameDecoder)>,
}

/// A live worker: its process and connection, and its owner's peer.
struct Worker<P> {
    proc: Arc<WorkerProc>,
    peer: Arc<P>,
}

impl<P> Clone for Worker<P> {
    fn clone(&self) -> Self {
        Worker {
            proc: self.proc.clone(),
            peer: self.peer.clone(),
        }
    }
}

struct PoolState<P> {
    idle: Vec<Worker<P>>,
    live: HashMap<u32, Worker<P>>,
    starting: HashMap<u32, Starting>,
    closed: bool,
}

impl<P> Default for PoolState<P> {
    fn default() -> Self {
        PoolState {
            idle: Vec::new(),
            live: HashMap::new(),
            starting: HashMap::new(),
            closed: false,
        }
    }
}

/// The node daemon's pool of worker processes, working for owner `O`.
pub struct Pool<O: OwnerService> {
    name: String,
    token: u128,
    command: WorkerCommand,
    /// The node's shared-memory store, whose arena every worker maps.
    store: Arc<ShmStore>,
    /// Values at least this large go to shared memory (the workers are
    /// told, in their environment).
    threshold: usize,
    state: Mutex<PoolState<O::Peer>>,
    /// Names the reader threads after the runtime.
    thread_name: String,
    /// Whom the workers' tasks belong to.
    owner: Arc<O>,
    /// Where the workers' output goes.
    logs: WorkerLogs,
    /// The session directory holding the node's spill files and logs
    /// (unless both were given elsewhere).
    session: Option<Session>,
    /// Bounds on connections in their handshake (tests shorten them).
    limits: Mutex<HandshakeLimits>,
    /// This pool, for the futures a lease returns.
    me: std::sync::Weak<Pool<O>>,
}

impl<O: OwnerService> std::fmt::Debug for Pool<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Pool")
            .field("socket", &self.name)
            .field("live", &s.live.len())
            .field("idle", &s.idle.len())
            .finish_non_exhaustive()
    }
}

/// How a pool is set up (see [`Pool::start`]).
pub(crate) struct PoolSetup<O> {
    pub(crate) command: WorkerCommand,
    pub(crate) prestart: usize,
    pub(crate) token: u128,
    pub(crate) store: Arc<ShmStore>,
    pub(crate) threshold: usize,
    pub(crate) thread_name: String,
    pub(crate) owner: Arc<O>,
    pub(crate) logs: WorkerLogs,
    pub(crate) session: Option<Session>,
}

impl<O: OwnerService> Pool<O> {
    /// Binds the daemon's socket and starts `prestart` workers in the
    /// background.
    pub(crate) fn start(setup: PoolSetup<O>, handle: &tokio::runtime::Handle) -> Result<Arc<Self>> {
        // The name is visible to every local user (`/proc/net/unix`), so it
        // is random on its own: nothing in it says anything of the token.
        let name = format!(
            "rustyray-{}-{:032x}",
            std::process::id(),
            rustyray_common::ids::random_token()
        );
        let listener = {
            let _enter = handle.enter();
            Listener::bind(&Address::Unix(name.clone()))
                .map_err(|e| Error::from_io("binding the node socket", &e))?
        };
        let PoolSetup {
            command,
            prestart,
            token,
            store,
            threshold,
            thread_name,
            owner,
            logs,
            session,
        } = setup;
        let pool = Arc::new_cyclic(|me| Pool {
            name,
            token,
            command,
            store,
            threshold,
            state: Mutex::new(PoolState::default()),
            thread_name,
            owner,
            logs,
            session,
            limits: Mutex::new(HandshakeLimits::default()),
            me: me.clone(),
        });
        handle.spawn(accept_loop(Arc::downgrade(&pool), listener, token));
        for _ in 0..prestart {
            let p = pool.clone();
            handle.spawn(async move {
                match p.spawn_worker().await {
                    Ok(w) => p.put_back(w),
                    Err(e) => tracing::warn!(error = %e, "could not prestart a worker process"),
                }
            });
        }
        Ok(pool)
    }

    /// Leases a worker: an idle one, else a new one.
    async fn lease_worker(self: Arc<Self>) -> Result<Arc<O::Peer>> {
        match self.try_lease_worker()? {
            Some(w) => Ok(w.peer),
            None => self.spawn_worker().await.map(|w| w.peer),
        }
    }

    /// Leases an idle worker, if one is.
    fn try_lease_worker(&self) -> Result<Option<Worker<O::Peer>>> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(Error::Shutdown);
        }
        // A worker still running a task it shares is kept for later.
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(w) = s.idle.pop() {
            if w.proc.is_dead() {
                continue;
            }
            if w.proc.shared_tasks.load(Ordering::Acquire) > 0 {
                busy.push(w);
                continue;
            }
            found = Some(w);
            break;
        }
        s.idle.extend(busy);
        Ok(found)
    }

    /// Returns a worker to the idle ones.
    fn put_back(&self, w: Worker<O::Peer>) {
        let mut s = self.state.lock();
        if !s.closed && !w.proc.dead.load(Ordering::Acquire) {
            s.idle.push(w);
        }
    }

    /// Starts a worker process and waits for it to connect.
    async fn spawn_worker(self: &Arc<Self>) -> Result<Worker<O::Peer>> {
        failpoint!("node::spawn", |_| Err(Error::OutOfDescriptors(
            "starting a worker process (failpoint node::spawn)".to_owned()
        )));
        let mut cmd = Command::new(&self.command.program);
        cmd.args(&self.command.args)
            .env(WORKER_ENV, &self.name)
            .env(TOKEN_ENV, format!("{:032x}", self.token))
            .env(THRESHOLD_ENV, self.threshold.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        rustyray_shm::inherit_arena(&mut cmd, self.store.arena(), ARENA_ENV)
            .map_err(|e| Error::WorkerStart(format!("cannot hand the arena to a worker: {e}")))?;
        let (tx, mut rx) = oneshot::channel();
        // The start registers before the process exists, under the lock,
        // so its connection cannot arrive first.
        let mut child = {
            let mut s = self.state.lock();
            if s.closed {
                return Err(Error::Shutdown);
            }
            let child = cmd.spawn().map_err(|e| {
                let what = format!("starting worker process {}", self.command.program.display());
                match Error::from_io(what, &e) {
                    e @ Error::OutOfDescriptors(_) => e,
                    _ => Error::WorkerStart(format!("{}: {e}", self.command.program.display())),
                }
            })?;
            s.starting.insert(
                child.id(),
                Starting {
                    done: tx,
                    down: None,
                    up: None,
                },
            );
            child
        };
        let pid = child.id();
        if let Err(e) = self.logs.follow(pid, &mut child) {
            self.state.lock().starting.remove(&pid);
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::WorkerStart(format!(
                "cannot start a thread for the output of worker process {pid}: {e}"
            )));
        }
        let began = Instant::now();
        let conn = loop {
            tokio::select! {
                c = &mut rx => break c.map_err(|_| Error::Shutdown).and_then(|c| c),
                () = tokio::time::sleep(STARTUP_CHECK) => {
                    let exited = match child.try_wait() {
                        Ok(Some(status)) => Some(Error::WorkerStart(format!(
                            "worker process {pid} exited before connecting ({status}); \
                             does its main call rustyray::worker_entry() first?"
                        ))),
                        Ok(None) if began.elapsed() > STARTUP_TIMEOUT => Some(Error::WorkerStart(
                            format!("worker process {pid} did not connect within {STARTUP_TIMEOUT:?}"),
                        )),
                        Ok(None) => None,
                        Err(e) => Some(Error::from_io(format!("watching worker process {pid}"), &e)),
                    };
                    if let Some(reason) = exited {
                        break Err(reason);
                    }
                }
            }
        };
        let Connection {
            down: stream,
            up: mut rd,
            up_dec: dec,
        } = match conn {
            Ok(c) => c,
            Err(e) => {
                self.state.lock().starting.remove(&pid);
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let proc = WorkerProc::new(pid, Some(child), stream);
        let peer = self.owner.attach(proc.clone());
        let w = Worker { proc, peer };
        {
            let mut s = self.state.lock();
            if s.closed {
                drop(s);
                w.proc.reap();
                w.peer.discard();
                return Err(Error::Shutdown);
            }
            s.live.insert(pid, w.clone());
        }
        let (pool, w2) = (self.me.clone(), w.clone());
        let reader = std::thread::Builder::new()
            .name(self.thread_name.clone())
            .spawn(move || read_loop(&pool, &w2, &mut rd, dec));
        match reader {
            Ok(h) => *w.proc.reader.lock() = Some(h),
            Err(e) => {
                self.lost(&w, &format!("no reader thread: {e}"));
                return Err(Error::WorkerStart(format!("cannot start a reader thread: {e}")));
            }
        }
        tracing::debug!(pid, "worker process connected");
        Ok(w)
    }

    /// Forgets a worker whose connection ended, reaps it, and tells its
    /// owner.
    fn lost(&self, w: &Worker<O::Peer>, why: &str) {
        w.proc.dead.store(true, Ordering::Release);
        w.proc.died.notify_waiters();
        {
            let mut s = self.state.lock();
            s.live.remove(&w.proc.pid);
            s.idle.retain(|i| !Arc::ptr_eq(&i.proc, &w.proc));
        }
        // The process goes first: only then may what it held in shared
        // memory be reused.
        w.proc.reap();
        w.proc.release_shared(&self.store);
        w.peer.lost(why);
        w.proc.end();
    }

    /// The session directory, unless spill files and logs were both given
    /// elsewhere.
    pub(crate) fn session_dir(&self) -> Option<&Path> {
        self.session.as_ref().map(Session::dir)
    }
}

impl<O: OwnerService> NodeManager<O::Peer> for Pool<O> {
    fn try_lease(&self) -> Result<Option<Arc<O::Peer>>> {
        Ok(self.try_lease_worker()?.map(|w| w.peer))
    }

    fn lease(&self) -> BoxFuture<'static, Result<Arc<O::Peer>>> {
        let me = self.me.upgrade();
        Box::pin(async move {
            match me {
                Some(pool) => pool.lease_worker().await,
                None => Err(Error::Shutdown),
            }
        })
    }

    fn give_back(&self, peer: Arc<O::Peer>) {
        let mut s = self.state.lock();
        if s.closed {
            return;
        }
        // Found among the live workers by its peer: a worker that died
        // meanwhile is not there any more.
        let w = s
            .live
            .get(&peer.pid())
            .filter(|w| Arc::ptr_eq(&w.peer, &peer) && !w.proc.is_dead())
            .cloned();
        if let Some(w) = w {
            s.idle.push(w);
        }
    }

    fn live(&self) -> Vec<u32> {
        self.state.lock().live.keys().copied().collect()
    }

    fn shut_down(&self) {
        let live: Vec<_> = {
            let mut s = self.state.lock();
            s.closed = true;
            s.idle.clear();
            s.starting.clear();
            s.live.drain().map(|(_, w)| w).collect()
        };
        for w in &live {
            w.proc.dead.store(true, Ordering::Release);
            w.proc.died.notify_waiters();
            let _ = w.proc.send(&Message::Shutdown);
            w.proc.reap();
            w.peer.discard();
            w.proc.release_shared(&self.store);
        }
        // The reader threads end with their connections; a worker has ended
        // once its reader is done with it (it may be failing its tasks).
        for w in &live {
            let reader = w.proc.reader.lock().take();
            if let Some(h) = reader {
                if h.thread().id() != std::thread::current().id() {
                    let _ = h.join();
                }
            }
            w.proc.end();
        }
        // The workers' last lines reach their logs before shutdown ends.
        self.logs.drain(OUTPUT_DRAIN);
    }

    fn close(&self) {
        self.store.remove_spill_files();
        if let Some(session) = &self.session {
            session.close();
        }
    }
}

/// Accepts worker connections and hands each to the start waiting for its
/// process id.
///
/// The socket's abstract name is visible to every local user, so what an
/// unknown process may cost the node is bounded: a connection whose peer
/// (as the kernel reports it, `SO_PEERCRED`) is not a worker process this
/// pool is starting is closed before a byte is read; the rest must finish
/// the handshake in time, with a first frame of at most [`HELLO_MAX`]
/// bytes, and only so many may be in it at once ([`HandshakeLimits`]).
/// A connection that fails any of this is closed; nothing else is affected.
async fn accept_loop<O: OwnerService>(pool: std::sync::Weak<Pool<O>>, listener: Listener, token: u128) {
    let in_handshake = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                let e = Error::from_io("accepting a worker connection", &e);
                tracing::warn!(error = %e, "cannot accept on the node socket");
                // Out of descriptors, say: wait a little rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(p) = pool.upgrade() else { return };
        // Only the processes this pool is starting may connect.
        let pid = stream.peer_pid();
        let Some(pid) = pid.filter(|pid| p.state.lock().starting.contains_key(pid)) else {
            tracing::debug!(peer = ?pid, "closed a connection from a process that is not a starting worker");
            continue;
        };
        let limits = *p.limits.lock();
        drop(p);
        if in_handshake.fetch_add(1, Ordering::AcqRel) >= limits.max {
            in_handshake.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                pid,
                "closed a connection: too many connections in their handshake"
            );
            continue;
        }
        let (pool, counter) = (pool.clone(), in_handshake.clone());
        tokio::spawn(async move {
            // The handshake reads a blocking connection, on a blocking
            // thread; at the deadline the connection is shut, which ends
            // the read there.
            // Without a second handle the deadline could not end the
            // read: such a connection is refused.
            let Ok(watch) = stream.try_clone() else {
                counter.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(pid, "closed a connection whose handshake could not be bounded");
                return;
            };
            let handshake = tokio::task::spawn_blocking(move || handshake(stream, pid, token));
            let done = tokio::time::timeout(limits.timeout, handshake).await;
            counter.fetch_sub(1, Ordering::AcqRel);
            let (role, stream, dec) = match done {
                Ok(Ok(Ok(c))) => c,
                Ok(Err(e)) => {
                    tracing::warn!(pid, error = %e, "a handshake thread failed");
                    return;
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(pid, error = %e, "refused a connection to the node socket");
                    return;
                }
                Err(_) => {
                    let _ = watch.shutdown();
                    tracing::warn!(
                        pid,
                        "closed a connection that did not finish its handshake in time"
                    );
                    return;
                }
            };
            if let Some(pool) = pool.upgrade() {
                pool.connected(pid, role, stream, dec);
            }
        });
    }
}

/// Runs the accepting side of a worker's handshake; returns its role and
/// the connection, with what was read past the `Hello`.
fn handshake(
    mut stream: Conn,
    pid: u32,
    token: u128,
) -> std::result::Result<(Role, Conn, FrameDecoder), Error> {
    let mut dec = FrameDecoder::new(HELLO_MAX);
    let (role, said) = wire::accept_handshake_blocking(&mut stream, &mut dec, token)?;
    // The pid in `Hello` is the one the kernel knows for the peer, so no
    // other process holding the token can pose as a worker that is
    // starting.
    if said != pid {
        return Err(Error::Handshake(format!(
            "the peer is process {pid} but its Hello names {said}"
        )));
    }
    if !matches!(role, Role::Worker | Role::WorkerUp) {
        return Err(Error::Handshake(format!(
            "a {role:?} connection is not a worker's"
        )));
    }
    dec.set_max(wire::DEFAULT_MAX_FRAME);
    Ok((role, stream, dec))
}

impl<O: OwnerService> Pool<O> {
    /// Hands a worker's connection that finished its handshake to the start
    /// waiting for it; the start completes once both of the worker's
    /// connections are in.
    fn connected(&self, pid: u32, role: Role, stream: Conn, dec: FrameDecoder) {
        let mut state = self.state.lock();
        let Some(start) = state.starting.get_mut(&pid) else {
            tracing::warn!(pid, ?role, "closed a connection no worker start waits for");
            return;
        };
        let twice = match role {
            Role::Worker => start.down.replace(stream).map(|_| "a second first connection"),
            _ => start.up.replace((stream, dec)).map(|_| "a second uplink"),
        };
        if let Some(reason) = twice {
            if let Some(start) = state.starting.remove(&pid) {
                let _ = start
                    .done
                    .send(Err(Error::Handshake(format!("worker {pid}: {reason}"))));
            }
            return;
        }
        if start.down.is_some() && start.up.is_some() {
            if let Some(Starting {
                done,
                down: Some(down),
                up: Some((up, up_dec)),
            }) = state.starting.remove(&pid)
            {
                let _ = done.send(Ok(Connection { down, up, up_dec }));
            }
        }
    }
}

/// A result or put in shared memory is sealed when the worker reports it
/// (it wrote it into the allocation `CreateObject` gave it).
fn seal_stored(w: &WorkerProc, outcome: WireOutcome) -> WireOutcome {
    match outcome {
        WireOutcome::Stored { type_name, id, len } => match w.writers.lock().remove(&id) {
            Some(writer) if writer.len() as u64 == len => {
                writer.seal();
                WireOutcome::Stored { type_name, id, len }
            }
            _ => WireOutcome::Failed(Error::Protocol(format!(
                "the worker reported object {id:x} it was given no room for"
            ))),
        },
        o => o,
    }
}

/// Reads a worker's messages until its connection ends (on the worker's
/// reader thread), then forgets the worker.
fn read_loop<O: OwnerService>(
    pool: &std::sync::Weak<Pool<O>>,
    w: &Worker<O::Peer>,
    rd: &mut Conn,
    dec: FrameDecoder,
) {
    rustyray_proto::service::mark_reader();
    // A handler that panics ends the connection like a malformed frame:
    // the worker is lost (its work failed or retried), never forgotten.
    let why = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_messages(pool, w, rd, dec)))
        .unwrap_or_else(|p| {
            format!(
                "its reader thread panicked: {}",
                rustyray_common::error::panic_message(p.as_ref())
            )
        });
    cork::flush();
    match pool.upgrade() {
        Some(pool) => pool.lost(w, &why),
        None => {
            w.proc.dead.store(true, Ordering::Release);
            w.proc.died.notify_waiters();
            w.proc.reap();
            w.peer.discard();
        }
    }
}

/// Handles a worker's messages until its connection ends; returns why.
/// The node keeps the shared-memory messages; the rest go to the owner's
/// peer of the worker.
fn read_messages<O: OwnerService>(
    pool: &std::sync::Weak<Pool<O>>,
    w: &Worker<O::Peer>,
    rd: &mut Conn,
    mut dec: FrameDecoder,
) -> String {
    let Worker { proc: w, peer } = w;
    loop {
        failpoint!(dynamic format!("node::recv::{}", w.pid), |_| {
            "a read failed (failpoint node::recv)".to_owned()
        });
        let msg = match dec.next_message() {
            Ok(Some(msg)) => Ok(Some(msg)),
            // Out of messages: what they held back goes before the read.
            Ok(None) => {
                cork::flush();
                wire::read_message_blocking(rd, &mut dec)
            }
            Err(e) => Err(e),
        };
        if matches!(
            msg,
            Ok(Some(
                Message::TaskDone { .. }
                    | Message::CallActor { .. }
                    | Message::Release { .. }
                    | Message::ReleaseActor { .. }
                    | Message::Unpin { .. }
            ))
        ) {
            cork::start();
        } else {
            cork::flush();
        }
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => break "its connection closed".to_owned(),
            Err(e) => break format!("its connection failed: {e}"),
        };
        let for_owner = match msg {
            Message::TaskDone { task_id, outcome } => Message::TaskDone {
                task_id,
                outcome: seal_stored(w, outcome),
            },
            Message::Fetched { id, outcome } => Message::Fetched {
                id,
                outcome: seal_stored(w, outcome),
            },
            Message::Answer { to, task_id, outcome } => Message::Answer {
                to,
                task_id,
                outcome: seal_stored(w, outcome),
            },
            Message::CreateObject { id, len } => {
                let slot = match pool.upgrade() {
                    Some(pool) => usize::try_from(len)
                        .map_err(|_| Error::Protocol(format!("an object of {len} bytes")))
                        .and_then(|len| pool.store.create(id, len).map_err(Error::from))
                        .map(|writer| {
                            let offset = writer.offset() as u64;
                            w.writers.lock().insert(id, writer);
                            offset
                        }),
                    None => Err(Error::Shutdown),
                };
                let _ = w.send(&Message::ObjectSlot { id, slot });
                continue;
            }
            Message::AbortObject { id } => {
                w.writers.lock().remove(&id);
                continue;
            }
            Message::Unpin { id } => {
                let held = {
                    let mut guard = w.pins.lock();
                    let Some(pins) = guard.as_mut() else { continue };
                    match pins.get_mut(&id) {
                        Some(n) if *n > 1 => {
                            *n -= 1;
                            true
                        }
                        Some(_) => pins.remove(&id).is_some(),
                        None => false,
                    }
                };
                if let (true, Some(pool)) = (held, pool.upgrade()) {
                    let _ = pool.store.unpin(id);
                }
                continue;
            }
            Message::Ping { nonce } => {
                let _ = w.send(&Message::Pong { nonce });
                continue;
            }
            Message::Pong { .. } => continue,
            other => other,
        };
        if let Err(why) = peer.handle(for_owner) {
            break why;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustyray_common::ids::random_token;
    use std::ffi::OsString;
    use std::path::PathBuf;

    /// A worker whose connection is one end of a socket pair, with no
    /// process behind it.
    fn on_socket(stream: Conn) -> Arc<WorkerProc> {
        WorkerProc::new(0, None, stream)
    }

    /// A worker on a socket pair, and a thread collecting what reaches
    /// the other end until the worker is dropped.
    fn worker_and_peer() -> (Arc<WorkerProc>, std::thread::JoinHandle<Vec<u8>>) {
        let (ours, theirs) = rustyray_transport::MemoryNet::pair();
        let peer = std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = std::io::Read::read_to_end(&mut { theirs }, &mut got);
            got
        });
        (on_socket(ours), peer)
    }

    #[test]
    fn held_frames_keep_their_order_with_frames_other_threads_write() {
        let (w, peer) = worker_and_peer();
        cork::start();
        w.write(b"1");
        w.write(b"2");
        let other = w.clone();
        // Not corked: goes out at once, after the held frames.
        std::thread::spawn(move || other.write(b"3"))
            .join()
            .expect("writer");
        w.write(b"4");
        cork::flush();
        w.write(b"5");
        drop(w);
        assert_eq!(peer.join().expect("peer"), b"12345");
    }

    #[test]
    fn a_large_frame_is_never_held_nor_leaves_a_large_buffer() {
        let (w, peer) = worker_and_peer();
        let large = vec![7_u8; 8 << 20];
        cork::start();
        w.write(b"small");
        w.write(&large);
        let held = w.out.lock().held.capacity();
        cork::flush();
        drop(w);
        let got = peer.join().expect("peer");
        assert_eq!(got.len(), 5 + large.len());
        assert_eq!(&got[..5], b"small");
        assert!(
            held < 2 * cork::HOLD_MAX,
            "a {held}-byte buffer stayed with the worker"
        );
    }

    #[test]
    fn a_corked_thread_that_panics_still_sends_what_it_held() {
        let (w, peer) = worker_and_peer();
        let w2 = w.clone();
        let panicked = std::thread::spawn(move || {
            cork::start();
            w2.write(b"a reply someone waits for");
            panic!("a handler panicked");
        })
        .join();
        assert!(panicked.is_err());
        assert!(w.out.lock().held.is_empty());
        drop(w);
        assert_eq!(peer.join().expect("peer"), b"a reply someone waits for");
    }

    /// An owner for a node whose workers never run anything: every
    /// message for it ends the connection.
    struct NoOwner;

    struct NoPeer(Arc<dyn WorkerLink>);

    impl WorkerPeer for NoPeer {
        fn pid(&self) -> u32 {
            self.0.pid()
        }
        fn handle(self: &Arc<Self>, msg: Message) -> std::result::Result<(), String> {
            Err(format!("no owner for {msg:?}"))
        }
        fn lost(&self, _why: &str) {}
        fn discard(&self) {}
    }

    impl OwnerService for NoOwner {
        type Peer = NoPeer;
        fn attach(self: &Arc<Self>, link: Arc<dyn WorkerLink>) -> Arc<NoPeer> {
            Arc::new(NoPeer(link))
        }
    }

    /// A node with no worker processes, on a runtime of its own, and the
    /// directory of its spill files and logs; shut down when dropped.
    struct TestNode {
        pool: Arc<Pool<NoOwner>>,
        dir: PathBuf,
        _rt: tokio::runtime::Runtime,
    }

    impl TestNode {
        fn start(token: u128) -> TestNode {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let dir = std::env::temp_dir().join(format!("rr-node-{:x}", random_token()));
            let store =
                rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.join("spill")))
                    .expect("store");
            let setup = PoolSetup {
                command: WorkerCommand::new("/bin/false", Vec::<OsString>::new()),
                prestart: 0,
                token,
                store: Arc::new(store),
                threshold: 100 * 1024,
                thread_name: "rrtest-n".into(),
                owner: Arc::new(NoOwner),
                logs: WorkerLogs::new(dir.join("logs"), false),
                session: None,
            };
            let pool = Pool::start(setup, rt.handle()).expect("pool");
            TestNode { pool, dir, _rt: rt }
        }

        /// Makes the pool wait for a worker with this test's process id, as
        /// it does for a worker process it started.
        fn expect_this_process(&self) {
            let (done, _) = oneshot::channel();
            let starting = Starting {
                done,
                down: None,
                up: None,
            };
            self.pool
                .state
                .lock()
                .starting
                .insert(std::process::id(), starting);
        }

        fn connect(&self) -> Conn {
            Conn::connect(&Address::Unix(self.pool.name.clone())).expect("connect")
        }
    }

    impl Drop for TestNode {
        fn drop(&mut self) {
            self.pool.shut_down();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Whether the node closed `s` (read ends) rather than leaving it open
    /// for a generous minute.
    fn closed_by_node(s: &mut Conn) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut buf = [0_u8; 64];
        loop {
            match std::io::Read::read(s, &mut buf) {
                Ok(0) => return true,
                // A `Refused` frame may come first.
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Whether `s` is still open with nothing to read (a read waits rather
    /// than finding the end).
    fn still_open(s: &Conn) -> bool {
        s.set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
        let open = matches!(
            std::io::Read::read(&mut { s }, &mut [0_u8; 1]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        );
        s.set_read_timeout(None).expect("timeout");
        open
    }

    fn hello(token: u128) -> Vec<u8> {
        wire::encode_frame(&Message::hello(Role::Worker, token)).expect("frame")
    }

    #[test]
    fn the_socket_name_says_nothing_of_the_token() {
        let token = random_token();
        let node = TestNode::start(token);
        let name = node.pool.name.clone();
        for derived in [token, token ^ 0x5a5a] {
            assert!(
                !name.contains(&format!("{derived:032x}")),
                "{name} holds the token"
            );
        }
        // The token as an earlier version derived it from the name (which
        // every local user can read in /proc/net/unix) is refused.
        let tail = name.rsplit('-').next().expect("name");
        let guessed = u128::from_str_radix(tail, 16).expect("hex") ^ 0x5a5a;
        node.expect_this_process();
        let mut s = node.connect();
        std::io::Write::write_all(&mut s, &hello(guessed)).expect("write");
        let mut dec = FrameDecoder::default();
        match wire::read_message_blocking(&mut s, &mut dec) {
            Ok(Some(Message::Refused { .. })) | Ok(None) | Err(_) => {}
            other => panic!("a token guessed from the socket's name was answered {other:?}"),
        }
    }

    #[test]
    fn a_process_that_is_not_a_starting_worker_is_closed_before_a_byte_is_read() {
        let token = random_token();
        let node = TestNode::start(token);
        // Idle connections (which once stayed forever, one descriptor
        // each) and, even with the right token, a `Hello`: the node waits
        // for no such process.
        let mut conns: Vec<_> = (0..200).map(|_| node.connect()).collect();
        for s in conns.iter_mut().step_by(2) {
            let _ = std::io::Write::write_all(s, &hello(token));
        }
        for s in &mut conns {
            assert!(closed_by_node(s), "a stranger's connection stayed open");
        }
    }

    #[test]
    fn a_first_frame_larger_than_a_hello_closes_the_connection() {
        let node = TestNode::start(random_token());
        node.expect_this_process();
        let mut s = node.connect();
        // A 64 MiB frame announced, a first slice of it sent: the node
        // refuses it on the announcement instead of buffering it.
        std::io::Write::write_all(&mut s, &(64_u32 << 20).to_le_bytes()).expect("header");
        let _ = std::io::Write::write_all(&mut s, &[0_u8; 4096]);
        assert!(closed_by_node(&mut s));
    }

    #[test]
    fn a_silent_connection_is_closed_when_its_handshake_time_is_up() {
        let node = TestNode::start(random_token());
        node.pool.limits.lock().timeout = Duration::from_millis(200);
        node.expect_this_process();
        let mut s = node.connect();
        assert!(closed_by_node(&mut s));
    }

    #[test]
    fn connections_beyond_the_handshake_cap_are_closed_at_once() {
        let node = TestNode::start(random_token());
        node.pool.limits.lock().max = 4;
        node.expect_this_process();
        let first: Vec<_> = (0..4).map(|_| node.connect()).collect();
        let mut fifth = node.connect();
        assert!(
            closed_by_node(&mut fifth),
            "a connection past the cap stayed open"
        );
        // Accepted in order: the first four are still in their handshake.
        assert!(first.iter().all(still_open));
    }

    #[test]
    fn running_out_of_descriptors_is_said_as_such() {
        let e = Error::from_io(
            "starting worker process x",
            &std::io::Error::from_raw_os_error(24),
        );
        assert!(matches!(e, Error::OutOfDescriptors(_)), "{e}");
        assert!(e.to_string().contains("ulimit"), "{e}");
        let e = Error::from_io("reading", &std::io::Error::from_raw_os_error(104));
        assert!(matches!(e, Error::Connection { .. }), "{e}");
    }
}
