//! Objects with worker processes: the owner's store when full, shared
//! memory, spilling, blobs read in place, references lent to workers
//! and objects put inside workers.

mod common;
#[path = "common/process.rs"]
mod process;
use common::{wait_until, LONG};
use process::{add, park_forever, process_config, read_pid, scratch, shm_runtime, TestRay};
use rustyray::prelude::*;

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

#[rustyray::remote]
fn byte_len(v: Vec<u8>) -> usize {
    v.len()
}

/// Has the owner fetch a second object of this worker's while the owner's
/// store is full of the first: the `Release` that makes room is read
/// behind the value (`Fetched`) that needs it.
#[rustyray::remote]
fn put_while_full() -> rustyray::Result<usize> {
    let ray = rustyray::current()?;
    let first = ray.put(vec![1_u8; 60_000])?;
    let n = ray.get(&byte_len::remote(&ray, first.clone())?)?;
    let second = ray.put(vec![2_u8; 60_000])?;
    let m = byte_len::remote(&ray, second)?;
    drop(first);
    Ok(n + ray.get(&m)?)
}

/// A process runtime whose owner's store holds 100 kB, with a full
/// timeout long enough that a wait for room that is never satisfied
/// fails the test.
fn small_store_runtime() -> rustyray::Result<TestRay> {
    let config = process_config()
        .object_store_memory(100_000)
        .object_store_full_timeout(LONG);
    Ok(TestRay(rustyray::init_with(config)?))
}

#[test]
fn a_put_waiting_for_room_does_not_hold_up_the_release_behind_it() -> rustyray::Result<()> {
    // Room for one of the two objects (both below the shared-memory
    // threshold, so both live in the owner's store). The full timeout is
    // long: a reader that waited for room itself would wait all of it and
    // then fail the second object.
    let ray = small_store_runtime()?;
    assert_eq!(ray.get_timeout(&put_while_full::remote(&ray)?, LONG)?, 120_000);
    Ok(())
}

/// Holds references the driver lent it, and returns results that need
/// the room they take.
#[rustyray::actor]
struct Keeper {
    held: Vec<ObjectRef<Vec<u8>>>,
}

#[rustyray::actor]
impl Keeper {
    fn new() -> Self {
        Keeper { held: Vec::new() }
    }

    fn keep(&mut self, refs: Vec<ObjectRef<Vec<u8>>>) -> usize {
        self.held.extend(refs);
        self.held.len()
    }

    fn bytes(&self, n: usize) -> Vec<u8> {
        vec![3; n]
    }

    fn forget(&mut self) -> usize {
        self.held.clear();
        0
    }
}

#[test]
fn a_result_waiting_for_room_does_not_hold_up_the_release_behind_it() -> rustyray::Result<()> {
    // The owner's store has room for one of the two 60 kB values; the
    // first is kept only for the actor. The actor's result comes in before
    // the `Release` of the first, on the same connection.
    let ray = small_store_runtime()?;
    let keeper = Keeper::remote(&ray)?;
    let first = ray.put(vec![1_u8; 60_000])?;
    assert_eq!(ray.get_timeout(&keeper.keep(vec![first])?, LONG)?, 1);
    let result = keeper.bytes(60_000)?;
    let forgot = keeper.forget()?;
    assert_eq!(ray.get_timeout(&forgot, LONG)?, 0);
    assert_eq!(ray.get_timeout(&result, LONG)?.len(), 60_000);
    Ok(())
}

// ----- shared memory -----------------------------------------------------

/// A deterministic pattern for object `k`.
fn pattern(k: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ k.wrapping_mul(131)) as u8)
        .collect()
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[rustyray::remote]
fn checksum_of(v: Vec<u8>) -> u64 {
    checksum(&v)
}

#[rustyray::remote]
fn sum_ints(v: Vec<i64>) -> i64 {
    v.iter().sum()
}

#[rustyray::remote]
fn blob_in_place(b: rustyray::Blob) -> (bool, u64) {
    (b.is_shared(), checksum(&b))
}

#[rustyray::remote]
fn make_bytes(k: u64, len: u64) -> Vec<u8> {
    pattern(k as usize, len as usize)
}

