//! What every RustyRay role speaks — Ray's `src/ray/common`.
//!
//! The core worker (owners and workers), the node daemon, the control
//! service and the wire protocol between them all depend on this crate and
//! on nothing above it. It owns:
//!
//! * [`ids`] — object, task and actor ids (128 bits: the minting runtime,
//!   then a counter), and how a runtime mints them;
//! * [`error`] — the one public [`Error`] type, whose variants mirror Ray's
//!   error kinds and which crosses process boundaries as bytes;
//! * [`resources`] — resource sets in fixed point (`CPU`, `GPU`, custom);
//! * [`options`] — per-call task and actor options, the options a remote
//!   function or actor class declares, and the command a node starts as
//!   its workers.
//!
//! ```
//! use rustyray_common::{ResourceSet, CPU};
//! let mut r = ResourceSet::new();
//! r.set(CPU, 1.5)?;
//! assert_eq!(r.get(CPU), 1.5);
//! # Ok::<(), rustyray_common::Error>(())
//! ```

#![forbid(unsafe_code)]

pub mod error;
pub mod ids;
pub mod options;
pub mod resources;

pub use error::{Error, Result, TaskFailure};
pub use ids::{ActorId, ObjectId, TaskId};
pub use options::{
    ActorOptions, ActorOptionsBuilder, CancelOptions, DeclaredOptions, TaskOptions, TaskOptionsBuilder,
    WorkerCommand, DEFAULT_MAX_RETRIES,
};
pub use resources::{detect_gpus, ResourceSet, CPU, GPU};
