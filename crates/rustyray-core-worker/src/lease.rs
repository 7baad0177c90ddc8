//! The owner's side of the worker processes it leases from the node
//! daemon: Ray's `CoreWorkerClient` (pushing a task to a leased worker)
//! and the owner's half of `CoreWorkerService` (what a worker asks of the
//! owner of its task).
//!
//! The node daemon (`rustyray-raylet`) hosts the processes and their
//! connections and hands this crate one [`Leased`] per worker (through
//! [`Owner`], the [`OwnerService`] it was started with). A `Leased` keeps
//! what the owner tracks for that worker: the tasks in flight on it (task
//! id → the completion its outcome goes to), the owner's objects and
//! actors lent to it until it gives them back (`Release`,
//! `ReleaseActor`), and the CPU of the tasks running there (lent back to
//! the owner's scheduler while one blocks). The worker's messages for its
//! owner reach [`Leased::handle`] on the node's reader thread for that
//! worker; the node keeps the shared-memory side (allocations for results,
//! pins, `Unpin`) to itself.
//!
//! The owner also borrows from each worker the objects that are the
//! worker's own (their ids carry the worker's tag, see `Listening`) when a
//! message of the worker names them: one count per message, given back
//! ([`Owner::give_back`]) when the owner's last reference goes; their
//! values are asked of the worker when first looked at
//! ([`Owner::fetch`]); those not fetched when the worker dies fail with
//! `OwnerDied`.
//!
//! # Order at a worker's death
//!
//! The node marks the worker dead, reaps it, releases its pins, then calls
//! [`WorkerPeer::lost`]; [`Leased::push_then`] records a task as in flight
//! before it checks whether the worker is dead (the rule in
//! `rustyray_proto::service`). A ledger that `lost` emptied stays closed:
//! what a later message would lend goes back at once.

use crate::error::{Error, Result};
use crate::ids::{ActorId, ObjectId, TaskId};
use crate::runtime::Inner;
use crate::shm::{Loan, NodeStore};
use crate::wire::service::{OwnerService, WorkerLink, WorkerPeer};
use crate::wire::{Message, WireOutcome};
use crate::{RawActor, RawRef, ResourceSet, Value};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use tokio::sync::oneshot;

/// What runs when a task pushed to a worker ends: with its outcome, or
/// with why the worker could not finish it. Runs on the worker's reader
/// thread (or wherever the worker is found dead).
pub(crate) type Completion = Box<dyn FnOnce(std::result::Result<WireOutcome, String>) + Send>;

/// The owner a node's workers answer to: the driver's runtime, and the
/// node's shared-memory store it lends values through.
#[doc(hidden)]
pub struct Owner {
    rt: OnceLock<Weak<Inner>>,
    shm: Arc<NodeStore>,
    /// Every worker's peer by process id, for a `Lend` naming it.
    peers: Mutex<HashMap<u32, Weak<Leased>>>,
    /// Every worker's peer by the tag its ids carry, for what the owner
    /// borrows from it, with its process id (to name it once it is gone).
    by_tag: Mutex<HashMap<u64, (Weak<Leased>, u32)>>,
    /// `Fetch`es of objects not here yet, by object (see [`Owner::park`]).
    parked: Mutex<HashMap<ObjectId, Vec<crate::actor::Reply>, crate::ids::IdHash>>,
}

/// How long a `Fetch` of an object this owner does not know waits for it
/// to arrive before it is answered `ObjectLost`.
const PARK_TIME: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner").finish_non_exhaustive()
    }
}

