//! The machinery shared by a store and its handles: reserving space,
//! spilling victims to disk and restoring objects, with file I/O done while
//! the lock is released.

use std::path::PathBuf;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::handles::in_arena;
use super::state::{DiskLoc, Inner, PlannedFile, Slot, SpillFile, SpillWant, Victim};
use super::StoreConfig;
use crate::alloc::block_size;
use crate::spill::{self, SpillBackend};
use crate::{Arena, ShmError};

/// State shared by a store and the `Writer`s and `Pinned`s it handed out.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) arena: Arena,
    pub(super) state: Mutex<Inner>,
    pub(super) changed: Condvar,
    pub(super) config: StoreConfig,
    pub(super) backend: Box<dyn SpillBackend>,
    /// Prefix of this store's spill file names, unique among live stores.
    pub(super) file_prefix: String,
    /// Whether the store created `config.spill_dir` (and so removes it).
    pub(super) created_dir: bool,
}

impl Shared {
    pub(super) fn capacity(&self) -> usize {
        self.config.capacity
    }

    pub(super) fn remove_files(&self, paths: impl IntoIterator<Item = PathBuf>) {
        for path in paths {
            spill::remove_file(self.backend.as_ref(), &path);
        }
    }

    /// Reserves a block for `len` bytes of object `id`, spilling least
    /// recently used objects until it fits. The lock is released while spill
    /// files are written; files emptied meanwhile are added to `trash`.
    pub(super) fn reserve(
        &self,
        state: &mut MutexGuard<'_, Inner>,
        id: u128,
        len: usize,
        trash: &mut Vec<PathBuf>,
    ) -> Result<usize, ShmError> {
        let full = |state: &Inner| ShmError::Full {
            id,
            requested: len as u64,
            capacity: self.capacity() as u64,
            pinned: state.unspillable(),
        };
        let Some(size) = block_size(len).filter(|&size| size <= self.capacity()) else {
            return Err(full(state));
        };
        loop {
            if let Some(offset) = state.alloc.alloc(size) {
                return Ok(offset);
            }
            // Enough free bytes may exist but scattered: spill at least one
            // block's worth, and aim for a batch that fuses small objects.
            let least = size.saturating_sub(state.alloc.free_bytes()).max(1);
            let batch = least.max(self.config.fuse_bytes.min(self.capacity() / 4));
            let victims = self.plan_victims(state, id, SpillWant { least, batch })?;
            if victims.is_empty() {
                if state.spills_in_flight > 0 {
                    // Another thread is about to free space.
                    self.changed.wait(state);
                    continue;
                }
                return Err(full(state));
            }
            self.spill(state, id, victims, trash)?;
        }
    }

    /// Chooses the objects to spill, checking the spill limit; the batch is
    /// cut back to the least that helps when the whole batch would exceed it.
    fn plan_victims(&self, state: &Inner, id: u128, want: SpillWant) -> Result<Vec<Victim>, ShmError> {
        let bytes = |victims: &[Victim]| victims.iter().map(|v| v.len as u64).sum::<u64>();
        let victims = state.candidates(want.batch);
        let Some(limit) = self.config.spill_limit else {
            return Ok(victims);
        };
        let available = limit.saturating_sub(state.disk_bytes + state.disk_reserved);
        if bytes(&victims) <= available {
            return Ok(victims);
        }
        let victims = state.candidates(want.least);
        let needed = bytes(&victims);
        if needed <= available {
            Ok(victims)
        } else {
            Err(ShmError::OutOfDisk {
                id,
                needed,
                available: Some(available),
            })
        }
    }

    /// Groups victims into spill files: objects of `fuse_bytes` or more get
    /// a file each, smaller ones share files of at most `fuse_bytes`.
    fn plan_files(&self, state: &mut Inner, victims: Vec<Victim>) -> Vec<PlannedFile> {
        let fuse = self.config.fuse_bytes;
        let mut files: Vec<PlannedFile> = Vec::new();
        let mut fused: Option<(usize, usize)> = None; // (index in files, bytes)
        for victim in victims {
            let fits = |&(_, bytes): &(usize, usize)| victim.len < fuse && bytes + victim.len <= fuse;
            match fused.filter(fits) {
                Some((index, bytes)) => {
                    files[index].victims.push(victim);
                    fused = Some((index, bytes + victim.len));
                }
                None => {
                    let file = state.next_file;
                    state.next_file += 1;
                    let path = self.config.spill_dir.join(format!("{}-{file}", self.file_prefix));
                    if victim.len < fuse {
                        fused = Some((files.len(), victim.len));
                    }
                    files.push(PlannedFile {
                        file,
                        path,
                        victims: vec![victim],
                    });
                }
            }
        }
        files
    }

