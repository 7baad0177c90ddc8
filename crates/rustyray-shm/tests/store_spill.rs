//! Spilling under memory pressure: objects that do not fit go to disk and
//! come back intact; pinned objects stay; deletes and disk limits behave.

mod common;

use common::{files_in, pattern, store, store_with};
use rustyray_shm::ShmError;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Sizes of a workload of three times `capacity`: small objects of 10–50
/// KiB with a 1 MiB object every 25th.
fn workload(capacity: usize) -> Vec<(u128, usize)> {
    let mut objects = Vec::new();
    let mut total = 0;
    let mut id = 0u128;
    while total < 3 * capacity {
        let len = if id % 25 == 24 {
            MIB
        } else {
            10 * KIB + (id as usize * 7919) % (40 * KIB)
        };
        objects.push((id, len));
        total += len;
        id += 1;
    }
    objects
}

#[test]
fn three_times_the_arena_spills_and_reads_back_intact() -> Result<(), ShmError> {
    let capacity = 4 * MIB;
    let (_dir, store) = store(capacity);
    let objects = workload(capacity);
    assert!(objects.iter().filter(|(_, len)| *len == MIB).count() >= 4);
    for &(id, len) in &objects {
        store.put(id, &pattern(id, len))?;
        assert!(store.stats().used <= capacity as u64);
    }
    let after_puts = store.stats();
    assert!(after_puts.objects_spilled > 0, "{after_puts:?}");
    assert_eq!(
        after_puts.objects_in_memory + after_puts.objects_spilled,
        objects.len() as u64
    );
    assert_eq!(after_puts.restores, 0);

    // Every object is still referenced; read each back, oldest first (all
    // of those were spilled), then in a scattered order.
    for &(id, len) in objects.iter().chain(objects.iter().rev().step_by(3)) {
        let pinned = store.get(id)?;
        assert_eq!(pinned.len(), len);
        assert!(pinned[..] == pattern(id, len)[..], "object {id} differs");
        assert!(store.stats().used <= capacity as u64);
    }
    let end = store.stats();
    assert!(end.restores >= after_puts.objects_spilled, "{end:?}");
    assert_eq!(end.objects_in_memory + end.objects_spilled, objects.len() as u64);
    assert_eq!(end.capacity, capacity as u64);
    Ok(())
}

#[test]
fn small_objects_are_fused_into_few_files() -> Result<(), ShmError> {
    let (dir, store) = store(MIB);
    for id in 0..200u128 {
        store.put(id, &pattern(id, 10 * KIB + (id as usize % 5) * KIB))?;
    }
    let stats = store.stats();
    assert!(stats.objects_spilled >= 80, "{stats:?}");
    assert!(stats.spill_files * 10 <= stats.objects_spilled, "{stats:?}");
    assert_eq!(files_in(&dir) as u64, stats.spill_files);
    for id in 0..200u128 {
        assert_eq!(
            &store.get(id)?[..],
            &pattern(id, 10 * KIB + (id as usize % 5) * KIB)[..]
        );
    }
    Ok(())
}

#[test]
fn fusing_respects_fuse_bytes() -> Result<(), ShmError> {
    // With fusing off, every spilled object gets its own file.
    let (dir, store) = store_with(MIB, |c| c.with_fuse_bytes(0));
    for id in 0..60u128 {
        store.put(id, &pattern(id, 30 * KIB))?;
    }
    let stats = store.stats();
    assert!(stats.objects_spilled > 0);
    assert_eq!(stats.spill_files, stats.objects_spilled);
    assert_eq!(files_in(&dir) as u64, stats.spill_files);
    Ok(())
}

#[test]
fn pinned_objects_are_never_spilled() -> Result<(), ShmError> {
    let (_dir, store) = store(MIB);
    store.put(0, &pattern(0, 100 * KIB))?;
    let pinned = store.get(0)?;
    let offset = pinned.offset();
    for id in 1..40u128 {
        store.put(id, &pattern(id, 100 * KIB))?;
    }
    assert!(store.stats().objects_spilled >= 30);
    // Object 0 is the oldest, but pinned: same place, same bytes.
    let (again, _) = store.pin(0)?;
    store.unpin(0)?;
    assert_eq!(again as usize, offset);
    assert_eq!(&pinned[..], &pattern(0, 100 * KIB)[..]);
    assert_eq!(store.stats().restores, 0);
    Ok(())
}

