//! Direct actor calls: code in a worker process calls an actor hosted by
//! another worker process straight over a connection between the two,
//! not through the owner (Ray's direct actor task submitter).
//!
//! # Endpoints and connections
//!
//! Every worker process listens on an endpoint of its own (a Unix socket in
//! the abstract namespace, with a random name) and tells its owner
//! (`Listening`). When the owner lends a handle on an actor that is alive
//! in a worker process, the handle carries that process's endpoint
//! ([`ActorRoute`]). A caller connects there (role `Peer`, the node's
//! token), says its own endpoint, and the actor's process connects back:
//! each side writes only on the connection it opened and reads only the
//! one the other opened (as a worker and its node do), so no reader is
//! woken by the other side taking what it wrote. Calls go out as
//! `ActorCall`, answers come back as `TaskDone`. A connection that has
//! not finished its handshake is bounded as the node's are: a first frame
//! of at most [`HELLO_MAX`] bytes, [`HANDSHAKE_TIME`] to finish, at most
//! [`MAX_HANDSHAKES`] at once.
//!
//! # Objects
//!
//! Objects a call names go through the driver's books: it is told to lend
//! them to the actor's process (`Lend`) before the call goes, borrowing
//! from this process first the ones that are this process's own; the
//! answer lends the call's result's objects back the same way. A call's
//! result is this process's own, made or not: the driver borrows it like
//! any other (asking for its value once someone looks at it). Values
//! travel inline on these connections (a large one is copied through the
//! socket rather than read in shared memory), and frames are held back
//! and written several at a time while answers are due (see `Holding`).
//!
//! # Order and failure
//!
//! The calls of one process on one actor go out on one connection, in
//! submission order, and the actor's process takes them in that order.
//! When the connection fails (the actor's process died, was killed, or the
//! actor moved), the calls still out are sent to the owner in their order
//! (`CallActor` with `attempted`, one retry spent), or failed with
//! `ActorDied` when the actor allows no retries, and every later call on
//! that actor goes through the owner, which restarts the actor and keeps
//! the order across the restart.

use super::{complete, Upstream, Worker};
use crate::codec::Value;
use crate::error::{Error, Result};
use crate::ids::{ActorId, ObjectId, TaskId};
use crate::object_ref::{Arg, RawRef};
use crate::runtime::Inner;
use crate::task::{Target, TaskSpec, TaskState};
use crate::wire::{self, ActorRoute, FrameDecoder, Message, NamedActor, Role, WireOutcome};
use parking_lot::{Condvar, Mutex};
use rustyray_transport::{Address, Conn, Listener};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Calls this process sent straight to an actor's process, ever (see
/// [`direct_calls`]).
static DIRECT_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many actor calls this process has sent straight to the actor's
/// worker process, skipping the owner. A diagnostic: tests and benchmarks
/// check with it that the driver is off the path.
pub fn direct_calls() -> u64 {
    DIRECT_CALLS.load(Ordering::Relaxed)
}

/// The largest first frame a `Peer` connection may send (a `Hello`).
const HELLO_MAX: u32 = 256;

/// How long a `Peer` connection has to finish its handshake (and say its
/// endpoint), and how long a caller waits for the connection back.
const HANDSHAKE_TIME: Duration = Duration::from_secs(10);

/// How often a caller waiting for the connection back checks that the
/// other process is still there.
const BACK_POLL: Duration = Duration::from_millis(20);

/// How many `Peer` connections may be in their handshake at once.
const MAX_HANDSHAKES: usize = 64;