    /// Writes `victims` to spill files with the lock released, then frees
    /// their arena space, except for objects pinned meanwhile. On failure no
    /// object changes place.
    fn spill(
        &self,
        state: &mut MutexGuard<'_, Inner>,
        id: u128,
        victims: Vec<Victim>,
        trash: &mut Vec<PathBuf>,
    ) -> Result<(), ShmError> {
        let needed: u64 = victims.iter().map(|v| v.len as u64).sum();
        for victim in &victims {
            state.lru.remove(&victim.tick);
            if let Some(entry) = state.objects.get_mut(&victim.id) {
                debug_assert!(entry.pins == 0 && !entry.deleted);
                entry.slot = Slot::Spilling {
                    offset: victim.offset,
                };
            }
        }
        let files = self.plan_files(state, victims);
        state.spills_in_flight += 1;
        state.disk_reserved += needed;
        let written = MutexGuard::unlocked(state, || self.write_files(&files));
        state.spills_in_flight -= 1;
        state.disk_reserved -= needed;
        self.changed.notify_all();
        match written {
            Ok(sizes) => {
                for (planned, size) in files.into_iter().zip(sizes) {
                    self.finish_file(state, planned, size, trash);
                }
                tracing::debug!(for_object = id, bytes = needed, "spilled objects");
                Ok(())
            }
            Err(failure) => {
                for victim in files.iter().flat_map(|f| &f.victims) {
                    let Some(entry) = state.objects.get_mut(&victim.id) else {
                        continue;
                    };
                    entry.slot = Slot::Resident {
                        offset: victim.offset,
                        tick: victim.tick,
                    };
                    if entry.pins == 0 {
                        // Keeps its old place in the LRU order.
                        if entry.deleted {
                            state.free_resident(victim.id, victim.offset);
                        } else {
                            state.lru.insert(victim.tick, victim.id);
                        }
                    }
                }
                let err = failure.into_error(id, needed);
                tracing::warn!(for_object = id, error = %err, "spilling failed");
                Err(err)
            }
        }
    }

    /// Writes the planned files; on failure removes the ones already written.
    fn write_files(&self, files: &[PlannedFile]) -> Result<Vec<u64>, spill::WriteFailure> {
        let mut sizes = Vec::with_capacity(files.len());
        for planned in files {
            let mut parts = Vec::with_capacity(planned.victims.len());
            for victim in &planned.victims {
                // SAFETY: the victim is in the Spilling state: it was sealed,
                // so nobody writes its region again, and its block is not
                // freed or reallocated until this thread ends the state under
                // the lock, after this slice is gone.
                let bytes = unsafe { self.arena.region(victim.offset, victim.len) };
                parts.push(in_arena(bytes));
            }
            match spill::write_file(self.backend.as_ref(), &planned.path, &parts) {
                Ok(size) => sizes.push(size),
                Err(failure) => {
                    self.remove_files(files[..sizes.len()].iter().map(|f| f.path.clone()));
                    return Err(failure);
                }
            }
        }
        Ok(sizes)
    }

    /// Records a written spill file and moves its objects to Spilled, or
    /// keeps in memory those pinned meanwhile and frees those deleted.
    fn finish_file(&self, state: &mut Inner, planned: PlannedFile, size: u64, trash: &mut Vec<PathBuf>) {
        let mut file_offset = 0;
        let mut live = 0;
        for victim in &planned.victims {
            let at = DiskLoc {
                file: planned.file,
                offset: file_offset,
            };
            file_offset += victim.len as u64;
            let Some(entry) = state.objects.get_mut(&victim.id) else {
                continue;
            };
            debug_assert_eq!(
                entry.slot,
                Slot::Spilling {
                    offset: victim.offset
                }
            );
            if entry.pins > 0 {
                // Read while spilling: it stays, and its disk copy is dead.
                entry.slot = Slot::Resident {
                    offset: victim.offset,
                    tick: 0,
                };
            } else if entry.deleted {
                state.free_resident(victim.id, victim.offset);
            } else {
                entry.slot = Slot::Spilled { at };
                state.alloc.free(victim.offset, entry.block());
                live += 1;
            }
        }
        debug_assert_eq!(file_offset, size);
        if live == 0 {
            trash.push(planned.path);
        } else {
            state.disk_bytes += size;
            state.files.insert(
                planned.file,
                SpillFile {
                    path: planned.path,
                    size,
                    live,
                },
            );
        }
    }

