//! The node's shared-memory object store — Ray's plasma store together with
//! its object spilling (`LocalObjectManager` spilling and restoring through
//! external storage).
//!
//! # Design
//!
//! Every object is one `Entry` in `Inner::objects`, in one of these
//! states (`Slot`):
//!
//! ```text
//!   create ──► Writing ──seal──► Resident ◄────────────────┐
//!                 │               │    ▲                    │
//!        drop unsealed      spill │    │ pinned meanwhile,  │ restore done
//!                 ▼               ▼    │ or the write failed│
//!               freed          Spilling ──write done──► Spilled ──get──► Restoring
//! ```
//!
//! - **Writing**: space reserved, bytes written by the one [`Writer`].
//! - **Resident**: sealed and in the arena; never written again. It may be
//!   pinned; an unpinned one is a spill candidate, kept in `Inner::lru`.
//! - **Spilling**: a thread is copying the bytes to a spill file without the
//!   lock. It may still be pinned and read, never freed until the copy ends.
//! - **Spilled**: only on disk, at a `DiskLoc`.
//! - **Restoring**: a thread is reserving space and reading the bytes back
//!   without the lock; other readers of the object wait for it.
//!
//! Invariants (asserted in debug builds where cheap):
//! - an object is in `lru` iff it is Resident, unpinned and not deleted;
//! - only Resident and Spilling objects have pins;
//! - arena space is freed only for an unpinned object that no thread is
//!   copying, so a region is never reused while anyone can read it;
//! - `delete` of an object that is pinned, being written, spilled or restored
//!   only marks it; the thread that ends that state frees it;
//! - a spill file is removed as soon as none of its objects is Spilled or
//!   Restoring; `SpillFile::live` counts those objects.
//!
//! One [`parking_lot::Mutex`] guards all of `Inner`. File I/O (spill
//! writes, restore reads, removing files) happens with the lock released:
//! the Spilling and Restoring states keep other threads away from the
//! objects involved. The condition variable `Shared::changed` is signalled
//! when a spill or a restore finishes; threads wait on it for a restore of
//! the object they want, or for space that an in-flight spill is about to
//! free. No thread waits while it has a spill or restore of its own in
//! flight, so waits cannot form a cycle.
//!
//! Files: `config` (configuration and statistics), `state` (the object table
//! and allocator behind the lock, no `unsafe`), `shared` (spilling and
//! restoring), `handles` ([`Writer`] and [`Pinned`]). Only `shared` and
//! `handles` touch arena bytes, so only they contain `unsafe`.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::alloc::{block_size, Allocator};
use crate::spill::{DiskBackend, SpillBackend};
use crate::{Arena, ShmError};

mod config;
#[allow(unsafe_code)]
mod handles;
#[allow(unsafe_code)]
mod shared;
mod state;

pub use config::{StoreConfig, StoreStats, DEFAULT_FUSE_BYTES};
pub use handles::{Pinned, Writer};
use shared::Shared;
use state::{Entry, Inner, Slot};

/// The node's shared-memory object store: sealed immutable objects in one
/// [`Arena`] that worker processes map, spilled to disk under memory
/// pressure and restored on access, so that a referenced object is never
/// lost to eviction.
///
/// `ShmStore` is `Send + Sync`; share it with `Arc` or scoped threads. Its
/// [`Writer`]s and [`Pinned`]s keep the arena mapped even after the store is
/// dropped.
///
/// ```
/// use rustyray_shm::{ShmError, ShmStore, StoreConfig};
///
/// let dir = tempfile::tempdir()?;
/// let store = ShmStore::new(StoreConfig::new(1 << 20, dir.path().join("spill")))?;
/// store.put(42, b"hello")?;
/// let object = store.get(42)?;
/// assert_eq!(&object[..], b"hello");
/// assert!(matches!(store.get(43), Err(ShmError::NotFound(43))));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ShmStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for ShmStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmStore")
            .field("arena", &self.shared.arena)
            .field("spill_dir", &self.shared.config.spill_dir)
            .finish_non_exhaustive()
    }
}

