//! RustyRay's node shared-memory object store — Ray's plasma store with
//! object spilling.
//!
//! The node daemon owns one [`ShmStore`]: immutable objects, written once and
//! sealed, in a shared-memory [`Arena`] that worker processes of the node map
//! to read them without copies. When the arena is full, objects that are
//! still referenced but not in use are spilled to files on disk, several
//! small ones fused into one file, and restored transparently on access, so
//! an object the program can reach is never lost to eviction (architecture
//! decision 5). The arena is an anonymous `memfd`, so no shared-memory
//! segment outlives the processes using it (decision 13).
//!
//! Main types:
//! - [`ShmStore`] with its [`StoreConfig`] and [`StoreStats`]: create, seal,
//!   get, pin, delete; spilling and restoring;
//! - [`Writer`]: the single writer of an object until it is sealed;
//! - [`Pinned`]: a read handle that keeps an object in memory;
//! - [`Arena`] and [`inherit_arena`]: the mapping, and how to hand it to a
//!   child process;
//! - [`ShmClient`] and [`RemoteView`]: the arena in a worker process, which
//!   reads and writes only the regions the node daemon hands it;
//! - [`ShmError`]: every failure, as plain data;
//! - [`plain`]: flat arrays of numbers to and from their bytes form at
//!   memory speed.
//!
//! This is the only RustyRay crate that uses `unsafe` (decision 11), and only
//! in its `arena`, `client` and `plain` modules and the store's `shared` and `handles` files, which
//! the compiler enforces (`unsafe_code` is denied everywhere else). The
//! aliasing contract that makes it sound is described on the [`arena`]
//! module. Linux only.
//!
//! ```
//! use rustyray_shm::{ShmStore, StoreConfig};
//!
//! let dir = tempfile::tempdir()?;
//! // A 1 MiB arena: the third object forces the first out to disk.
//! let store = ShmStore::new(StoreConfig::new(1 << 20, dir.path()))?;
//! store.put(1, &[1; 400_000])?;
//! store.put(2, &[2; 400_000])?;
//! store.put(3, &[3; 400_000])?;
//! assert_eq!(store.stats().objects_spilled, 1);
//!
//! // Reading it back restores it (spilling another in turn).
//! let one = store.get(1)?;
//! assert!(one.iter().all(|&b| b == 1));
//! assert_eq!(store.stats().restores, 1);
//!
//! // The owner's last reference is gone: free it.
//! drop(one);
//! store.delete(1)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod alloc;
#[allow(unsafe_code)]
pub mod arena;
#[allow(unsafe_code)]
mod client;
mod error;
#[allow(unsafe_code)]
pub mod plain;
mod spill;
#[allow(unsafe_code)]
mod store;

pub use arena::{inherit_arena, Arena};
pub use client::{RemoteView, ShmClient};
pub use error::ShmError;
pub use store::{Pinned, ShmStore, StoreConfig, StoreStats, Writer, DEFAULT_FUSE_BYTES};
