//! RustyRay: Ray Core for Rust.
//!
//! Write ordinary functions and structs, mark them remote, and get typed
//! futures back. The runtime is embedded: `rustyray::init()` starts worker
//! threads in your process, with nothing to install or start.
//!
//! ```
//! use rustyray::prelude::*;
//!
//! #[rustyray::remote]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! #[rustyray::actor]
//! struct Counter {
//!     n: i64,
//! }
//!
//! #[rustyray::actor]
//! impl Counter {
//!     fn new(start: i64) -> Self {
//!         Counter { n: start }
//!     }
//!     fn incr(&mut self, by: i64) -> i64 {
//!         self.n += by;
//!         self.n
//!     }
//! }
//!
//! fn main() -> rustyray::Result<()> {
//!     let ray = rustyray::init()?;
//!     let x = add::remote(&ray, 1, 2)?; // ObjectRef<i64>
//!     let y = add::remote(&ray, &x, 10)?; // values and refs mix freely
//!     assert_eq!(ray.get(&y)?, 13);
//!     let c = Counter::remote(&ray, 0)?; // ActorHandle<Counter>
//!     assert_eq!(ray.get(&c.incr(5)?)?, 5);
//!     Ok(())
//! }
//! ```
//!
//! In async code, `obj_ref.await` gives the value. Inside a task,
//! [`current()`] is the runtime running it.
//!
//! With [`WorkerMode::Processes`] tasks run in worker processes, as in Ray:
//! the program's own executable started again in worker mode, which
//! `#[rustyray::main]` on `main` (or [`worker_entry()`] first thing in
//! `main`) detects.
//!
//! See `docs/architecture.md` in the repository for how the pieces map to
//! Ray's.

#![forbid(unsafe_code)]

pub use rustyray_core_worker::{
    create_actor, current, detect_gpus, is_cancelled, registry, worker_entry, ActorClass, ActorHandle,
    ActorId, ActorOptions, ActorOptionsBuilder, ActorStub, Arg, ArgList, Blob, CancelOptions, Config, Data,
    Error, GetFuture, IntoArg, ObjectId, ObjectRef, RawActor, RawRef, Ray, ResourceSet, Result,
    SharedStoreStats, StoreStats, TaskFailure, TaskId, TaskOptions, TaskOptionsBuilder, Value, WaitResult,
    WorkerCommand, WorkerMode, CPU, DEFAULT_MAX_RETRIES, GPU,
};
pub use rustyray_macros::{actor, main, remote};

/// What the macros' generated code calls. Not a stable API.
#[doc(hidden)]
pub use rustyray_core_worker::__private;

use rustyray_core_worker::embed::{Handle, NodeOptions, NodeParts, Owner, ShmStore};
use std::sync::Arc;

/// Starts a runtime with the default [`Config`]: embedded, tasks and
/// actors on this process's threads.
pub fn init() -> Result<Ray> {
    init_with(Config::default())
}

/// Starts a runtime as `config` says. In the worker-process mode
/// ([`WorkerMode::Processes`]) the driver hosts the node daemon
/// (`rustyray-raylet`): its worker pool and shared-memory store.
pub fn init_with(config: Config) -> Result<Ray> {
    rustyray_core_worker::embed::init_hosting(config, Some(start_node))
}

/// Starts the node daemon a driver hosts, for the core worker.
fn start_node(
    opts: NodeOptions,
    handle: &Handle,
    owner: &dyn Fn(&Arc<ShmStore>) -> Arc<Owner>,
) -> Result<NodeParts> {
    let node = rustyray_raylet::start(opts, handle, owner)?;
    Ok(NodeParts {
        manager: node.pool,
        store: node.store,
        log_dir: node.log_dir,
        session_dir: node.session_dir,
    })
}

/// The names most programs need.
pub mod prelude {
    pub use crate::{
        ActorHandle, ActorOptionsBuilder, CancelOptions, Config, Error, ObjectRef, Ray, TaskOptionsBuilder,
        WorkerMode,
    };
}
