//! The worker-thread pool that runs sync user code — the embedded
//! equivalent of Ray's worker pool.
//!
//! Sync tasks, sync actor methods and constructors run here, never on the
//! async executor's threads. The pool is elastic: a job that finds no idle
//! thread gets a new one, so a task blocked in `get` (which has lent its
//! CPU back) never starves the tasks it waits for; threads beyond the
//! minimum leave after a spell of idleness. The scheduler, not the pool,
//! bounds how many tasks run at once.
//!
//! Shutdown closes the queue, wakes every idle thread and joins every
//! thread the pool ever started.

use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

const IDLE_EXIT: Duration = Duration::from_secs(30);

/// The stack of each pool thread (reserved address space; only the pages
/// used are ever backed). Larger than Rust's 2 MiB default because a task
/// blocked on a child that is still queued runs the child on its own stack
/// (see [`has_stack_to_spare`]).
const STACK_SIZE: usize = 16 << 20;

thread_local! {
    /// The address near the base of this pool thread's stack (0 on threads
    /// that are not the pool's).
    static STACK_BASE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// An address in the caller's stack frame.
#[inline(never)]
fn stack_address() -> usize {
    let marker = 0_u8;
    std::ptr::addr_of!(marker) as usize
}

/// Whether the calling thread is a pool thread with more than half of its
/// stack unused: it may then run another task on its own stack. This
/// bounds how deep tasks run inside each other, whatever their frames
/// cost, so a deep tree of nested tasks uses more threads instead of
/// overflowing a stack.
pub(crate) fn has_stack_to_spare() -> bool {
    let base = STACK_BASE.with(std::cell::Cell::get);
    // Stacks grow down on every platform this runs on.
    let here = stack_address();
    base != 0 && base.saturating_sub(here) < STACK_SIZE / 2
}

/// Starts a thread with a pool thread's stack, marked so that
/// [`has_stack_to_spare`] holds on it too (a worker process's reading
/// threads run sync tasks, which may run their queued children).
pub(crate) fn spawn_with_stack(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .stack_size(STACK_SIZE)
        .spawn(move || {
            STACK_BASE.with(|b| b.set(stack_address()));
            f()
        })
}

/// How long an idle thread watches for work before it sleeps: a job that
/// arrives meanwhile starts without a futex wake-up (a few microseconds on
/// the hot path of synchronous task and actor calls).
const SPIN: Duration = Duration::from_micros(50);

struct State {
    jobs: VecDeque<Job>,
    /// Threads asleep on the condition variable.
    idle: usize,
    /// Threads watching `queued` before they sleep.
    spinning: usize,
    live: usize,
    /// The last attempt to start a thread failed (the system refused);
    /// cleared when a thread finishes a job (room may have come back).
    refused: bool,
    /// Threads blocked in `get`/`wait` (each holding a [`BlockSlot`]).
    blocked: usize,
    closed: bool,
    handles: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// `jobs.len()`, readable without the lock by spinning threads.
    queued: AtomicUsize,
    cv: Condvar,
    name: String,
    min_threads: usize,
    max_threads: usize,
}

/// A thread's right to block, from [`Pool::block_slot`]; given back when
/// dropped.
pub(crate) struct BlockSlot(Arc<Shared>);

impl std::fmt::Debug for BlockSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockSlot")
    }
}

impl Drop for BlockSlot {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.blocked = s.blocked.saturating_sub(1);
    }
}

