//! Calls from a worker process straight to the worker process hosting the
//! actor (the driver off the path): results, order, references both ways,
//! and what happens when the actor's process dies under the calls.

mod common;
#[path = "common/process.rs"]
mod process;
use common::LONG;
use process::{kill9, process_runtime, scratch};
use rustyray::prelude::*;
use std::path::Path;

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

/// Numbers its calls; its process id on request.
#[rustyray::actor]
struct Counter {
    n: u64,
}

#[rustyray::actor]
impl Counter {
    fn new() -> Self {
        Counter { n: 0 }
    }

    /// The number of this call (1, 2, …) in the current process, after a
    /// nap of `nap_ms`.
    fn next(&mut self, nap_ms: u64) -> (u32, u64) {
        if nap_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(nap_ms));
        }
        self.n += 1;
        (std::process::id(), self.n)
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    /// [`Counter::next`] once the file `go` exists (a minute at most).
    fn next_after(&mut self, go: String) -> (u32, u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !Path::new(&go).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.next(0)
    }

    /// Reads an object passed by reference and one inside a value.
    fn sum(&self, a: i64, inside: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
        let ray = rustyray::current()?;
        let mut total = a;
        for r in &inside {
            total += ray.get(r)?;
        }
        Ok(total)
    }

    /// Puts an object and returns a reference to it.
    fn make(&self, v: i64) -> rustyray::Result<ObjectRef<i64>> {
        rustyray::current()?.put(v)
    }

    /// A value far above the shared-memory threshold.
    fn large(&self, len: usize) -> Vec<u8> {
        vec![7; len]
    }

    /// A handle on a new actor of this class.
    fn spawn(&self) -> rustyray::Result<ActorHandle<Counter>> {
        Counter::remote(&rustyray::current()?)
    }

    /// Fails, with a message.
    fn fail(&self) -> Result<i64, String> {
        Err("no luck".to_owned())
    }
}

/// A gate that calls wait at until another call opens it (a threaded
/// actor: the calls run side by side).
#[rustyray::actor]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

#[rustyray::actor]
impl Gate {
    fn new() -> Self {
        Gate {
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
        }
    }

    fn ping(&self) -> u32 {
        std::process::id()
    }

    /// Returns after `ms` milliseconds.
    fn nap(&self, ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }

    /// Whether the gate opened within a minute.
    fn wait_open(&self) -> bool {
        let Ok(open) = self.open.lock() else { return false };
        let waited = self.opened.wait_timeout_while(open, LONG, |open| !*open);
        waited.is_ok_and(|(open, _)| *open)
    }

    fn open(&self) {
        if let Ok(mut open) = self.open.lock() {
            *open = true;
        }
        self.opened.notify_all();
    }
}

/// Calls the gate's `wait_open`, then `open`, and returns both results
/// without waiting for either: the second call goes out while the first
/// is unanswered, and no wait of this task sends it.
#[rustyray::remote]
fn open_behind_a_wait(g: ActorHandle<Gate>) -> rustyray::Result<(ObjectRef<bool>, ObjectRef<()>, u64)> {
    let before = rustyray::__private::direct_calls();
    let waiting = g.wait_open()?;
    let opening = g.open()?;
    Ok((waiting, opening, rustyray::__private::direct_calls() - before))
}

/// Calls `nap`, then `wait_open` (which starts while the nap runs and holds
/// the actor's answer to it back, unless something sends it), waits for
/// the nap, then opens the gate.
#[rustyray::remote]
fn wait_for_an_answer_behind_a_wait(g: ActorHandle<Gate>) -> rustyray::Result<(bool, u64)> {
    let ray = rustyray::current()?;
    let before = rustyray::__private::direct_calls();
    let nap = g.nap(100)?;
    let waiting = g.wait_open()?;
    ray.get(&nap)?;
    g.open()?;
    Ok((ray.get(&waiting)?, rustyray::__private::direct_calls() - before))
}

/// Makes three calls, cancels the third while the first still holds the
/// actor (so the third is queued in the actor's process), and returns how
/// that call ended and how many calls the actor ran by then.
#[rustyray::remote]
fn cancel_a_queued_call(c: ActorHandle<Counter>, go: String) -> rustyray::Result<(String, u64)> {
    let ray = rustyray::current()?;
    // The first call holds the actor until the cancel has been sent.
    let first = c.next_after(go.clone())?;
    let second = c.next(300)?;
    let third = c.next(300)?;
    ray.cancel(&third)?;
    let _ = std::fs::write(&go, b"");
    let ended = match ray.get(&third) {
        Err(e) => e.to_string(),
        Ok(v) => format!("it ran: {v:?}"),
    };
    ray.get(&first)?;
    let (_, n) = ray.get(&second)?;
    // A call after them sees whether the cancelled one ran.
    let (_, after) = ray.get(&c.next(0)?)?;
    Ok((ended, after - n))
}

