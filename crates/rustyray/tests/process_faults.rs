//! Faults injected at the runtime's seams through failpoints (the `fail`
//! crate): starting a worker process, writing to and reading from a
//! worker's connection, allocating in shared memory. Each fault must give
//! a clear typed error or be recovered from, never a hang or a loss.
//!
//! Built only with the `failpoints` feature:
//! `cargo nextest run -p rustyray --features failpoints --test process_faults`.
//! The failpoints are configured in this process (the driver, which hosts
//! the node daemon); the worker processes, this binary started again, have
//! none configured.
#![cfg(feature = "failpoints")]

mod common;
#[path = "common/process.rs"]
mod process;
use common::LONG;
use process::{process_runtime, whoami};
use rustyray::prelude::*;

/// The entry point of the worker processes the tests start.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

/// Sets failpoint `name` to `actions` for as long as the value lives.
struct Failpoint(String);

impl Failpoint {
    fn set(name: &str, actions: &str) -> Failpoint {
        fail::cfg(name, actions).expect("failpoint");
        Failpoint(name.to_owned())
    }
}

impl Drop for Failpoint {
    fn drop(&mut self) {
        fail::remove(&self.0);
    }
}

#[test]
fn a_worker_that_cannot_start_fails_the_task_with_a_typed_error() -> rustyray::Result<()> {
    let _scenario = fail::FailScenario::setup();
    // Every start fails as if the process were out of descriptors (the
    // prestarted workers too).
    let spawn = Failpoint::set("node::spawn", "return");
    let ray = process_runtime();
    match ray.get_timeout(&whoami::options().max_retries(0).remote(&ray)?, LONG) {
        Err(Error::OutOfDescriptors(what)) => assert!(what.contains("worker process"), "{what}"),
        other => panic!("expected OutOfDescriptors, got {other:?}"),
    }
    // Retried per max_retries, then said as what it is.
    match ray.get_timeout(&whoami::options().max_retries(2).remote(&ray)?, LONG) {
        Err(Error::OutOfDescriptors(_)) => {}
        other => panic!("expected OutOfDescriptors after the retries, got {other:?}"),
    }
    // Once starts work again, so do tasks.
    drop(spawn);
    let pid = ray.get_timeout(&whoami::remote(&ray)?, LONG)?;
    assert_ne!(pid, std::process::id());
    Ok(())
}

/// An actor that only holds its worker process.
#[rustyray::actor]
struct Holder;