impl ShmStore {
    /// Creates a store with its own arena of `config.capacity` bytes,
    /// creating `config.spill_dir` if it does not exist.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert_eq!(store.stats().capacity, 1 << 20);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(config: StoreConfig) -> Result<ShmStore, ShmError> {
        ShmStore::with_backend(config, Box::new(DiskBackend))
    }

    pub(crate) fn with_backend(
        config: StoreConfig,
        backend: Box<dyn SpillBackend>,
    ) -> Result<ShmStore, ShmError> {
        let arena = Arena::create("rustyray-plasma", config.capacity)?;
        let dir = &config.spill_dir;
        let io_err = |source| ShmError::Io {
            path: dir.clone(),
            source,
        };
        let created_dir = !dir.try_exists().map_err(io_err)?;
        if created_dir {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        // The memfd's inode number is unique among live memfds, so two stores
        // sharing a spill directory never pick the same file names.
        let file_prefix = format!("rustyray-spill-{}-{}", std::process::id(), arena.inode()?);
        let inner = Inner {
            alloc: Allocator::new(config.capacity),
            objects: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
            files: HashMap::new(),
            next_file: 0,
            disk_bytes: 0,
            disk_reserved: 0,
            spills_in_flight: 0,
            restores: 0,
        };
        let shared = Shared {
            arena,
            state: Mutex::new(inner),
            changed: Condvar::new(),
            config,
            backend,
            file_prefix,
            created_dir,
        };
        Ok(ShmStore {
            shared: Arc::new(shared),
        })
    }

    /// The arena, to hand to worker processes (see
    /// [`inherit_arena`](crate::inherit_arena)) so they can read pinned
    /// objects at their offsets.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert_eq!(store.arena().capacity(), 1 << 20);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn arena(&self) -> &Arena {
        &self.shared.arena
    }

    /// Reserves `len` bytes for a new object `id` and returns the [`Writer`]
    /// that fills and seals it.
    ///
    /// When the arena lacks room, least recently used unpinned objects are
    /// spilled to disk until the request fits. Fails with
    /// [`ShmError::Duplicate`] if `id` exists, [`ShmError::Full`] if the
    /// request cannot fit even after spilling everything spillable,
    /// [`ShmError::OutOfDisk`] if the spill needs more disk than the limit or
    /// the file system allow (nothing is spilled then), and [`ShmError::Io`]
    /// if a spill file cannot be written.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// let mut writer = store.create(7, 4)?;
    /// writer.as_mut_slice().copy_from_slice(b"data");
    /// writer.seal();
    /// assert_eq!(&store.get(7)?[..], b"data");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create(&self, id: u128, len: usize) -> Result<Writer, ShmError> {
        let shared = &self.shared;
        let mut trash = Vec::new();
        let mut state = shared.state.lock();
        if state.objects.contains_key(&id) {
            return Err(ShmError::Duplicate(id));
        }
        let reserved = shared.reserve(&mut state, id, len, &mut trash);
        let result = match reserved {
            // A concurrent create of the same id may have won while the lock
            // was released for spilling.
            Ok(offset) if state.objects.contains_key(&id) => {
                state.alloc.free(offset, block_size(len).unwrap_or(usize::MAX));
                Err(ShmError::Duplicate(id))
            }
            Ok(offset) => {
                state.objects.insert(
                    id,
                    Entry {
                        len,
                        slot: Slot::Writing { offset },
                        pins: 0,
                        deleted: false,
                    },
                );
                Ok(Writer::new(Arc::clone(shared), id, offset, len))
            }
            Err(err) => Err(err),
        };
        drop(state);
        shared.remove_files(trash);
        result
    }

    /// Stores `bytes` as the sealed object `id`: [`create`](ShmStore::create),
    /// copy, [`seal`](Writer::seal).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(1, b"one")?;
    /// assert!(matches!(store.put(1, b"again"), Err(rustyray_shm::ShmError::Duplicate(1))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn put(&self, id: u128, bytes: &[u8]) -> Result<(), ShmError> {
        let mut writer = self.create(id, bytes.len())?;
        writer.as_mut_slice().copy_from_slice(bytes);
        writer.seal();
        Ok(())
    }

    /// Pins object `id` in memory and returns a handle to its bytes,
    /// restoring it from disk first if it was spilled (which may spill
    /// others). Fails with [`ShmError::NotFound`] for an unknown or deleted
    /// id, [`ShmError::NotSealed`] while it is being written, and with the
    /// errors of [`create`](ShmStore::create) when a restore cannot get room.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(5, &[1, 2, 3])?;
    /// let pinned = store.get(5)?;
    /// assert_eq!(&pinned[..], &[1, 2, 3]);
    /// assert_eq!(pinned.len(), 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn get(&self, id: u128) -> Result<Pinned, ShmError> {
        let (offset, len) = self.shared.pin(id)?;
        Ok(Pinned::new(Arc::clone(&self.shared), id, offset, len))
    }

    /// Pins object `id` for a reader in another process and returns its
    /// `(offset, len)` in the arena; like [`get`](ShmStore::get) it restores
    /// a spilled object first. The object is neither spilled, moved nor
    /// freed until a matching [`unpin`](ShmStore::unpin).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(9, b"remote")?;
    /// let (offset, len) = store.pin(9)?;
    /// assert_eq!((offset % 64, len), (0, 6));
    /// store.unpin(9)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pin(&self, id: u128) -> Result<(u64, u64), ShmError> {
        let (offset, len) = self.shared.pin(id)?;
        Ok((offset as u64, len as u64))
    }

    /// Releases one remote pin of object `id`. Fails with
    /// [`ShmError::NotFound`] for an unknown id and [`ShmError::NotPinned`]
    /// when it holds no pin. A deferred delete completes at the last unpin.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(9, b"remote")?;
    /// store.pin(9)?;
    /// store.unpin(9)?;
    /// assert!(matches!(store.unpin(9), Err(rustyray_shm::ShmError::NotPinned(9))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unpin(&self, id: u128) -> Result<(), ShmError> {
        self.shared.unpin(id)
    }

    /// Deletes object `id` because its owner's reference count reached zero:
    /// its arena space, or its share of a spill file, is freed at once, and a
    /// spill file left without live objects is removed. While the object is
    /// pinned, being written, spilled or restored, the delete is deferred to
    /// the end of that state; it is hidden from `get` at once. Fails with
    /// [`ShmError::NotFound`] for an unknown or already deleted id.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(3, &[0; 1000])?;
    /// store.delete(3)?;
    /// assert_eq!(store.stats().used, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn delete(&self, id: u128) -> Result<(), ShmError> {
        let mut state = self.shared.state.lock();
        let entry = state
            .objects
            .get_mut(&id)
            .filter(|e| !e.deleted)
            .ok_or(ShmError::NotFound(id))?;
        let mut trash = None;
        match entry.slot {
            Slot::Resident { offset, tick } if entry.pins == 0 => {
                state.lru.remove(&tick);
                state.free_resident(id, offset);
            }
            Slot::Spilled { at } => {
                state.objects.remove(&id);
                trash = state.release_disk(at.file);
            }
            Slot::Writing { .. } | Slot::Resident { .. } | Slot::Spilling { .. } | Slot::Restoring { .. } => {
                entry.deleted = true;
            }
        }
        drop(state);
        self.shared.remove_files(trash);
        Ok(())
    }

    /// A snapshot of the store's counters.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert_eq!(store.stats().objects_spilled, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stats(&self) -> StoreStats {
        let state = self.shared.state.lock();
        let mut stats = StoreStats {
            capacity: self.shared.config.capacity as u64,
            used: state.alloc.used() as u64,
            spill_files: state.files.len() as u64,
            disk_bytes: state.disk_bytes,
            restores: state.restores,
            ..StoreStats::default()
        };
        for entry in state.objects.values().filter(|e| !e.deleted) {
            match entry.slot {
                Slot::Resident { .. } | Slot::Spilling { .. } => stats.objects_in_memory += 1,
                Slot::Spilled { .. } | Slot::Restoring { .. } => {
                    stats.objects_spilled += 1;
                    stats.bytes_spilled += entry.len as u64;
                }
                Slot::Writing { .. } => {}
            }
        }
        stats
    }
}

