//! The in-process object store and ownership table — Ray's
//! `CoreWorkerMemoryStore` together with its `ReferenceCounter`.
//!
//! # Design
//!
//! Each object has one [`Entry`] in one of a fixed number of shards (a
//! `Mutex<HashMap>` each, chosen by the id's counter bits). An entry holds:
//!
//! * `state`: `Pending` (with the wakers of everyone waiting for it),
//!   `Remote` (lent by the owner, not asked for yet), `Ready` (the value
//!   and its size) or `Failed` (the error);
//! * `refs`: how many live reference handles name the object. Every
//!   `ObjectRef` clone shares one handle; handles are created by `put`, by
//!   task submission (the return object), and by decoding bytes that mention
//!   the object. A pending task's arguments and values nested in other
//!   objects hold handles too, which is how they keep their objects alive;
//! * `lent`: how many counts another process keeps on the object for this
//!   one: in a worker, the owner (the driver) that lent it here; in the
//!   driver, the worker whose own object it borrows. An object lent here (a
//!   reference inside a message) starts `Remote`: nothing is asked for
//!   until someone looks at it, and then its lender is asked once
//!   (`set_fetch`) and the entry waits, `Pending`, for its answer. When the
//!   entry goes, `release` hands back `lent` so the lender can drop that
//!   many counts;
//!   because the count lives in the entry, a loan that arrives while the
//!   entry is going is counted in the next entry, never in the one going.
//!
//! Invariants: an entry exists exactly while `refs > 0`; a state leaves
//! `Pending` once and never returns to it (the first completion wins, so a
//! cancelled task's late result is ignored); `used` is the sum of the sizes
//! of `Ready` entries plus reservations in flight.
//!
//! Locking: a shard lock is held only for map operations. Wakers are woken
//! and removed values dropped after the lock is released, because dropping
//! a value can release nested references and re-enter the store.
//! `create_pending` and `insert_ready` check the shutdown flag under the
//! shard lock, so `shut_down` (which sets the flag, then drains each shard)
//! never leaves a new object behind.
//!
//! The locks, condition variable and atomics come from [`crate::sync`], so
//! that this synchronization is model-checked with shuttle: see
//! `model_tests` (`cargo nextest run -p rustyray-core-worker --features shuttle
//! --lib model_`).

use crate::codec::Value;
use crate::error::{Error, Result};
use crate::ids::{IdHash, ObjectId};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

const SHARDS: usize = 32;

/// Counters describing the store's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Objects with a value in the store.
    pub num_objects: u64,
    /// Bytes held by those values (their encoded size).
    pub bytes_used: u64,
    /// Objects known to the ownership table, pending ones included.
    pub num_entries: u64,
    /// The store's capacity in bytes.
    pub capacity: u64,
}

enum State {
    Pending(Vec<Waker>),
    /// Owned by another process, which lent it here, and not asked for yet:
    /// the first look at it asks the owner (see [`Store::set_fetch`]) and
    /// makes it `Pending`.
    Remote,
    Ready(Value, u64),
    /// Boxed: errors are large and rare, entries are many.
    Failed(Box<Error>),
}

struct Entry {
    state: State,
    refs: u32,
    /// Counts another process keeps on this object for this one (it lent
    /// the object here); given back, all at once, when the entry goes.
    lent: u32,
}

/// The result of looking at an object without waiting.
pub(crate) enum Peek {
    Ready(Value),
    Failed(Error),
    Pending,
}

pub(crate) struct Store {
    shards: Box<[Mutex<HashMap<ObjectId, Entry, IdHash>>]>,
    ready: AtomicU64,
    entries: AtomicU64,
    used: AtomicU64,
    capacity: u64,
    full_timeout: Duration,
    space: Mutex<()>,
    space_cv: Condvar,
    space_waiters: AtomicUsize,
    shut_down: AtomicBool,
    recycler: Mutex<Recycler>,
    /// Asks the owner for a lent object's value (in a worker process).
    fetch: std::sync::OnceLock<Box<dyn Fn(ObjectId) + Send + Sync>>,
}

/// Buffers of freed large plain-data objects, kept for `put_copy` to copy
/// into: memory that is already mapped and faulted in, as plasma's arena
/// is, so a copying put runs at memcpy speed instead of page-fault speed.
#[derive(Default)]
struct Recycler {
    buffers: Vec<(u64, Box<dyn Any + Send + Sync>)>,
    bytes: u64,
}

