//! Actors in worker processes: call order, restarts and retries, kill,
//! forced cancels, handles passed across processes and actors created
//! in workers.

mod common;
#[path = "common/process.rs"]
mod process;
use common::{wait_until, LONG};
use process::{add, gone, kill9, process_runtime, scratch, shm_runtime};
use rustyray::prelude::*;
use std::path::Path;

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

// ----- actors ------------------------------------------------------------

#[rustyray::actor]
struct Tally {
    n: i64,
    pid: u32,
    barrier: std::sync::Barrier,
}

#[rustyray::actor(max_concurrency = 4)]
impl Tally {
    fn new(start: i64) -> Result<Self, String> {
        if start < 0 {
            return Err(format!("negative start {start}"));
        }
        Ok(Tally {
            n: start,
            pid: std::process::id(),
            barrier: std::sync::Barrier::new(4),
        })
    }

    fn add(&mut self, by: i64) -> i64 {
        self.n += by;
        self.n
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn explode(&self) -> i64 {
        panic!("tally exploded")
    }

    /// Passes only when four calls run at once.
    fn meet(&self) -> bool {
        self.barrier.wait();
        true
    }

    /// Aborts the process the first time (leaving its pid in `dir`).
    fn abort_once(&self, dir: String) -> u32 {
        let marker = Path::new(&dir).join("crashed");
        if !marker.exists() && std::fs::write(&marker, std::process::id().to_string()).is_ok() {
            std::process::abort();
        }
        std::process::id()
    }
}

/// Counts the calls its current process ran, and crashes its process on
/// cue.
#[rustyray::actor]
struct Sequence {
    count: u32,
}

#[rustyray::actor]
impl Sequence {
    fn new() -> Self {
        Sequence { count: 0 }
    }