/// This process's endpoint and its connections to other worker processes.
pub(crate) struct Peers {
    endpoint: String,
    /// The tag this process's ids carry (said with the endpoint).
    tag: u64,
    token: u128,
    /// Connections this process opened (it writes on them), by endpoint;
    /// each slot is locked while its connection is being opened, so no
    /// endpoint gets two and no other endpoint waits.
    out: Mutex<HashMap<String, Arc<OutSlot>>>,
    /// Endpoints whose connection to this process is up (this process
    /// reads them), for a caller waiting for the connection back.
    back: Mutex<HashSet<String>>,
    back_ready: Condvar,
    worker: Weak<Worker>,
    /// Frames held back on this process's connections.
    pub(super) holding: Arc<Holding>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The connection to one endpoint, once opened.
type OutSlot = Mutex<Option<Arc<PeerOut>>>;

/// The most bytes of frames a connection holds back before it writes them.
const HOLD_MAX: usize = 32 * 1024;

/// The longest a held frame waits for the write that takes it (see
/// [`Holding`]).
const HOLD_TIME: Duration = Duration::from_micros(100);

/// A connection this process opened to another worker process.
pub(crate) struct PeerOut {
    /// The other process.
    pid: u32,
    /// The socket: written by one thread at a time (the one that found
    /// no write under way, see [`Outgoing`]), never under a lock.
    conn: Conn,
    out: Mutex<Outgoing>,
    /// Woken when a write under way ends.
    written: Condvar,
    /// The other process's endpoint (to fail over what a failed write
    /// carried).
    endpoint: String,
    broken: AtomicBool,
    /// Calls the other process made here whose answers are not written
    /// yet (answers are held back while more are to come).
    owed: AtomicUsize,
    /// An answer came back from the other process since held frames were
    /// last written: the next frame goes at once, with what is held.
    acked: AtomicBool,
    holding: Arc<Holding>,
}

/// What a connection has to write: frames queued (held back, or waiting
/// for the write under way), and whether a thread is writing.
///
/// No lock is held across a write: a thread that queues a frame while
/// another writes leaves it to that one, which writes what was queued
/// meanwhile before it lets go. So no thread ever waits for another
/// one's write, and a reader (which takes the route and connection locks
/// to finish answers) is never held up behind a write stuck on a peer
/// whose reader is itself stuck writing back to this process.
#[derive(Default)]
struct Outgoing {
    queued: Vec<u8>,
    writing: bool,
}

/// What a frame queued on a connection asks of the thread that queued it.
#[must_use]
enum Queued {
    /// Nothing more: held back, or a write under way takes it.
    Done,
    /// Write it (and what else is queued): [`PeerOut::settle`] does.
    Write,
    /// The connection is broken.
    Broken,
}

/// Frames held back for a write that takes several at once (as Nagle's
/// rule does for TCP). A frame is held only while an answer is due on the
/// same pair of connections: a call while earlier calls on its route are
/// unanswered (the first call made after one of them is answered writes
/// what is held), an answer while the caller's later calls are still
/// running here (the last answer writes). Any other write on the
/// connection takes what is held first, so the order of frames never
/// changes; at [`HOLD_MAX`] bytes the frames go at once. Waiting for a
/// frame that is held could deadlock (an actor call that waits for a later
/// call of the same caller), so nothing waits longer than [`HOLD_TIME`]: a
/// thread of the process writes what is held then, and a task that blocks
/// writes it at once.
pub(crate) struct Holding {
    /// Connections holding frames, each with when its first was held.
    due: Mutex<std::collections::VecDeque<(Instant, Weak<PeerOut>)>>,
    wake: Condvar,
    /// Endpoints whose connection failed in a write: what was sent there
    /// is failed over, from the holding thread (the writer may hold locks
    /// that failing over takes).
    lost: Mutex<Vec<String>>,
    /// The process's connections, to fail over what a lost one carried.
    peers: std::sync::OnceLock<Weak<Peers>>,
}

impl Holding {
    /// Starts the thread that writes held frames when they are due.
    fn start() -> Result<Arc<Holding>> {
        let holding = Arc::new(Holding {
            due: Mutex::default(),
            wake: Condvar::new(),
            lost: Mutex::default(),
            peers: std::sync::OnceLock::new(),
        });
        let h = holding.clone();
        std::thread::Builder::new()
            .name("rustyray-flush".to_owned())
            .spawn(move || h.run())
            .map_err(|e| Error::from_io("starting the worker's flush thread", &e))?;
        Ok(holding)
    }

    /// Writes held frames as they come due, for as long as the process
    /// lives.
    fn run(&self) {
        let mut due = self.due.lock();
        loop {
            if !self.lost.lock().is_empty() {
                drop(due);
                let lost = std::mem::take(&mut *self.lost.lock());
                if let Some(peers) = self.peers.get().and_then(Weak::upgrade) {
                    for endpoint in lost {
                        peers.gone(&endpoint);
                    }
                }
                due = self.due.lock();
                continue;
            }
            let Some(&(at, _)) = due.front() else {
                self.wake.wait(&mut due);
                continue;
            };
            if Instant::now() < at {
                self.wake.wait_until(&mut due, at);
                continue;
            }
            let Some((_, out)) = due.pop_front() else { continue };
            drop(due);
            if let Some(out) = out.upgrade() {
                out.drain_all();
            }
            due = self.due.lock();
        }
    }

    /// The connection to `endpoint` failed in a write: what it carried is
    /// failed over.
    fn lost(&self, endpoint: &str) {
        self.lost.lock().push(endpoint.to_owned());
        let _due = self.due.lock();
        self.wake.notify_one();
    }

    /// The holding thread takes over writing what `out` has queued (a
    /// thread that wrote its share leaves the rest to it).
    fn take_over(&self, out: &Arc<PeerOut>) {
        let mut due = self.due.lock();
        due.push_front((Instant::now(), Arc::downgrade(out)));
        drop(due);
        self.wake.notify_one();
    }

    /// `out` started holding frames.
    fn held(&self, out: &Arc<PeerOut>) {
        let mut due = self.due.lock();
        let first = due.is_empty();
        due.push_back((Instant::now() + HOLD_TIME, Arc::downgrade(out)));
        drop(due);
        if first {
            self.wake.notify_one();
        }
    }

    /// Has every held frame written now by the holding thread (for a
    /// thread that reads a connection, which must not write them itself).
    pub(super) fn hurry(&self) {
        let mut due = self.due.lock();
        if due.is_empty() {
            return;
        }
        let now = Instant::now();
        for entry in due.iter_mut() {
            entry.0 = now;
        }
        drop(due);
        self.wake.notify_one();
    }

