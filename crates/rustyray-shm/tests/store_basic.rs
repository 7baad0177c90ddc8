//! Creating, reading, pinning and deleting objects without memory pressure.

mod common;

use common::{files_in, pattern, store};
use rustyray_shm::ShmError;

const KIB: usize = 1024;

#[test]
fn put_then_get_round_trips() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    for (id, len) in [
        (1u128, 0usize),
        (2, 1),
        (3, 63),
        (4, 64),
        (5, 65),
        (u128::MAX, 100 * KIB),
    ] {
        store.put(id, &pattern(id, len))?;
    }
    for (id, len) in [
        (1u128, 0usize),
        (2, 1),
        (3, 63),
        (4, 64),
        (5, 65),
        (u128::MAX, 100 * KIB),
    ] {
        let pinned = store.get(id)?;
        assert_eq!(pinned.len(), len);
        assert_eq!(pinned.offset() % 64, 0);
        assert_eq!(&pinned[..], &pattern(id, len)[..], "object {id}");
    }
    assert_eq!(store.stats().objects_in_memory, 6);
    Ok(())
}

#[test]
fn unknown_ids_are_not_found() {
    let (_dir, store) = store(1 << 20);
    assert!(matches!(store.get(7), Err(ShmError::NotFound(7))));
    assert!(matches!(store.pin(7), Err(ShmError::NotFound(7))));
    assert!(matches!(store.unpin(7), Err(ShmError::NotFound(7))));
    assert!(matches!(store.delete(7), Err(ShmError::NotFound(7))));
    let message = store.get(0xabc).err().map(|e| e.to_string());
    assert_eq!(
        message.as_deref(),
        Some("object 0xabc not found in the shared-memory store")
    );
}

#[test]
fn duplicate_ids_are_refused() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    let writer = store.create(1, 10)?;
    assert!(matches!(store.create(1, 10), Err(ShmError::Duplicate(1))));
    writer.seal();
    assert!(matches!(store.put(1, b"x"), Err(ShmError::Duplicate(1))));
    assert_eq!(store.stats().used, 64);
    Ok(())
}

#[test]
fn unsealed_objects_cannot_be_read() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    let _writer = store.create(1, 10)?;
    assert!(matches!(store.get(1), Err(ShmError::NotSealed(1))));
    Ok(())
}

#[test]
fn an_aborted_writer_frees_its_space() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    let mut writer = store.create(1, 300 * KIB)?;
    writer.write_at(0, b"partial")?;
    assert_eq!(store.stats().used, 300 * KIB as u64);
    drop(writer);
    assert_eq!(store.stats().used, 0);
    assert!(matches!(store.get(1), Err(ShmError::NotFound(1))));
    // The id is free again.
    store.put(1, b"complete")?;
    assert_eq!(&store.get(1)?[..], b"complete");
    Ok(())
}

#[test]
fn objects_larger_than_the_arena_are_refused() {
    let (_dir, store) = store(1 << 20);
    let err = store.create(1, (1 << 20) + 1).err();
    assert!(
        matches!(err, Some(ShmError::Full { id: 1, requested, capacity: 1048576, .. }) if requested == (1 << 20) + 1),
        "{err:?}"
    );
}

#[test]
fn delete_frees_memory_at_once() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    store.put(1, &pattern(1, 200 * KIB))?;
    store.put(2, &pattern(2, 100 * KIB))?;
    store.delete(1)?;
    assert_eq!(store.stats().used, 100 * KIB as u64);
    assert!(matches!(store.get(1), Err(ShmError::NotFound(1))));
    assert!(matches!(store.delete(1), Err(ShmError::NotFound(1))));
    store.delete(2)?;
    assert_eq!(store.stats().used, 0);
    // All space is one range again: an object of the whole arena fits.
    store.put(3, &pattern(3, 1 << 20))?;
    Ok(())
}

#[test]
fn delete_while_pinned_is_deferred_to_the_last_unpin() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    store.put(1, &pattern(1, 10 * KIB))?;
    let local = store.get(1)?;
    let second = local.clone();
    store.pin(1)?;
    store.delete(1)?;
    // Hidden at once, but the memory stays until every pin is gone.
    assert!(matches!(store.get(1), Err(ShmError::NotFound(1))));
    assert!(matches!(store.create(1, 1), Err(ShmError::Duplicate(1))));
    drop(local);
    store.unpin(1)?;
    assert_eq!(store.stats().used, 10 * KIB as u64);
    assert_eq!(&second[..], &pattern(1, 10 * KIB)[..]);
    drop(second);
    assert_eq!(store.stats().used, 0);
    assert!(matches!(store.unpin(1), Err(ShmError::NotFound(1))));
    store.put(1, b"reused")?;
    Ok(())
}

#[test]
fn remote_pins_report_the_objects_place() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    store.put(1, b"remote bytes")?;
    let (offset, len) = store.pin(1)?;
    let local = store.get(1)?;
    assert_eq!((offset, len), (local.offset() as u64, 12));
    // SAFETY: object 1 is sealed and pinned, so nobody writes its region.
    let bytes = unsafe { store.arena().region(offset as usize, len as usize)? };
    assert_eq!(bytes, b"remote bytes");
    store.unpin(1)?;
    drop(local);
    assert!(matches!(store.unpin(1), Err(ShmError::NotPinned(1))));
    Ok(())
}

#[test]
fn pinned_handles_move_between_threads() -> Result<(), ShmError> {
    let (_dir, store) = store(1 << 20);
    store.put(1, &pattern(1, 5000))?;
    let pinned = store.get(1)?;
    let sum = std::thread::scope(|s| {
        let a = s.spawn(|| pinned.iter().map(|&b| u64::from(b)).sum::<u64>());
        let clone = pinned.clone();
        let b = s.spawn(move || clone.iter().map(|&b| u64::from(b)).sum::<u64>());
        (a.join(), b.join())
    });
    let expected: u64 = pattern(1, 5000).iter().map(|&b| u64::from(b)).sum();
    assert!(matches!(sum, (Ok(x), Ok(y)) if x == expected && y == expected));
    Ok(())
}

#[test]
fn dropping_the_store_removes_its_spill_files_and_directory() -> Result<(), ShmError> {
    let (dir, store) = store(256 * KIB);
    for id in 0..12 {
        store.put(id, &pattern(id, 64 * KIB))?;
    }
    let stats = store.stats();
    assert!(stats.spill_files > 0);
    assert_eq!(files_in(&dir) as u64, stats.spill_files);
    drop(store);
    assert!(!dir.path().join("spill").exists());
    Ok(())
}

#[test]
fn an_existing_spill_directory_is_kept_on_drop() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("unrelated"), b"keep")?;
    let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(128 * KIB, dir.path()))?;
    for id in 0..6 {
        store.put(id, &pattern(id, 64 * KIB))?;
    }
    assert!(store.stats().spill_files > 0);
    drop(store);
    let left: Vec<_> = std::fs::read_dir(dir.path())?.collect::<Result<_, _>>()?;
    assert_eq!(left.len(), 1);
    assert_eq!(std::fs::read(dir.path().join("unrelated"))?, b"keep");
    Ok(())
}