    /// Call `i`: this process's pid and how many calls it ran. Aborts the
    /// process at each `i` in `crash_at` the first time it reaches it
    /// (markers in `dir`); sleeps `nap_ms` first.
    fn step(&mut self, i: u32, crash_at: Vec<u32>, dir: String, nap_ms: u64) -> (u32, u32) {
        std::thread::sleep(std::time::Duration::from_millis(nap_ms));
        if crash_at.contains(&i) {
            let marker = Path::new(&dir).join(format!("crashed-at-{i}"));
            if !marker.exists() && std::fs::write(&marker, b"").is_ok() {
                std::process::abort();
            }
        }
        self.count += 1;
        (std::process::id(), self.count)
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

/// Checks that calls `0..n` ran in submission order in each process that
/// ran them: within a process the count goes up by one from call to call,
/// and each process ran one unbroken range of calls.
fn assert_ran_in_order(results: &[(u32, u32)]) {
    let mut seen = Vec::new();
    for (i, w) in results.windows(2).enumerate() {
        let ((p0, c0), (p1, c1)) = (w[0], w[1]);
        if p0 == p1 {
            assert_eq!(c1, c0 + 1, "call {} ran out of order: {results:?}", i + 1);
        } else {
            assert!(!seen.contains(&p1), "process {p1} ran two ranges: {results:?}");
            assert_eq!(
                c1,
                1,
                "call {} is not the first in its process: {results:?}",
                i + 1
            );
            seen.push(p0);
        }
    }
}

#[test]
fn calls_keep_their_order_across_restarts_of_a_crashing_actor() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("order-crash");
    let s = Sequence::options()
        .max_restarts(2)
        .max_task_retries(-1)
        .remote(&ray)?;
    let d = dir.display().to_string();
    let refs = (0..100)
        .map(|i| s.step(i, vec![30, 60], d.clone(), 0))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let results = ray.get_many_timeout(&refs, LONG)?;
    assert_ran_in_order(&results);
    let pids: std::collections::HashSet<_> = results.iter().map(|r| r.0).collect();
    assert_eq!(pids.len(), 3, "two crashes, three processes: {results:?}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn calls_keep_their_order_when_the_actors_process_is_killed() -> rustyray::Result<()> {
    let ray = process_runtime();
    let s = Sequence::options()
        .max_restarts(1)
        .max_task_retries(-1)
        .remote(&ray)?;
    let first = ray.get_timeout(&s.pid()?, LONG)?;
    let refs = (0..100)
        .map(|i| s.step(i, Vec::new(), String::new(), 10))
        .collect::<rustyray::Result<Vec<_>>>()?;
    // Killed while calls are in flight and queued in the process.
    ray.get_timeout(&refs[20], LONG)?;
    kill9(first);
    let results = ray.get_many_timeout(&refs, LONG)?;
    assert_ran_in_order(&results);
    assert!(
        results.iter().any(|r| r.0 != first),
        "the kill came too late: {results:?}"
    );
    Ok(())
}

#[rustyray::actor]
struct Echo;

#[rustyray::actor]
impl Echo {
    fn new() -> Self {
        Echo
    }

    async fn echo(&self, s: String) -> String {
        tokio::task::yield_now().await;
        s
    }
}

#[test]
fn actors_live_in_worker_processes_and_keep_call_order() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 0)?;
    let pid = ray.get_timeout(&t.pid()?, LONG)?;
    assert_ne!(pid, std::process::id());
    assert!(ray.worker_pids().contains(&pid));
    let refs = (0..100).map(|_| t.add(1)).collect::<rustyray::Result<Vec<_>>>()?;
    assert_eq!(ray.get_many_timeout(&refs, LONG)?, (1..=100).collect::<Vec<_>>());
    // A reference argument is resolved by the owner.
    let five = ray.put(5_i64)?;
    assert_eq!(ray.get_timeout(&t.add(&five)?, LONG)?, 105);
    // max_concurrency holds in the process: four calls meet at a barrier.
    let meets = (0..4).map(|_| t.meet()).collect::<rustyray::Result<Vec<_>>>()?;
    for m in &meets {
        assert!(ray.get_timeout(m, LONG)?);
    }
    let e = Echo::remote(&ray)?;
    assert_eq!(ray.get_timeout(&e.echo("hi".to_owned())?, LONG)?, "hi");
    Ok(())
}

#[test]
fn a_crashed_actor_process_restarts_per_max_restarts() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::options().max_restarts(1).remote(&ray, 10)?;
    let first = ray.get_timeout(&t.pid()?, LONG)?;
    assert_eq!(ray.get_timeout(&t.add(1)?, LONG)?, 11);
    // A panic takes the process down; the call fails, the actor restarts
    // in a new process with its constructor's state.
    assert!(matches!(
        ray.get_timeout(&t.explode()?, LONG),
        Err(Error::ActorDied { .. })
    ));
    let second = ray.get_timeout(&t.pid()?, LONG)?;
    assert_ne!(first, second);
    wait_until("the first actor process is gone", || gone(first));
    assert_eq!(ray.get_timeout(&t.add(1)?, LONG)?, 11);
    // No restarts left: a killed process ends the actor.
    kill9(second);
    wait_until("the actor is dead", || {
        matches!(
            ray.get_timeout(&t.pid().expect("submit"), LONG),
            Err(Error::ActorDied { .. })
        )
    });
    Ok(())
}

#[test]
fn a_call_lost_with_its_process_is_retried_per_max_task_retries() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("actor-retry");
    let t = Tally::options()
        .max_restarts(1)
        .max_task_retries(1)
        .remote(&ray, 0)?;
    let pid = ray.get_timeout(&t.abort_once(dir.display().to_string())?, LONG)?;
    let crashed: u32 = std::fs::read_to_string(dir.join("crashed"))
        .expect("marker")
        .trim()
        .parse()
        .expect("pid");
    assert_ne!(pid, crashed);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn kill_and_constructor_errors_end_process_actors() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 1)?;
    let pid = ray.get_timeout(&t.pid()?, LONG)?;
    ray.kill(&t)?;
    assert!(matches!(
        ray.get_timeout(&t.add(1)?, LONG),
        Err(Error::ActorDied { .. })
    ));
    wait_until("the killed actor's process is gone", || gone(pid));
    let bad = Tally::remote(&ray, -1)?;
    match ray.get_timeout(&bad.add(1)?, LONG) {
        Err(Error::ActorDied {
            cause: Some(cause), ..
        }) => {
            assert!(cause.to_string().contains("negative start -1"), "{cause}");
        }
        other => panic!("expected ActorDied with the constructor's error, got {other:?}"),
    }
    Ok(())
}