    /// Writes every held frame now (a task of this process blocks; what
    /// is more than its share is left to the holding thread).
    pub(super) fn flush_all(&self) {
        let outs: Vec<_> = self.due.lock().iter().map(|(_, o)| o.clone()).collect();
        for out in outs.iter().filter_map(Weak::upgrade) {
            out.drain();
        }
    }
}

impl PeerOut {
    /// The other process's id.
    pub(super) fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the other process closed the connection (it died). Only for
    /// a connection nothing was sent on yet: the other side never writes on
    /// it, so a read finds either nothing or the end.
    fn closed(&self) -> bool {
        if self
            .conn
            .set_read_timeout(Some(Duration::from_millis(1)))
            .is_err()
        {
            return true;
        }
        let mut byte = [0_u8; 1];
        match std::io::Read::read(&mut &self.conn, &mut byte) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    /// Writes one message; false when it cannot go (the connection is
    /// broken from then on, or the message is too large).
    fn send(self: &Arc<Self>, msg: &Message) -> bool {
        match wire::encode_frame(msg) {
            Ok(frame) => self.write(&frame),
            Err(_) => false,
        }
    }

    /// Writes one frame after what is queued; false when the connection
    /// is broken (from then on).
    pub(super) fn write(self: &Arc<Self>, frame: &[u8]) -> bool {
        let queued = self.push(frame, false);
        self.settle(queued)
    }

    /// Queues one frame to be written next (see [`Queued`]); the caller
    /// settles it with [`PeerOut::settle`] after letting go of any lock it
    /// holds. With `hold`, the frame is held back for a later write (see
    /// [`Holding`]) unless it should go now: more than [`HOLD_MAX`] bytes
    /// are queued, or an answer came since the last write.
    fn push(self: &Arc<Self>, frame: &[u8], hold: bool) -> Queued {
        let mut o = self.out.lock();
        if self.broken.load(Ordering::Acquire) {
            o.queued.clear();
            return Queued::Broken;
        }
        let first = o.queued.is_empty();
        o.queued.extend_from_slice(frame);
        if o.writing {
            return Queued::Done;
        }
        if !hold || o.queued.len() > HOLD_MAX || self.acked.swap(false, Ordering::AcqRel) {
            return Queued::Write;
        }
        drop(o);
        if first {
            self.holding.held(self);
        }
        Queued::Done
    }

    /// Does what queuing a frame asked for: writes when told to; false
    /// when the connection is broken.
    fn settle(self: &Arc<Self>, queued: Queued) -> bool {
        match queued {
            Queued::Done => true,
            Queued::Write => self.drain(),
            Queued::Broken => false,
        }
    }

    /// Writes what is queued, unless another thread is writing (it takes
    /// it); false when the connection is broken (from then on). A thread
    /// writes its share: what was queued when it began, and more only up
    /// to [`HOLD_MAX`] bytes; the holding thread takes over the rest, so
    /// a reader never writes an unbounded amount of other threads' frames
    /// (two readers each stuck writing to the other would never return).
    pub(super) fn drain(self: &Arc<Self>) -> bool {
        self.drain_up_to(Some(HOLD_MAX))
    }

    /// [`PeerOut::drain`] with no bound (the holding thread).
    fn drain_all(self: &Arc<Self>) -> bool {
        self.drain_up_to(None)
    }

    fn drain_up_to(self: &Arc<Self>, bound: Option<usize>) -> bool {
        let mut o = self.out.lock();
        if o.writing || o.queued.is_empty() {
            return !self.broken.load(Ordering::Acquire);
        }
        o.writing = true;
        let mut total = 0;
        loop {
            let mut bytes = std::mem::take(&mut o.queued);
            self.acked.store(false, Ordering::Release);
            drop(o);
            let written = (&self.conn).write_all(&bytes);
            total += bytes.len();
            o = self.out.lock();
            if written.is_err() {
                self.broken.store(true, Ordering::Release);
                o.queued.clear();
                o.writing = false;
                drop(o);
                self.written.notify_all();
                // Frames other threads queued went with it: what was sent
                // there is failed over (the holding thread does it).
                self.holding.lost(&self.endpoint);
                return false;
            }
            if o.queued.is_empty() {
                // The buffer is kept for the next frames.
                bytes.clear();
                o.queued = bytes;
                o.writing = false;
                drop(o);
                self.written.notify_all();
                return true;
            }
            if bound.is_some_and(|b| total > b) {
                o.writing = false;
                drop(o);
                self.written.notify_all();
                self.holding.take_over(self);
                return true;
            }
        }
    }

    /// Waits until `deadline` for a write under way to end, then writes
    /// everything queued (the process is about to end).
    fn flush_before(self: &Arc<Self>, deadline: Instant) {
        let mut o = self.out.lock();
        while o.writing {
            if self.written.wait_until(&mut o, deadline).timed_out() {
                return;
            }
        }
        drop(o);
        self.drain_all();
    }

    /// An answer to a call this process made came back on the other
    /// process's connection.
    fn ack(&self) {
        self.acked.store(true, Ordering::Release);
    }

    /// A call the other process made here came in: its answer is owed.
    fn owe(&self) {
        self.owed.fetch_add(1, Ordering::AcqRel);
    }

    /// A call the other process made here is answered (by `frame`, or
    /// through the owner when `None`): held back while more answers are
    /// owed, else written with whatever is held.
    fn answer_with(self: &Arc<Self>, frame: Option<&[u8]>) {
        let more = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)))
            .is_ok_and(|n| n > 1);
        let queued = match frame {
            Some(frame) => self.push(frame, more),
            None if more => Queued::Done,
            None => Queued::Write,
        };
        self.settle(queued);
    }
}