impl Owner {
    pub(crate) fn new(shm: Arc<NodeStore>) -> Arc<Owner> {
        Arc::new(Owner {
            rt: OnceLock::new(),
            shm,
            peers: Mutex::new(HashMap::new()),
            by_tag: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::default()),
        })
    }

    /// Names the runtime, once it exists (workers may connect before).
    pub(crate) fn set_runtime(&self, rt: &Arc<Inner>) {
        let _ = self.rt.set(Arc::downgrade(rt));
    }

    /// Holds `reply` to a `Fetch` of object `id`, which is not here yet: a
    /// worker that passed a reference straight to another worker lent the
    /// object (`Lend`) on its own connection,
    /// which may be read after the receiver's `Fetch`. Answered when the
    /// object comes ([`Owner::unpark`]), or `ObjectLost` after
    /// [`PARK_TIME`].
    fn park(self: &Arc<Self>, rt: &Arc<Inner>, id: ObjectId, reply: crate::actor::Reply) {
        let mut parked = self.parked.lock();
        // It may have come meanwhile (`unpark` looks under this lock).
        if let Ok(r) = RawRef::acquire(id, rt.clone()) {
            drop(parked);
            crate::actor::reply_when_done(rt, r, reply);
            return;
        }
        let first = !parked.contains_key(&id);
        parked.entry(id).or_default().push(reply);
        drop(parked);
        if first {
            let owner = Arc::downgrade(self);
            rt.handle.spawn(async move {
                tokio::time::sleep(PARK_TIME).await;
                let waiting = owner.upgrade().and_then(|o| o.parked.lock().remove(&id));
                for reply in waiting.unwrap_or_default() {
                    reply(Err(Error::ObjectLost(id)));
                }
            });
        }
    }

    /// Object `r` is here now: answers the `Fetch`es parked for it.
    fn unpark(&self, r: &RawRef) {
        let waiting = {
            let mut parked = self.parked.lock();
            if parked.is_empty() {
                return;
            }
            parked.remove(&r.id())
        };
        for reply in waiting.unwrap_or_default() {
            crate::actor::reply_when_done(r.runtime(), r.clone(), reply);
        }
    }

    /// Whether the worker whose ids carry `tag` is connected and alive.
    pub(crate) fn knows(&self, tag: u64) -> bool {
        self.lender(tag).is_some_and(|w| !w.is_dead())
    }

    /// The worker whose ids carry `tag`, while it is connected.
    fn lender(&self, tag: u64) -> Option<Arc<Leased>> {
        self.by_tag.lock().get(&tag).and_then(|(w, _)| w.upgrade())
    }

    /// Asks the worker that owns object `id` (it lent it here) for its
    /// value; a worker that is gone fails it with `OwnerDied`.
    pub(crate) fn fetch(&self, id: ObjectId) {
        let lender = self.lender(id.owner()).filter(|w| !w.is_dead());
        if lender.is_some_and(|w| w.send(&Message::Fetch { id })) {
            return;
        }
        if let Some(rt) = self.runtime() {
            rt.store.complete(id, Err(self.owner_died(id)));
        }
    }

    /// Whether a worker whose ids carry `tag` was connected here (and is
    /// still remembered: see the sweep in `Listening`).
    pub(crate) fn had_worker(&self, tag: u64) -> bool {
        self.by_tag.lock().contains_key(&tag)
    }

    /// `OwnerDied` for object `id`, naming the worker that owned it.
    pub(crate) fn owner_died(&self, id: ObjectId) -> Error {
        let pid = self.by_tag.lock().get(&id.owner()).map(|(_, pid)| *pid);
        let owner = pid.map_or_else(
            || "a worker process that is gone".to_owned(),
            |pid| format!("worker process {pid}"),
        );
        Error::OwnerDied { object_id: id, owner }
    }

    /// Gives back to the worker that owns object `id` the `count` counts
    /// this process borrowed it with (its last reference here went).
    pub(crate) fn give_back(&self, id: ObjectId, count: u32) {
        if let Some(w) = self.lender(id.owner()) {
            w.send(&Message::Release { id, count });
        }
    }

    /// The node's shared-memory store, as this owner writes to it.
    pub(crate) fn shm(&self) -> &Arc<NodeStore> {
        &self.shm
    }

    /// The runtime, while it is up.
    fn runtime(&self) -> Option<Arc<Inner>> {
        self.rt.get().and_then(Weak::upgrade)
    }
}

impl OwnerService for Owner {
    type Peer = Leased;

    fn attach(self: &Arc<Self>, link: Arc<dyn WorkerLink>) -> Arc<Leased> {
        let pid = link.pid();
        let leased = Arc::new(Leased {
            link,
            owner: self.clone(),
            inflight: Mutex::new(HashMap::default()),
            ledger: Mutex::new(Some(Ledger::default())),
            cpu: Mutex::new(HashMap::default()),
            endpoint: OnceLock::new(),
            listening: tokio::sync::Notify::new(),
            leases: Mutex::new(HashMap::default()),
            lessor: Mutex::new(None),
            created: Mutex::new(Vec::new()),
            tag: OnceLock::new(),
            routed: Mutex::new(std::collections::HashSet::new()),
        });
        let mut peers = self.peers.lock();
        // Workers that are gone leave their entries behind; swept here, so
        // the map holds about as many entries as there are live workers.
        if peers.len() >= 64 && peers.len().is_power_of_two() {
            peers.retain(|_, w| w.strong_count() > 0);
        }
        peers.insert(pid, Arc::downgrade(&leased));
        leased
    }
}

/// What the owner lends a worker and keeps for it until it says it is
/// done: counts on the objects it holds (one per message that lent the
/// worker the object, its own or one it borrows) and on its actors (one
/// per message that lent the handle).
#[derive(Default)]
struct Ledger {
    borrows: Counts<ObjectId, RawRef>,
    actors: Counts<ActorId, RawActor>,
}

