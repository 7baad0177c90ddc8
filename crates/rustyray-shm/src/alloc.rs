//! Free-space allocator over the arena — the role of plasma's dlmalloc: a
//! first-fit allocator of 64-byte aligned blocks whose free ranges coalesce
//! on release.
//!
//! It manages offsets only and never touches the arena's memory.

use std::collections::BTreeMap;

/// Alignment, and granularity, of every block: one cache line.
pub(crate) const ALIGN: usize = 64;

/// Rounds a request up to whole blocks; an empty request still takes one
/// block, so every object has a distinct offset.
pub(crate) fn block_size(len: usize) -> Option<usize> {
    len.max(1).checked_next_multiple_of(ALIGN)
}

/// First-fit allocator over `[0, capacity)`.
///
/// Invariants (checked by `check` in tests): free ranges are disjoint,
/// non-adjacent (adjacent ones are merged), non-empty, start at multiples of
/// [`ALIGN`], and together with the allocated blocks cover the arena.
#[derive(Debug)]
pub(crate) struct Allocator {
    /// Free ranges, start offset → length.
    free: BTreeMap<usize, usize>,
    capacity: usize,
    used: usize,
}

impl Allocator {
    pub(crate) fn new(capacity: usize) -> Allocator {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Allocator {
            free,
            capacity,
            used: 0,
        }
    }

    /// Bytes currently allocated (block sizes, so rounded up to [`ALIGN`]).
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// Bytes currently free (possibly in several ranges).
    pub(crate) fn free_bytes(&self) -> usize {
        self.capacity - self.used
    }

    /// Reserves a block of `size` bytes (a [`block_size`]) and returns its
    /// offset, or `None` when no free range is large enough.
    pub(crate) fn alloc(&mut self, size: usize) -> Option<usize> {
        debug_assert!(size > 0 && size.is_multiple_of(ALIGN));
        let (&start, &len) = self.free.iter().find(|(_, &len)| len >= size)?;
        self.free.remove(&start);
        if len > size {
            self.free.insert(start + size, len - size);
        }
        self.used += size;
        Some(start)
    }

    /// Returns block `(offset, size)` to the free ranges, merging it with its
    /// neighbours.
    pub(crate) fn free(&mut self, offset: usize, size: usize) {
        debug_assert!(size > 0 && offset.is_multiple_of(ALIGN) && offset + size <= self.capacity);
        let mut start = offset;
        let mut len = size;
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back() {
            debug_assert!(prev + prev_len <= offset, "double free at {offset}");
            if prev + prev_len == offset {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some((&next, &next_len)) = self.free.range(offset..).next() {
            debug_assert!(offset + size <= next, "double free at {offset}");
            if offset + size == next {
                self.free.remove(&next);
                len += next_len;
            }
        }
        self.free.insert(start, len);
        self.used -= size;
    }

    #[cfg(test)]
    fn check(&self) {
        let mut end = 0;
        let mut total = 0;
        for (&start, &len) in &self.free {
            assert!(len > 0);
            assert_eq!(start % ALIGN, 0);
            assert!(
                start > end || (start == 0 && end == 0),
                "ranges overlap or touch at {start}"
            );
            end = start + len;
            total += len;
        }
        assert!(end <= self.capacity);
        assert_eq!(total, self.capacity - self.used);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn sizes_round_up_to_blocks() {
        assert_eq!(block_size(0), Some(64));
        assert_eq!(block_size(1), Some(64));
        assert_eq!(block_size(64), Some(64));
        assert_eq!(block_size(65), Some(128));
        assert_eq!(block_size(usize::MAX), None);
    }

    #[test]
    fn freed_neighbours_merge() {
        let mut a = Allocator::new(64 * 4);
        let x = a.alloc(64);
        let y = a.alloc(64);
        let z = a.alloc(64);
        assert_eq!((x, y, z), (Some(0), Some(64), Some(128)));
        a.free(0, 64);
        a.free(128, 64);
        a.check();
        // Block 128 merged with the never-used block 192.
        assert_eq!(a.free.get(&128), Some(&128));
        a.free(64, 64);
        a.check();
        assert_eq!(a.free.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize),
        Free(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (1usize..5000).prop_map(Op::Alloc),
                any::<prop::sample::Index>().prop_map(|i| Op::Free(i.index(1 << 16)))
            ],
            1..200,
        )
    }

    proptest! {
        #[test]
        fn blocks_never_overlap_and_free_space_coalesces(capacity in 1usize..40_000, ops in ops()) {
            let mut a = Allocator::new(capacity);
            let mut live: Vec<(usize, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(len) => {
                        let size = block_size(len).unwrap_or(usize::MAX);
                        if let Some(off) = a.alloc(size) {
                            prop_assert_eq!(off % ALIGN, 0);
                            prop_assert!(off + size <= capacity);
                            for &(o, s) in &live {
                                prop_assert!(off + size <= o || o + s <= off, "{off}+{size} overlaps {o}+{s}");
                            }
                            live.push((off, size));
                        } else {
                            // First fit fails only when no free range is large enough.
                            prop_assert!(a.free.values().all(|&l| l < size));
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (off, size) = live.swap_remove(i % live.len());
                        a.free(off, size);
                    }
                    Op::Free(_) => {}
                }
                a.check();
                prop_assert_eq!(a.used(), live.iter().map(|&(_, s)| s).sum::<usize>());
            }
            for (off, size) in live.drain(..) {
                a.free(off, size);
            }
            a.check();
            prop_assert_eq!(a.used(), 0);
            prop_assert_eq!(a.free.into_iter().collect::<Vec<_>>(), vec![(0, capacity)]);
        }
    }
}
