//! The one public error type, mirroring Ray's exception kinds
//! (`RayTaskError`, `RayActorError`, `ObjectLostError`, `OwnerDiedError`,
//! `GetTimeoutError`, `TaskCancelledError`, `WorkerCrashedError`,
//! `OutOfMemoryError`, `ObjectStoreFullError`, `RaySystemError`, ...).
//!
//! Errors are values: an object that failed stores its error and hands a
//! clone to every reader, and errors cross process boundaries as bytes, so
//! [`Error`] is `Clone` and serde-serializable and keeps its variant.

use crate::ids::{ActorId, ObjectId, TaskId};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The result type of every fallible RustyRay call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a task attempt failed, as recorded in [`Error::Task`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskFailure {
    /// The function returned `Err`; the message is its `Display`.
    Returned,
    /// The function panicked; the message is the panic payload.
    Panicked,
    /// An argument of the task failed; the cause is that argument's error.
    DependencyFailed,
}

/// Every error RustyRay reports. Variants mirror Ray's error kinds.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Error {
    /// A task or actor method failed (Ray's `RayTaskError`).
    #[error(
        "task {function}{} ({task_id}) failed after {attempts} attempt(s): {message}",
        .name.as_deref().map(|n| format!(" named {n:?}")).unwrap_or_default()
    )]
    Task {
        /// The registered name of the function or method.
        function: String,
        /// The name given with the `name` option, if any.
        name: Option<String>,
        /// The task that failed.
        task_id: TaskId,
        /// How it failed.
        failure: TaskFailure,
        /// The error's `Display`, or the panic message.
        message: String,
        /// How many attempts were made, retries included.
        attempts: u32,
        /// The error this one was caused by, if any (e.g. a failed argument).
        #[source]
        cause: Option<Box<Error>>,
    },
    /// The actor is dead: killed, crashed beyond its restarts, or failed to
    /// construct (Ray's `ActorDiedError`).
    #[error("actor {class} ({actor_id}) died: {reason}")]
    ActorDied {
        /// The actor's registered class name.
        class: String,
        /// The actor.
        actor_id: ActorId,
        /// Why it died.
        reason: String,
        /// The error that killed it, if any.
        #[source]
        cause: Option<Box<Error>>,
    },
    /// No actor is registered under this name (Ray's `ValueError` from
    /// `ray.get_actor`).
    #[error("no actor named {name:?} exists")]
    ActorNotFound {
        /// The name that was looked up.
        name: String,
    },
    /// The object's value is gone and cannot be rebuilt (Ray's
    /// `ObjectLostError`).
    #[error("object {0} was lost")]
    ObjectLost(ObjectId),
    /// The process that owned the object died before the object was made
    /// (Ray's `OwnerDiedError`).
    #[error("the owner of object {object_id}, {owner}, died")]
    OwnerDied {
        /// The object.
        object_id: ObjectId,
        /// The process that owned it.
        owner: String,
    },
    /// `get` did not see the object before its timeout (Ray's
    /// `GetTimeoutError`).
    #[error("get timed out after {timeout:?} waiting for object {object_id}")]
    GetTimeout {
        /// The first object that was not ready.
        object_id: ObjectId,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The task was cancelled before it produced a value (Ray's
    /// `TaskCancelledError`).
    #[error("task {0} was cancelled")]
    TaskCancelled(TaskId),
    /// The worker running the task died (Ray's `WorkerCrashedError`).
    #[error("the worker running task {task_id} crashed: {reason}")]
    WorkerCrashed {
        /// The task that was running.
        task_id: TaskId,
        /// What is known about the crash.
        reason: String,
    },
    /// The node ran out of memory (Ray's `OutOfMemoryError`).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The object store could not make room for an object in time (Ray's
    /// `ObjectStoreFullError`).
    #[error(
        "object store full: {needed} bytes needed, {used} of {capacity} bytes in use by referenced objects"
    )]
    ObjectStoreFull {
        /// Size of the object that did not fit.
        needed: u64,
        /// Bytes held by live objects.
        used: u64,
        /// The store's capacity.
        capacity: u64,
    },
    /// Spilling an object to disk failed for lack of space (Ray's
    /// `OutOfDiskError`); nothing was lost, the object stays in memory.
    #[error("out of disk: {0}")]
    OutOfDisk(String),
    /// A value could not be encoded or decoded.
    #[error("serialization failed: {0}")]
    Serialization(String),
    /// A value was read as a different type than it was stored with.
    #[error("type mismatch: expected {expected}, found {found}")]
    TypeMismatch {
        /// The type the reader asked for.
        expected: String,
        /// The type the value was stored with.
        found: String,
    },
    /// A caller passed something the runtime cannot accept.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No node can ever satisfy the resource request (Ray's
    /// `TaskUnschedulableError`).
    #[error("{what} can never be scheduled: it requests {requested}, the cluster has {available}")]
    Unschedulable {
        /// The task or actor.
        what: String,
        /// The resource request.
        requested: String,
        /// The cluster's total resources.
        available: String,
    },
    /// No function or actor class is registered under this name.
    #[error("no remote function or actor named {0:?} is registered in this executable")]
    UnknownFunction(String),
    /// Two registrations share one name.
    #[error("the name {0:?} is registered twice")]
    DuplicateRegistration(String),
    /// A worker process could not be started, or exited or stalled before
    /// it connected (Ray: a worker that fails to register with its raylet).
    #[error("cannot start a worker process: {0}")]
    WorkerStart(String),
    /// A connection between RustyRay processes could not be opened, read
    /// or written (Ray's `RpcError`).
    #[error("connection failed while {what}: {message}")]
    Connection {
        /// What the process was doing.
        what: String,
        /// The operating system's error.
        message: String,
    },
    /// A file-system call failed (the session directory, a log file).
    #[error("{what} failed: {message}")]
    Io {
        /// What the process was doing.
        what: String,
        /// The operating system's error.
        message: String,
    },
    /// The process ran out of file descriptors (`EMFILE`/`ENFILE`).
    #[error("out of file descriptors while {0}; raise the limit (ulimit -n)")]
    OutOfDescriptors(String),
    /// A peer's handshake failed or was refused: a wrong token, another
    /// protocol version, a process that is not who it says.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// A peer broke the protocol: a malformed or oversized frame, or a
    /// message that has no place where it came.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A task would block in `get`/`wait` while every worker thread the
    /// runtime may start is in use (see `Config::max_worker_threads`):
    /// it fails instead of waiting for work no thread is left to run.
    #[error("a task cannot block: all {limit} worker threads are in use (each blocked task holds one)")]
    ThreadLimit {
        /// The runtime's thread limit.
        limit: usize,
    },
    /// The runtime has shut down (or is shutting down).
    #[error("the runtime has shut down")]
    Shutdown,
}

impl Error {
    #[doc(hidden)]
    pub fn serialization(e: impl std::fmt::Display) -> Self {
        Error::Serialization(e.to_string())
    }

    #[doc(hidden)]
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// The error an operating-system failure `e` makes while doing `what`:
    /// running out of descriptors is said as such, anything else is a
    /// connection failure.
    #[doc(hidden)]
    pub fn from_io(what: impl Into<String>, e: &std::io::Error) -> Self {
        // EMFILE (the process's limit) and ENFILE (the system's).
        const EMFILE: i32 = 24;
        const ENFILE: i32 = 23;
        match e.raw_os_error() {
            Some(EMFILE | ENFILE) => Error::OutOfDescriptors(what.into()),
            _ => Error::Connection {
                what: what.into(),
                message: e.to_string(),
            },
        }
    }
}

/// The message a panic carried: its payload when that is a string.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