/// Counts kept for one worker, by key, each with what it keeps alive. A
/// count may go below zero for a while: a worker that received something
/// from another worker (lent with `Lend`, which that worker sends to this
/// owner) may give it back before the `Lend` is read. The value is held
/// while the count is above zero.
pub(crate) struct Counts<K, V> {
    held: HashMap<K, (Option<V>, i64)>,
    /// Keys whose count is below zero (bounded: see [`Counts::release`]).
    owed: usize,
}

impl<K, V> Default for Counts<K, V> {
    fn default() -> Self {
        Counts {
            held: HashMap::new(),
            owed: 0,
        }
    }
}

/// The most keys a worker may give back before they were lent to it
/// (releases that overtook their `Lend`); more are dropped, logged.
const MAX_OWED: usize = 1 << 16;

impl<K: std::hash::Hash + Eq + Copy + std::fmt::Debug, V> Counts<K, V> {
    /// Counts one more for `key`; `value` makes what the count keeps
    /// alive, when it is the first (it is not called for a count that only
    /// pays a debt back, nor when a value is kept already).
    pub(crate) fn lend_with(&mut self, key: K, value: impl FnOnce() -> Option<V>) {
        let entry = self.held.entry(key).or_insert((None, 0));
        let was = entry.1;
        entry.1 += 1;
        if was < 0 {
            if entry.1 == 0 {
                self.held.remove(&key);
                self.owed -= 1;
            }
            return;
        }
        if entry.0.is_none() {
            // `None` when nothing is left to keep (the object or actor is
            // gone): the count stays all the same, so the worker's release
            // of it balances instead of leaving a debt.
            entry.0 = value();
        }
    }

    /// [`Counts::lend_with`] with `value` at hand; returns it when it was
    /// not kept, for the caller to drop outside the lock (dropping the
    /// last handle on an object frees what it refers to).
    pub(crate) fn lend(&mut self, key: K, value: V) -> Option<V> {
        let mut slot = Some(value);
        self.lend_with(key, || slot.take());
        slot
    }

    /// Takes `count` back for `key`; returns the value once no count is
    /// left, for the caller to drop outside the lock.
    pub(crate) fn release(&mut self, key: K, count: u32) -> Option<V> {
        let count = i64::from(count);
        match self.held.get_mut(&key) {
            Some(entry) if entry.1 > count => {
                entry.1 -= count;
                None
            }
            Some(entry) if entry.1 > 0 => {
                let left = entry.1 - count;
                let value = entry.0.take();
                if left == 0 {
                    self.held.remove(&key);
                } else {
                    entry.1 = left;
                    self.owed += 1;
                }
                value
            }
            Some(entry) => {
                entry.1 -= count;
                None
            }
            None if self.owed < MAX_OWED => {
                self.held.insert(key, (None, -count));
                self.owed += 1;
                None
            }
            None => {
                tracing::warn!(?key, "a worker gave back more than it was lent; ignored");
                None
            }
        }
    }
}

/// The owner's side of one worker process it leases from the node.
pub struct Leased {
    link: Arc<dyn WorkerLink>,
    owner: Arc<Owner>,
    /// Tasks pushed to the worker and not finished yet.
    inflight: Mutex<HashMap<TaskId, Completion, crate::ids::IdHash>>,
    /// `None` once the worker is gone: what would be lent then goes back
    /// at once.
    ledger: Mutex<Option<Ledger>>,
    /// Tasks running here: their CPU, and whether it is lent out while the
    /// task blocks.
    cpu: Mutex<HashMap<TaskId, (ResourceSet, bool), crate::ids::IdHash>>,
    /// Where the worker accepts `Peer` connections (`Listening`).
    endpoint: OnceLock<String>,
    /// Woken when the endpoint is known.
    listening: tokio::sync::Notify,
    /// Leases this worker holds for tasks it submitted (see `grant`).
    leases: Mutex<HashMap<TaskId, crate::grant::Granted, crate::ids::IdHash>>,
    /// The worker this one is leased to, and the lease, while it is.
    lessor: Mutex<Option<(Weak<Leased>, TaskId)>>,
    /// The actors code in this worker created, not detached: they end
    /// with it.
    created: Mutex<Vec<ActorId>>,
    /// The tag the worker's ids carry (`Listening`): objects whose ids
    /// carry it are the worker's own, borrowed from it.
    tag: OnceLock<u64>,
    /// Actors whose route the worker was told (`Route`), after it made
    /// calls on them through the owner.
    routed: Mutex<std::collections::HashSet<ActorId>>,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased")
            .field("pid", &self.link.pid())
            .field("dead", &self.link.is_dead())
            .finish_non_exhaustive()
    }
}