    /// Pins object `id`, restoring it first if it is on disk.
    pub(super) fn pin(&self, id: u128) -> Result<(usize, usize), ShmError> {
        let mut state = self.state.lock();
        let (at, len) = loop {
            let entry = state
                .objects
                .get_mut(&id)
                .filter(|e| !e.deleted)
                .ok_or(ShmError::NotFound(id))?;
            match entry.slot {
                Slot::Writing { .. } => return Err(ShmError::NotSealed(id)),
                Slot::Resident { offset, tick } => {
                    entry.pins += 1;
                    let len = entry.len;
                    if entry.pins == 1 {
                        state.lru.remove(&tick);
                    }
                    return Ok((offset, len));
                }
                Slot::Spilling { offset } => {
                    entry.pins += 1;
                    return Ok((offset, entry.len));
                }
                Slot::Restoring { .. } => self.changed.wait(&mut state),
                Slot::Spilled { at } => {
                    entry.slot = Slot::Restoring { at, offset: None };
                    break (at, entry.len);
                }
            }
        };
        let mut trash = Vec::new();
        let restored = self.restore(&mut state, id, at, len, &mut trash);
        self.changed.notify_all();
        drop(state);
        self.remove_files(trash);
        restored.map(|offset| (offset, len))
    }

    /// Restores object `id` (in state `Restoring { at, offset: None }`) into
    /// new arena space and pins it; on failure it is Spilled again (or
    /// dropped, if deleted meanwhile).
    fn restore(
        &self,
        state: &mut MutexGuard<'_, Inner>,
        id: u128,
        at: DiskLoc,
        len: usize,
        trash: &mut Vec<PathBuf>,
    ) -> Result<usize, ShmError> {
        let read = self.reserve(state, id, len, trash).and_then(|offset| {
            let path = state
                .files
                .get(&at.file)
                .map(|f| f.path.clone())
                .unwrap_or_default();
            if let Some(entry) = state.objects.get_mut(&id) {
                entry.slot = Slot::Restoring {
                    at,
                    offset: Some(offset),
                };
            }
            let read = MutexGuard::unlocked(state, || {
                // SAFETY: the block at `offset` was just allocated for this
                // restore and the object is Restoring, which nobody can pin;
                // so this is the only reference to the region until the
                // object is published as Resident under the lock, after the
                // slice is gone.
                let buf = unsafe { self.arena.region_mut(offset, len) }?;
                spill::read_file(&path, at.offset, buf)
            });
            match read {
                Ok(()) => Ok(offset),
                Err(err) => {
                    state.alloc.free(offset, block_size(len).unwrap_or(usize::MAX));
                    Err(err)
                }
            }
        });
        let Some(deleted) = state.objects.get(&id).map(|e| e.deleted) else {
            return Err(ShmError::NotFound(id));
        };
        match read {
            Ok(offset) if !deleted => {
                if let Some(entry) = state.objects.get_mut(&id) {
                    entry.slot = Slot::Resident { offset, tick: 0 };
                    entry.pins += 1;
                }
                state.restores += 1;
                trash.extend(state.release_disk(at.file));
                tracing::debug!(object = id, bytes = len, "restored spilled object");
                Ok(offset)
            }
            Ok(offset) => {
                state.free_resident(id, offset);
                trash.extend(state.release_disk(at.file));
                Err(ShmError::NotFound(id))
            }
            Err(err) => {
                if deleted {
                    state.objects.remove(&id);
                    trash.extend(state.release_disk(at.file));
                } else if let Some(entry) = state.objects.get_mut(&id) {
                    entry.slot = Slot::Spilled { at };
                }
                Err(err)
            }
        }
    }

    /// Releases one pin of object `id`.
    pub(super) fn unpin(&self, id: u128) -> Result<(), ShmError> {
        let mut state = self.state.lock();
        let entry = state.objects.get_mut(&id).ok_or(ShmError::NotFound(id))?;
        if entry.pins == 0 {
            return Err(ShmError::NotPinned(id));
        }
        entry.pins -= 1;
        if entry.pins == 0 {
            // A Spilling object is settled by the spilling thread instead.
            state.settle_unpinned(id);
        }
        Ok(())
    }
}
