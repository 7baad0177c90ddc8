//! Objects: put/get, timeouts, wait semantics, ownership and freeing,
//! the store's memory limit.

mod common;
use common::{both_modes, LONG};
use rustyray::prelude::*;
use rustyray::Config;
use std::time::Duration;

#[rustyray::remote]
fn slow_echo(x: i64, gate: ObjectRef<()>) -> i64 {
    let ray = rustyray::current().expect("inside a task");
    ray.get(&gate).expect("gate");
    x
}

#[rustyray::remote]
fn blob(n: usize) -> Vec<u64> {
    (0..n as u64).collect()
}

#[rustyray::remote]
fn total(v: Vec<u64>) -> u64 {
    v.iter().sum()
}

#[rustyray::remote]
fn wrap(inner: Vec<ObjectRef<Vec<u64>>>) -> Vec<ObjectRef<Vec<u64>>> {
    inner
}

#[rustyray::remote]
fn fail() -> Result<i64, String> {
    Err("nope".into())
}

both_modes! {
    fn put_get_and_many(ray) {
        let a = ray.put(String::from("hello"))?;
        let b = ray.put(vec![1_u8, 2, 3])?;
        assert_eq!(ray.get(&a)?, "hello");
        assert_eq!(ray.get(&b)?, vec![1, 2, 3]);
        let many: Vec<ObjectRef<i64>> = (0..10).map(|i| ray.put(i)).collect::<Result<_, _>>()?;
        assert_eq!(ray.get_many(&many)?, (0..10).collect::<Vec<_>>());
        let stats = ray.store_stats();
        assert_eq!(stats.num_objects, 12);
        assert!(stats.bytes_used > 0);
        Ok(())
    }
}

#[test]
fn get_timeout_is_an_error() -> rustyray::Result<()> {
    for bytes in [false, true] {
        let ray = common::runtime(2.0, bytes);
        let (latch, pending) = common::latch(&ray);
        match ray.get_timeout(&pending, Duration::from_millis(50)) {
            Err(Error::GetTimeout { object_id, .. }) => assert_eq!(object_id, pending.id()),
            other => panic!("expected a timeout, got {other:?}"),
        }
        latch.open()?;
        ray.get_timeout(&pending, LONG)?;
    }
    Ok(())
}

#[test]
fn wait_has_rays_semantics() -> rustyray::Result<()> {
    for bytes in [false, true] {
        let ray = common::runtime(2.0, bytes);
        let (latch, gate) = common::latch(&ray);
        let a = ray.put(1_i64)?;
        let pend1 = slow_echo::remote(&ray, 2, gate.clone())?;
        let b = ray.put(3_i64)?;
        let refs = vec![pend1.clone(), a.clone(), b.clone()];

        // Enough ready: returns at once, ready in input order, capped.
        let (ready, rest) = ray.wait(&refs, 1, None)?;
        assert_eq!(ready, vec![a.clone()]);
        assert_eq!(rest, vec![pend1.clone(), b.clone()]);
        let (ready, rest) = ray.wait(&refs, 2, Some(LONG))?;
        assert_eq!(ready, vec![a.clone(), b.clone()]);
        assert_eq!(rest, vec![pend1.clone()]);

        // Not enough: the timeout returns what is ready.
        let (ready, rest) = ray.wait(&refs, 3, Some(Duration::from_millis(30)))?;
        assert_eq!(ready, vec![a.clone(), b.clone()]);
        assert_eq!(rest, vec![pend1.clone()]);
        let (ready, _) = ray.wait(&refs, 3, Some(Duration::ZERO))?;
        assert_eq!(ready.len(), 2);

        // Completion wakes a waiting `wait`.
        latch.open()?;
        let (ready, rest) = ray.wait(&refs, 3, None)?;
        assert_eq!(ready, refs);
        assert!(rest.is_empty());

        // Errors count as ready.
        let f = fail::remote(&ray)?;
        let (ready, _) = ray.wait(std::slice::from_ref(&f), 1, Some(LONG))?;
        assert_eq!(ready, vec![f]);

        // Nothing to wait for: nothing ready, nothing left, as in Ray.
        let (ready, rest) = ray.wait::<i64>(&[], 1, None)?;
        assert!(ready.is_empty() && rest.is_empty());

        // Bad arguments.
        assert!(matches!(ray.wait(&refs, 0, None), Err(Error::InvalidArgument(_))));
        assert!(matches!(ray.wait(&refs, 4, None), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            ray.wait(&[a.clone(), a.clone()], 1, None),
            Err(Error::InvalidArgument(_))
        ));
    }
    Ok(())
}