impl Leased {
    /// The worker's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.link.pid()
    }

    /// Whether the worker is known to be dead.
    pub(crate) fn is_dead(&self) -> bool {
        self.link.is_dead()
    }

    /// Kills the worker's process.
    pub(crate) fn kill(&self) {
        self.link.kill();
    }

    /// Treats the worker as dead from now on and kills it.
    pub(crate) fn condemn(&self) {
        self.link.condemn();
    }

    /// Counts a task that shares the process with a task blocked in it.
    pub(crate) fn share(&self, begins: bool) {
        self.link.share(begins);
    }

    /// Waits until the worker's death has been handled: every task in
    /// flight on it has run its completion.
    pub(crate) async fn ended(&self) {
        self.link.ended().await;
    }

    /// Asks the worker to cancel `task`: it flags the task (and aborts it
    /// at its next await if async); with `force` the process is killed,
    /// unless a task shares it (it would be taken along).
    pub(crate) fn cancel(&self, task: TaskId, force: bool) {
        if force && !self.link.is_shared() {
            self.link.kill();
        } else {
            let _ = self.link.send(&Message::CancelTask { task_id: task, force });
        }
    }

    /// Sends a message; false when the worker is gone.
    pub(crate) fn send(&self, msg: &Message) -> bool {
        self.link.send(msg)
    }

    /// A message's frame; `None` (logged) when it cannot be sent, e.g. it
    /// is over the size limit.
    fn frame(&self, msg: &Message) -> Option<Vec<u8>> {
        crate::wire::encode_frame(msg)
            .map_err(
                |e| tracing::warn!(pid = self.pid(), error = %e, "cannot send a message to a worker process"),
            )
            .ok()
    }

    /// Sends a task to the worker; `done` runs with its outcome, or with
    /// why the worker could not finish it. The task is on its way when this
    /// returns, so tasks sent one after the other arrive in order. `loan`
    /// (the shared-memory arguments pinned for it, the objects its values
    /// refer to) becomes the worker's to give back.
    pub(crate) fn push_then(&self, task_id: TaskId, msg: &Message, loan: Loan, done: Completion) {
        // Built first: a message that cannot go lends nothing (the loan
        // goes back as it drops).
        let Some(frame) = self.frame(msg) else {
            done(Err(format!(
                "task {task_id} is too large to send to a worker process"
            )));
            return;
        };
        self.inflight.lock().insert(task_id, done);
        self.take_loan(loan);
        // A worker found dead before the insert has already failed what it
        // held; fail this one too (the node marks it dead before `lost`).
        if self.is_dead() {
            if let Some(done) = self.inflight.lock().remove(&task_id) {
                done(Err(format!("worker process {} died", self.pid())));
            }
            return;
        }
        self.link.write(&frame);
    }

    /// [`Leased::push_then`], as a future. `convert` turns the outcome into
    /// what the future yields, on the reader thread as the outcome arrives:
    /// the objects it names must be taken before the worker's next messages
    /// (a `Release`) are read.
    pub(crate) fn push<T: Send + 'static>(
        &self,
        task_id: TaskId,
        msg: &Message,
        loan: Loan,
        convert: impl FnOnce(WireOutcome) -> T + Send + 'static,
    ) -> impl std::future::Future<Output = std::result::Result<T, String>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.push_then(
            task_id,
            msg,
            loan,
            Box::new(move |r| {
                let _ = tx.send(r.map(convert));
            }),
        );
        let pid = self.pid();
        async move {
            rx.await
                .unwrap_or_else(|_| Err(format!("worker process {pid} died")))
        }
    }

    /// Records what a message lends the worker, before the message goes.
    fn take_loan(&self, loan: Loan) {
        let (pins, refs, actors) = loan.hand_over();
        if !pins.is_empty() {
            // The worker is gone: its pins go back here.
            if let Err(pins) = self.link.hold_pins(pins) {
                for id in pins {
                    let _ = self.owner.shm.store.unpin(id);
                }
            }
        }
        if refs.is_empty() && actors.is_empty() {
            return;
        }
        let mut spare = (Vec::new(), Vec::new());
        let mut guard = self.ledger.lock();
        // When the worker is gone, all of it is spare.
        match guard.as_mut() {
            Some(ledger) => {
                for r in refs {
                    spare.0.extend(ledger.borrows.lend(r.id(), r));
                }
                for a in actors {
                    spare.1.extend(ledger.actors.lend(a.id(), a));
                }
            }
            None => spare = (refs, actors),
        }
        // Dropped outside the lock.
        drop(guard);
        drop(spare);
    }

    /// Sends a message that lends the worker `loan` (see `push_then`);
    /// false, lending nothing, when it cannot be sent.
    fn send_lending(&self, msg: &Message, loan: Loan) -> bool {
        let Some(frame) = self.frame(msg) else {
            return false;
        };
        self.take_loan(loan);
        self.link.write(&frame);
        true
    }

    /// Borrows from the worker the objects of its own among `ids` (one
    /// count each: a message of its lent them here), before what names
    /// them is taken. The returned references hold them until then.
    fn borrow_lent(&self, rt: &Arc<Inner>, ids: &[ObjectId]) -> Vec<RawRef> {
        let Some(&tag) = self.tag.get() else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for &id in ids.iter().filter(|id| id.owner() == tag) {
            match rt.store.borrow(id) {
                Ok(()) => {
                    let r = RawRef::adopt(id, rt.clone());
                    // A worker that asked for it before it came gets it now.
                    self.owner.unpark(&r);
                    held.push(r);
                }
                // Shutting down: the count goes back at once.
                Err(_) => {
                    self.send(&Message::Release { id, count: 1 });
                }
            }
        }
        held
    }

    /// [`Leased::borrow_lent`] for what an outcome names.
    fn borrow_named(&self, rt: &Arc<Inner>, outcome: &WireOutcome) -> Vec<RawRef> {
        match outcome {
            WireOutcome::Value { refs, .. } if !refs.is_empty() => self.borrow_lent(rt, refs),
            _ => Vec::new(),
        }
    }

    /// Counts for this worker what another worker lent it (`Lend`).
    fn lent_by_peer(&self, rt: &Arc<Inner>, refs: &[ObjectId], actors: &[ActorId]) {
        let mut ledger = self.ledger.lock();
        let Some(ledger) = ledger.as_mut() else {
            return;
        };
        for &id in refs {
            // The lender holds the object until after its `Lend`: it is
            // here (or its owner is another worker, whose own `Lend` may
            // not be read yet).
            ledger.borrows.lend_with(id, || rt.acquire_named(id).ok());
        }
        for &id in actors {
            ledger.actors.lend_with(id, || crate::actor::hold_actor(rt, id));
        }
    }

    /// The endpoint where the worker accepts `Peer` connections, once it
    /// said.
    pub(crate) fn endpoint(&self) -> Option<&str> {
        self.endpoint.get().map(String::as_str)
    }

    /// Completes when the worker says its endpoint (enable it, then check
    /// [`Leased::endpoint`], then await).
    pub(crate) fn listening(&self) -> tokio::sync::futures::Notified<'_> {
        self.listening.notified()
    }

    /// The leases this worker holds.
    pub(crate) fn leases(&self) -> &Mutex<HashMap<TaskId, crate::grant::Granted, crate::ids::IdHash>> {
        &self.leases
    }

    /// Records whom this worker is leased to (`None` once it is not).
    pub(crate) fn set_lessor(&self, lessor: Option<(Weak<Leased>, TaskId)>) {
        *self.lessor.lock() = lessor;
    }

    /// Ends the leases this worker holds, and the one it is leased under:
    /// it is gone.
    fn end_leases(&self) {
        let Some(rt) = self.owner.runtime() else { return };
        crate::grant::end_all(&rt, self);
        let lessor = self.lessor.lock().take();
        if let Some((lessee, lease_id)) = lessor {
            if let Some(lessee) = lessee.upgrade() {
                crate::grant::end(&rt, &lessee, lease_id, true);
            }
        }
    }

    /// Records the CPU of a task sent here (`Some`), or forgets it when the
    /// task ends (`None`): then returns the CPU if it was still lent out.
    pub(crate) fn running_cpu(&self, task: TaskId, cpu: Option<ResourceSet>) -> Option<ResourceSet> {
        let mut m = self.cpu.lock();
        match cpu {
            Some(c) => {
                m.insert(task, (c, false));
                None
            }
            None => m.remove(&task).and_then(|(c, lent)| lent.then_some(c)),
        }
    }

    /// A task here blocks or resumes: its CPU to lend or take back, if the
    /// state changed.
    fn lend(&self, task: TaskId, blocked: bool) -> Option<ResourceSet> {
        let mut m = self.cpu.lock();
        let (c, lent) = m.get_mut(&task)?;
        (*lent != blocked).then(|| {
            *lent = blocked;
            c.clone()
        })
    }

    /// Gives back `count` of the counts the worker held on an object;
    /// returns the reference once none are left, for the caller to drop
    /// outside the lock (freeing it may free what it refers to).
    fn release(&self, id: ObjectId, count: u32) -> Option<RawRef> {
        let mut ledger = self.ledger.lock();
        ledger.as_mut()?.borrows.release(id, count)
    }

    /// [`Leased::release`] for an actor handle.
    fn release_actor(&self, id: ActorId, count: u32) -> Option<RawActor> {
        let mut ledger = self.ledger.lock();
        ledger.as_mut()?.actors.release(id, count)
    }

    /// An answer to the worker: `message` made of an outcome, lending what
    /// the value names; an answer too large to send goes as an error.
    fn answer(
        self: &Arc<Self>,
        message: impl Fn(WireOutcome) -> Message + Send + 'static,
    ) -> crate::actor::Reply {
        let to = self.clone();
        Box::new(move |result| {
            let (outcome, loan) = lend_outcome(result, Some(&to.owner.shm));
            if !to.send_lending(&message(outcome), loan) {
                let outcome = WireOutcome::Failed(Error::Protocol(
                    "the value is too large to send to a worker process".to_owned(),
                ));
                to.send(&message(outcome));
            }
        })
    }

    /// Tells the worker, once per actor, the route of an actor it calls
    /// through the owner, when the actor is alive in another worker
    /// process: its later calls go there straight (`Route`). (A worker
    /// whose route to the actor broke keeps calling through the owner: it
    /// keeps the broken route, whatever it is told.)
    fn tell_route(&self, rt: &Arc<Inner>, actor_id: ActorId) {
        if self.routed.lock().contains(&actor_id) {
            return;
        }
        let Some(actor) = crate::actor::routed_for_worker(rt, actor_id) else {
            return;
        };
        if actor.route.as_ref().is_none_or(|r| r.pid == self.pid()) {
            return;
        }
        if self.routed.lock().insert(actor_id) {
            self.send(&Message::Route { actor });
        }
    }

    /// Answers a `CallActor`, `SpawnActor` or `GetActor` with
    /// `ObjectReady`.
    fn object_ready(self: &Arc<Self>, task_id: TaskId) -> crate::actor::Reply {
        self.answer(move |outcome| Message::ObjectReady { task_id, outcome })
    }

    /// The owner-side handling of one message (see [`WorkerPeer::handle`]).
    fn serve(self: &Arc<Self>, msg: Message) -> std::result::Result<(), String> {
        let owner = self.owner.runtime();
        match msg {
            Message::TaskDone { task_id, outcome } => {
                // What the worker lent with it is borrowed before the value
                // is taken (and given back if nobody takes it).
                let _held = owner.as_ref().map(|rt| self.borrow_named(rt, &outcome));
                let done = self.inflight.lock().remove(&task_id);
                match (done, outcome) {
                    (Some(done), outcome) => done(Ok(outcome)),
                    // Nobody waits for it (a duplicate).
                    (None, outcome) => self.discard(outcome),
                }
            }
            Message::CallActor {
                actor_id,
                task_id,
                spec,
                refs,
                attempted,
            } => {
                let reply = self.object_ready(task_id);
                match owner {
                    Some(rt) => {
                        let _held = self.borrow_lent(&rt, &refs);
                        let spec = Value::from_bytes(spec, "TaskSpec");
                        crate::actor::call_for_worker(&rt, actor_id, task_id, &spec, attempted, reply);
                        self.tell_route(&rt, actor_id);
                    }
                    None => reply(Err(Error::Shutdown)),
                }
            }
            Message::Blocked { task_id, on } => {
                if let (Some(rt), Some(cpu)) = (owner, self.lend(task_id, true)) {
                    if let Some(on) = on {
                        rt.help_worker(on, &cpu, self);
                    }
                    rt.lend_back(&cpu);
                }
            }
            Message::Unblocked { task_id } => {
                if let (Some(rt), Some(cpu)) = (owner, self.lend(task_id, false)) {
                    rt.take_back(&cpu);
                }
            }
            Message::Release { id, count } => drop(self.release(id, count)),
            Message::ReleaseActor { actor, count } => drop(self.release_actor(actor, count)),
            Message::SpawnActor {
                task_id,
                spec,
                refs,
                options,
            } => {
                let reply = self.object_ready(task_id);
                let _held = owner.as_ref().map(|rt| self.borrow_lent(rt, &refs));
                let created = owner.clone().ok_or(Error::Shutdown).and_then(|rt| {
                    crate::actor::spawn_for_worker(&rt, &Value::from_bytes(spec, "TaskSpec"), &options)
                });
                if let (Ok(actor), false, Some(rt)) = (&created, options.detached, &owner) {
                    let mut mine = self.created.lock();
                    // Actors that ended leave their ids behind; swept here.
                    if mine.len() >= 64 && mine.len().is_power_of_two() {
                        mine.retain(|id| crate::actor::is_live(rt, *id));
                    }
                    mine.push(actor.id());
                }
                reply(created.map(Value::local));
            }
            Message::GetActor { task_id, name } => {
                let reply = self.object_ready(task_id);
                let found = owner
                    .ok_or(Error::Shutdown)
                    .and_then(|rt| crate::actor::named(&rt, &name));
                reply(found.map(Value::local));
            }
            Message::KillActor { actor, no_restart } => {
                if let Some(rt) = owner {
                    crate::actor::kill_for_worker(&rt, actor, no_restart);
                }
            }
            Message::Fetch { id } => {
                let reply = self.answer(move |outcome| Message::Fetched { id, outcome });
                // The worker holds a count on the object, so it is here,
                // or on its way from the worker that passed it on.
                match owner.ok_or(Error::Shutdown) {
                    Ok(rt) => match rt.acquire_named(id) {
                        // (A dead worker's object is taken as failed with
                        // `OwnerDied`, and answered so.)
                        Ok(r) => crate::actor::reply_when_done(&rt, r, reply),
                        // Not here yet: it may be on its way.
                        Err(_) if rt.check_open().is_ok() => self.owner.park(&rt, id, reply),
                        Err(e) => reply(Err(e)),
                    },
                    Err(e) => reply(Err(e)),
                }
            }
            Message::Answer { to, task_id, outcome } => {
                let _held = owner.as_ref().map(|rt| self.borrow_named(rt, &outcome));
                let to = self.owner.peers.lock().get(&to).and_then(Weak::upgrade);
                let (Some(to), Some(rt)) = (to, owner) else {
                    // The caller is gone: what the answer holds goes too.
                    self.discard(outcome);
                    return Ok(());
                };
                match outcome {
                    // A value is lent to the caller as the owner lends its
                    // own (pinned in shared memory, or inline).
                    WireOutcome::Value { .. } | WireOutcome::Stored { .. } => {
                        let from = self.pid();
                        let reply = to.answer(move |outcome| Message::Answered {
                            task_id,
                            from,
                            outcome,
                        });
                        reply(value_from_wire(outcome, &rt));
                    }
                    other => {
                        to.send(&Message::Answered {
                            task_id,
                            from: self.pid(),
                            outcome: other,
                        });
                    }
                }
            }
            // Code in the worker cancelled a task or call it had the owner
            // run: cancelled here as the owner's own (not recursively: its
            // children are the owner's to cancel).
            Message::CancelTask { task_id, force } => {
                if let Some(rt) = owner {
                    let opts = crate::options::CancelOptions {
                        force,
                        recursive: false,
                    };
                    let _ = rt.cancel(task_id.return_object(), opts);
                }
            }
            Message::Listening { endpoint, tag } => {
                if self.tag.set(tag).is_ok() {
                    let mut by_tag = self.owner.by_tag.lock();
                    // Swept as `peers` is (see `attach`).
                    if by_tag.len() >= 64 && by_tag.len().is_power_of_two() {
                        by_tag.retain(|_, (w, _)| w.strong_count() > 0);
                    }
                    by_tag.insert(tag, (Arc::downgrade(self), self.pid()));
                }
                let _ = self.endpoint.set(endpoint);
                self.listening.notify_waiters();
            }
            Message::RequestLease { lease_id, resources } => match owner {
                Some(rt) => crate::grant::request(&rt, self, lease_id, &resources),
                None => {
                    self.send(&Message::LeaseRefused {
                        lease_id,
                        error: Error::Shutdown,
                    });
                }
            },
            Message::ReturnLease { lease_id, broken } => {
                if let Some(rt) = owner {
                    crate::grant::end(&rt, self, lease_id, broken);
                }
            }
            Message::Lend { to, refs, actors } => {
                // The sender's own objects are borrowed from it first (and
                // given back at once if the receiver is gone).
                let _held = owner.as_ref().map(|rt| self.borrow_lent(rt, &refs));
                let to = self.owner.peers.lock().get(&to).and_then(Weak::upgrade);
                if let (Some(to), Some(rt)) = (to, owner) {
                    to.lent_by_peer(&rt, &refs, &actors);
                }
            }
            // The value of an object of the worker's own that this process
            // borrows and asked for.
            Message::Fetched { id, outcome } => {
                let _held = owner.as_ref().map(|rt| self.borrow_named(rt, &outcome));
                match owner {
                    // Never waiting here for room: this thread reads the
                    // releases that make it.
                    Some(rt) => match value_from_wire(outcome, &rt) {
                        Ok(v) => rt.publish(id, v),
                        Err(e) => rt.store.complete(id, Err(e)),
                    },
                    None => self.discard(outcome),
                }
            }
            other => return Err(format!("unexpected message from a worker: {other:?}")),
        }
        Ok(())
    }

    /// Drops an outcome the worker sent that nobody keeps: a sealed object
    /// in shared memory is freed here.
    fn discard(&self, outcome: WireOutcome) {
        if let WireOutcome::Stored { id, .. } = outcome {
            let _ = self.owner.shm.store.delete(id);
        }
    }

    /// Lets go of what was kept for the worker; the tasks in flight are
    /// returned for the caller to fail or drop.
    fn close(&self) -> HashMap<TaskId, Completion, crate::ids::IdHash> {
        let ledger = self.ledger.lock().take();
        drop(ledger);
        std::mem::take(&mut *self.inflight.lock())
    }
}