#[test]
fn large_objects_are_written_once_into_shared_memory() -> rustyray::Result<()> {
    let dir = scratch("shm-large");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let stats = || ray.shared_store_stats().expect("process mode has a shared store");
    let data = pattern(1, 1 << 20);
    let r = ray.put(data.clone())?;
    assert_eq!(stats().objects_in_memory, 1, "{:?}", stats());
    // A worker reads it from shared memory; small objects stay inline.
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, &r)?, LONG)?,
        checksum(&data)
    );
    let small = ray.put(vec![1_u8; 100])?;
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, &small)?, LONG)?,
        checksum(&[1; 100])
    );
    assert_eq!(stats().objects_in_memory, 1);
    // A large result is written by the worker into shared memory.
    let made = make_bytes::remote(&ray, 7, 3 << 20)?;
    assert_eq!(ray.get_timeout(&made, LONG)?, pattern(7, 3 << 20));
    assert_eq!(stats().objects_in_memory, 2);
    // A large inline argument goes through shared memory too, then is freed.
    let inline = pattern(9, 200_000);
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, inline.clone())?, LONG)?,
        checksum(&inline)
    );
    // A copying put of a large flat vector writes it straight into
    // shared memory; a worker reads it back.
    let ints: Vec<i64> = (0..100_000).map(|i| i * 3 - 7).collect();
    let copied = ray.put_copy(&ints)?;
    assert_eq!(stats().objects_in_memory, 3);
    assert_eq!(ray.get_timeout(&copied, LONG)?, ints);
    assert_eq!(
        ray.get_timeout(&sum_ints::remote(&ray, &copied)?, LONG)?,
        ints.iter().sum::<i64>()
    );
    drop(copied);
    // Unreferenced objects are freed at once.
    drop((r, made));
    wait_until("the store is empty", || {
        stats().objects_in_memory == 0 && stats().used == 0
    });
    Ok(())
}

