//! RustyRay's core worker: ownership, the object store, the scheduler, and
//! task and actor execution — Ray's core worker, in every driver and
//! worker process. The node daemon it leases worker processes from is
//! `rustyray-raylet`, reached only through `rustyray-proto`'s service
//! traits.
//!
//! Users reach this crate through the `rustyray` facade, whose macros
//! generate the typed stubs that call into it. The main types:
//!
//! * [`Ray`] — a runtime handle: `put`, `get`, `wait`, `cancel`, `kill`,
//!   `get_actor`, `shutdown`;
//! * [`ObjectRef<T>`] — a typed reference to an object, awaitable;
//! * [`ActorHandle<A>`] — a typed handle on an actor;
//! * [`Error`] — every failure, with Ray's kinds;
//! * [`registry`] — the link-time registry of functions and actors.
//!
//! ```
//! let ray = rustyray_core_worker::init_with(rustyray_core_worker::Config::new().num_cpus(2.0))?;
//! let r = ray.put(41_i64)?;
//! assert_eq!(ray.get(&r)? + 1, 42);
//! # Ok::<(), rustyray_core_worker::Error>(())
//! ```
//!
//! Module map (Ray's names in parentheses): [`store`](crate::StoreStats)
//! (memory store + reference counter), `scheduler` (local task manager),
//! `pool` (worker pool), `actor` (actor manager + actor task receiver),
//! `task` (task specification + task manager), `codec` (serialization),
//! `context` (runtime context); for worker processes: `lease` (the owner's
//! side of each worker leased from the node: pushing tasks, what is lent to
//! the worker, its requests), `worker` (the worker process's loop), `shm`
//! (plasma, as an owner and a worker use it). Ids, errors, resources and
//! options come from `rustyray-common`; the messages between the roles
//! from `rustyray-proto`.

#![forbid(unsafe_code)]

/// A failpoint (the `fail` crate) where fault tests inject failures:
/// `failpoint!("name", |_| value)` returns `value` from the enclosing
/// function when the test configures `name` to `return`. Compiled out
/// unless the `failpoints` feature is on. The point here: `shm::create`
/// (allocating in the node's shared memory); the node daemon's are in
/// `rustyray-raylet`.
macro_rules! failpoint {
    ($name:literal, $on_fire:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, $on_fire);
    };
}

pub(crate) use rustyray_common::{error, ids, options, resources};
pub(crate) use rustyray_proto as wire;

mod actor;
mod blob;
mod codec;
mod context;
mod grant;
mod lease;
mod object_ref;
mod pool;
pub mod registry;
mod runtime;
mod scheduler;
mod shm;
mod store;
mod sync;
mod task;
mod worker;

pub use actor::{create_actor, ActorClass, ActorHandle, ActorStub, RawActor};
pub use blob::Blob;
pub use codec::{Data, Value};
pub use error::{Error, Result, TaskFailure};
pub use ids::{ActorId, ObjectId, TaskId};
pub use object_ref::{Arg, GetFuture, IntoArg, ObjectRef, RawRef};
pub use options::WorkerCommand;
pub use options::{
    ActorOptions, ActorOptionsBuilder, CancelOptions, TaskOptions, TaskOptionsBuilder, DEFAULT_MAX_RETRIES,
};
pub use resources::{detect_gpus, ResourceSet, CPU, GPU};
pub use runtime::{current, init, init_with, is_cancelled, Config, Ray, WaitResult, WorkerMode};
pub use rustyray_shm::StoreStats as SharedStoreStats;
pub use store::StoreStats;
pub use task::ArgList;
pub use worker::worker_entry;

/// What the embedder (the `rustyray` crate) joins the node daemon with:
/// the owner a node's workers answer to and the way to start a runtime
/// that hosts a node. Not a stable API.
#[doc(hidden)]
pub mod embed {
    pub use crate::lease::{Leased, Owner};
    pub use crate::options::NodeOptions;
    pub use crate::runtime::{init_hosting, NodeParts, StartNode};
    pub use rustyray_shm::ShmStore;
    pub use tokio::runtime::Handle;
}

/// What the macros' generated code calls. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::actor::{instance_mut, instance_ref, new_instance};
    pub use crate::registry::{
        ActorEntry, BoxFuture, DeclaredOptions, ExclusiveGuard, FunctionBody, FunctionEntry, Instance,
        InvokeError, InvokeResult, MethodBody, MethodEntry, SharedGuard, ACTOR_CLASSES, ACTOR_METHODS,
        REMOTE_FUNCTIONS,
    };
    pub use crate::worker::{direct_calls, leased_tasks};
    pub use linkme;

    use crate::{Arg, Data, ObjectRef, Ray, Result, TaskOptions, Value};

    /// Wraps a function's plain return value.
    pub fn output<T: Data>(v: T) -> InvokeResult {
        Ok(Value::local(v))
    }

    /// Wraps a function's `Result` return value: `Err` becomes a task
    /// error carrying its `Display`.
    pub fn fallible<T: Data, E: std::fmt::Display>(r: std::result::Result<T, E>) -> InvokeResult {
        match r {
            Ok(v) => Ok(Value::local(v)),
            Err(e) => Err(InvokeError::User(e.to_string())),
        }
    }

    /// Wraps a constructor's `Result`.
    pub fn fallible_instance<A: Send + Sync + 'static, E: std::fmt::Display>(
        r: std::result::Result<A, E>,
    ) -> std::result::Result<crate::registry::Instance, InvokeError> {
        match r {
            Ok(a) => Ok(new_instance(a)),
            Err(e) => Err(InvokeError::User(e.to_string())),
        }
    }

    /// Submits a function task.
    pub fn submit<R>(
        ray: &Ray,
        entry: &'static FunctionEntry,
        opts: &TaskOptions,
        args: Vec<Arg>,
    ) -> Result<ObjectRef<R>> {
        Ok(ray.inner().submit_task(entry, args, opts)?.typed())
    }
}