both_modes! {
    fn store_returns_to_empty_after_a_large_workload(ray) {
        {
            let mut outs = Vec::new();
            for i in 0..200 {
                let b = blob::remote(ray, 100 + i)?;
                let t = total::remote(ray, &b)?;
                let p = ray.put(vec![i as u64; 50])?;
                outs.push((b, t, p));
            }
            let nested = wrap::remote(ray, outs.iter().map(|(b, _, _)| b.clone()).collect::<Vec<_>>())?;
            for (i, (_, t, p)) in outs.iter().enumerate() {
                let n = 100 + i as u64;
                assert_eq!(ray.get(t)?, n * (n - 1) / 2);
                assert_eq!(ray.get(p)?.len(), 50);
            }
            let inner = ray.get(&nested)?;
            assert_eq!(ray.get(&inner[3])?.len(), 103);
            assert!(ray.store_stats().num_objects > 0);
        }
        // Every ref is gone: the store is empty.
        let s = ray.store_stats();
        assert_eq!((s.num_objects, s.bytes_used, s.num_entries), (0, 0, 0), "{s:?}");
        Ok(())
    }
}

both_modes! {
    fn nested_ref_keeps_its_object_alive(ray) {
        let inner = ray.put(vec![7_u64; 10])?;
        let outer = ray.put(vec![inner.clone()])?;
        let id = inner.id();
        drop(inner);
        // Still reachable through `outer`.
        assert_eq!(ray.store_stats().num_objects, 2);
        let got = ray.get(&outer)?;
        assert_eq!(got[0].id(), id);
        assert_eq!(ray.get(&got[0])?, vec![7; 10]);
        drop(got);
        drop(outer);
        assert_eq!(ray.store_stats().num_objects, 0);
        Ok(())
    }
}

both_modes! {
    fn pending_task_args_keep_objects_alive(ray) {
        let (latch, gate) = common::latch(ray);
        let x = ray.put(41_i64)?;
        let r = slow_echo::remote(ray, &x, gate)?;
        drop(x);
        // The pending task holds x.
        assert_eq!(ray.store_stats().num_objects, 1);
        latch.open()?;
        assert_eq!(ray.get(&r)?, 41);
        Ok(())
    }
}

#[test]
fn put_beyond_the_limit_is_object_store_full() -> rustyray::Result<()> {
    let ray = rustyray::init_with(
        Config::new()
            .num_cpus(1.0)
            .object_store_memory(10_000)
            .object_store_full_timeout(Duration::from_millis(20)),
    )?;
    let a = ray.put(vec![1_u8; 6_000])?;
    match ray.put(vec![2_u8; 6_000]) {
        Err(Error::ObjectStoreFull { needed, capacity, .. }) => {
            assert!(needed >= 6_000);
            assert_eq!(capacity, 10_000);
        }
        other => panic!("expected ObjectStoreFull, got {other:?}"),
    }
    // Freeing the first makes room.
    drop(a);
    let b = ray.put(vec![2_u8; 6_000])?;
    assert_eq!(ray.get(&b)?.len(), 6_000);
    // Larger than the whole store: fails at once.
    assert!(matches!(
        ray.put(vec![0_u8; 20_000]),
        Err(Error::ObjectStoreFull { .. })
    ));
    Ok(())
}

both_modes! {
    fn put_copy_keeps_the_original_and_reuses_freed_buffers(ray) {
        let a: Vec<u64> = (0..300_000).collect();
        let b: Vec<u64> = (0..250_000).rev().collect();
        for _ in 0..3 {
            let ra = ray.put_copy(&a)?;
            assert_eq!(ray.get(&ra)?, a);
            drop(ra);
            // The next copy may land in the buffer `ra` left: only `b`'s
            // contents may show.
            let rb = ray.put_copy(&b)?;
            assert_eq!(ray.get(&rb)?, b);
        }
        assert_eq!(a.len(), 300_000);
        let s = ray.store_stats();
        assert_eq!((s.num_objects, s.bytes_used), (0, 0));
        Ok(())
    }
}

both_modes! {
    fn a_small_copy_never_pins_a_large_recycled_buffer(ray) {
        let big: Vec<u8> = vec![3; 8 << 20];
        drop(ray.put_copy(&big)?);
        let small = vec![1_u8; 2 << 20];
        let r = ray.put_copy(&small)?;
        assert_eq!(ray.get(&r)?, small);
        // Accounted by the memory it holds, which stays near its size.
        let used = ray.store_stats().bytes_used;
        assert!(used < 5 << 20, "a 2 MiB copy holds {used} bytes");
        Ok(())
    }
}

/// Decodes the reference it carries, then panics: a user `Deserialize`
/// failing in the middle of a copy.
#[derive(Debug)]
struct Bomb(ObjectRef<i64>);

impl serde::Serialize for Bomb {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Bomb {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _r = ObjectRef::<i64>::deserialize(d)?;
        panic!("Deserialize exploded")
    }
}

#[test]
fn a_panicking_deserialize_leaves_no_reference_behind() -> rustyray::Result<()> {
    let ray = common::runtime(1.0, false);
    {
        let inner = ray.put(1_i64)?;
        let outer = ray.put(vec![Bomb(inner)])?;
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ray.get(&outer)));
        assert!(got.is_err(), "the user's Deserialize panics");
    }
    let s = ray.store_stats();
    assert_eq!((s.num_objects, s.num_entries), (0, 0), "{s:?}");
    Ok(())
}
