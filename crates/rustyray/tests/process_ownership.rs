//! Objects a worker process makes are that process's own (Ray's ownership
//! model): they stay there, the driver and other workers borrow them, they
//! are freed there when the last borrower lets go, and they are lost with
//! their owner's process (`OwnerDied`).

mod common;
#[path = "common/process.rs"]
mod process;
use common::LONG;
use process::{kill9, process_runtime};
use rustyray::prelude::*;

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

/// Puts objects in its own process and reports on that process's store.
#[rustyray::actor]
struct Keeper;

#[rustyray::actor]
impl Keeper {
    fn new() -> Self {
        Keeper
    }

    /// A small object put here.
    fn put(&self, v: i64) -> rustyray::Result<ObjectRef<i64>> {
        rustyray::current()?.put(v)
    }

    /// A large object put here (its value travels in shared memory).
    fn put_large(&self, len: usize) -> rustyray::Result<ObjectRef<Vec<u8>>> {
        rustyray::current()?.put(vec![3_u8; len])
    }

    /// An object put here that holds references to two more put here.
    fn put_nested(&self, v: i64) -> rustyray::Result<ObjectRef<Vec<ObjectRef<i64>>>> {
        let ray = rustyray::current()?;
        let inner = vec![ray.put(v)?, ray.put(v + 1)?];
        ray.put(inner)
    }

    /// How many objects this process's store holds.
    fn entries(&self) -> rustyray::Result<u64> {
        Ok(rustyray::current()?.store_stats().num_entries)
    }

    /// This process's id.
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

/// Reads objects passed inside a value, in a worker process of its own.
#[rustyray::remote]
fn read_all(refs: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    refs.iter().map(|r| ray.get(r)).sum()
}

#[test]
fn an_object_a_worker_put_is_read_from_it_and_freed_there_when_the_driver_lets_go() -> rustyray::Result<()> {
    let ray = process_runtime();
    let k = Keeper::remote(&ray)?;
    let before = ray.get_timeout(&k.entries()?, LONG)?;
    let r = ray.get_timeout(&k.put(5)?, LONG)?;
    assert_eq!(ray.get_timeout(&r, LONG)?, 5);
    // Still there while the driver holds a reference (its counts go back
    // on the same connection as the next call, ahead of it).
    assert_eq!(ray.get_timeout(&k.entries()?, LONG)?, before + 1);
    drop(r);
    assert_eq!(ray.get_timeout(&k.entries()?, LONG)?, before);
    Ok(())
}

#[test]
fn large_and_nested_objects_of_a_worker_reach_the_driver() -> rustyray::Result<()> {
    let ray = process_runtime();
    let k = Keeper::remote(&ray)?;
    let large = ray.get_timeout(&k.put_large(4 << 20)?, LONG)?;
    let v = ray.get_timeout(&large, LONG)?;
    assert_eq!((v.len(), v[0], v[v.len() - 1]), (4 << 20, 3, 3));
    let outer = ray.get_timeout(&k.put_nested(10)?, LONG)?;
    let inner = ray.get_timeout(&outer, LONG)?;
    assert_eq!(ray.get_many(&inner)?, vec![10, 11]);
    let before = ray.get_timeout(&k.entries()?, LONG)?;
    drop((large, v, outer, inner));
    // The large object, the outer one and the two it holds.
    assert_eq!(ray.get_timeout(&k.entries()?, LONG)?, before - 4);
    Ok(())
}

#[test]
fn a_workers_object_the_driver_passes_on_is_read_by_another_worker() -> rustyray::Result<()> {
    let ray = process_runtime();
    let k = Keeper::remote(&ray)?;
    let refs = vec![
        ray.get_timeout(&k.put(1)?, LONG)?,
        ray.get_timeout(&k.put(2)?, LONG)?,
    ];
    // Not read by the driver first: the task's worker borrows them.
    assert_eq!(ray.get_timeout(&read_all::remote(&ray, refs.clone())?, LONG)?, 3);
    assert_eq!(ray.get_many(&refs)?, vec![1, 2]);
    Ok(())
}

#[test]
fn objects_of_a_worker_that_dies_fail_with_owner_died_naming_it() -> rustyray::Result<()> {
    let ray = process_runtime();
    let k = Keeper::options().max_restarts(1).remote(&ray)?;
    let pid = ray.get_timeout(&k.pid()?, LONG)?;
    let r = ray.get_timeout(&k.put(5)?, LONG)?;
    kill9(pid);
    match ray.get_timeout(&r, LONG) {
        Err(rustyray::Error::OwnerDied { object_id, owner }) => {
            assert_eq!(object_id, r.id());
            assert!(owner.contains(&pid.to_string()), "{owner}");
        }
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    // The actor itself goes on in a new process.
    assert_ne!(ray.get_timeout(&k.pid()?, LONG)?, pid);
    Ok(())
}