impl ShmStore {
    /// Removes every spill file of the store, and the spill directory if
    /// the store created it and it is empty now: what the owner does at
    /// shutdown, and what dropping the store does. Spilled objects are gone
    /// after this; objects in memory stay readable.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let spill = dir.path().join("spill");
    /// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, &spill))?;
    /// store.put(1, &[1; 600_000])?;
    /// store.put(2, &[2; 600_000])?; // spills object 1
    /// store.remove_spill_files();
    /// assert!(!spill.exists());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn remove_spill_files(&self) {
        let paths: Vec<PathBuf> = {
            let mut state = self.shared.state.lock();
            state.disk_bytes = 0;
            state.files.drain().map(|(_, file)| file.path).collect()
        };
        self.shared.remove_files(paths);
        if self.shared.created_dir {
            if let Err(err) = std::fs::remove_dir(&self.shared.config.spill_dir) {
                tracing::debug!(dir = %self.shared.config.spill_dir.display(), error = %err,
                    "spill directory not removed");
            }
        }
    }
}

impl Drop for ShmStore {
    /// Removes the store's spill files (see
    /// [`ShmStore::remove_spill_files`]). Writers and pins still alive keep
    /// the arena mapped but can no longer reach spilled objects.
    fn drop(&mut self) {
        self.remove_spill_files();
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::path::Path;

    use super::*;

    /// Sends every spill write to `/dev/full`, which fails writes with
    /// ENOSPC exactly as a full file system does.
    #[derive(Debug)]
    struct DevFull;

    impl SpillBackend for DevFull {
        fn create(&self, _path: &Path) -> io::Result<File> {
            OpenOptions::new().write(true).open("/dev/full")
        }

        fn remove(&self, _path: &Path) -> io::Result<()> {
            // Nothing was created; `/dev/full` itself must never be removed.
            Ok(())
        }
    }

    fn pattern(id: u128, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u128 * 31 + id * 7) as u8).collect()
    }

    #[test]
    fn a_full_disk_fails_the_create_and_loses_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let config = StoreConfig::new(64 * 1024, dir.path());
        let store = ShmStore::with_backend(config, Box::new(DevFull))?;
        for id in 0..4 {
            store.put(id, &pattern(id, 16 * 1024))?;
        }
        let err = store.put(99, &pattern(99, 16 * 1024));
        assert!(
            matches!(
                err,
                Err(ShmError::OutOfDisk {
                    id: 99,
                    available: None,
                    ..
                })
            ),
            "{err:?}"
        );
        let stats = store.stats();
        assert_eq!(
            (stats.objects_in_memory, stats.objects_spilled, stats.spill_files),
            (4, 0, 0)
        );
        for id in 0..4 {
            assert_eq!(&store.get(id)?[..], &pattern(id, 16 * 1024)[..]);
        }
        // The failed spill left every object a spill candidate again.
        assert_eq!(store.shared.state.lock().lru.len(), 4);
        Ok(())
    }

    /// Spills to disk, but the first time a spill file is created (with the
    /// store's lock released) it deletes object 0 and pins object 1, both
    /// being spilled right then.
    #[derive(Debug, Default)]
    struct Meddler {
        store: std::sync::OnceLock<std::sync::Weak<ShmStore>>,
        pins: Mutex<Vec<Result<Pinned, ShmError>>>,
        deletes: Mutex<Vec<Result<(), ShmError>>>,
    }

    #[derive(Debug)]
    struct MeddlingDisk(Arc<Meddler>);

    impl SpillBackend for MeddlingDisk {
        fn create(&self, path: &Path) -> io::Result<File> {
            let store = self.0.store.get().and_then(std::sync::Weak::upgrade);
            if let Some(store) = store.filter(|_| self.0.pins.lock().is_empty()) {
                self.0.deletes.lock().push(store.delete(0));
                self.0.pins.lock().push(store.get(1));
            }
            DiskBackend.create(path)
        }

        fn remove(&self, path: &Path) -> io::Result<()> {
            DiskBackend.remove(path)
        }
    }

    #[test]
    fn objects_deleted_or_pinned_while_being_spilled_are_not_spilled(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let meddler = Arc::new(Meddler::default());
        let config = StoreConfig::new(128 * 1024, dir.path());
        let store = Arc::new(ShmStore::with_backend(
            config,
            Box::new(MeddlingDisk(Arc::clone(&meddler))),
        )?);
        meddler
            .store
            .set(Arc::downgrade(&store))
            .map_err(|_| "store already set")?;
        for id in 0..8 {
            store.put(id, &pattern(id, 16 * 1024))?;
        }
        // Needs 16 KiB; spills objects 0 and 1 (a 32 KiB batch).
        store.put(8, &pattern(8, 16 * 1024))?;

        assert!(matches!(meddler.deletes.lock().as_slice(), [Ok(())]));
        let pinned = meddler.pins.lock().pop().ok_or("no pin taken")??;
        assert_eq!(&pinned[..], &pattern(1, 16 * 1024)[..]);
        assert!(matches!(store.get(0), Err(ShmError::NotFound(0))));
        let stats = store.stats();
        assert_eq!(
            (stats.objects_spilled, stats.spill_files, stats.objects_in_memory),
            (0, 0, 8)
        );
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        {
            let state = store.shared.state.lock();
            assert!(!state.objects.contains_key(&0));
            assert!(
                matches!(state.objects.get(&1), Some(e) if e.pins == 1 && matches!(e.slot, Slot::Resident { .. }))
            );
        }
        drop(pinned);
        // Unpinned, object 1 is a spill candidate again (the most recently used).
        store.put(9, &pattern(9, 16 * 1024))?;
        assert!(store.stats().objects_spilled >= 1);
        assert_eq!(&store.get(1)?[..], &pattern(1, 16 * 1024)[..]);
        Ok(())
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ShmStore>();
        check::<Pinned>();
        check::<Writer>();
        check::<Arena>();
    }

    #[test]
    fn spill_files_are_named_inside_the_spill_dir() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let config = StoreConfig::new(64 * 1024, dir.path());
        let store = ShmStore::new(config.clone())?;
        for id in 0..8 {
            store.put(id, &pattern(id, 16 * 1024))?;
        }
        let state = store.shared.state.lock();
        assert!(!state.files.is_empty());
        assert!(state
            .files
            .values()
            .all(|f| f.path.parent() == Some(dir.path()) && f.path.exists()));
        Ok(())
    }

    #[test]
    fn invariants_hold_after_mixed_operations() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = ShmStore::new(StoreConfig::new(64 * 1024, dir.path()).with_fuse_bytes(20 * 1024))?;
        let mut pins = Vec::new();
        for id in 0..40u128 {
            store.put(id, &pattern(id, 1000 + (id as usize * 397) % 9000))?;
            if id % 7 == 0 {
                pins.push(store.get(id / 2)?);
            }
            if id % 5 == 0 {
                store.delete(id / 3).or_else(|e| {
                    if matches!(e, ShmError::NotFound(_)) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            }
        }
        drop(pins);
        let state = store.shared.state.lock();
        for (id, entry) in &state.objects {
            assert_eq!(entry.pins, 0, "{id}");
            let in_lru =
                matches!(entry.slot, Slot::Resident { tick, .. } if state.lru.get(&tick) == Some(id));
            assert_eq!(
                in_lru,
                matches!(entry.slot, Slot::Resident { .. }) && !entry.deleted,
                "{id}"
            );
        }
        assert_eq!(
            state.lru.len(),
            state
                .objects
                .values()
                .filter(|e| matches!(e.slot, Slot::Resident { .. }))
                .count()
        );
        let live: usize = state.files.values().map(|f| f.live).sum();
        assert_eq!(
            live,
            state
                .objects
                .values()
                .filter(|e| matches!(e.slot, Slot::Spilled { .. }))
                .count()
        );
        Ok(())
    }
}