#[rustyray::actor]
impl Holder {
    fn new() -> Self {
        Holder
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

#[test]
fn a_start_that_fails_once_is_retried() -> rustyray::Result<()> {
    let _scenario = fail::FailScenario::setup();
    let ray = process_runtime();
    // Actors take a worker process each for good, until every live worker
    // is held: the next task needs a new process.
    common::wait_until("the prestarted workers are up", || ray.worker_pids().len() >= 2);
    let mut holders = Vec::new();
    while holders.len() < ray.worker_pids().len() {
        let h = Holder::remote(&ray)?;
        ray.get_timeout(&h.pid()?, LONG)?;
        holders.push(h);
    }
    // The start fails once: with no retries the task says why ...
    let spawn = Failpoint::set("node::spawn", "1*return");
    match ray.get_timeout(&whoami::options().max_retries(0).remote(&ray)?, LONG) {
        Err(Error::OutOfDescriptors(_)) => {}
        other => panic!("expected OutOfDescriptors, got {other:?}"),
    }
    drop(spawn);
    // ... and with one retry it runs on the next start.
    let _spawn = Failpoint::set("node::spawn", "1*return");
    let pid = ray.get_timeout(&whoami::options().max_retries(1).remote(&ray)?, LONG)?;
    assert!(ray.worker_pids().contains(&pid));
    Ok(())
}

#[test]
fn a_write_that_fails_condemns_the_worker_and_its_task_is_retried() -> rustyray::Result<()> {
    let _scenario = fail::FailScenario::setup();
    let ray = process_runtime();
    ray.get_timeout(&whoami::remote(&ray)?, LONG)?;
    let workers = ray.worker_pids();
    // The next frame the driver writes to a worker (this task's push)
    // fails: that worker's state is unknown, so it is killed, and the task
    // is retried on another (it once waited forever).
    let send = Failpoint::set("node::send", "1*return");
    let pid = ray.get_timeout(&whoami::options().max_retries(3).remote(&ray)?, LONG)?;
    drop(send);
    assert!(!workers.contains(&pid) || ray.worker_pids().contains(&pid));
    common::wait_until("the condemned worker is gone", || {
        workers.iter().any(|w| !ray.worker_pids().contains(w))
    });
    Ok(())
}

#[test]
fn a_read_that_fails_loses_the_worker_and_nothing_else() -> rustyray::Result<()> {
    let _scenario = fail::FailScenario::setup();
    let ray = process_runtime();
    ray.get_timeout(&whoami::remote(&ray)?, LONG)?;
    // The next message a marked worker's reader thread takes up fails: the
    // worker is lost (its tasks failed or retried, its process reaped).
    // Every live worker is marked, so the one that runs the next task
    // fails (a worker that connects later is marked on the next round).
    let mut marked = std::collections::HashSet::new();
    let mut points = Vec::new();
    let lost = |marked: &std::collections::HashSet<u32>| {
        let live = ray.worker_pids();
        marked.iter().any(|p| !live.contains(p))
    };
    for _ in 0..50 {
        for p in ray.worker_pids() {
            if marked.insert(p) {
                points.push(Failpoint::set(&format!("node::recv::{p}"), "return"));
            }
        }
        ray.get_timeout(&whoami::options().max_retries(3).remote(&ray)?, LONG)?;
        if lost(&marked) {
            break;
        }
    }
    common::wait_until("a worker whose read failed is gone", || lost(&marked));
    drop(points);
    // The node still runs tasks.
    let other = ray.get_timeout(&whoami::remote(&ray)?, LONG)?;
    assert!(ray.worker_pids().contains(&other));
    Ok(())
}

#[test]
fn a_shared_memory_allocation_that_fails_fails_the_put_and_loses_nothing() -> rustyray::Result<()> {
    let _scenario = fail::FailScenario::setup();
    let ray = process_runtime();
    // Large values (at least 100 KiB) live in the node's shared memory.
    let kept = ray.put(vec![7_u8; 200_000])?;
    let create = Failpoint::set("shm::create", "return");
    match ray.put(vec![1_u8; 200_000]) {
        Err(Error::OutOfDisk(what)) => assert!(what.contains("shared memory"), "{what}"),
        other => panic!("expected OutOfDisk, got {other:?}"),
    }
    // What was there stays readable; small values do not touch it.
    assert_eq!(ray.get(&kept)?.len(), 200_000);
    assert_eq!(ray.get(&ray.put(5_i64)?)?, 5);
    drop(create);
    let later = ray.put(vec![2_u8; 200_000])?;
    assert_eq!(ray.get(&later)?[0], 2);
    Ok(())
}

/// Returns the references it is given.
#[rustyray::actor]
struct Echoer;

#[rustyray::actor]
impl Echoer {
    fn new() -> Self {
        Echoer
    }

    fn echo(&self, refs: Vec<ObjectRef<i64>>) -> Vec<ObjectRef<i64>> {
        refs
    }
}

/// Passes an object of its own straight to another worker process.
#[rustyray::actor]
struct Passer;

#[rustyray::actor]
impl Passer {
    fn new() -> Self {
        Passer
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// How many objects this process's store holds.
    fn entries(&self) -> rustyray::Result<u64> {
        Ok(rustyray::current()?.store_stats().num_entries)
    }

    /// Puts an object and passes it to `echo` in a call straight to its
    /// process; the answer names the object, so it goes back through the
    /// driver. Returns what came back and how many calls went straight.
    fn pass_on(&self, echo: ActorHandle<Echoer>) -> rustyray::Result<(Vec<ObjectRef<i64>>, u64)> {
        let ray = rustyray::current()?;
        // One message to the driver first: its reader takes up the next
        // one (this call's `Lend`) only after the failpoint's pause.
        let _ = ray.get_actor::<Passer>("nobody");
        let before = rustyray::__private::direct_calls();
        let mine = ray.put(42_i64)?;
        let back = ray.get(&echo.echo(vec![mine])?)?;
        Ok((back, rustyray::__private::direct_calls() - before))
    }
}

#[test]
fn a_workers_object_another_worker_names_before_the_owners_lend_is_read_is_kept() -> rustyray::Result<()> {
    let _scenario = fail::FailScenario::setup();
    let ray = process_runtime();
    let echo = Echoer::remote(&ray)?;
    assert!(ray.get_timeout(&echo.echo(Vec::new())?, LONG)?.is_empty());
    let p = Passer::remote(&ray)?;
    let pid = ray.get_timeout(&p.pid()?, LONG)?;
    let kept_there = ray.get_timeout(&p.entries()?, LONG)?;
    let kept_here = ray.store_stats().num_entries;
    // The driver reads the passing worker's messages late: the echoing
    // worker's answer naming the object reaches it before the `Lend` that
    // counts it (the two come on different connections).
    let late = Failpoint::set(&format!("node::recv::{pid}"), "sleep(300)");
    let (back, direct) = ray.get_timeout(&p.pass_on(echo)?, LONG)?;
    drop(late);
    assert_eq!(direct, 1, "the call should go straight to the echoing process");
    assert_eq!(ray.get_many(&back)?, vec![42]);
    // Every count balanced: once the driver and the workers let go, the
    // object is gone from the driver and from its owner.
    drop(back);
    common::wait_until("the driver lets go of the object", || {
        ray.store_stats().num_entries <= kept_here
    });
    assert_eq!(ray.get_timeout(&p.entries()?, LONG)?, kept_there);
    Ok(())
}