#[test]
fn blobs_are_read_in_place_from_shared_memory() -> rustyray::Result<()> {
    let dir = scratch("shm-blob");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let data = pattern(3, 2 << 20);
    let r = ray.put(rustyray::Blob::from(data.clone()))?;
    // In the worker: a view of the arena, no copy.
    let (shared, sum) = ray.get_timeout(&blob_in_place::remote(&ray, &r)?, LONG)?;
    assert!(shared, "the worker's blob was copied");
    assert_eq!(sum, checksum(&data));
    // In the driver: a view too, pinned while held.
    let view = ray.get_timeout(&r, LONG)?;
    assert!(view.is_shared());
    assert_eq!(&view[..], &data[..]);
    drop(r);
    let stats = ray.shared_store_stats().expect("stats");
    assert!(
        stats.used >= 2 << 20,
        "the view keeps the object's memory: {stats:?}"
    );
    assert_eq!(&view[..], &data[..]);
    drop(view);
    wait_until("the object is freed with its last view", || {
        ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    // Threads mode: the same type, shared by reference count.
    let threads = rustyray::init_with(Config::new().num_cpus(1.0))?;
    let b = threads.put(rustyray::Blob::from(vec![5_u8; 10]))?;
    assert_eq!(&threads.get(&b)?[..], &[5; 10]);
    Ok(())
}

#[test]
fn referenced_objects_spill_to_disk_and_come_back() -> rustyray::Result<()> {
    let dir = scratch("shm-spill");
    let spill = dir.join("spill");
    // 8 MiB of shared memory, 24 MiB of live objects.
    let ray = shm_runtime(8 << 20, &spill);
    let n = 24;
    let refs = (0..n)
        .map(|k| ray.put(pattern(k, 1 << 20)))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let stats = ray.shared_store_stats().expect("stats");
    assert!(stats.objects_spilled > 0, "{stats:?}");
    assert!(stats.used <= stats.capacity);
    // Every byte comes back, in the driver and in workers.
    for (k, r) in refs.iter().enumerate() {
        assert_eq!(ray.get_timeout(r, LONG)?, pattern(k, 1 << 20), "object {k}");
    }
    let sums = refs
        .iter()
        .map(|r| checksum_of::remote(&ray, r))
        .collect::<rustyray::Result<Vec<_>>>()?;
    for (k, s) in sums.iter().enumerate() {
        assert_eq!(
            ray.get_timeout(s, LONG)?,
            checksum(&pattern(k, 1 << 20)),
            "object {k} in a worker"
        );
    }
    let stats = ray.shared_store_stats().expect("stats");
    assert!(stats.restores > 0, "{stats:?}");
    // Dropping the references frees memory and spill files at once.
    drop(refs);
    wait_until("memory and disk are free", || {
        ray.shared_store_stats()
            .is_some_and(|s| s.objects_in_memory == 0 && s.objects_spilled == 0 && s.spill_files == 0)
    });
    ray.shutdown()?;
    assert!(!spill.exists(), "the spill directory outlived shutdown");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[rustyray::remote]
fn abort_holding(v: rustyray::Blob) -> u64 {
    if !v.is_empty() {
        std::process::abort();
    }
    0
}

#[test]
fn a_dead_worker_releases_its_pins() -> rustyray::Result<()> {
    let dir = scratch("shm-pins");
    let ray = shm_runtime(16 << 20, &dir.join("spill"));
    let r = ray.put(rustyray::Blob::from(pattern(4, 1 << 20)))?;
    match ray.get_timeout(&abort_holding::options().max_retries(0).remote(&ray, &r)?, LONG) {
        Err(Error::WorkerCrashed { .. }) => {}
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    drop(r);
    wait_until("the object is freed although its reader died", || {
        ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    Ok(())
}

// ----- edge cases found in review ------------------------------------------

/// A large value that holds a reference made inside the worker (whose
/// allocation in shared memory is given up: it goes inline).
#[rustyray::remote]
fn large_with_ref() -> (Vec<u8>, ObjectRef<u8>) {
    let ray = rustyray::current().expect("inside a task");
    (vec![7; 300_000], ray.put(1_u8).expect("put"))
}

/// A value whose `Serialize` panics.
#[derive(Debug, serde::Deserialize)]
struct Bomb;

impl serde::Serialize for Bomb {
    fn serialize<S: serde::Serializer>(&self, _s: S) -> Result<S::Ok, S::Error> {
        panic!("Bomb cannot be serialized")
    }
}

#[rustyray::remote]
fn take_bomb(_b: Bomb) -> u8 {
    0
}

#[test]
fn unsendable_values_are_errors_that_leak_nothing() -> rustyray::Result<()> {
    let dir = scratch("unsendable");
    let ray = shm_runtime(16 << 20, &dir.join("spill"));
    // A large value holding a reference made in the worker travels inline
    // with it (not through shared memory); nothing is left allocated.
    for _ in 0..3 {
        let (big, inner) = ray.get_timeout(&large_with_ref::options().max_retries(0).remote(&ray)?, LONG)?;
        assert_eq!(big.len(), 300_000);
        assert_eq!(ray.get_timeout(&inner, LONG)?, 1);
    }
    wait_until("abandoned result allocations are freed", || {
        ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    match ray.get_timeout(&take_bomb::remote(&ray, Bomb)?, LONG) {
        Err(Error::Serialization(m)) => assert!(m.contains("Bomb cannot be serialized"), "{m}"),
        other => panic!("expected a serialization error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

// ----- references across processes -----------------------------------------

/// Puts objects inside a worker and returns references to them.
#[rustyray::remote]
fn put_many(n: u32) -> Vec<ObjectRef<u32>> {
    let ray = rustyray::current().expect("inside a task");
    (0..n).map(|i| ray.put(i).expect("put")).collect()
}

#[rustyray::remote]
fn put_large() -> ObjectRef<Vec<u8>> {
    let ray = rustyray::current().expect("inside a task");
    ray.put(pattern(11, 500_000)).expect("put")
}

#[test]
fn objects_put_in_a_worker_outlive_it_in_the_owner() -> rustyray::Result<()> {
    let dir = scratch("worker-puts");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let refs = ray.get_timeout(&put_many::remote(&ray, 2_000)?, LONG)?;
    assert_eq!(refs.len(), 2_000);
    let values = ray.get_many_timeout(&refs, LONG)?;
    assert_eq!(values, (0..2_000).collect::<Vec<_>>());
    let large = ray.get_timeout(&put_large::remote(&ray)?, LONG)?;
    assert_eq!(ray.get_timeout(&large, LONG)?, pattern(11, 500_000));
    // A worker reads it too.
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, &large)?, LONG)?,
        checksum(&pattern(11, 500_000))
    );
    let before = ray.store_stats();
    drop((refs, large));
    wait_until("the worker's objects are freed once nobody holds them", || {
        ray.store_stats().num_objects < before.num_objects.saturating_sub(1_999)
            && ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Reads every object of a list it was handed (inside a worker, where the
/// objects are the owner's).
#[rustyray::remote]
fn sum_lent(refs: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    Ok(ray.get_many(&refs)?.iter().sum())
}

/// Checksums lent large objects, read in place from shared memory.
#[rustyray::remote]
fn checksums_lent(refs: Vec<ObjectRef<rustyray::Blob>>) -> rustyray::Result<Vec<(bool, u64)>> {
    let ray = rustyray::current()?;
    refs.iter()
        .map(|r| ray.get(r).map(|b| (b.is_shared(), checksum(&b))))
        .collect()
}

/// Hands lent references back, unread.
#[rustyray::remote]
fn pass_back(refs: Vec<ObjectRef<i64>>) -> Vec<ObjectRef<i64>> {
    refs
}

/// Reads a list of references that a nested task returned to this worker.
#[rustyray::remote]
fn sum_nested(n: u32) -> rustyray::Result<u64> {
    let ray = rustyray::current()?;
    let refs = ray.get(&put_many::remote(&ray, n)?)?;
    Ok(ray.get_many(&refs)?.into_iter().map(u64::from).sum())
}

/// Waits for the object of a lent reference whose task is still running.
#[rustyray::remote]
fn await_lent(refs: Vec<ObjectRef<u32>>) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    Ok(ray.get_many(&refs)?.into_iter().sum())
}

/// Waits for lent references with `wait`, then awaits them.
#[rustyray::remote]
async fn wait_then_await(refs: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    let (ready, rest) = ray.wait(&refs, refs.len(), Some(LONG))?;
    if !rest.is_empty() {
        return Err(rustyray::Error::InvalidArgument("wait returned early".into()));
    }
    let mut sum = 0;
    for r in ready {
        sum += r.await?;
    }
    Ok(sum)
}

#[test]
fn references_inside_values_are_lent_to_workers() -> rustyray::Result<()> {
    let dir = scratch("lent-refs");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let baseline = ray.store_stats().num_entries;
    let small = (1..=100_i64)
        .map(|i| ray.put(i))
        .collect::<rustyray::Result<Vec<_>>>()?;
    assert_eq!(
        ray.get_timeout(&sum_lent::remote(&ray, small.clone())?, LONG)?,
        5050
    );
    assert_eq!(
        ray.get_timeout(&wait_then_await::remote(&ray, small[..10].to_vec())?, LONG)?,
        55
    );
    // Large objects are read in place, whether put in the driver or made
    // by a task in a worker.
    let blobs = [
        ray.put(rustyray::Blob::from(pattern(1, 300_000)))?,
        ray.put(rustyray::Blob::from(pattern(2, 200_000)))?,
    ];
    let got = ray.get_timeout(&checksums_lent::remote(&ray, blobs.to_vec())?, LONG)?;
    assert_eq!(
        got,
        vec![
            (true, checksum(&pattern(1, 300_000))),
            (true, checksum(&pattern(2, 200_000)))
        ]
    );
    // References a worker hands back unread are still good.
    let back = ray.get_timeout(&pass_back::remote(&ray, small[..3].to_vec())?, LONG)?;
    assert_eq!(ray.get_many_timeout(&back, LONG)?, vec![1, 2, 3]);
    // A nested task's list of references reaches the worker that made it.
    assert_eq!(ray.get_timeout(&sum_nested::remote(&ray, 300)?, LONG)?, 44_850);
    // A reference to an object not made yet: the worker waits for it.
    let gate = scratch("lent-refs-gate");
    let slow = park_forever::remote(&ray, gate.to_string_lossy().into_owned())?;
    let waiting = await_lent::remote(&ray, vec![slow.clone()])?;
    read_pid(&gate);
    ray.cancel(&slow)?;
    match ray.get_timeout(&waiting, LONG) {
        Err(Error::Task { message, .. }) => assert!(message.contains("cancel"), "{message}"),
        other => panic!("expected the cancelled task's error, got {other:?}"),
    }
    // Every count lent to the workers comes back: with the driver's
    // references gone, so are the objects.
    drop((small, blobs, back, slow, waiting));
    wait_until("lent objects are freed once nobody holds them", || {
        ray.store_stats().num_entries <= baseline && ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(gate);
    Ok(())
}

/// Puts objects and drops them, keeping nothing.
#[rustyray::remote]
fn put_and_drop(n: u32) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    for i in 0..n {
        ray.put(vec![i; 1_000])?;
    }
    let kept = ray.put(7_u32)?;
    ray.get(&kept)
}

/// Returns a put object that refers to two other put objects.
#[rustyray::remote]
fn put_nested() -> rustyray::Result<ObjectRef<Vec<ObjectRef<Vec<u8>>>>> {
    let ray = rustyray::current()?;
    let large = ray.put(pattern(3, 200_000))?;
    let small = ray.put(pattern(4, 10))?;
    ray.put(vec![large, small])
}

/// Passes an object put here to a task it submits.
#[rustyray::remote]
fn put_then_submit() -> rustyray::Result<u64> {
    let ray = rustyray::current()?;
    let x = ray.put(pattern(5, 1_000))?;
    let nested = ray.put(vec![x.clone()])?;
    let direct = ray.get(&checksum_of::remote(&ray, &x)?)?;
    let inside = ray.get(&checksums_nested::remote(&ray, nested)?)?;
    Ok(direct ^ inside)
}

#[rustyray::remote]
fn checksums_nested(refs: Vec<ObjectRef<Vec<u8>>>) -> rustyray::Result<u64> {
    let ray = rustyray::current()?;
    Ok(ray
        .get_many(&refs)?
        .iter()
        .map(|v| checksum(v))
        .fold(0, |a, b| a ^ b.rotate_left(1)))
}

#[test]
fn objects_put_in_a_worker_stay_there_until_a_reference_leaves() -> rustyray::Result<()> {
    let dir = scratch("local-puts");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let baseline = ray.store_stats().num_entries;
    // Nothing left the worker: the owner borrowed none of its puts (a
    // borrowed one would have an entry there).
    assert_eq!(ray.get_timeout(&put_and_drop::remote(&ray, 100)?, LONG)?, 7);
    assert_eq!(ray.store_stats().num_entries, baseline);
    assert!(ray.shared_store_stats().is_some_and(|s| s.used == 0));
    // A returned reference takes its object along, and the objects that
    // object names.
    let outer = ray.get_timeout(&put_nested::remote(&ray)?, LONG)?;
    let inner = ray.get_timeout(&outer, LONG)?;
    assert_eq!(
        ray.get_many_timeout(&inner, LONG)?,
        vec![pattern(3, 200_000), pattern(4, 10)]
    );
    // So does a reference passed to a task, directly or inside a value.
    let expected = checksum(&pattern(5, 1_000)) ^ checksum(&pattern(5, 1_000)).rotate_left(1);
    assert_eq!(ray.get_timeout(&put_then_submit::remote(&ray)?, LONG)?, expected);
    drop((outer, inner));
    wait_until("shared objects are freed once nobody holds them", || {
        ray.store_stats().num_entries <= baseline && ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

// ----- regressions found in review -------------------------------------

#[rustyray::remote]
fn first_len(v: (Vec<u8>, ObjectRef<i64>)) -> u64 {
    v.0.len() as u64
}

#[test]
fn a_task_too_large_to_send_lends_nothing() -> rustyray::Result<()> {
    let dir = scratch("too-large");
    let ray = shm_runtime(256 << 20, &dir.join("spill"));
    assert_eq!(ray.get_timeout(&add::remote(&ray, 1, 1)?, LONG)?, 2);
    let baseline = ray.store_stats().num_entries;
    let r = ray.put(5_i64)?;
    // A value holding a reference travels inline, and this one is over
    // the frame limit.
    let res = first_len::options()
        .max_retries(0)
        .remote(&ray, (vec![1_u8; 65 << 20], r.clone()))?;
    assert!(ray.get_timeout(&res, LONG).is_err());
    drop((r, res));
    wait_until("the referenced object is freed", || {
        ray.store_stats().num_entries <= baseline
    });
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
