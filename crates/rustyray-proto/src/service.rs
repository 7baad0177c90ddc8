//! The seams between the roles, in terms of the messages above: what an
//! owner (a core worker) asks of the node daemon that hosts its workers,
//! what it asks of one worker process through that node, and what the
//! node hands back to the owner of each worker it started.
//!
//! The node daemon (`rustyray-raylet`) implements [`NodeManager`] and
//! [`WorkerLink`]; the core worker (`rustyray-core-worker`) implements
//! [`OwnerService`] and [`WorkerPeer`]. Neither crate names the other:
//! the embedder (the `rustyray` crate) joins them. Today both sides live
//! in the driver's process and these are plain calls; across processes a
//! frame client implements the same traits.
//!
//! # The rule at a worker's death
//!
//! The node marks a worker dead ([`WorkerLink::is_dead`]) before it tells
//! the owner ([`WorkerPeer::lost`]); an owner that sends a task records it
//! as in flight *before* it checks [`WorkerLink::is_dead`]. So a task is
//! either failed by `lost` or by the sender itself, never by both and
//! never by neither.

use crate::Message;
use rustyray_common::error::Result;
use std::cell::Cell;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed future that can move between threads.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One worker process as its owner reaches it through the node: the
/// connection's writing side, the shared-memory pins the node keeps for
/// it, and its life.
pub trait WorkerLink: Send + Sync + Debug {
    /// The worker's process id.
    fn pid(&self) -> u32;

    /// Writes one whole frame (see [`crate::encode_frame`]) after any frames
    /// before it. A write that fails condemns the worker: its state is
    /// unknown from then on.
    fn write(&self, frame: &[u8]);

    /// Writes one message; `false` (logged, nothing sent) when it cannot be
    /// encoded, e.g. it is over the frame limit.
    fn send(&self, msg: &Message) -> bool {
        match crate::encode_frame(msg) {
            Ok(frame) => {
                self.write(&frame);
                true
            }
            Err(e) => {
                tracing::warn!(pid = self.pid(), error = %e, "cannot send a message to a worker process");
                false
            }
        }
    }

    /// Records shared-memory objects pinned for the worker, which it gives
    /// back with `Unpin` (or the node releases when it dies). `Err` gives
    /// them back to the caller when the worker is already gone: it must
    /// unpin them itself.
    fn hold_pins(&self, ids: Vec<u128>) -> std::result::Result<(), Vec<u128>>;

    /// Whether the worker is known to be dead.
    fn is_dead(&self) -> bool;

    /// Counts a task pushed to share the process with a task blocked in it
    /// (`true`), or its end (`false`): while any runs, the worker is not
    /// leased to another task.
    fn share(&self, begins: bool);

    /// Whether a task shares the process (see [`Self::share`]).
    fn is_shared(&self) -> bool;

    /// Kills the process (SIGKILL); its connection ends, which fails what it
    /// was running.
    fn kill(&self);

    /// Treats the worker as dead from now on and kills it.
    fn condemn(&self);

    /// Resolves once the worker's death has been handled: the owner has been
    /// told ([`WorkerPeer::lost`]) and every task in flight on it has run
    /// its completion.
    fn ended(&self) -> BoxFuture<'_, ()>;
}

/// The owner's side of one worker process: what the node hands it of the
/// worker's messages, and the news of its death.
pub trait WorkerPeer: Send + Sync + 'static {
    /// The worker's process id (its link's).
    fn pid(&self) -> u32;

    /// Handles one message the worker sent its owner. Runs on the thread
    /// reading the worker's connection ([`on_reader`] is true there), which
    /// must never wait on another process. `Err` says why the connection
    /// is to end (an unexpected message).
    fn handle(self: &Arc<Self>, msg: Message) -> std::result::Result<(), String>;

    /// The worker died (its link already says so, see the module's rule) and
    /// its process is gone: fail what was in flight on it and let go of
    /// what was kept for it.
    fn lost(&self, why: &str);

    /// The node is shutting down: let go of everything kept for the worker
    /// without running what waits on it.
    fn discard(&self);
}

/// The owner of the work a node's workers run: the node asks it for the
/// peer of each worker it starts.
pub trait OwnerService: Send + Sync + 'static {
    /// The owner's side of one worker.
    type Peer: WorkerPeer;

    /// Makes the peer of a worker that just connected.
    fn attach(self: &Arc<Self>, link: Arc<dyn WorkerLink>) -> Arc<Self::Peer>;
}

/// What an owner asks of the node daemon hosting its workers (Ray's
/// `RequestWorkerLease` / `ReturnWorker`), `P` being the owner's peer of
/// each worker.
pub trait NodeManager<P>: Send + Sync + Debug {
    /// An idle worker, if one is.
    fn try_lease(&self) -> Result<Option<Arc<P>>>;

    /// A worker: an idle one, else a new one once it has connected.
    fn lease(&self) -> BoxFuture<'static, Result<Arc<P>>>;

    /// Returns a leased worker to the pool.
    fn give_back(&self, worker: Arc<P>);

    /// The process ids of the live workers.
    fn live(&self) -> Vec<u32>;

    /// Stops and reaps every worker; later leases fail.
    fn shut_down(&self);

    /// Removes what the node keeps on disk for this session (spill files,
    /// the session directory unless it holds logs). Called last, once
    /// nothing refers to the node's objects.
    fn close(&self);
}

thread_local! {
    /// Set on the threads that read a worker's connection.
    static ON_READER: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as one reading a worker's connection.
pub fn mark_reader() {
    ON_READER.with(|r| r.set(true));
}

/// Whether this thread reads a worker's connection: it must not wait for
/// another process (or for room in a store, which another process's
/// message may free), or it would hold up the messages behind.
pub fn on_reader() -> bool {
    ON_READER.with(Cell::get)
}
