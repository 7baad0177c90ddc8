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

pub use rustyray_core::*;
pub use rustyray_macros::{actor, main, remote};

/// The names most programs need.
pub mod prelude {
    pub use crate::{
        ActorHandle, ActorOptionsBuilder, CancelOptions, Config, Error, ObjectRef, Ray, TaskOptionsBuilder,
        WorkerMode,
    };
}
