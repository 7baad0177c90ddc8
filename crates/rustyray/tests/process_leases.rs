//! Tasks submitted by code in a worker process: owned by that process and
//! run on workers it leases from the node, with the driver off their path
//! (Ray's normal task submitter and worker leases): results and references
//! both ways, retries when a leased worker dies, cancel, the death of the
//! owner, and shapes no node can meet.

mod common;
#[path = "common/process.rs"]
mod process;
use common::{wait_until, LONG};
use process::{add, gone, kill9, park_forever, process_runtime, read_pid, scratch, whoami};
use rustyray::prelude::*;
use std::path::Path;

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

/// A byte string of `n` bytes (large ones go through shared memory).
#[rustyray::remote]
fn bytes_of(n: usize) -> Vec<u8> {
    vec![7; n]
}

/// The sum of a value passed by reference and the values inside a list.
#[rustyray::remote]
fn sum_of(a: i64, inside: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    let mut total = a;
    for r in &inside {
        total += ray.get(r)?;
    }
    Ok(total)
}

/// Ends its process on its first attempt (marked by `dir/first`), answers
/// on the next.
#[rustyray::remote]
fn die_once(dir: String) -> u32 {
    let first = Path::new(&dir).join("first");
    if !first.exists() {
        let _ = std::fs::write(&first, b"1");
        std::process::exit(3);
    }
    std::process::id()
}

/// Fails on its first attempt (marked by `dir/first`), answers on the
/// next.
#[rustyray::remote]
fn fail_once(dir: String) -> rustyray::Result<u8> {
    let first = Path::new(&dir).join("first");
    if !first.exists() {
        let _ = std::fs::write(&first, b"1");
        return Err(rustyray::Error::InvalidArgument("the first attempt fails".into()));
    }
    Ok(1)
}

/// Holds no CPU, so every task it submits runs on a leased worker.
#[rustyray::actor]
struct Owner {
    parked: Vec<ObjectRef<u32>>,
}