// ----- edge cases found in review ------------------------------------------

#[test]
fn kill_with_restart_in_quick_succession_keeps_a_process_actor_usable() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::options().max_restarts(10).remote(&ray, 5)?;
    // Right after creation, and twice in a row.
    ray.kill_raw(t.raw(), false)?;
    ray.kill_raw(t.raw(), false)?;
    assert_eq!(ray.get_timeout(&t.add(1)?, LONG)?, 6);
    let pid = ray.get_timeout(&t.pid()?, LONG)?;
    ray.kill_raw(t.raw(), false)?;
    // A call made right after the kill waits for the restarted actor.
    assert_eq!(ray.get_timeout(&t.add(2)?, LONG)?, 7);
    assert_ne!(ray.get_timeout(&t.pid()?, LONG)?, pid);
    Ok(())
}

#[rustyray::actor]
struct Waiter;

#[rustyray::actor]
impl Waiter {
    fn new() -> Self {
        Waiter
    }

    fn wait_for_cancel(&self) -> bool {
        while !rustyray::is_cancelled() {
            std::thread::park_timeout(std::time::Duration::from_millis(5));
        }
        true
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

#[test]
fn a_forced_cancel_does_not_kill_an_actor_process() -> rustyray::Result<()> {
    let ray = process_runtime();
    let w = Waiter::remote(&ray)?;
    let pid = ray.get_timeout(&w.pid()?, LONG)?;
    let r = w.wait_for_cancel()?;
    ray.cancel_with(
        &r,
        rustyray::CancelOptions {
            force: true,
            ..Default::default()
        },
    )?;
    assert!(matches!(ray.get_timeout(&r, LONG), Err(Error::TaskCancelled(_))));
    // The actor (no restarts) is alive, in the same process.
    assert_eq!(ray.get_timeout(&w.pid()?, LONG)?, pid);
    Ok(())
}

// ----- handles across processes ---------------------------------------------

#[rustyray::actor]
struct Relay {
    target: ActorHandle<Tally>,
}

#[rustyray::actor]
impl Relay {
    fn new(target: ActorHandle<Tally>) -> Self {
        Relay { target }
    }

    fn add_via(&self, by: i64) -> Result<i64, String> {
        let ray = rustyray::current().map_err(|e| e.to_string())?;
        let r = self.target.add(by).map_err(|e| e.to_string())?;
        ray.get(&r).map_err(|e| e.to_string())
    }
}

#[rustyray::remote]
fn add_through(t: ActorHandle<Tally>, by: i64) -> Result<i64, String> {
    let ray = rustyray::current().map_err(|e| e.to_string())?;
    let r = t.add(by).map_err(|e| e.to_string())?;
    ray.get(&r).map_err(|e| e.to_string())
}

#[test]
fn workers_call_the_owners_actors_through_their_handles() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 0)?;
    let relay = Relay::remote(&ray, t.clone())?;
    assert_eq!(ray.get_timeout(&relay.add_via(5)?, LONG)?, 5);
    assert_eq!(
        ray.get_timeout(&add_through::remote(&ray, t.clone(), 2)?, LONG)?,
        7
    );
    // Many calls from several processes land on the one actor, each once.
    let calls = (0..20)
        .map(|_| relay.add_via(1))
        .collect::<rustyray::Result<Vec<_>>>()?;
    ray.get_many_timeout(&calls, LONG)?;
    assert_eq!(ray.get_timeout(&t.add(0)?, LONG)?, 27);
    // A dead actor's error reaches the caller in the worker.
    ray.kill(&t)?;
    match ray.get_timeout(&relay.add_via(1)?, LONG) {
        Err(Error::Task { message, .. }) => assert!(message.contains("died"), "{message}"),
        other => panic!("expected the actor's death, got {other:?}"),
    }
    Ok(())
}