impl Peers {
    /// Listens on a fresh endpoint and accepts `Peer` connections on the
    /// worker's executor.
    pub(crate) fn start(worker: &Arc<Worker>, token: u128) -> Result<Arc<Peers>> {
        let endpoint = format!(
            "rustyray-p-{}-{:032x}",
            std::process::id(),
            crate::ids::random_token()
        );
        let listener = {
            let _enter = worker.rt.handle.enter();
            Listener::bind(&Address::Unix(endpoint.clone()))
                .map_err(|e| Error::from_io("binding the worker's endpoint", &e))?
        };
        let peers = Arc::new(Peers {
            endpoint,
            tag: worker.rt.ids.owner(),
            token,
            out: Mutex::default(),
            back: Mutex::default(),
            back_ready: Condvar::new(),
            worker: Arc::downgrade(worker),
            holding: Holding::start()?,
        });
        let _ = peers.holding.peers.set(Arc::downgrade(&peers));
        worker
            .rt
            .handle
            .spawn(accept_loop(Arc::downgrade(&peers), listener));
        Ok(peers)
    }

    /// This process's endpoint.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The connection to `endpoint` (process `pid`), opened if there is
    /// none (or the last one broke).
    pub(super) fn out_to(&self, endpoint: &str, pid: u32) -> Result<Arc<PeerOut>> {
        let slot = self.out.lock().entry(endpoint.to_owned()).or_default().clone();
        let mut slot = slot.lock();
        if let Some(o) = slot.as_ref().filter(|o| !o.broken.load(Ordering::Acquire)) {
            return Ok(o.clone());
        }
        let mut conn = Conn::connect(&Address::Unix(endpoint.to_owned()))
            .map_err(|e| Error::from_io("connecting to a worker process", &e))?;
        conn.set_read_timeout(Some(HANDSHAKE_TIME))
            .map_err(|e| Error::from_io("connecting to a worker process", &e))?;
        let mut dec = FrameDecoder::new(HELLO_MAX);
        wire::connect_handshake_blocking(&mut conn, &mut dec, Role::Peer, self.token)?;
        let o = Arc::new(PeerOut {
            pid,
            conn,
            out: Mutex::default(),
            written: Condvar::new(),
            endpoint: endpoint.to_owned(),
            broken: AtomicBool::new(false),
            owed: AtomicUsize::new(0),
            acked: AtomicBool::new(false),
            holding: self.holding.clone(),
        });
        if !o.send(&Message::Listening {
            endpoint: self.endpoint.clone(),
            tag: self.tag,
        }) {
            return Err(Error::Connection {
                what: "connecting to a worker process".to_owned(),
                message: "the connection closed during its handshake".to_owned(),
            });
        }
        *slot = Some(o.clone());
        Ok(o)
    }

    /// Writes what every connection has queued, waiting at most a moment
    /// for writes under way (the process is about to end).
    pub(super) fn flush_every(&self) {
        let deadline = Instant::now() + Duration::from_millis(100);
        let slots: Vec<_> = self.out.lock().values().cloned().collect();
        for slot in slots {
            let Some(out) = slot.try_lock().and_then(|o| o.clone()) else {
                continue;
            };
            out.flush_before(deadline);
        }
    }

    /// Forgets the connection to `endpoint` (marked broken).
    pub(super) fn drop_out(&self, endpoint: &str) {
        let slot = self.out.lock().remove(endpoint);
        if let Some(o) = slot.and_then(|s| s.lock().take()) {
            o.broken.store(true, Ordering::Release);
        }
    }

    /// Waits until `endpoint`'s connection to this process is up; false
    /// when it is not within [`HANDSHAKE_TIME`] or the process there closed
    /// `out` meanwhile (it died).
    pub(super) fn wait_back(&self, endpoint: &str, out: &PeerOut) -> bool {
        let deadline = Instant::now() + HANDSHAKE_TIME;
        loop {
            {
                let mut back = self.back.lock();
                if back.contains(endpoint) {
                    return true;
                }
                let slice = (Instant::now() + BACK_POLL).min(deadline);
                if !self.back_ready.wait_until(&mut back, slice).timed_out() {
                    continue;
                }
            }
            if Instant::now() >= deadline || out.closed() {
                return self.back.lock().contains(endpoint);
            }
        }
    }

