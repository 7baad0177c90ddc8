//! Several threads creating, reading and deleting objects at once in a small
//! arena, so that spills and restores race with each other.

mod common;

use std::collections::BTreeMap;

use common::{pattern, store};
use rustyray_shm::ShmError;

const THREADS: u128 = 4;
const OPS: u128 = 150;

/// Object size for `id`: 1 byte to 64 KiB.
fn size(id: u128) -> usize {
    1 + ((id * 2_654_435_761) % (64 * 1024)) as usize
}

/// One thread's work: put objects, read back earlier ones, delete some;
/// returns the ids it left alive.
fn worker(store: &rustyray_shm::ShmStore, thread: u128) -> Result<Vec<u128>, ShmError> {
    let mut live = BTreeMap::new();
    for i in 0..OPS {
        let id = (thread << 64) | i;
        store.put(id, &pattern(id, size(id)))?;
        live.insert(id, ());
        if i % 3 == 0 {
            // An older object of this thread, probably spilled by now.
            let old = (thread << 64) | (i * 7 % (i + 1));
            if live.contains_key(&old) {
                let pinned = store.get(old)?;
                assert!(
                    pinned[..] == pattern(old, size(old))[..],
                    "object {old:#x} differs"
                );
            }
        }
        if i % 5 == 4 {
            let victim = (thread << 64) | (i / 2);
            if live.remove(&victim).is_some() {
                store.delete(victim)?;
            }
        }
    }
    Ok(live.into_keys().collect())
}

#[test]
fn concurrent_puts_gets_and_deletes_keep_every_object_intact() -> Result<(), ShmError> {
    // At most two objects per thread are pinned or being written at once,
    // 512 KiB in all, so the rest of the 2 MiB always has a gap that fits.
    let (_dir, store) = store(2 << 20);
    let results: Vec<Result<Vec<u128>, ShmError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                s.spawn(move || worker(store, t))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mut live = Vec::new();
    for result in results {
        live.extend(result?);
    }
    let stats = store.stats();
    assert!(stats.objects_spilled > 0 && stats.restores > 0, "{stats:?}");
    assert_eq!(stats.objects_in_memory + stats.objects_spilled, live.len() as u64);
    for &id in &live {
        let pinned = store.get(id)?;
        assert!(pinned[..] == pattern(id, size(id))[..], "object {id:#x} differs");
    }
    for &id in &live {
        store.delete(id)?;
    }
    let end = store.stats();
    assert_eq!((end.used, end.spill_files, end.disk_bytes), (0, 0, 0));
    Ok(())
}