impl WorkerPeer for Leased {
    fn pid(&self) -> u32 {
        self.link.pid()
    }

    fn handle(self: &Arc<Self>, msg: Message) -> std::result::Result<(), String> {
        self.serve(msg)
    }

    fn lost(&self, why: &str) {
        self.end_leases();
        // What this process borrows from it and has not got is lost with
        // it (Ray's `OwnerDiedError`).
        if let (Some(rt), Some(&tag)) = (self.owner.runtime(), self.tag.get()) {
            let owner = format!("worker process {}", self.pid());
            rt.store.fail_owned_by(tag, |id| Error::OwnerDied {
                object_id: id,
                owner: owner.clone(),
            });
        }
        // The actors it owns go with it.
        let created = std::mem::take(&mut *self.created.lock());
        if let Some(rt) = self.owner.runtime() {
            for id in created {
                crate::actor::owner_died(&rt, id, self.pid());
            }
        }
        let inflight = self.close();
        if !inflight.is_empty() {
            tracing::warn!(
                pid = self.pid(),
                tasks = inflight.len(),
                reason = why,
                "worker process died"
            );
        }
        for (_, done) in inflight {
            done(Err(format!("worker process {} died", self.pid())));
        }
    }

    fn discard(&self) {
        self.end_leases();
        let inflight = self.close();
        drop(inflight);
    }
}

