//! RustyRay's node daemon — the role of Ray's raylet on one machine: the
//! pool of worker processes (starting them, the handshake on the node's
//! socket, leasing them to their owner, reaping them), the shared-memory
//! store service (allocations for large results, pins held for workers,
//! spilling), the workers' log files, and the session directory.
//!
//! It talks to the core worker only in `rustyray-proto` terms: it
//! implements [`NodeManager`](rustyray_proto::service::NodeManager) and
//! [`WorkerLink`](rustyray_proto::service::WorkerLink), and hands each
//! worker's messages for its owner to the owner's
//! [`WorkerPeer`](rustyray_proto::service::WorkerPeer). It does not depend
//! on the core worker; the `rustyray` crate joins the two.
//!
//! Today the node daemon runs inside the driver's process (the
//! worker-process mode of a single node); the cluster's node daemons run
//! it as a process of its own.

#![forbid(unsafe_code)]

/// A failpoint (the `fail` crate) where fault tests inject failures:
/// `failpoint!("name", |_| value)` returns `value` from the enclosing
/// function when the test configures `name` to `return`. Compiled out
/// unless the `failpoints` feature is on. The points: `node::spawn`
/// (starting a worker process), `node::send` (writing to a worker),
/// `node::recv::<pid>` (reading from worker process `<pid>`, so a test
/// picks the worker whose read fails).
macro_rules! failpoint {
    ($name:literal, $on_fire:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, $on_fire);
    };
    (dynamic $name:expr, $on_fire:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!(&$name, $on_fire);
    };
}

mod pool;
mod session;
mod worker_logs;

pub use pool::Pool;

use rustyray_common::error::{Error, Result};
use rustyray_common::options::NodeOptions;
use rustyray_proto::service::OwnerService;
use rustyray_shm::{ShmStore, StoreConfig};
use std::path::PathBuf;
use std::sync::Arc;

/// A started node daemon.
#[derive(Debug)]
pub struct Node<O: OwnerService> {
    /// The worker pool, which is also the node manager its owner leases
    /// workers from.
    pub pool: Arc<Pool<O>>,
    /// The node's shared-memory store.
    pub store: Arc<ShmStore>,
    /// Where the workers' logs go.
    pub log_dir: PathBuf,
    /// The session directory (spill files and logs), unless both were
    /// given elsewhere.
    pub session_dir: Option<PathBuf>,
}

/// Starts a node daemon on `handle`: its session directory, its
/// shared-memory store, its socket, and `opts.prestart` workers. `owner`
/// makes the owner its workers answer to, given the store.
pub fn start<O: OwnerService>(
    opts: NodeOptions,
    handle: &tokio::runtime::Handle,
    owner: impl FnOnce(&Arc<ShmStore>) -> Arc<O>,
) -> Result<Node<O>> {
    // Spill files and logs go under one session directory, which the next
    // start removes should this process die unclean.
    let session = match (&opts.spill_dir, &opts.log_dir) {
        (Some(_), Some(_)) => None,
        _ => Some(session::Session::create(&opts.name)?),
    };
    let in_session = |sub: &str| session.as_ref().map(|s| s.dir().join(sub));
    let spill_dir = opts.spill_dir.or_else(|| in_session("spill"));
    let log_dir = opts.log_dir.or_else(|| in_session("logs"));
    let (Some(spill_dir), Some(log_dir)) = (spill_dir, log_dir) else {
        return Err(Error::invalid("no directory for spill files and logs"));
    };
    let store = Arc::new(ShmStore::new(StoreConfig::new(opts.capacity, spill_dir)).map_err(Error::from)?);
    let setup = pool::PoolSetup {
        command: opts.command,
        prestart: opts.prestart,
        token: rustyray_common::ids::random_token(),
        store: store.clone(),
        threshold: opts.threshold,
        thread_name: format!("{}-n", opts.name),
        owner: owner(&store),
        logs: worker_logs::WorkerLogs::new(log_dir.clone(), opts.log_to_driver),
        session,
    };
    let pool = Pool::start(setup, handle)?;
    let session_dir = pool.session_dir().map(PathBuf::from);
    Ok(Node {
        pool,
        store,
        log_dir,
        session_dir,
    })
}