/// Creates an actor and returns its handle, with this worker's pid.
#[rustyray::remote]
fn make_tally(start: i64) -> rustyray::Result<(ActorHandle<Tally>, u32)> {
    let ray = rustyray::current()?;
    let t = Tally::remote(&ray, start)?;
    ray.get(&t.add(1)?)?;
    Ok((t, std::process::id()))
}

/// Creates an actor, uses it and drops it; returns the actor's pid.
#[rustyray::remote]
fn use_and_drop_tally() -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    let t = Tally::remote(&ray, 0)?;
    ray.get(&t.pid()?)
}

/// Creates a named actor.
#[rustyray::remote]
fn make_named(name: String) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    let t = Tally::options().name(&name).remote(&ray, 100)?;
    // Reachable by name while this handle keeps it alive.
    let found: ActorHandle<Tally> = ray.get_actor(&name)?;
    ray.get(&found.add(1)?)?;
    ray.get(&t.pid()?)
}

/// Kills the actor it was handed.
#[rustyray::remote]
fn kill_it(t: ActorHandle<Tally>) -> rustyray::Result<()> {
    let ray = rustyray::current()?;
    ray.kill(&t)
}

#[test]
fn actors_created_in_workers_are_the_owners_in_their_own_processes() -> rustyray::Result<()> {
    let ray = process_runtime();
    // The actor lives in a process of its own, neither the driver nor the
    // worker that created it, and the driver may use the handle.
    let (t, creator) = ray.get_timeout(&make_tally::remote(&ray, 10)?, LONG)?;
    let home = ray.get_timeout(&t.pid()?, LONG)?;
    assert_ne!(home, creator);
    assert_ne!(home, std::process::id());
    assert_eq!(ray.get_timeout(&t.add(5)?, LONG)?, 16);
    // Killed from a worker, it is dead for everyone.
    ray.get_timeout(&kill_it::remote(&ray, t.clone())?, LONG)?;
    match ray.get_timeout(&t.add(1)?, LONG) {
        Err(Error::ActorDied { .. }) => {}
        other => panic!("expected ActorDied, got {other:?}"),
    }
    // An actor whose handles all went (the worker's last one with its
    // task) ends, and its process with it.
    let pid = ray.get_timeout(&use_and_drop_tally::remote(&ray)?, LONG)?;
    wait_until("an actor with no handles left ends its process", || gone(pid));
    // Names are the owner's: a worker finds the actor it named.
    let named = ray.get_timeout(&make_named::remote(&ray, "tally-from-worker".to_owned())?, LONG)?;
    wait_until("the named actor ends with its last handle", || gone(named));
    Ok(())
}

/// Creates two actors, one detached, and returns their handles with this
/// worker's pid.
#[rustyray::remote]
#[allow(clippy::type_complexity)]
fn make_two_tallies() -> rustyray::Result<(ActorHandle<Tally>, ActorHandle<Tally>, u32)> {
    let ray = rustyray::current()?;
    let owned = Tally::remote(&ray, 1)?;
    let detached = Tally::options().detached(true).remote(&ray, 2)?;
    ray.get(&owned.add(0)?)?;
    ray.get(&detached.add(0)?)?;
    Ok((owned, detached, std::process::id()))
}

#[test]
fn an_actor_goes_with_the_worker_that_created_it_unless_detached() -> rustyray::Result<()> {
    let ray = process_runtime();
    let (owned, detached, creator) = ray.get_timeout(&make_two_tallies::remote(&ray)?, LONG)?;
    assert_eq!(ray.get_timeout(&owned.add(1)?, LONG)?, 2);
    let owned_pid = ray.get_timeout(&owned.pid()?, LONG)?;
    // The creator's process dies (its task is over; the process idles in
    // the pool): the actor it owns ends with it, as in Ray; the detached
    // one lives on.
    kill9(creator);
    wait_until("the owned actor's process ends with its owner", || {
        gone(owned_pid)
    });
    match ray.get_timeout(&owned.add(1)?, LONG) {
        Err(Error::ActorDied { reason, .. }) => {
            assert!(reason.contains(&creator.to_string()), "{reason}");
        }
        other => panic!("expected ActorDied naming the owner, got {other:?}"),
    }
    assert_eq!(ray.get_timeout(&detached.add(1)?, LONG)?, 3);
    ray.kill(&detached)?;
    Ok(())
}