/// The value a worker sent (an answer, a fetched value), or the error it
/// sent instead; a bare task outcome there is a protocol error.
fn value_from_wire(outcome: WireOutcome, rt: &Arc<Inner>) -> Result<Value> {
    match crate::runtime::Outcome::from_wire(outcome, rt) {
        crate::runtime::Outcome::Value(v) => Ok(v),
        crate::runtime::Outcome::Failed(e) => Err(e),
        _ => Err(Error::Protocol("a value was expected".to_owned())),
    }
}

/// An object's value (or error) as a worker receives it, and what that
/// lends the worker: a value in shared memory is pinned for it, one
/// inline lends the objects it refers to.
pub(crate) fn lend_outcome(result: Result<Value>, node: Option<&Arc<NodeStore>>) -> (WireOutcome, Loan) {
    let mut loan = Loan::none();
    let outcome = result
        .and_then(|v| {
            let type_name = v.type_name().to_owned();
            loan.lend(&v, node).map(|lent| lent.into_outcome(type_name))
        })
        .unwrap_or_else(WireOutcome::Failed);
    (outcome, loan)
}

#[cfg(test)]
mod tests {
    use super::Counts;

    /// A value that says when it is dropped.
    struct Kept(std::rc::Rc<std::cell::Cell<u32>>);