/// Says it started, then waits (at most a minute) to be cancelled and
/// says it saw it.
#[rustyray::remote]
fn until_cancelled(dir: String) -> bool {
    let dir = Path::new(&dir);
    let _ = std::fs::write(dir.join("started"), b"");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if rustyray::is_cancelled() {
            let _ = std::fs::write(dir.join("seen"), b"");
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// Submits `until_cancelled` from this worker, cancels it once it runs,
/// and returns how its reference ended.
#[rustyray::remote]
fn cancel_a_submitted_task(dir: String) -> rustyray::Result<String> {
    let ray = rustyray::current()?;
    let r = until_cancelled::remote(&ray, dir.clone())?;
    let started = Path::new(&dir).join("started");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !started.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ray.cancel(&r)?;
    Ok(match ray.get(&r) {
        Err(e) => e.to_string(),
        Ok(v) => format!("it returned {v}"),
    })
}

/// Reads a value passed by reference.
#[rustyray::remote]
fn read_it(x: i64) -> i64 {
    x
}

/// Calls whose answers cannot come straight back (large, a handle) and a
/// failed call whose reference is passed on.
#[rustyray::remote]
fn awkward_answers(c: ActorHandle<Counter>) -> rustyray::Result<(usize, u64, String, u64)> {
    let ray = rustyray::current()?;
    let before = rustyray::__private::direct_calls();
    let big = ray.get(&c.large(3 << 20)?)?;
    let other = ray.get(&c.spawn()?)?;
    let (_, n) = ray.get(&other.next(0)?)?;
    let failed = c.fail()?;
    let passed = read_it::remote(&ray, &failed)?;
    let err = match ray.get(&passed) {
        Err(e) => e.to_string(),
        Ok(v) => format!("unexpected value {v}"),
    };
    Ok((big.len(), n, err, rustyray::__private::direct_calls() - before))
}

/// Makes `n` calls on `c` from this worker process and returns their
/// results with how many of them went straight to the actor's process.
#[rustyray::remote]
fn call_from_worker(
    c: ActorHandle<Counter>,
    n: u32,
    nap_ms: u64,
    mark: Option<String>,
) -> rustyray::Result<(Vec<(u32, u64)>, u64)> {
    let ray = rustyray::current()?;
    let before = rustyray::__private::direct_calls();
    let refs = (0..n)
        .map(|_| c.next(nap_ms))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let direct = rustyray::__private::direct_calls() - before;
    // Once the first call is answered the rest are out: said in a file.
    if let Some(mark) = mark {
        let _ = ray.get(&refs[0]);
        let _ = std::fs::write(mark, b"");
    }
    Ok((ray.get_many(&refs)?, direct))
}

/// Numbers its calls; starts only once the file `go` exists (a minute at
/// most).
#[rustyray::actor]
struct Late {
    n: u64,
}

#[rustyray::actor]
impl Late {
    fn new(go: String) -> Self {
        let deadline = std::time::Instant::now() + LONG;
        while !Path::new(&go).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Late { n: 0 }
    }

    /// The number of this call, with the process id.
    fn next(&mut self) -> (u32, u64) {
        self.n += 1;
        (std::process::id(), self.n)
    }
}

/// Makes `n` calls on `c` that nap `nap_ms` each and returns them
/// unanswered: the task's handle (the last one) goes while they run.
#[rustyray::remote]
fn call_then_let_go(
    c: ActorHandle<Counter>,
    n: u32,
    nap_ms: u64,
) -> rustyray::Result<Vec<ObjectRef<(u32, u64)>>> {
    (0..n).map(|_| c.next(nap_ms)).collect()
}

/// A call's result: the process that ran it and its number there.
type OneCall = (u32, u64);

/// Calls' results: the process that ran each and its number there.
type Numbered = Vec<OneCall>;

/// Makes `rounds` rounds of `n` calls on `c`, each waited for before the
/// next; the actor starts only once the first round is out (the handle
/// came here before it was alive). Returns every result in order, and how
/// many calls of the first and of the last round went straight to the
/// actor's process.
#[rustyray::remote]
fn call_late_in_rounds(
    c: ActorHandle<Late>,
    go: String,
    rounds: u32,
    n: u32,
) -> rustyray::Result<(Numbered, u64, u64)> {
    let ray = rustyray::current()?;
    let mut results = Vec::new();
    let (mut first, mut last) = (None, 0);
    for _ in 0..rounds {
        let before = rustyray::__private::direct_calls();
        let refs = (0..n).map(|_| c.next()).collect::<rustyray::Result<Vec<_>>>()?;
        last = rustyray::__private::direct_calls() - before;
        first.get_or_insert(last);
        let _ = std::fs::write(&go, b"");
        results.extend(ray.get_many(&refs)?);
    }
    Ok((results, first.unwrap_or_default(), last))
}

/// Passes objects to the actor by reference, inside a value, and as the
/// pending result of an earlier call; returns the sums and a value read
/// through a reference the actor returned.
#[rustyray::remote]
fn pass_references(
    c: ActorHandle<Counter>,
    from_driver: ObjectRef<i64>,
) -> rustyray::Result<(i64, i64, i64, u64)> {
    let ray = rustyray::current()?;
    let before = rustyray::__private::direct_calls();
    let mine = ray.put(100_i64)?;
    let a = ray.get(&c.sum(&mine, vec![from_driver.clone()])?)?;
    // The result of a call still out, passed on to the next call.
    let made = c.make(7)?;
    let inner: ObjectRef<i64> = ray.get(&made)?;
    let b = ray.get(&c.sum(&from_driver, vec![inner.clone()])?)?;
    let read = ray.get(&inner)?;
    Ok((a, b, read, rustyray::__private::direct_calls() - before))
}

/// Makes two calls on `c` that go through the owner (the actor starts
/// only once they are out), lets it start, reads the first when `read`
/// and returns both: handed to the driver done or still out. Returns how
/// many went straight to the actor's process too.
#[rustyray::remote]
fn call_through_the_owner_and_hand_over(
    c: ActorHandle<Late>,
    go: String,
    read: bool,
) -> rustyray::Result<(Vec<ObjectRef<OneCall>>, u64)> {
    let ray = rustyray::current()?;
    let before = rustyray::__private::direct_calls();
    let refs = vec![c.next()?, c.next()?];
    let direct = rustyray::__private::direct_calls() - before;
    std::fs::write(&go, b"").map_err(|e| rustyray::Error::InvalidArgument(e.to_string()))?;
    if read {
        ray.get(&refs[0])?;
    }
    Ok((refs, direct))
}

/// A counter restarted once after its process dies, its calls retried
/// without limit; with its first process's id.
fn restartable_counter(ray: &Ray) -> rustyray::Result<(ActorHandle<Counter>, u32)> {
    let c = Counter::options()
        .max_restarts(1)
        .max_task_retries(-1)
        .remote(ray)?;
    let first = ray.get_timeout(&c.pid()?, LONG)?;
    Ok((c, first))
}

/// [`assert_in_order`], and some calls ran after the first process
/// (`first`) was killed.
fn assert_in_order_across_a_restart(results: &[(u32, u64)], first: u32) {
    assert_in_order(results);
    assert!(
        results.iter().any(|r| r.0 != first),
        "the kill came too late: {results:?}"
    );
}

/// Checks that each process ran one unbroken, in-order range of calls.
fn assert_in_order(results: &[(u32, u64)]) {
    for (i, w) in results.windows(2).enumerate() {
        let ((p0, c0), (p1, c1)) = (w[0], w[1]);
        if p0 == p1 {
            assert_eq!(c1, c0 + 1, "call {} ran out of order: {results:?}", i + 1);
        } else {
            assert_eq!(
                c1,
                1,
                "call {} is not the first in its process: {results:?}",
                i + 1
            );
        }
    }
}

#[test]
fn a_workers_calls_go_straight_to_the_actors_process_in_order() -> rustyray::Result<()> {
    let ray = process_runtime();
    let c = Counter::remote(&ray)?;
    let actor_pid = ray.get_timeout(&c.pid()?, LONG)?;
    let (results, direct) =
        ray.get_timeout(&call_from_worker::remote(&ray, c.clone(), 200, 0, None)?, LONG)?;
    assert_eq!(direct, 200, "every call should skip the owner");
    assert!(results.iter().all(|(p, _)| *p == actor_pid));
    assert_in_order(&results);
    // The driver's own calls and the worker's land on the same actor.
    assert_eq!(ray.get_timeout(&c.next(0)?, LONG)?, (actor_pid, 201));
    Ok(())
}

#[test]
fn a_worker_given_a_handle_before_the_actor_started_goes_straight_there_later_in_order(
) -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("late-route");
    let go = dir.join("go").display().to_string();
    // Lent before the actor is alive (it starts once the worker's first
    // round is out): the handle carries no route, so the first calls go
    // through the owner, which then tells the route.
    let c = Late::remote(&ray, go.clone())?;
    let (results, first, last) =
        ray.get_timeout(&call_late_in_rounds::remote(&ray, c.clone(), go, 3, 100)?, LONG)?;
    assert_eq!(results.len(), 300);
    assert_in_order(&results);
    assert_eq!(first, 0, "the first round should go through the owner");
    assert_eq!(last, 100, "the last round should go straight to the actor");
    assert_eq!(ray.get_timeout(&c.next()?, LONG)?.1, 301);
    Ok(())
}

#[test]
fn calls_still_out_when_the_last_handle_goes_run_before_the_actor_ends() -> rustyray::Result<()> {
    let ray = process_runtime();
    let c = Counter::remote(&ray)?;
    ray.get_timeout(&c.pid()?, LONG)?;
    // The driver's handle goes into the task; the task's goes when it
    // returns, with its calls still running in the actor's process.
    let refs = ray.get_timeout(&call_then_let_go::remote(&ray, c, 20, 10)?, LONG)?;
    let results = ray.get_many_timeout(&refs, LONG)?;
    let counts: Vec<u64> = results.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, (1..=20).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn references_cross_a_direct_call_both_ways() -> rustyray::Result<()> {
    let ray = process_runtime();
    let c = Counter::remote(&ray)?;
    ray.get_timeout(&c.pid()?, LONG)?;
    let x = ray.put(5_i64)?;
    let (a, b, read, direct) = ray.get_timeout(&pass_references::remote(&ray, c, x)?, LONG)?;
    assert_eq!((a, b, read), (105, 12, 7));
    assert_eq!(direct, 3);
    Ok(())
}

#[test]
fn large_answers_handles_and_failures_reach_a_direct_caller() -> rustyray::Result<()> {
    let ray = process_runtime();
    let c = Counter::remote(&ray)?;
    ray.get_timeout(&c.pid()?, LONG)?;
    let (len, n, err, direct) = ray.get_timeout(&awkward_answers::remote(&ray, c)?, LONG)?;
    assert_eq!(len, 3 << 20);
    assert_eq!(n, 1, "the returned handle works");
    assert!(err.contains("no luck"), "{err}");
    assert!(direct >= 3, "{direct} direct calls");
    Ok(())
}

#[test]
fn a_call_behind_an_unanswered_one_goes_out_though_the_caller_never_waits() -> rustyray::Result<()> {
    let ray = process_runtime();
    let g = Gate::options().max_concurrency(4).remote(&ray)?;
    ray.get_timeout(&g.ping()?, LONG)?;
    let (waiting, opening, direct) = ray.get_timeout(&open_behind_a_wait::remote(&ray, g.clone())?, LONG)?;
    assert_eq!(direct, 2, "both calls should go straight to the actor");
    ray.get_timeout(&opening, LONG)?;
    assert!(ray.get_timeout(&waiting, LONG)?, "the gate never opened");
    Ok(())
}

#[test]
fn an_answer_behind_a_running_call_reaches_a_caller_that_waits_for_it() -> rustyray::Result<()> {
    let ray = process_runtime();
    let g = Gate::options().max_concurrency(4).remote(&ray)?;
    ray.get_timeout(&g.ping()?, LONG)?;
    let (opened, direct) =
        ray.get_timeout(&wait_for_an_answer_behind_a_wait::remote(&ray, g.clone())?, LONG)?;
    assert_eq!(direct, 3, "every call should go straight to the actor");
    assert!(opened, "the gate never opened");
    Ok(())
}

#[test]
fn a_cancelled_direct_call_that_is_still_queued_never_runs() -> rustyray::Result<()> {
    let ray = process_runtime();
    let c = Counter::remote(&ray)?;
    ray.get_timeout(&c.pid()?, LONG)?;
    let dir = scratch("cancel-queued");
    let go = dir.join("go").display().to_string();
    let (ended, step) = ray.get_timeout(&cancel_a_queued_call::remote(&ray, c, go)?, LONG)?;
    assert!(ended.contains("cancel"), "{ended}");
    assert_eq!(step, 1, "the cancelled call ran in the actor");
    Ok(())
}

#[test]
fn a_task_a_worker_cancels_is_cancelled_where_it_runs() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("cancel-submitted");
    let d = dir.display().to_string();
    let ended = ray.get_timeout(&cancel_a_submitted_task::remote(&ray, d)?, LONG)?;
    assert!(ended.contains("cancel"), "{ended}");
    common::wait_until("the task saw its cancel", || dir.join("seen").exists());
    Ok(())
}

#[test]
fn calls_out_when_the_actors_process_is_killed_keep_their_order() -> rustyray::Result<()> {
    let ray = process_runtime();
    let (c, first) = restartable_counter(&ray)?;
    let dir = scratch("kill-direct");
    let mark = dir.join("out");
    let calls = call_from_worker::remote(&ray, c.clone(), 100, 20, Some(mark.display().to_string()))?;
    // Killed while the worker's calls are out.
    common::wait_until("the worker's calls are out", || mark.exists());
    kill9(first);
    let (results, _) = ray.get_timeout(&calls, LONG)?;
    assert_eq!(results.len(), 100);
    assert_in_order_across_a_restart(&results, first);
    Ok(())
}

#[test]
fn calls_out_when_the_last_handle_went_and_the_actors_process_is_killed_run_after_the_restart(
) -> rustyray::Result<()> {
    let ray = process_runtime();
    let (c, first) = restartable_counter(&ray)?;
    // The task's handle, the last one, goes while its calls run; the
    // actor's process is killed under them: they go through the owner,
    // which restarts the actor, and only then is the handle given back.
    let refs = ray.get_timeout(&call_then_let_go::remote(&ray, c, 40, 20)?, LONG)?;
    kill9(first);
    let results = ray.get_many_timeout(&refs, LONG)?;
    assert_eq!(results.len(), 40);
    assert_in_order_across_a_restart(&results, first);
    Ok(())
}

#[test]
fn calls_out_when_the_actor_allows_no_retry_fail_with_its_death() -> rustyray::Result<()> {
    let ray = process_runtime();
    let c = Counter::remote(&ray)?;
    let pid = ray.get_timeout(&c.pid()?, LONG)?;
    let dir = scratch("kill-direct-no-retry");
    let mark = dir.join("out");
    let calls = call_from_worker::remote(&ray, c.clone(), 50, 40, Some(mark.display().to_string()))?;
    common::wait_until("the worker's calls are out", || mark.exists());
    kill9(pid);
    match ray.get_timeout(&calls, LONG) {
        Err(Error::Task { message, .. }) => assert!(message.contains("died"), "{message}"),
        other => panic!("expected the actor's death, got {other:?}"),
    }
    Ok(())
}

/// Calls the actor straight, once the file `go` exists, and returns the
/// call's result unread (handed to the driver pending).
#[rustyray::remote]
fn call_and_hand_over(c: ActorHandle<Counter>, go: String) -> rustyray::Result<Vec<ObjectRef<(u32, u64)>>> {
    Ok(vec![c.next_after(go)?])
}

#[test]
fn a_result_handed_over_pending_survives_the_fail_over_of_its_call() -> rustyray::Result<()> {
    let ray = process_runtime();
    let (c, first) = restartable_counter(&ray)?;
    let dir = scratch("handed-over-fail-over");
    let go = dir.join("go").display().to_string();
    let refs = ray.get_timeout(&call_and_hand_over::remote(&ray, c.clone(), go.clone())?, LONG)?;
    // The call is out on the route (it waits for `go`); its process dies,
    // so the call fails over through the driver, which already holds its
    // result pending: the retried call completes that one.
    kill9(first);
    std::fs::write(&go, b"go").map_err(|e| rustyray::Error::InvalidArgument(e.to_string()))?;
    let (pid, n) = ray.get_timeout(&refs[0], LONG)?;
    assert_ne!(pid, first, "it ran again in the restarted process");
    assert_eq!(n, 1);
    Ok(())
}

#[test]
fn results_of_calls_through_the_owner_are_the_workers_and_can_be_handed_on() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("through-owner-hand-over");
    for (i, read) in [false, true].into_iter().enumerate() {
        let go = dir.join(format!("go{i}")).display().to_string();
        let c = Late::remote(&ray, go.clone())?;
        let task = call_through_the_owner_and_hand_over::remote(&ray, c.clone(), go, read)?;
        let (refs, direct) = ray.get_timeout(&task, LONG)?;
        assert_eq!(direct, 0, "the calls should go through the owner");
        // The driver kept nothing for the worker: each result reaches it
        // as the worker's object, handed over when it left the worker.
        let got = ray.get_many(&refs)?;
        assert_eq!(got.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2]);
        drop(refs);
        assert_eq!(ray.get_timeout(&c.next()?, LONG)?.1, 3);
    }
    Ok(())
}