#[test]
fn a_create_that_only_pinned_objects_block_is_full() -> Result<(), ShmError> {
    let (_dir, store) = store(MIB);
    let mut pins = Vec::new();
    for id in 0..8u128 {
        store.put(id, &pattern(id, 128 * KIB))?;
        pins.push(store.get(id)?);
    }
    let err = store.create(100, 64 * KIB).err();
    assert!(
        matches!(err, Some(ShmError::Full { id: 100, pinned, .. }) if pinned == MIB as u64),
        "{err:?}"
    );
    assert_eq!(store.stats().objects_spilled, 0);
    // One unpin makes room by spilling exactly that object.
    pins.pop();
    store.put(100, &pattern(100, 64 * KIB))?;
    assert_eq!(store.stats().objects_spilled, 1);
    for (id, pin) in pins.iter().enumerate() {
        assert_eq!(&pin[..], &pattern(id as u128, 128 * KIB)[..]);
    }
    Ok(())
}

#[test]
fn deleting_spilled_objects_removes_their_files() -> Result<(), ShmError> {
    // fuse_bytes of 64 KiB: the 100 KiB objects get a file each, the 8 KiB
    // ones share files of eight. The small ones, put first, are all spilled.
    let (dir, store) = store_with(MIB, |c| c.with_fuse_bytes(64 * KIB));
    for id in 100..140u128 {
        store.put(id, &pattern(id, 8 * KIB))?;
    }
    for id in 0..16u128 {
        store.put(id, &pattern(id, 100 * KIB))?;
    }
    let before = store.stats();
    assert!(before.objects_spilled >= 46, "{before:?}");
    assert_eq!(files_in(&dir) as u64, before.spill_files);

    // A large spilled object sits alone in its file.
    store.delete(0)?;
    assert_eq!(store.stats().spill_files, before.spill_files - 1);
    assert_eq!(files_in(&dir) as u64, before.spill_files - 1);
    assert_eq!(store.stats().used, before.used);

    // Fused files go once their last object is deleted, and not before.
    for id in 100..139u128 {
        store.delete(id)?;
    }
    let mid = store.stats();
    assert!(mid.spill_files >= 1);
    store.delete(139)?;
    assert_eq!(store.stats().spill_files, mid.spill_files - 1);
    assert_eq!(files_in(&dir) as u64, mid.spill_files - 1);

    for id in 1..16u128 {
        assert_eq!(&store.get(id)?[..], &pattern(id, 100 * KIB)[..]);
    }
    for id in 1..16u128 {
        store.delete(id)?;
    }
    let end = store.stats();
    assert_eq!(
        (end.spill_files, end.disk_bytes, end.used, files_in(&dir)),
        (0, 0, 0, 0)
    );
    Ok(())
}

#[test]
fn restoring_frees_the_disk_copy() -> Result<(), ShmError> {
    let (dir, store) = store(256 * KIB);
    for id in 0..4u128 {
        store.put(id, &pattern(id, 128 * KIB))?;
    }
    assert_eq!(store.stats().objects_spilled, 2);
    drop(store.get(0)?);
    drop(store.get(1)?);
    let stats = store.stats();
    assert_eq!((stats.objects_spilled, stats.restores), (2, 2));
    // Objects 2 and 3 went to disk to make room; 0 and 1's files are gone.
    assert_eq!(files_in(&dir) as u64, stats.spill_files);
    assert_eq!(stats.disk_bytes, 2 * 128 * KIB as u64);
    Ok(())
}

#[test]
fn the_spill_limit_fails_creates_with_out_of_disk_and_loses_nothing() -> Result<(), ShmError> {
    let (_dir, store) = store_with(256 * KIB, |c| c.with_spill_limit(100 * KIB as u64));
    for id in 0..4u128 {
        store.put(id, &pattern(id, 64 * KIB))?;
    }
    // The first spill fits under the limit, the second does not.
    store.put(4, &pattern(4, 64 * KIB))?;
    let err = store.put(5, &pattern(5, 64 * KIB)).err();
    assert!(
        matches!(err, Some(ShmError::OutOfDisk { id: 5, needed, available: Some(a) })
            if needed == 64 * KIB as u64 && a == 36 * KIB as u64),
        "{err:?}"
    );
    assert!(matches!(store.get(5), Err(ShmError::NotFound(5))));
    let stats = store.stats();
    assert_eq!((stats.objects_in_memory, stats.objects_spilled), (4, 1));
    for id in 1..5u128 {
        assert_eq!(&store.get(id)?[..], &pattern(id, 64 * KIB)[..]);
    }
    // Restoring object 0 needs another spill, which the limit forbids too.
    assert!(matches!(store.get(0), Err(ShmError::OutOfDisk { id: 0, .. })));
    // Once the owner frees something, the spilled object comes back.
    store.delete(4)?;
    assert_eq!(&store.get(0)?[..], &pattern(0, 64 * KIB)[..]);
    assert_eq!(store.stats().disk_bytes, 0);
    Ok(())
}