#[rustyray::actor(num_cpus = 0)]
impl Owner {
    fn new() -> Self {
        Owner { parked: Vec::new() }
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// Submits `n` tasks, gets them; returns their process ids and how
    /// many tasks this process pushed to leased workers meanwhile.
    fn fan_out(&self, n: usize) -> rustyray::Result<(Vec<u32>, u64)> {
        let ray = rustyray::current()?;
        let before = rustyray::__private::leased_tasks();
        let refs = (0..n)
            .map(|_| whoami::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        let pids = ray.get_many(&refs)?;
        Ok((pids, rustyray::__private::leased_tasks() - before))
    }

    /// A reference to a large result of a task it submitted, handed on.
    fn large(&self, n: usize) -> rustyray::Result<ObjectRef<Vec<u8>>> {
        let ray = rustyray::current()?;
        bytes_of::remote(&ray, n)
    }

    /// Reads a large result here.
    fn large_len(&self, n: usize) -> rustyray::Result<usize> {
        let ray = rustyray::current()?;
        Ok(ray.get(&bytes_of::remote(&ray, n)?)?.len())
    }

    /// Passes objects put here, by reference and inside a value, to a
    /// task, and a result of its own on to another.
    fn pass_refs(&self) -> rustyray::Result<i64> {
        let ray = rustyray::current()?;
        let a = ray.put(1_i64)?;
        let inside = vec![ray.put(10_i64)?, add::remote(&ray, 50, 50)?];
        let first = sum_of::remote(&ray, &a, inside)?;
        // A pending result of this process's own, passed on.
        let second = add::remote(&ray, &first, 1000)?;
        ray.get(&second)
    }

    fn die_once(&self, dir: String, retries: i32) -> rustyray::Result<u32> {
        let ray = rustyray::current()?;
        ray.get(&die_once::options().max_retries(retries).remote(&ray, dir)?)
    }

    fn fail_once(&self, dir: String, retry: bool) -> rustyray::Result<u8> {
        let ray = rustyray::current()?;
        ray.get(&fail_once::options().retry_exceptions(retry).remote(&ray, dir)?)
    }

    /// Starts a task that parks until cancelled; the reference goes back.
    fn park(&mut self, dir: String) -> rustyray::Result<()> {
        let ray = rustyray::current()?;
        let r = park_forever::remote(&ray, dir)?;
        self.parked.push(r);
        Ok(())
    }

    /// Cancels the parked task, and says how it ended.
    fn cancel_parked(&mut self, force: bool) -> rustyray::Result<String> {
        let ray = rustyray::current()?;
        let Some(r) = self.parked.pop() else {
            return Ok("nothing parked".into());
        };
        ray.cancel_with(
            &r,
            rustyray::CancelOptions {
                force,
                recursive: false,
            },
        )?;
        Ok(match ray.get_timeout(&r, std::time::Duration::from_secs(60)) {
            Err(rustyray::Error::TaskCancelled(_)) => "cancelled".into(),
            other => format!("{other:?}"),
        })
    }

    /// Submits a task asking for more CPUs than the node has.
    fn too_big(&self) -> rustyray::Result<String> {
        let ray = rustyray::current()?;
        Ok(match ray.get(&whoami::options().num_cpus(64.0).remote(&ray)?) {
            Err(rustyray::Error::Unschedulable { what, .. }) => what,
            other => format!("{other:?}"),
        })
    }
}

#[test]
fn tasks_a_worker_submits_run_on_workers_it_leases_off_the_driver() -> rustyray::Result<()> {
    let ray = process_runtime();
    let owner = Owner::remote(&ray)?;
    let me = ray.get_timeout(&owner.pid()?, LONG)?;
    let (pids, leased) = ray.get_timeout(&owner.fan_out(200)?, LONG)?;
    assert_eq!(pids.len(), 200);
    assert_eq!(leased, 200, "every task went straight to a leased worker");
    assert!(pids.iter().all(|&p| p != me), "they ran in other processes");
    Ok(())
}

#[test]
fn results_of_a_workers_tasks_are_its_own_and_may_leave_it() -> rustyray::Result<()> {
    let ray = process_runtime();
    let owner = Owner::remote(&ray)?;
    // Large: it comes back through shared memory, read there.
    assert_eq!(ray.get_timeout(&owner.large_len(300_000)?, LONG)?, 300_000);
    // A reference to it leaves the process that owns it.
    let inner = ray.get_timeout(&owner.large(300_000)?, LONG)?;
    let v = ray.get_timeout(&inner, LONG)?;
    assert_eq!(v.len(), 300_000);
    assert!(v.iter().all(|&b| b == 7));
    // Objects put there, by reference and inside a value, and a pending
    // result of its own, passed to its tasks.
    assert_eq!(ray.get_timeout(&owner.pass_refs()?, LONG)?, 1111);
    Ok(())
}

#[test]
fn a_leased_worker_that_dies_has_its_task_retried_or_failed() -> rustyray::Result<()> {
    let ray = process_runtime();
    let owner = Owner::remote(&ray)?;
    let dir = scratch("lease-die-retry");
    let pid = ray.get_timeout(&owner.die_once(dir.display().to_string(), 1)?, LONG)?;
    assert!(pid > 0);
    let dir = scratch("lease-die-fail");
    match ray.get_timeout(&owner.die_once(dir.display().to_string(), 0)?, LONG) {
        Err(Error::Task { message, .. }) => {
            assert!(message.contains("died"), "{message}");
        }
        other => panic!("expected the worker's crash, got {other:?}"),
    }
    // Exceptions are retried only when the task allows it.
    let dir = scratch("lease-fail-retry");
    assert_eq!(
        ray.get_timeout(&owner.fail_once(dir.display().to_string(), true)?, LONG)?,
        1
    );
    let dir = scratch("lease-fail-no-retry");
    assert!(ray
        .get_timeout(&owner.fail_once(dir.display().to_string(), false)?, LONG)
        .is_err());
    Ok(())
}

#[test]
fn cancel_reaches_a_task_on_a_leased_worker() -> rustyray::Result<()> {
    let ray = process_runtime();
    let owner = Owner::remote(&ray)?;
    let dir = scratch("lease-cancel");
    ray.get_timeout(&owner.park(dir.display().to_string())?, LONG)?;
    read_pid(&dir);
    assert_eq!(ray.get_timeout(&owner.cancel_parked(false)?, LONG)?, "cancelled");
    // A forced cancel ends the leased worker's process.
    let dir = scratch("lease-cancel-force");
    ray.get_timeout(&owner.park(dir.display().to_string())?, LONG)?;
    let pid = read_pid(&dir);
    assert_eq!(ray.get_timeout(&owner.cancel_parked(true)?, LONG)?, "cancelled");
    wait_until("the leased worker is gone", || gone(pid));
    // Its resources came back: tasks still run.
    assert_eq!(ray.get_timeout(&add::remote(&ray, 1, 2)?, LONG)?, 3);
    Ok(())
}

#[test]
fn the_leases_of_an_owner_that_dies_end_with_it() -> rustyray::Result<()> {
    // One CPU: a task of the driver runs only once the lease is over.
    let ray = process::TestRay(rustyray::init_with(process::process_config().num_cpus(1.0))?);
    let owner = Owner::remote(&ray)?;
    let owner_pid = ray.get_timeout(&owner.pid()?, LONG)?;
    let dir = scratch("lease-owner-dies");
    ray.get_timeout(&owner.park(dir.display().to_string())?, LONG)?;
    let leased = read_pid(&dir);
    kill9(owner_pid);
    // The task of the dead owner goes with it, as in Ray.
    wait_until("the dead owner's leased worker is gone", || gone(leased));
    assert_eq!(ray.get_timeout(&add::remote(&ray, 2, 3)?, LONG)?, 5);
    Ok(())
}

#[test]
fn a_shape_no_node_can_meet_fails_in_the_worker_that_asked() -> rustyray::Result<()> {
    let ray = process_runtime();
    let owner = Owner::remote(&ray)?;
    let what = ray.get_timeout(&owner.too_big()?, LONG)?;
    assert!(what.contains("whoami"), "{what}");
    Ok(())
}

// ----- on one CPU: what holds the CPU must lend it, nothing waits on a lease

/// A task the driver pushed (holding the only CPU) that waits for its own
/// child with a deadline (no help then): its CPU must be lent meanwhile.
#[rustyray::remote]
fn parent_waits_with_deadline() -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    let c = whoami::remote(&ray)?;
    let (ready, _) = ray.wait(
        std::slice::from_ref(&c),
        1,
        Some(std::time::Duration::from_secs(60)),
    )?;
    if ready.is_empty() {
        return Ok(0);
    }
    ray.get(&c)
}

/// `a + b` after a nap.
#[rustyray::remote]
fn slow_add(a: i64, b: i64) -> i64 {
    std::thread::sleep(std::time::Duration::from_millis(50));
    a + b
}

/// Returns a reference to a child it submitted, unread.
#[rustyray::remote]
fn returns_child_ref() -> rustyray::Result<ObjectRef<u32>> {
    let ray = rustyray::current()?;
    whoami::remote(&ray)
}

/// Holds no CPU; its tasks name each other's results.
#[rustyray::actor]
struct Chain;

#[rustyray::actor(num_cpus = 0)]
impl Chain {
    fn new() -> Self {
        Chain
    }