    /// The connection from `endpoint` ended: the process there is gone (or
    /// unreachable), so what was sent to it is failed over.
    fn gone(&self, endpoint: &str) {
        self.back.lock().remove(endpoint);
        self.drop_out(endpoint);
        if let Some(w) = self.worker.upgrade() {
            w.up.routes.peer_gone(&w.rt, &w.up, endpoint);
            w.up.submitter.peer_gone(&w.up, &w.rt, endpoint);
        }
    }
}

/// Accepts `Peer` connections; each finishes its handshake, bounded, on a
/// thread of its own, which then reads it.
async fn accept_loop(peers: Weak<Peers>, listener: Listener) {
    let in_handshake = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept on the worker's endpoint");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(p) = peers.upgrade() else { return };
        if in_handshake.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
            in_handshake.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let counter = in_handshake.clone();
        tokio::spawn(async move {
            // The handshake reads a blocking connection on a blocking
            // thread; at the deadline the connection is shut, which ends the
            // read there however slowly the other side sends.
            let Ok(watch) = conn.try_clone() else {
                counter.fetch_sub(1, Ordering::AcqRel);
                return;
            };
            let greeter = p.clone();
            let greeting = tokio::task::spawn_blocking(move || greet(&greeter, conn));
            let done = tokio::time::timeout(HANDSHAKE_TIME, greeting).await;
            counter.fetch_sub(1, Ordering::AcqRel);
            let Ok(Ok(Ok((conn, dec, endpoint, pid)))) = done else {
                let _ = watch.shutdown();
                return;
            };
            let reader = std::thread::Builder::new()
                .name("rustyray-peer".to_owned())
                .spawn(move || serve_peer(&p, conn, dec, &endpoint, pid));
            if reader.is_err() {
                let _ = watch.shutdown();
            }
        });
    }
}

/// The accepting side of a `Peer` connection's handshake: the token, the
/// peer's process id as the kernel knows it, and its endpoint, all within
/// [`HANDSHAKE_TIME`].
fn greet(peers: &Peers, mut conn: Conn) -> Result<(Conn, FrameDecoder, String, u32)> {
    let kernel_pid = conn.peer_pid();
    conn.set_read_timeout(Some(HANDSHAKE_TIME))
        .map_err(|e| Error::from_io("a worker's handshake", &e))?;
    let mut dec = FrameDecoder::new(HELLO_MAX);
    let (role, pid) = wire::accept_handshake_blocking(&mut conn, &mut dec, peers.token)?;
    if role != Role::Peer || kernel_pid.is_some_and(|k| k != pid) {
        return Err(Error::Handshake(format!(
            "a {role:?} connection from process {pid} is not a worker's"
        )));
    }
    let Some(Message::Listening { endpoint, .. }) = wire::read_message_blocking(&mut conn, &mut dec)? else {
        return Err(Error::Handshake("a worker did not say its endpoint".to_owned()));
    };
    conn.set_read_timeout(None)
        .map_err(|e| Error::from_io("a worker's handshake", &e))?;
    dec.set_max(wire::DEFAULT_MAX_FRAME);
    Ok((conn, dec, endpoint, pid))
}

/// Reads a connection another worker process opened: the calls it makes on
/// the actor hosted here (answered on the connection back, opened first),
/// their cancels, and the answers to this process's own calls.
fn serve_peer(peers: &Arc<Peers>, mut conn: Conn, mut dec: FrameDecoder, endpoint: &str, pid: u32) {
    // The connection back: this process's answers go there.
    let Ok(back) = peers.out_to(endpoint, pid) else {
        return;
    };
    peers.back.lock().insert(endpoint.to_owned());
    peers.back_ready.notify_all();
    while let Ok(Some(msg)) = wire::read_message_blocking(&mut conn, &mut dec) {
        let Some(worker) = peers.worker.upgrade() else {
            break;
        };
        match msg {
            Message::ActorCall {
                actor_id,
                task_id,
                spec,
                refs,
            } => {
                back.owe();
                peer_call(&worker, &back, actor_id, task_id, spec, &refs)
            }
            Message::LeasedTask {
                lease_id,
                task_id,
                spec,
                refs,
                cpu,
            } => super::run_leased(&worker, &back, lease_id, task_id, spec, refs, cpu),
            Message::CancelTask { task_id, force } => {
                // A forced cancel of a task on a lease ends this process, as
                // Ray's does.
                if force && worker.up.is_leased_here(task_id) {
                    std::process::exit(1);
                }
                if !super::cancel_here(&worker, task_id) {
                    // Not here yet (its push may be behind): it is
                    // cancelled when it comes.
                    worker.up.cancel_early(task_id);
                }
            }
            Message::TaskDone { task_id, outcome } => {
                back.ack();
                worker.up.answered(&worker.rt, task_id, pid, outcome)
            }
            Message::Ping { nonce } => {
                back.send(&Message::Pong { nonce });
            }
            Message::Pong { .. } => {}
            other => {
                tracing::warn!(peer = pid, message = ?other, "closed a worker connection that sent an unexpected message");
                break;
            }
        }
    }
    peers.gone(endpoint);
}