/// Objects at least this large have their buffers recycled.
pub(crate) const RECYCLE_MIN: u64 = 1 << 20;
/// At most this many buffers are kept.
const RECYCLE_MAX_BUFFERS: usize = 8;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("stats", &self.stats()).finish()
    }
}

impl Store {
    pub(crate) fn new(capacity: u64, full_timeout: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::default())).collect(),
            ready: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            used: AtomicU64::new(0),
            capacity,
            full_timeout,
            space: Mutex::new(()),
            space_cv: Condvar::new(),
            space_waiters: AtomicUsize::new(0),
            shut_down: AtomicBool::new(false),
            recycler: Mutex::new(Recycler::default()),
            fetch: std::sync::OnceLock::new(),
        }
    }

    /// Sets how this store asks the lender for an object lent to it, the
    /// first time anyone looks at it. Set once, by a worker process or a
    /// driver hosting the node.
    pub(crate) fn set_fetch(&self, fetch: Box<dyn Fn(ObjectId) + Send + Sync>) {
        let _ = self.fetch.set(fetch);
    }

    fn request(&self, id: ObjectId) {
        if let Some(fetch) = self.fetch.get() {
            fetch(id);
        }
    }

    /// Takes a count on an object another process owns and lent here
    /// (counting the loan), creating it (not fetched yet) when this store
    /// has no entry for it.
    pub(crate) fn borrow(&self, id: ObjectId) -> Result<()> {
        self.take_remote(id, 1)
    }

    /// Takes a reference on an object of another process's that a message
    /// names before its lender's own message (which counts the loan, see
    /// [`Store::borrow`]) was read: one more reference on its entry, or a
    /// new entry (not fetched yet) that counts no loan.
    pub(crate) fn expect_lent(&self, id: ObjectId) -> Result<()> {
        self.take_remote(id, 0)
    }

    /// One more reference on object `id`, counting `lent` loans, its entry
    /// made (`Remote`, not fetched yet) when there is none.
    fn take_remote(&self, id: ObjectId, lent: u32) -> Result<()> {
        let mut shard = self.shard(id).lock();
        // Checked under the shard lock, as in `create_pending`.
        if self.shut_down.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        match shard.get_mut(&id) {
            Some(entry) => {
                entry.refs += 1;
                entry.lent += lent;
            }
            None => {
                shard.insert(
                    id,
                    Entry {
                        state: State::Remote,
                        refs: 1,
                        lent,
                    },
                );
                self.entries.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Joins a pending object another message already made here (one more
    /// reference on it), or makes it. Errors when it exists and is done.
    pub(crate) fn join_pending(&self, id: ObjectId) -> Result<()> {
        {
            let mut shard = self.shard(id).lock();
            match shard.get_mut(&id) {
                Some(Entry {
                    state: State::Pending(_) | State::Remote,
                    refs,
                    ..
                }) => {
                    *refs += 1;
                    return Ok(());
                }
                Some(_) => {
                    return Err(Error::Protocol(format!("object {id} is already made")));
                }
                None => {}
            }
        }
        self.create_pending(id)
    }

    /// Fails every object whose id carries `tag` that this store has no
    /// value of yet (its owner, the process that minted it, died): `err`
    /// makes each one's error. (In the driver, that includes the result of
    /// a call a worker sent through it: the call's result is the worker's,
    /// so whoever holds it gets `OwnerDied`, as in Ray.)
    pub(crate) fn fail_owned_by(&self, tag: u64, err: impl Fn(ObjectId) -> Error) {
        let mut woken = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for (id, entry) in shard.iter_mut() {
                if id.owner() != tag {
                    continue;
                }
                if matches!(entry.state, State::Pending(_) | State::Remote) {
                    if let State::Pending(w) =
                        std::mem::replace(&mut entry.state, State::Failed(Box::new(err(*id))))
                    {
                        woken.extend(w);
                    }
                }
            }
        }
        woken.into_iter().for_each(Waker::wake);
    }

    /// Frees a value, keeping its buffer for reuse when it is a large
    /// plain-data vector nobody else holds.
    fn free_value(&self, value: Value, size: u64) {
        if size < RECYCLE_MIN || self.shut_down.load(Ordering::Acquire) {
            return;
        }
        let Some(buffer) = value.into_plain_buffer() else {
            return;
        };
        // A quarter of the store, so recycled memory never crowds out
        // objects; `size` counts the buffer's capacity (`codec::plain_size`).
        // The flag is read under the recycler's lock, which `shut_down`
        // empties after setting it, so nothing is kept past shutdown.
        let limit = self.capacity / 4;
        let mut r = self.recycler.lock();
        let open = !self.shut_down.load(Ordering::Acquire);
        if open && r.buffers.len() < RECYCLE_MAX_BUFFERS && r.bytes + size <= limit {
            r.bytes += size;
            r.buffers.push((size, buffer));
        }
    }

    /// A recycled `Vec<E>` with room for `len` elements, if one is kept.
    pub(crate) fn take_buffer<E: Send + Sync + 'static>(&self, len: usize) -> Option<Vec<E>> {
        let mut r = self.recycler.lock();
        // The smallest that fits, and at most twice the room needed, so a
        // small copy never pins a large buffer.
        let i = r
            .buffers
            .iter()
            .enumerate()
            .filter_map(|(i, (_, b))| {
                let cap = b.downcast_ref::<Vec<E>>()?.capacity();
                (cap >= len && cap <= len.saturating_mul(2)).then_some((i, cap))
            })
            .min_by_key(|(_, cap)| *cap)?
            .0;
        let (size, b) = r.buffers.swap_remove(i);
        r.bytes -= size;
        drop(r);
        b.downcast::<Vec<E>>().ok().map(|v| *v)
    }

    fn shard(&self, id: ObjectId) -> &Mutex<HashMap<ObjectId, Entry, IdHash>> {
        &self.shards[(id.as_u128() as usize) % SHARDS]
    }

    fn missing(&self, id: ObjectId) -> Error {
        if self.shut_down.load(Ordering::Acquire) {
            Error::Shutdown
        } else {
            Error::ObjectLost(id)
        }
    }

    pub(crate) fn stats(&self) -> StoreStats {
        StoreStats {
            num_objects: self.ready.load(Ordering::Relaxed),
            bytes_used: self.used.load(Ordering::Relaxed),
            num_entries: self.entries.load(Ordering::Relaxed),
            capacity: self.capacity,
        }
    }

    /// Registers a pending object with one reference (its first handle).
    pub(crate) fn create_pending(&self, id: ObjectId) -> Result<()> {
        let mut shard = self.shard(id).lock();
        // Checked under the shard lock: `shut_down` sets the flag before it
        // drains each shard, so a new object is either refused here or
        // drained there, never left behind.
        if self.shut_down.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        // Never over an entry that is there: its waiters and counts would
        // go with it.
        if shard.contains_key(&id) {
            return Err(Error::Protocol(format!("object {id} was made twice")));
        }
        shard.insert(
            id,
            Entry {
                state: State::Pending(Vec::new()),
                refs: 1,
                lent: 0,
            },
        );
        // Counted under the lock, before anyone can remove the entry and
        // uncount it.
        self.entries.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reserves room for `size` bytes, waiting up to the store's full
    /// timeout for referenced objects to be freed.
    /// Reserves room for `size` bytes if it is free now.
    pub(crate) fn try_reserve(&self, size: u64) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used + size <= self.capacity).then_some(used + size)
            })
            .is_ok()
    }

    pub(crate) fn reserve(&self, size: u64) -> Result<()> {
        let full = |used| Error::ObjectStoreFull {
            needed: size,
            used,
            capacity: self.capacity,
        };
        if size > self.capacity {
            return Err(full(self.used.load(Ordering::Relaxed)));
        }
        // `SeqCst` here and in `unreserve`: a waiter announces itself in
        // `space_waiters` and then reads `used`, a releaser writes `used` and
        // then reads `space_waiters`. With weaker orderings both reads may
        // see the old values (a store-buffering race): the releaser skips
        // the notification and the waiter sleeps on space that was freed.
        let try_reserve = || {
            self.used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                    (used + size <= self.capacity).then_some(used + size)
                })
                .is_ok()
        };
        if try_reserve() {
            return Ok(());
        }
        // A timeout too large to add to `now` means no deadline.
        let deadline = Instant::now().checked_add(self.full_timeout);
        let mut guard = self.space.lock();
        self.space_waiters.fetch_add(1, Ordering::SeqCst);
        let result = loop {
            if try_reserve() {
                break Ok(());
            }
            if self.shut_down.load(Ordering::Acquire) {
                break Err(Error::Shutdown);
            }
            let timed_out = match deadline {
                Some(at) => self.space_cv.wait_until(&mut guard, at).timed_out(),
                None => {
                    self.space_cv.wait(&mut guard);
                    false
                }
            };
            if timed_out && !try_reserve() {
                break Err(full(self.used.load(Ordering::Relaxed)));
            }
        };
        self.space_waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn unreserve(&self, size: u64) {
        // `SeqCst`: see `reserve`.
        self.used.fetch_sub(size, Ordering::SeqCst);
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.space.lock();
            self.space_cv.notify_all();
        }
    }

    /// Stores a new object (a `put`) with one reference. Room must have
    /// been reserved for `size` bytes.
    pub(crate) fn insert_ready(&self, id: ObjectId, value: Value, size: u64) -> Result<()> {
        let mut shard = self.shard(id).lock();
        // Checked under the shard lock, as in `create_pending`.
        if self.shut_down.load(Ordering::Acquire) {
            drop(shard);
            self.unreserve(size);
            return Err(Error::Shutdown);
        }
        let prev = shard.insert(
            id,
            Entry {
                state: State::Ready(value, size),
                refs: 1,
                lent: 0,
            },
        );
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.ready.fetch_add(1, Ordering::Relaxed);
        drop(shard);
        drop(prev);
        Ok(())
    }

    /// Completes a pending object with a value (room reserved for `size`
    /// bytes) or an error. A completion for an object that is no longer
    /// referenced, or already complete, is dropped.
    pub(crate) fn complete(&self, id: ObjectId, outcome: Result<(Value, u64)>) {
        let mut discard = None;
        let wakers = {
            let mut shard = self.shard(id).lock();
            match shard.get_mut(&id) {
                Some(entry) if matches!(entry.state, State::Pending(_) | State::Remote) => {
                    let new = match outcome {
                        Ok((value, size)) => {
                            self.ready.fetch_add(1, Ordering::Relaxed);
                            State::Ready(value, size)
                        }
                        Err(e) => State::Failed(Box::new(e)),
                    };
                    match std::mem::replace(&mut entry.state, new) {
                        State::Pending(w) => w,
                        _ => Vec::new(),
                    }
                }
                _ => {
                    discard = Some(outcome);
                    Vec::new()
                }
            }
        };
        if let Some(Ok((_, size))) = &discard {
            self.unreserve(*size);
        }
        drop(discard);
        for w in wakers {
            w.wake();
        }
    }

    /// Adds a reference to an object that is known to exist.
    pub(crate) fn add_ref(&self, id: ObjectId) -> Result<()> {
        match self.shard(id).lock().get_mut(&id) {
            Some(entry) => {
                entry.refs += 1;
                Ok(())
            }
            None => Err(self.missing(id)),
        }
    }

    /// Drops one count. When that freed the object, returns the counts the
    /// owner process kept on it for this one (see [`Store::borrow`]), for
    /// the caller to give back.
    pub(crate) fn release(&self, id: ObjectId) -> Option<u32> {
        let removed = {
            let mut shard = self.shard(id).lock();
            match shard.get_mut(&id) {
                Some(entry) if entry.refs > 1 => {
                    entry.refs -= 1;
                    None
                }
                Some(_) => shard.remove(&id),
                None => None,
            }
        };
        if let Some(entry) = removed {
            self.entries.fetch_sub(1, Ordering::Relaxed);
            match entry.state {
                State::Ready(value, size) => {
                    self.ready.fetch_sub(1, Ordering::Relaxed);
                    self.unreserve(size);
                    self.free_value(value, size);
                }
                State::Pending(wakers) => wakers.into_iter().for_each(Waker::wake),
                State::Remote | State::Failed(_) => {}
            }
            return Some(entry.lent);
        }
        None
    }

    /// Looks at an object; when pending and `waker` is given, registers it
    /// to be woken on completion.
    pub(crate) fn peek(&self, id: ObjectId, waker: Option<&Waker>) -> Result<Peek> {
        let mut shard = self.shard(id).lock();
        let Some(entry) = shard.get_mut(&id) else {
            return Err(self.missing(id));
        };
        if matches!(entry.state, State::Remote) {
            entry.state = State::Pending(waker.into_iter().cloned().collect());
            drop(shard);
            self.request(id);
            return Ok(Peek::Pending);
        }
        Ok(match &mut entry.state {
            State::Ready(v, _) => Peek::Ready(v.clone()),
            State::Failed(e) => Peek::Failed((**e).clone()),
            State::Pending(wakers) => {
                if let Some(w) = waker {
                    // Re-polls register the same waker again; looking at
                    // the last few keeps that from piling up without
                    // making a million distinct waiters quadratic.
                    if !wakers.iter().rev().take(8).any(|x| x.will_wake(w)) {
                        wakers.push(w.clone());
                    }
                }
                Peek::Pending
            }
            State::Remote => Peek::Pending,
        })
    }

    /// Polls an object for its value.
    pub(crate) fn poll_value(&self, id: ObjectId, cx: &mut Context<'_>) -> Poll<Result<Value>> {
        match self.peek(id, Some(cx.waker())) {
            Ok(Peek::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Peek::Failed(e)) | Err(e) => Poll::Ready(Err(e)),
            Ok(Peek::Pending) => Poll::Pending,
        }
    }

    /// Which of `ids` are complete (ready or failed), taking each shard's
    /// lock once rather than once per id.
    pub(crate) fn completed(&self, ids: &[ObjectId]) -> Result<Vec<bool>> {
        // Counting sort of the positions by shard.
        let shard_of = |id: ObjectId| (id.as_u128() as usize) % SHARDS;
        let mut starts = [0_usize; SHARDS + 1];
        for id in ids {
            starts[shard_of(*id) + 1] += 1;
        }
        for i in 0..SHARDS {
            starts[i + 1] += starts[i];
        }
        let mut next = starts;
        let mut order = vec![0_u32; ids.len()];
        for (pos, id) in ids.iter().enumerate() {
            let sh = shard_of(*id);
            order[next[sh]] = pos as u32;
            next[sh] += 1;
        }
        let mut done = vec![false; ids.len()];
        // Lent objects looked at for the first time are asked for, after
        // the locks are released.
        let mut fetch = Vec::new();
        for sh in 0..SHARDS {
            let range = &order[starts[sh]..starts[sh + 1]];
            if range.is_empty() {
                continue;
            }
            let mut shard = self.shards[sh].lock();
            for &pos in range {
                let id = ids[pos as usize];
                match shard.get_mut(&id) {
                    Some(e) => match e.state {
                        State::Pending(_) => {}
                        State::Remote => {
                            e.state = State::Pending(Vec::new());
                            fetch.push(id);
                        }
                        _ => done[pos as usize] = true,
                    },
                    None => return Err(self.missing(id)),
                }
            }
        }
        fetch.into_iter().for_each(|id| self.request(id));
        Ok(done)
    }

    /// Removes a waker registered by `peek`, e.g. after a timed-out wait.
    pub(crate) fn forget_waker(&self, id: ObjectId, waker: &Waker) {
        if let Some(entry) = self.shard(id).lock().get_mut(&id) {
            if let State::Pending(wakers) = &mut entry.state {
                wakers.retain(|w| !w.will_wake(waker));
            }
        }
    }

    /// Whether the object is complete (ready or failed).
    pub(crate) fn is_complete(&self, id: ObjectId) -> bool {
        !matches!(self.peek(id, None), Ok(Peek::Pending))
    }

    /// Fails every pending object, frees every value and refuses new
    /// objects. Wakes every waiter, so blocked readers see `Shutdown`.
    pub(crate) fn shut_down(&self) {
        self.shut_down.store(true, Ordering::Release);
        for shard in self.shards.iter() {
            let drained: Vec<Entry> = shard.lock().drain().map(|(_, e)| e).collect();
            for entry in drained {
                self.entries.fetch_sub(1, Ordering::Relaxed);
                match entry.state {
                    State::Pending(wakers) => wakers.into_iter().for_each(Waker::wake),
                    State::Ready(value, size) => {
                        self.ready.fetch_sub(1, Ordering::Relaxed);
                        self.unreserve(size);
                        drop(value);
                    }
                    State::Remote | State::Failed(_) => {}
                }
            }
        }
        let buffers = std::mem::take(&mut *self.recycler.lock());
        drop(buffers);
        let _guard = self.space.lock();
        self.space_cv.notify_all();
    }
}

/// Wakes a parked thread: the waker of blocking `get` and `wait` calls.
pub(crate) struct ThreadWaker(std::thread::Thread);

thread_local! {
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
}

impl ThreadWaker {
    /// This thread's waker. One per thread, so registering it twice on an
    /// object is recognised as a duplicate (`Waker::will_wake`).
    pub(crate) fn current() -> Waker {
        THREAD_WAKER.with(Waker::clone)
    }
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod model_tests;
