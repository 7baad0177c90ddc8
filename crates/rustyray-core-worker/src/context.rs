//! The running task's context — Ray's `RuntimeContext`.
//!
//! Code running inside a task or actor call reaches its runtime, its task
//! and its cancellation flag through the context: a thread-local for sync
//! code (set for the duration of the call on the worker thread) and a tokio
//! task-local for async code. Neither is a process global: each is set by
//! the runtime that runs the code and cleared when the call ends.

use crate::ids::ObjectId;
use crate::resources::ResourceSet;
use crate::runtime::Inner;
use crate::task::TaskState;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// What the runtime knows about the call running on this thread or task.
#[derive(Debug)]
pub(crate) struct TaskContext {
    pub(crate) rt: Arc<Inner>,
    pub(crate) task: Arc<TaskState>,
    /// The CPU the call holds, lent back while it blocks.
    cpu: ResourceSet,
    blocked: AtomicU32,
    is_async: bool,
}

impl TaskContext {
    pub(crate) fn new(rt: Arc<Inner>, task: Arc<TaskState>, cpu: ResourceSet, is_async: bool) -> Arc<Self> {
        Arc::new(TaskContext {
            rt,
            task,
            cpu,
            blocked: AtomicU32::new(0),
            is_async,
        })
    }

    pub(crate) fn is_async(&self) -> bool {
        self.is_async
    }

    /// The CPU the call holds.
    pub(crate) fn cpu(&self) -> &ResourceSet {
        &self.cpu
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<TaskContext>>> = const { RefCell::new(None) };
}

tokio::task_local! {
    static ASYNC_CURRENT: Arc<TaskContext>;
}

/// The context of the call running here, if any.
pub(crate) fn current() -> Option<Arc<TaskContext>> {
    ASYNC_CURRENT
        .try_with(Arc::clone)
        .ok()
        .or_else(|| CURRENT.with(|c| c.borrow().clone()))
}

/// Runs `f` with `ctx` as this thread's context.
pub(crate) fn with_sync<R>(ctx: Arc<TaskContext>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<TaskContext>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT.with(|c| c.borrow_mut().replace(ctx));
    let _restore = Restore(prev);
    f()
}

/// Runs `fut` with `ctx` as its task-local context.
pub(crate) async fn with_async<F: std::future::Future>(ctx: Arc<TaskContext>, fut: F) -> F::Output {
    ASYNC_CURRENT.scope(ctx, fut).await
}

/// Marks the current call as blocked (waiting in `get`, `wait` or on an
/// awaited reference) for as long as it lives: the call's CPU is lent back
/// to the scheduler so that the tasks it waits for can run, and taken back
/// (even if that over-commits for a moment, as in Ray) when it ends.
#[derive(Debug)]
pub(crate) struct Blocked(Arc<TaskContext>);

impl Blocked {
    /// Marks the current call blocked, waiting for `on` if it waits for
    /// one object (the owner of a worker process may then run the task
    /// that makes it in this process).
    pub(crate) fn enter(on: Option<ObjectId>) -> Option<Blocked> {
        let ctx = current()?;
        if ctx.blocked.fetch_add(1, Ordering::AcqRel) == 0 {
            // In a worker process, the CPU is the owner's to lend.
            match ctx.rt.mode.upstream() {
                Some(up) => up.blocked(&ctx.rt, ctx.task.id, true, on),
                None if !ctx.cpu.is_empty() => ctx.rt.lend_back(&ctx.cpu),
                None => {}
            }
        }
        Some(Blocked(ctx))
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let ctx = &self.0;
        if ctx.blocked.fetch_sub(1, Ordering::AcqRel) == 1 {
            match ctx.rt.mode.upstream() {
                Some(up) => up.blocked(&ctx.rt, ctx.task.id, false, None),
                None if !ctx.cpu.is_empty() => ctx.rt.take_back(&ctx.cpu),
                None => {}
            }
        }
    }
}
