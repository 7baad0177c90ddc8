//! The object table, allocator and spill-file table that the store's mutex
//! guards, with the bookkeeping that keeps the invariants of the design note
//! in `store/mod.rs`. Nothing here touches arena bytes or files.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::alloc::{block_size, Allocator};

/// Where a spilled object's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DiskLoc {
    pub(super) file: u64,
    pub(super) offset: u64,
}

/// The state of one object; see the module's design note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Writing {
        offset: usize,
    },
    /// `tick` is the object's key in `lru` while it is unpinned.
    Resident {
        offset: usize,
        tick: u64,
    },
    Spilling {
        offset: usize,
    },
    Spilled {
        at: DiskLoc,
    },
    /// `offset` is `None` while the restoring thread is still reserving space.
    Restoring {
        at: DiskLoc,
        offset: Option<usize>,
    },
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) len: usize,
    pub(super) slot: Slot,
    /// Local `Pinned` handles plus remote pins.
    pub(super) pins: usize,
    /// Deleted by the owner; freed once the state that defers it ends.
    pub(super) deleted: bool,
}

impl Entry {
    pub(super) fn block(&self) -> usize {
        // The block size was computed successfully when the object was
        // created, so it cannot overflow now.
        block_size(self.len).unwrap_or(usize::MAX)
    }
}

#[derive(Debug)]
pub(super) struct SpillFile {
    pub(super) path: PathBuf,
    pub(super) size: u64,
    /// Objects stored in this file that are Spilled or Restoring.
    pub(super) live: usize,
}

/// Everything the store's mutex guards.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) alloc: Allocator,
    pub(super) objects: HashMap<u128, Entry>,
    /// Spill candidates, least recently used first: tick → object id.
    pub(super) lru: BTreeMap<u64, u128>,
    pub(super) clock: u64,
    pub(super) files: HashMap<u64, SpillFile>,
    pub(super) next_file: u64,
    /// Bytes in the files of `files`.
    pub(super) disk_bytes: u64,
    /// Bytes that in-flight spills are writing, counted against the limit.
    pub(super) disk_reserved: u64,
    pub(super) spills_in_flight: usize,
    pub(super) restores: u64,
}

/// Arena bytes a spill about to be planned should free; see `Shared::reserve`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SpillWant {
    /// The least that can make the request fit.
    pub(super) least: usize,
    /// What a spill aims for, so that small objects are fused into few files.
    pub(super) batch: usize,
}

/// One object a spill copies out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Victim {
    pub(super) id: u128,
    pub(super) tick: u64,
    pub(super) offset: usize,
    pub(super) len: usize,
}

/// One spill file a spill writes: its id, path and objects.
#[derive(Debug)]
pub(super) struct PlannedFile {
    pub(super) file: u64,
    pub(super) path: PathBuf,
    pub(super) victims: Vec<Victim>,
}

impl Inner {
    pub(super) fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Spill candidates, least recently used first, until their blocks add
    /// up to `bytes`.
    pub(super) fn candidates(&self, bytes: usize) -> Vec<Victim> {
        let mut total = 0;
        let mut out = Vec::new();
        for (&tick, id) in &self.lru {
            if total >= bytes {
                break;
            }
            let Some(entry) = self.objects.get(id) else {
                continue;
            };
            let Slot::Resident { offset, .. } = entry.slot else {
                continue;
            };
            total += entry.block();
            out.push(Victim {
                id: *id,
                tick,
                offset,
                len: entry.len,
            });
        }
        out
    }

    /// Arena bytes that cannot be spilled now.
    pub(super) fn unspillable(&self) -> u64 {
        let spillable: usize = self
            .lru
            .values()
            .filter_map(|id| self.objects.get(id))
            .map(Entry::block)
            .sum();
        (self.alloc.used() - spillable) as u64
    }

    /// Frees the arena block and the entry of an object that nobody pins or
    /// copies any more.
    pub(super) fn free_resident(&mut self, id: u128, offset: usize) {
        if let Some(entry) = self.objects.remove(&id) {
            debug_assert_eq!(entry.pins, 0);
            self.alloc.free(offset, entry.block());
        }
    }

    /// Drops one live object from spill file `file`; returns the file's path
    /// when it holds none any more and must be removed.
    pub(super) fn release_disk(&mut self, file: u64) -> Option<PathBuf> {
        let spill = self.files.get_mut(&file)?;
        spill.live -= 1;
        if spill.live > 0 {
            return None;
        }
        let spill = self.files.remove(&file)?;
        self.disk_bytes -= spill.size;
        Some(spill.path)
    }

    /// Makes a Resident object unpinned again: a spill candidate, or freed if
    /// it was deleted meanwhile.
    pub(super) fn settle_unpinned(&mut self, id: u128) {
        let tick = self.tick();
        let Some(entry) = self.objects.get_mut(&id) else {
            return;
        };
        let Slot::Resident { offset, .. } = entry.slot else {
            return;
        };
        debug_assert_eq!(entry.pins, 0);
        if entry.deleted {
            self.free_resident(id, offset);
        } else {
            entry.slot = Slot::Resident { offset, tick };
            self.lru.insert(tick, id);
        }
    }
}