/// An elastic pool of named worker threads.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.state.lock();
        f.debug_struct("Pool")
            .field("live", &s.live)
            .field("idle", &s.idle)
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(name: String, min_threads: usize, max_threads: usize) -> Self {
        Pool {
            shared: Arc::new(Shared {
                queued: AtomicUsize::new(0),
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    idle: 0,
                    spinning: 0,
                    live: 0,
                    refused: false,
                    blocked: 0,
                    closed: false,
                    handles: Vec::new(),
                }),
                cv: Condvar::new(),
                name,
                min_threads,
                max_threads: max_threads.max(min_threads).max(1),
            }),
        }
    }

    /// Runs `job` on a pool thread, or on this one when the pool is closed
    /// (shutdown), so it runs either way.
    pub(crate) fn execute_or_run(&self, job: Job) {
        if let Err(job) = self.execute(job) {
            job();
        }
    }

    /// Runs `job` on a pool thread. Hands the job back if the pool is
    /// closed.
    pub(crate) fn execute(&self, job: Job) -> Result<(), Job> {
        let mut s = self.shared.state.lock();
        if s.closed {
            return Err(job);
        }
        s.jobs.push_back(job);
        self.shared.queued.store(s.jobs.len(), Ordering::Release);
        if s.jobs.len() <= s.spinning {
            // A spinning thread takes it.
        } else if s.jobs.len() > s.idle + s.spinning && s.live < self.shared.max_threads {
            s.live += 1;
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(self.shared.name.clone())
                .stack_size(STACK_SIZE)
                .spawn(move || worker(shared));
            match spawned {
                Ok(h) => {
                    s.refused = false;
                    s.handles.retain(|h| !h.is_finished());
                    s.handles.push(h);
                }
                Err(e) => {
                    // Out of threads: the queued job waits for a busy
                    // thread, and tasks may not block meanwhile.
                    s.live -= 1;
                    s.refused = true;
                    tracing::error!(error = %e, "could not start a worker thread");
                }
            }
        } else {
            self.shared.cv.notify_one();
        }
        Ok(())
    }

    /// Reserves a thread's right to block (in `get`/`wait`) for as long as
    /// the slot lives: refused (`Err(limit)`) when every other thread the
    /// pool may run is blocked already, so that one is always left to run
    /// what they wait for. When the system refused the last thread the
    /// pool tried to start, the limit is the threads alive now.
    pub(crate) fn block_slot(&self) -> Result<BlockSlot, usize> {
        let mut s = self.shared.state.lock();
        let limit = if s.refused {
            s.live.min(self.shared.max_threads)
        } else {
            self.shared.max_threads
        };
        if s.blocked + 1 >= limit {
            return Err(limit);
        }
        s.blocked += 1;
        Ok(BlockSlot(self.shared.clone()))
    }

    /// Threads alive now.
    pub(crate) fn live_threads(&self) -> usize {
        self.shared.state.lock().live
    }

    /// Closes the pool, drops queued jobs and joins every thread except the
    /// calling one (when shutdown is started from a pool thread).
    pub(crate) fn shut_down(&self) {
        let (handles, jobs) = {
            let mut s = self.shared.state.lock();
            s.closed = true;
            (std::mem::take(&mut s.handles), std::mem::take(&mut s.jobs))
        };
        self.shared.cv.notify_all();
        drop(jobs);
        let me = std::thread::current().id();
        for h in handles {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

fn worker(shared: Arc<Shared>) {
    STACK_BASE.with(|b| b.set(stack_address()));
    let mut s = shared.state.lock();
    loop {
        if let Some(job) = s.jobs.pop_front() {
            shared.queued.store(s.jobs.len(), Ordering::Release);
            drop(s);
            // Jobs catch the user's panics themselves; this keeps the
            // pool's accounting right should one slip through.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            s = shared.state.lock();
            s.refused = false;
            continue;
        }
        if s.closed {
            break;
        }
        // Watch for work a little before sleeping; one watcher at a time, so
        // idle threads never crowd out busy ones.
        if s.spinning > 0 {
            s.idle += 1;
            let timed_out = shared.cv.wait_for(&mut s, IDLE_EXIT).timed_out();
            s.idle -= 1;
            if timed_out && s.jobs.is_empty() && s.live > shared.min_threads {
                break;
            }
            continue;
        }
        s.spinning += 1;
        drop(s);
        let spin_start = std::time::Instant::now();
        // The clock is read every 64 turns: reading it is dearer than the
        // check it bounds.
        'watch: loop {
            for _ in 0..64 {
                if shared.queued.load(Ordering::Acquire) != 0 {
                    break 'watch;
                }
                std::hint::spin_loop();
            }
            if spin_start.elapsed() >= SPIN {
                break;
            }
        }
        s = shared.state.lock();
        s.spinning -= 1;
        if !s.jobs.is_empty() || s.closed {
            continue;
        }
        s.idle += 1;
        let timed_out = shared.cv.wait_for(&mut s, IDLE_EXIT).timed_out();
        s.idle -= 1;
        if timed_out && s.jobs.is_empty() && s.live > shared.min_threads {
            break;
        }
    }
    s.live -= 1;
}
