//! Configuration and statistics of the store.

#![forbid(unsafe_code)]

use std::path::PathBuf;

/// Default [`StoreConfig::fuse_bytes`]: 8 MiB.
pub const DEFAULT_FUSE_BYTES: usize = 8 << 20;

/// Configuration of a [`ShmStore`](crate::ShmStore).
///
/// ```
/// use rustyray_shm::StoreConfig;
///
/// let config = StoreConfig::new(64 << 20, "/tmp/rustyray-spill")
///     .with_fuse_bytes(1 << 20)
///     .with_spill_limit(10 << 30);
/// assert_eq!(config.capacity, 64 << 20);
/// assert_eq!(config.spill_limit, Some(10 << 30));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Size of the shared-memory arena in bytes.
    pub capacity: usize,
    /// Directory for spill files; created (and removed again on drop) if it
    /// does not exist.
    pub spill_dir: PathBuf,
    /// Objects smaller than this are fused: spilled together into one file
    /// of at most this many bytes. Larger objects get a file each.
    pub fuse_bytes: usize,
    /// Most bytes the store keeps in spill files; `None` spills until the
    /// file system is full.
    pub spill_limit: Option<u64>,
}

impl StoreConfig {
    /// An arena of `capacity` bytes spilling into `spill_dir`, with fusing
    /// up to [`DEFAULT_FUSE_BYTES`] and no spill limit.
    ///
    /// ```
    /// let config = rustyray_shm::StoreConfig::new(1 << 20, "/tmp/spill");
    /// assert_eq!(config.fuse_bytes, rustyray_shm::DEFAULT_FUSE_BYTES);
    /// assert_eq!(config.spill_limit, None);
    /// ```
    pub fn new(capacity: usize, spill_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            capacity,
            spill_dir: spill_dir.into(),
            fuse_bytes: DEFAULT_FUSE_BYTES,
            spill_limit: None,
        }
    }

    /// Sets [`fuse_bytes`](StoreConfig::fuse_bytes).
    ///
    /// ```
    /// let config = rustyray_shm::StoreConfig::new(1 << 20, "/tmp/spill").with_fuse_bytes(4096);
    /// assert_eq!(config.fuse_bytes, 4096);
    /// ```
    pub fn with_fuse_bytes(mut self, fuse_bytes: usize) -> StoreConfig {
        self.fuse_bytes = fuse_bytes;
        self
    }

    /// Sets [`spill_limit`](StoreConfig::spill_limit).
    ///
    /// ```
    /// let config = rustyray_shm::StoreConfig::new(1 << 20, "/tmp/spill").with_spill_limit(1 << 30);
    /// assert_eq!(config.spill_limit, Some(1 << 30));
    /// ```
    pub fn with_spill_limit(mut self, bytes: u64) -> StoreConfig {
        self.spill_limit = Some(bytes);
        self
    }
}

/// A snapshot of a store's counters, from [`ShmStore::stats`](crate::ShmStore::stats).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
/// store.put(1, &[7; 100])?;
/// let stats = store.stats();
/// assert_eq!((stats.objects_in_memory, stats.used), (1, 128));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Size of the arena in bytes.
    pub capacity: u64,
    /// Arena bytes allocated now (object sizes rounded up to 64 bytes).
    pub used: u64,
    /// Sealed objects whose bytes are in the arena now.
    pub objects_in_memory: u64,
    /// Objects whose bytes are only on disk now.
    pub objects_spilled: u64,
    /// Bytes of the objects counted in `objects_spilled`.
    pub bytes_spilled: u64,
    /// Spill files on disk now.
    pub spill_files: u64,
    /// Bytes in spill files on disk now, including space of deleted or
    /// restored objects in files that still hold a spilled one.
    pub disk_bytes: u64,
    /// Objects restored from disk since the store was created.
    pub restores: u64,
}
