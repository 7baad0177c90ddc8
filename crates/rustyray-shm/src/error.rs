//! Errors of the shared-memory store — the failures Ray's plasma store and
//! spilling report (`ObjectStoreFullError`, `OutOfDiskError`, missing
//! objects), plus the system-call and hand-off failures of the arena.

use std::path::PathBuf;

/// Everything the arena and the store can fail with.
///
/// Fields are plain numbers, paths and strings so that a caller can turn an
/// error into a wire message without losing its variant. Object ids are
/// printed in hexadecimal.
///
/// ```
/// use rustyray_shm::ShmError;
///
/// let err = ShmError::NotFound(0x2a);
/// assert_eq!(err.to_string(), "object 0x2a not found in the shared-memory store");
/// ```
#[derive(thiserror::Error, Debug)]
pub enum ShmError {
    /// The arena cannot hold `requested` bytes for object `id` even after
    /// spilling every object that may be spilled: the rest is pinned by
    /// readers or held by unsealed writers (`pinned` bytes), or the request
    /// is larger than the arena.
    #[error(
        "object store full: object {id:#x} needs {requested} bytes, capacity is {capacity} bytes \
         of which {pinned} are pinned or being written"
    )]
    Full {
        /// The object that needed the space.
        id: u128,
        /// Bytes asked for.
        requested: u64,
        /// Size of the arena in bytes.
        capacity: u64,
        /// Bytes that cannot be spilled right now (pinned, being written, restored).
        pinned: u64,
    },
    /// Spilling to make room for object `id` needed `needed` more bytes on
    /// disk than the spill limit or the file system allowed. Nothing was
    /// lost: the objects that would have been spilled are still in memory.
    #[error(
        "out of disk space: spilling to make room for object {id:#x} needs {needed} bytes on disk\
         {}", available.map(|a| format!(", {a} bytes left under the spill limit")).unwrap_or_default()
    )]
    OutOfDisk {
        /// The object whose creation or restore needed the space.
        id: u128,
        /// Bytes the spill would have written.
        needed: u64,
        /// Bytes still allowed under the spill limit, or `None` when the file
        /// system itself reported that it is full.
        available: Option<u64>,
    },
    /// No object with this id is in the store (it was never created, or it
    /// was deleted).
    #[error("object {0:#x} not found in the shared-memory store")]
    NotFound(u128),
    /// An object with this id already exists (possibly still being written,
    /// or deleted while pinned and not yet freed).
    #[error("object {0:#x} already exists in the shared-memory store")]
    Duplicate(u128),
    /// The object exists but has not been sealed yet, so it cannot be read.
    #[error("object {0:#x} is still being written")]
    NotSealed(u128),
    /// `unpin` was called for an object that holds no pin.
    #[error("object {0:#x} is not pinned")]
    NotPinned(u128),
    /// A region `(offset, len)` does not lie inside a buffer of `size` bytes.
    #[error("region of {len} bytes at offset {offset} lies outside a buffer of {size} bytes")]
    OutOfRange {
        /// Start of the region.
        offset: u64,
        /// Length of the region.
        len: u64,
        /// Size of the arena or object the region was checked against.
        size: u64,
    },
    /// A region `(offset, len)` overlaps one this process is writing (or,
    /// for a write, reading or writing) through its [`crate::ShmClient`].
    #[error("region of {len} bytes at offset {offset} is in use in this process")]
    Conflict {
        /// Start of the region.
        offset: u64,
        /// Length of the region.
        len: u64,
    },
    /// A spill file could not be written, read or removed.
    #[error("spill file {path}: {source}")]
    Io {
        /// The spill file (or spill directory).
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call on the arena (`memfd_create`, `ftruncate`, `mmap`,
    /// `fcntl`, `fstat`) failed.
    #[error("shared-memory system call failed: {0}")]
    Os(#[from] std::io::Error),
    /// The text describing an inherited arena, or the descriptor it names,
    /// is malformed.
    #[error("bad arena hand-off: {0}")]
    BadHandoff(String),
    /// A store configuration value is unusable.
    #[error("invalid shared-memory store configuration: {0}")]
    InvalidConfig(String),
}

/// The runtime's error for a store failure: the same for the owner and the
/// node daemon, which both use the store.
impl From<ShmError> for rustyray_common::Error {
    fn from(e: ShmError) -> Self {
        use rustyray_common::Error;
        match e {
            ShmError::Full {
                requested,
                capacity,
                pinned,
                ..
            } => Error::ObjectStoreFull {
                needed: requested,
                used: pinned,
                capacity,
            },
            e @ ShmError::OutOfDisk { .. } => Error::OutOfDisk(e.to_string()),
            ShmError::NotFound(id) => Error::ObjectLost(rustyray_common::ids::ObjectId::from_u128(id)),
            other => Error::invalid(format!("shared-memory store: {other}")),
        }
    }
}