/// Runs a call another worker process made on the actor hosted here; its
/// answer goes back on `back`.
fn peer_call(
    worker: &Arc<Worker>,
    back: &Arc<PeerOut>,
    actor_id: ActorId,
    task_id: TaskId,
    spec: Vec<u8>,
    refs: &[ObjectId],
) {
    let rt = &worker.rt;
    let submitted = (|| {
        // The references passed as arguments were lent here (`Lend`); the
        // ones inside values are taken as the spec decodes.
        let keep = rt.hold_received(refs, &[])?;
        let spec = TaskSpec::from_bytes(&Value::from_bytes(spec, "TaskSpec"), rt, &rt.registry)?;
        drop(keep);
        super::call_hosted(worker, actor_id, spec)
    })();
    match submitted {
        Ok(r) => super::reply_when_done(worker, task_id, r, Some(back.clone())),
        Err(e) => answer(back, task_id, WireOutcome::Failed(e)),
    }
}

/// Sends the answer to a call another worker process made on the actor
/// hosted here, on the connection back; lost if the caller is gone.
pub(super) fn answer(to: &Arc<PeerOut>, task_id: TaskId, outcome: WireOutcome) {
    match wire::encode_frame(&Message::TaskDone { task_id, outcome }) {
        Ok(frame) => to.answer_with(Some(&frame)),
        Err(_) => to.answer_with(None),
    }
}

/// The answer to a call another worker process made on the actor hosted
/// here went through the owner (`Answer`).
pub(super) fn answered_through_owner(to: &Arc<PeerOut>) {
    to.answer_with(None);
}

/// Sends the answer to a task another worker pushed here on a lease, on
/// the connection back (at once: the lease's owner pushes more as answers
/// come); lost if the caller is gone.
pub(super) fn answer_leased(to: &Arc<PeerOut>, task_id: TaskId, outcome: WireOutcome) {
    to.send(&Message::TaskDone { task_id, outcome });
}

/// The direct routes this process knows, by actor.
#[derive(Default)]
pub(crate) struct Routes {
    by_actor: Mutex<HashMap<ActorId, Arc<Route>, crate::ids::IdHash>>,
    /// Calls out on a route, by task, with their submission numbers there.
    calls: Mutex<HashMap<TaskId, (Arc<Route>, u64), crate::ids::IdHash>>,
    /// Calls sent through the owner and not answered yet: a route learnt
    /// meanwhile is taken only once they are (a call straight to the
    /// actor could overtake them).
    relayed: Mutex<Relayed>,
    /// How many calls `relayed` holds, read without its lock.
    relayed_any: AtomicUsize,
}

/// Calls out through the owner, by task and how many per actor.
#[derive(Default)]
struct Relayed {
    actor_of: HashMap<TaskId, ActorId, crate::ids::IdHash>,
    out: HashMap<ActorId, usize, crate::ids::IdHash>,
}

/// The way from this process straight to one actor's process.
struct Route {
    actor: ActorId,
    class: String,
    to: ActorRoute,
    state: Mutex<RouteState>,
}

#[derive(Default)]
struct RouteState {
    /// The connection, once opened.
    out: Option<Arc<PeerOut>>,
    /// The connection failed (or never came up): calls go through the
    /// owner from now on.
    broken: bool,
    /// Calls sent and not answered, by submission number.
    inflight: BTreeMap<u64, Sent>,
    next: u64,
    /// Handles on the actor this process gave up (its last local one
    /// went) while calls were out: given back to the owner once they are
    /// answered, since the actor ends with its last handle.
    released: u32,
}

/// A call sent straight to the actor's process.
struct Sent {
    state: Arc<TaskState>,
    /// Its spec's bytes form, to send it through the owner if it is lost.
    spec: Vec<u8>,
    /// Keeps what the spec names alive until the call is answered.
    _named: Value,
}

impl Routes {
    /// Learns the route of an actor whose handle the owner lent here.
    pub(crate) fn learn(&self, named: &NamedActor) {
        let Some(to) = &named.route else { return };
        self.by_actor.lock().entry(named.id).or_insert_with(|| {
            Arc::new(Route {
                actor: named.id,
                class: named.class.clone(),
                to: to.clone(),
                state: Mutex::default(),
            })
        });
    }

    /// The route of `actor`, while calls still take it (to lend a handle on
    /// with it).
    pub(crate) fn route_of(&self, actor: ActorId) -> Option<ActorRoute> {
        let route = self.by_actor.lock().get(&actor).cloned()?;
        let broken = route.state.lock().broken;
        (!broken).then(|| route.to.clone())
    }

    /// Gives the owner back `count` handles on `actor` (the last local one
    /// went), once the calls still out on its route are answered: the
    /// actor ends with its last handle, and calls made before must run
    /// first, as calls queued behind the owner's own handle do.
    pub(crate) fn release_after_calls(&self, rt: &Arc<Inner>, up: &Upstream, actor: ActorId, count: u32) {
        let route = self.by_actor.lock().get(&actor).cloned();
        if let Some(route) = route {
            let mut st = route.state.lock();
            if !st.inflight.is_empty() && !st.broken {
                st.released += count;
                return;
            }
        }
        up.released_actor(actor, count);
        // Its last call may have been answered before the route could be
        // forgotten.
        crate::actor::forget_route_unless_held(rt, actor);
    }

