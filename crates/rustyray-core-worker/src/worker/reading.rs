//! Who reads a worker process's connection: the hand-off that lets a
//! worker run a sync task on the thread that read it.
//!
//! # Design
//!
//! Reading is a role: the thread holding the connection's reading side
//! (the [`Inbox`]) reads it. A reader that reads a sync task leaves the
//! inbox here, unread, and runs the task itself; when the task ends the
//! same thread takes the inbox back and reads on. A task thus starts and
//! ends with no thread hand-off, and no thread spins waiting for tasks.
//!
//! While the task runs, nothing reads. Whatever needs a message meanwhile
//! *claims* the inbox: code in this process that waits for an object or an
//! allocation (whose answer is a message) claims it before it waits, and a
//! watchdog claims it once the same task has run for a tick (so a cancel,
//! or a wait nobody claimed for, is read within a tick). A claim wakes a
//! standby thread, or starts one, to take the inbox and read; the task's
//! thread then becomes a standby when its task ends.
//!
//! # State and invariants
//!
//! One mutex guards the [`Slot`]: the inbox while no thread reads it,
//! whether it is claimed (`wanted`), how many standby threads wait, the
//! generation of the task left running, and whether the watchdog sleeps.
//! When the inbox is here and not wanted, the thread running the task
//! comes back for it; when it is wanted, a standby (or a new thread) takes
//! it, unless the task's thread takes it back first. Standby threads wait
//! on `standby`, the watchdog on `watch`. Nothing else is held while a
//! thread reads or runs a task.

use crate::wire::FrameDecoder;
use parking_lot::{Condvar, Mutex};
use rustyray_transport::Conn;
use std::sync::OnceLock;
use std::time::Duration;

/// How long a task may keep the inbox unread before the watchdog has
/// another thread read it.
const TICK: Duration = Duration::from_millis(2);

/// The reading side of the connection to the node daemon.
pub(crate) struct Inbox {
    pub(crate) stream: Conn,
    pub(crate) dec: FrameDecoder,
}

struct Slot {
    /// The inbox, while no thread reads it.
    inbox: Option<Inbox>,
    /// A thread must take the inbox and read.
    wanted: bool,
    /// Standby threads waiting for a claimed inbox.
    waiting: usize,
    /// Bumped each time a task starts with the inbox left here.
    generation: u64,
    /// The watchdog waits for a task to start.
    watchdog_idle: bool,
}

/// The reading role of one worker process's connection (see the module
/// documentation).
pub(crate) struct Reading {
    slot: Mutex<Slot>,
    standby: Condvar,
    watch: Condvar,
    /// Starts a new reader thread (set once the worker exists).
    spawn: OnceLock<Box<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
}

impl std::fmt::Debug for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reading").finish_non_exhaustive()
    }
}

impl Reading {
    pub(crate) fn new() -> Self {
        Reading {
            slot: Mutex::new(Slot {
                inbox: None,
                wanted: false,
                waiting: 0,
                generation: 0,
                watchdog_idle: true,
            }),
            standby: Condvar::new(),
            watch: Condvar::new(),
            spawn: OnceLock::new(),
        }
    }

    /// Sets how a claim starts a new reader thread when none stands by.
    pub(crate) fn set_spawn(&self, spawn: Box<dyn Fn() -> std::io::Result<()> + Send + Sync>) {
        let _ = self.spawn.set(spawn);
    }

    /// Waits, standing by, until the inbox is claimed, and takes it.
    pub(crate) fn take(&self) -> Inbox {
        let mut slot = self.slot.lock();
        slot.waiting += 1;
        loop {
            if slot.wanted {
                if let Some(inbox) = slot.inbox.take() {
                    slot.wanted = false;
                    slot.waiting -= 1;
                    return inbox;
                }
            }
            self.standby.wait(&mut slot);
        }
    }

    /// Leaves the inbox here, unread, while this thread runs a task.
    pub(crate) fn leave(&self, inbox: Inbox) {
        let mut slot = self.slot.lock();
        debug_assert!(slot.inbox.is_none(), "two readers held the inbox");
        slot.inbox = Some(inbox);
        slot.wanted = false;
        slot.generation = slot.generation.wrapping_add(1);
        if slot.watchdog_idle {
            slot.watchdog_idle = false;
            self.watch.notify_one();
        }
    }

    /// Takes the inbox back after a task, unless another thread took it
    /// (then this thread stands by: `None`).
    pub(crate) fn retake(&self) -> Option<Inbox> {
        let mut slot = self.slot.lock();
        let inbox = slot.inbox.take();
        if inbox.is_some() {
            slot.wanted = false;
        }
        inbox
    }

    /// Something in this process waits for a message: makes sure a thread
    /// reads (a standby woken, or a new thread started) if the inbox was
    /// left unread.
    pub(crate) fn claim(&self) {
        let mut slot = self.slot.lock();
        self.claim_locked(&mut slot);
    }

    fn claim_locked(&self, slot: &mut parking_lot::MutexGuard<'_, Slot>) {
        if slot.inbox.is_none() || slot.wanted {
            return;
        }
        slot.wanted = true;
        if slot.waiting > 0 {
            self.standby.notify_one();
            return;
        }
        let started = parking_lot::MutexGuard::unlocked(slot, || self.spawn.get().map(|spawn| spawn()));
        if let Some(Err(e)) = started {
            // Nobody else can read: the task's thread reads again when
            // its task ends.
            tracing::warn!(error = %e, "could not start a reader thread");
        }
    }

    /// The watchdog: claims the inbox for a task that keeps it unread for
    /// a whole tick. Runs for the life of the process.
    pub(crate) fn watch(&self) {
        let mut slot = self.slot.lock();
        loop {
            if slot.inbox.is_none() || slot.wanted {
                // Somebody reads (or will): wait for the next task.
                slot.watchdog_idle = true;
                self.watch.wait(&mut slot);
                continue;
            }
            let generation = slot.generation;
            self.watch.wait_for(&mut slot, TICK);
            if slot.generation == generation {
                self.claim_locked(&mut slot);
            }
        }
    }
}