    /// `x` names `y` inside a value while `y` still waits for `a`.
    fn nested_while_resolving(&self) -> rustyray::Result<i64> {
        let ray = rustyray::current()?;
        let a = slow_add::remote(&ray, 1, 2)?;
        let y = slow_add::remote(&ray, &a, 3)?;
        let x = sum_of::remote(&ray, 0, vec![y])?;
        ray.get(&x)
    }

    /// Returns a reference to a task of its own still running (parked
    /// until cancelled), and its pid.
    fn hand_over_pending(&self, dir: String) -> rustyray::Result<(ObjectRef<u32>, u32)> {
        let ray = rustyray::current()?;
        Ok((park_forever::remote(&ray, dir)?, std::process::id()))
    }
}

fn one_cpu() -> process::TestRay {
    process::TestRay(rustyray::init_with(process::process_config().num_cpus(1.0)).expect("runtime"))
}

#[test]
fn a_task_that_waits_for_its_child_lends_its_cpu_to_the_childs_lease() -> rustyray::Result<()> {
    let ray = one_cpu();
    let pid = ray.get_timeout(&parent_waits_with_deadline::remote(&ray)?, LONG)?;
    assert_ne!(pid, 0, "the child never ran");
    Ok(())
}

#[test]
fn a_task_may_return_a_reference_to_its_running_child() -> rustyray::Result<()> {
    let ray = one_cpu();
    // The parent answers at once, handing its child's result over pending;
    // the child then runs on the CPU the parent gave back.
    let inner = ray.get_timeout(&returns_child_ref::remote(&ray)?, LONG)?;
    assert!(ray.get_timeout(&inner, LONG)? > 0);
    Ok(())
}

#[test]
fn a_task_naming_a_result_still_waiting_holds_no_lease_meanwhile() -> rustyray::Result<()> {
    let ray = one_cpu();
    let chain = Chain::remote(&ray)?;
    assert_eq!(ray.get_timeout(&chain.nested_while_resolving()?, LONG)?, 6);
    Ok(())
}

#[test]
fn an_object_whose_owner_dies_before_making_it_fails_with_owner_died() -> rustyray::Result<()> {
    let ray = process_runtime();
    let chain = Chain::remote(&ray)?;
    let dir = scratch("owner-died");
    let (pending, owner) = ray.get_timeout(&chain.hand_over_pending(dir.display().to_string())?, LONG)?;
    read_pid(&dir);
    kill9(owner);
    match ray.get_timeout(&pending, LONG) {
        Err(Error::OwnerDied { owner: who, .. }) => {
            assert!(who.contains(&owner.to_string()), "{who}");
        }
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    Ok(())
}