    impl Drop for Kept {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn counts_hold_the_value_while_any_count_is_left() {
        let dropped = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut c: Counts<u32, Kept> = Counts::default();
        assert!(c.lend(1, Kept(dropped.clone())).is_none());
        // A second loan keeps the first value; the spare goes back.
        assert!(c.lend(1, Kept(dropped.clone())).is_some());
        assert!(c.release(1, 1).is_none());
        let last = c.release(1, 1);
        assert!(last.is_some(), "the last count gives the value back");
        drop(last);
        assert_eq!(dropped.get(), 2);
        assert!(c.held.is_empty());
    }

    #[test]
    fn a_release_that_overtakes_its_loan_is_owed_then_paid() {
        let dropped = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut c: Counts<u32, Kept> = Counts::default();
        // Given back before the `Lend` that counts it is read.
        assert!(c.release(7, 1).is_none());
        assert_eq!(c.owed, 1);
        // The loan pays the debt: nothing is kept, nothing made.
        let mut made = false;
        c.lend_with(7, || {
            made = true;
            Some(Kept(dropped.clone()))
        });
        assert!(!made, "a loan that pays a debt keeps nothing");
        assert!(c.held.is_empty());
        assert_eq!(c.owed, 0);
        // Releasing more than was lent leaves a debt the next loan pays.
        assert!(c.lend(8, Kept(dropped.clone())).is_none());
        let v = c.release(8, 2);
        assert!(v.is_some());
        drop(v);
        assert_eq!(c.owed, 1);
        assert!(c.lend(8, Kept(dropped.clone())).is_some(), "paid, not kept");
        assert!(c.held.is_empty());
        assert_eq!(c.owed, 0);
    }

    #[test]
    fn a_loan_of_something_gone_still_counts_so_its_release_balances() {
        let mut c: Counts<u32, ()> = Counts::default();
        // Nothing left to keep, but the receiver will give the count back.
        c.lend_with(3, || None);
        assert!(c.release(3, 1).is_none());
        assert!(c.held.is_empty(), "balanced, nothing kept");
        assert_eq!(c.owed, 0, "no debt left behind");
    }

    #[test]
    fn what_may_be_owed_is_bounded() {
        let mut c: Counts<u32, ()> = Counts::default();
        for k in 0..(super::MAX_OWED as u32 + 100) {
            c.release(k, 1);
        }
        assert_eq!(c.owed, super::MAX_OWED);
        assert_eq!(c.held.len(), super::MAX_OWED);
    }
}