/// Calls the owner's actor with a reference to a result not made yet, and
/// returns the call's reference unread.
#[rustyray::remote]
fn call_with_pending(t: ActorHandle<Tally>) -> rustyray::Result<ObjectRef<i64>> {
    let ray = rustyray::current()?;
    let by = add::remote(&ray, 2, 3)?;
    t.add(&by)
}

#[test]
fn workers_pass_references_to_the_owners_actors_and_return_call_results() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 10)?;
    let call = ray.get_timeout(&call_with_pending::remote(&ray, t.clone())?, LONG)?;
    assert_eq!(ray.get_timeout(&call, LONG)?, 15);
    assert_eq!(ray.get_timeout(&t.add(0)?, LONG)?, 15);
    Ok(())
}

// ----- regressions found in review -------------------------------------

#[rustyray::actor]
struct Seq {
    seen: Vec<u32>,
}

#[rustyray::actor]
impl Seq {
    fn new() -> Self {
        Seq { seen: Vec::new() }
    }

    fn push(&mut self, i: u32) -> u32 {
        self.seen.push(i);
        i
    }

    fn seen(&self) -> Vec<u32> {
        self.seen.clone()
    }
}

#[test]
fn actor_calls_keep_their_order_on_a_worker_that_ran_tasks() -> rustyray::Result<()> {
    let ray = process_runtime();
    for _ in 0..3 {
        let refs = (0..20)
            .map(|i| add::remote(&ray, i, 1))
            .collect::<rustyray::Result<Vec<_>>>()?;
        ray.get_many_timeout(&refs, LONG)?;
    }
    for _ in 0..3 {
        let s = Seq::remote(&ray)?;
        let refs = (0..2000)
            .map(|i| s.push(i))
            .collect::<rustyray::Result<Vec<_>>>()?;
        ray.get_many_timeout(&refs, LONG)?;
        let seen = ray.get_timeout(&s.seen()?, LONG)?;
        assert_eq!(seen, (0..2000).collect::<Vec<_>>());
    }
    Ok(())
}

#[rustyray::actor]
struct Crasher;

#[rustyray::actor]
impl Crasher {
    fn new() -> Self {
        Crasher
    }

    /// Aborts the process the first time; then puts an object and returns
    /// its reference.
    fn put_after_crash(&self, dir: String) -> rustyray::Result<ObjectRef<u64>> {
        let marker = Path::new(&dir).join("crashed");
        if !marker.exists() && std::fs::write(&marker, std::process::id().to_string()).is_ok() {
            std::process::abort();
        }
        rustyray::current()?.put(42_u64)
    }
}

#[test]
fn a_retried_call_may_return_a_reference_to_an_object_it_put() -> rustyray::Result<()> {
    let ray = process_runtime();
    for i in 0..5 {
        let dir = scratch(&format!("retry-put-{i}"));
        let c = Crasher::options()
            .max_restarts(1)
            .max_task_retries(1)
            .remote(&ray)?;
        let r = ray.get_timeout(&c.put_after_crash(dir.display().to_string())?, LONG)?;
        assert_eq!(ray.get_timeout(&r, LONG)?, 42);
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

#[rustyray::actor]
struct Big;

#[rustyray::actor]
impl Big {
    fn new() -> Self {
        Big
    }

    /// A result above the shared-memory threshold.
    fn big(&self, k: u32) -> Vec<u8> {
        vec![k as u8; 120_000]
    }
}

#[test]
fn large_actor_results_never_stall_the_actors_reader() -> rustyray::Result<()> {
    let dir = scratch("big-actor");
    let ray = shm_runtime(512 << 20, &dir.join("spill"));
    let b = Big::remote(&ray)?;
    for _ in 0..10 {
        let refs = (0..200).map(|k| b.big(k)).collect::<rustyray::Result<Vec<_>>>()?;
        let got = ray.get_many_timeout(&refs, LONG)?;
        assert!(got
            .iter()
            .enumerate()
            .all(|(k, v)| v.len() == 120_000 && v[0] == k as u8));
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