    /// Forgets `actor`'s route when no call is out on it (its last handle
    /// here went).
    pub(crate) fn forget(&self, actor: ActorId) {
        let mut by_actor = self.by_actor.lock();
        if by_actor
            .get(&actor)
            .is_some_and(|r| r.state.lock().inflight.is_empty())
        {
            by_actor.remove(&actor);
        }
    }

    /// Call `task` on `actor` goes through the owner.
    pub(super) fn relaying(&self, task: TaskId, actor: ActorId) {
        let mut r = self.relayed.lock();
        if r.actor_of.insert(task, actor).is_none() {
            *r.out.entry(actor).or_default() += 1;
            self.relayed_any.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The owner answered call `task` (if it went through the owner).
    pub(super) fn relay_answered(&self, task: TaskId) {
        if self.relayed_any.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut r = self.relayed.lock();
        let Some(actor) = r.actor_of.remove(&task) else {
            return;
        };
        self.relayed_any.fetch_sub(1, Ordering::AcqRel);
        if let std::collections::hash_map::Entry::Occupied(mut n) = r.out.entry(actor) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }

    /// Whether calls on `actor` sent through the owner are unanswered.
    fn relays_out(&self, actor: ActorId) -> bool {
        self.relayed_any.load(Ordering::Acquire) > 0 && self.relayed.lock().out.contains_key(&actor)
    }

    /// Asks the actor's process to cancel call `task_id`, if it is out on
    /// a route (a call still queued there does not run); false when it is
    /// not.
    pub(crate) fn cancel(&self, task_id: TaskId, force: bool) -> bool {
        let Some(route) = self.calls.lock().get(&task_id).map(|(r, _)| r.clone()) else {
            return false;
        };
        let out = route.state.lock().out.clone();
        match out {
            Some(out) => {
                out.send(&Message::CancelTask { task_id, force });
                true
            }
            // Failed over meanwhile: the owner has it now.
            None => false,
        }
    }

    /// Makes a call on `actor` straight to its process when a route is
    /// known; `Ok(None)` hands the call back to go through the owner.
    pub(crate) fn call(
        &self,
        up: &Upstream,
        rt: &Arc<Inner>,
        actor: ActorId,
        method: &'static crate::registry::MethodEntry,
        args: Vec<Arg>,
    ) -> Result<std::result::Result<RawRef, Vec<Arg>>> {
        let Some(route) = self.by_actor.lock().get(&actor).cloned() else {
            return Ok(Err(args));
        };
        if self.relays_out(actor) {
            return Ok(Err(args));
        }
        let (state, ret) = rt.new_task()?;
        let top = crate::runtime::ref_ids(&args);
        let spec = TaskSpec {
            id: state.id,
            target: Target::Method(actor, method),
            args,
            name: None,
        };
        // What is this process's own is lent to the owner first.
        let (named, shared) = match up.spec_for_owner(rt, &spec) {
            Ok(b) => b,
            Err(e) => {
                rt.forget_task(state.id);
                return Err(e);
            }
        };
        // Encoded first: a call too large to send is refused here, before
        // anything is lent or numbered.
        let msg = Message::ActorCall {
            actor_id: actor,
            task_id: state.id,
            spec: shared.bytes,
            refs: top,
        };
        let frame = wire::encode_frame(&msg);
        // The spec is kept for a fail-over (moved back out, not copied).
        let Message::ActorCall { spec: bytes, .. } = msg else {
            unreachable!("built as an ActorCall just above")
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                up.unshare(&shared.lent);
                rt.forget_task(state.id);
                return Err(Error::Protocol(format!("an actor call too large to send: {e}")));
            }
        };
        let mut st = route.state.lock();
        if !st.broken && st.out.is_none() {
            match up
                .peers()
                .map(|p| (p.out_to(&route.to.endpoint, route.to.pid), p))
            {
                Some((Ok(o), p)) if p.wait_back(&route.to.endpoint, &o) => st.out = Some(o),
                Some((Ok(_), p)) => {
                    // It never connected back: the connection is dropped.
                    p.drop_out(&route.to.endpoint);
                    st.broken = true;
                }
                _ => st.broken = true,
            }
        }
        let out = match (&st.out, st.broken) {
            (Some(o), false) => o.clone(),
            _ => {
                drop(st);
                let spec = super::SharedSpec {
                    bytes,
                    lent: shared.lent,
                };
                up.send_relayed(&state, actor, spec, false);
                return Ok(Ok(ret));
            }
        };
        // The owner lends the receiver what the call names (borrowing
        // first, from here, what is this process's own).
        let lent = named.nested_object_ids();
        let actors: Vec<ActorId> = named.nested_actors().iter().map(|a| a.id()).collect();
        if !lent.is_empty() || !actors.is_empty() {
            up.replies.send(&Message::Lend {
                to: route.to.pid,
                refs: lent,
                actors,
            });
        }
        let seq = st.next;
        st.next += 1;
        st.inflight.insert(
            seq,
            Sent {
                state: state.clone(),
                spec: bytes,
                _named: named,
            },
        );
        self.calls.lock().insert(state.id, (route.clone(), seq));
        // Held back while earlier calls on the route are unanswered: the
        // first call made after one of them is answered writes it (see
        // `Holding`).
        let queued = out.push(&frame, st.inflight.len() > 1);
        // Queued under the route's lock, so calls go out in the order of
        // their numbers; written after it is let go (its answers are read
        // meanwhile, and their reader takes that lock).
        drop(st);
        let sent = out.settle(queued);
        if sent {
            DIRECT_CALLS.fetch_add(1, Ordering::Relaxed);
        } else {
            let mut st = route.state.lock();
            if !st.broken {
                self.fail_over(rt, up, &route, &mut st);
            }
        }
        Ok(Ok(ret))
    }

    /// An answer to a call sent straight to an actor's process (or to
    /// nothing: then what it lends is given back).
    pub(super) fn answered(&self, rt: &Arc<Inner>, task_id: TaskId, outcome: WireOutcome) {
        let route = self.calls.lock().get(&task_id).cloned();
        let sent = route.as_ref().and_then(|(r, seq)| {
            let mut st = r.state.lock();
            let sent = st.inflight.remove(seq)?;
            // The last call out: handles given up meanwhile go back.
            let released = if st.inflight.is_empty() {
                std::mem::take(&mut st.released)
            } else {
                0
            };
            Some((sent, released))
        });
        let Some((sent, released)) = sent else {
            // Failed over already: what it lends goes back as it drops.
            drop(crate::runtime::Outcome::from_wire(outcome, rt));
            return;
        };
        complete(rt, task_id.return_object(), outcome);
        self.calls.lock().remove(&task_id);
        sent.state.finish();
        rt.forget_task(task_id);
        if let (1.., Some((route, _)), Some(up)) = (released, route, rt.mode.upstream()) {
            up.released_actor(route.actor, released);
            crate::actor::forget_route_unless_held(rt, route.actor);
        }
    }

    /// The process at `endpoint` is gone: every route to it fails over.
    fn peer_gone(&self, rt: &Arc<Inner>, up: &Upstream, endpoint: &str) {
        let mut routes: Vec<_> = self
            .by_actor
            .lock()
            .values()
            .filter(|r| r.to.endpoint == endpoint)
            .cloned()
            .collect();
        // A route forgotten with calls still out is reached through them.
        routes.extend(
            self.calls
                .lock()
                .values()
                .filter(|(r, _)| r.to.endpoint == endpoint)
                .map(|(r, _)| r.clone()),
        );
        routes.sort_by_key(|r| Arc::as_ptr(r) as usize);
        routes.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for route in routes {
            let mut st = route.state.lock();
            self.fail_over(rt, up, &route, &mut st);
        }
    }

    /// Stops using a route: the calls still out on it go to the owner, in
    /// order, with one attempt spent (or fail, when the actor allows no
    /// retries), and later calls follow them there. Under the route's
    /// lock, so no call is sent meanwhile.
    fn fail_over(&self, rt: &Arc<Inner>, up: &Upstream, route: &Route, st: &mut RouteState) {
        st.broken = true;
        st.out = None;
        let lost = std::mem::take(&mut st.inflight);
        for (_, sent) in lost {
            let task_id = sent.state.id;
            self.fail_over_one(rt, up, route, sent);
            self.calls.lock().remove(&task_id);
        }
        // After the calls, on the same connection: the owner queues them
        // before it lets the handles go.
        let released = std::mem::take(&mut st.released);
        if released > 0 {
            up.released_actor(route.actor, released);
        }
    }

    /// [`Routes::fail_over`] for one call.
    fn fail_over_one(&self, rt: &Arc<Inner>, up: &Upstream, route: &Route, sent: Sent) {
        let task_id = sent.state.id;
        if sent.state.is_cancelled() {
            // Its object already says so; it is not run again.
            sent.state.finish();
            rt.forget_task(task_id);
            return;
        }
        if route.to.max_task_retries == 0 {
            let died = Error::ActorDied {
                class: route.class.clone(),
                actor_id: route.actor,
                reason: "its worker process died while the call was in flight".to_owned(),
                cause: None,
            };
            rt.store.complete(task_id.return_object(), Err(died));
            sent.state.finish();
            rt.forget_task(task_id);
            return;
        }
        // What the call names that is this process's own is lent to the
        // owner again: what went with the lost call went with its receiver.
        let lent = match up.share(rt, &sent._named.nested_object_ids()) {
            Ok(lent) => lent,
            Err(e) => {
                rt.store.complete(task_id.return_object(), Err(e));
                sent.state.finish();
                rt.forget_task(task_id);
                return;
            }
        };
        // Counted as any call through the owner: a route this process
        // learns again (a new proxy, after this one went) waits for it.
        let spec = super::SharedSpec {
            bytes: sent.spec,
            lent,
        };
        up.send_relayed(&sent.state, route.actor, spec, true);
    }
}
