//! Cancellation, retries and resource accounting.

mod common;
use common::{both_modes, LONG};
use rustyray::prelude::*;
use rustyray::{TaskFailure, CPU, GPU};
use std::sync::atomic::{AtomicU32, Ordering};

#[rustyray::remote]
fn echo_after(x: i64, gate: ObjectRef<()>) -> i64 {
    let ray = rustyray::current().expect("inside a task");
    let _ = ray.get(&gate);
    x
}

/// Spins until cancelled (a cooperative sync task), then says so.
#[rustyray::remote]
fn spin_until_cancelled(started: ActorHandle<common::Latch>) -> String {
    started.open().expect("signal start");
    while !rustyray::is_cancelled() {
        std::thread::yield_now();
    }
    "saw the flag".to_owned()
}

/// Runs only once `dep` is ready (it is resolved, not passed as a ref).
#[rustyray::remote]
fn after(x: i64, _dep: ()) -> i64 {
    x
}

#[rustyray::remote]
async fn wait_forever(gate: ObjectRef<()>, started: ActorHandle<common::Latch>) -> i64 {
    started.open().expect("signal start");
    let _ = gate.await;
    1
}

/// Holds one reference, so a test can see a task's child.
#[rustyray::actor]
struct RefBox {
    r: Option<ObjectRef<i64>>,
}

#[rustyray::actor]
impl RefBox {
    fn new() -> Self {
        RefBox { r: None }
    }

    fn set(&mut self, r: ObjectRef<i64>) {
        self.r = Some(r);
    }

    fn get(&self) -> Option<ObjectRef<i64>> {
        self.r.clone()
    }
}

/// Submits a child that waits on `gate`, shows it to the test through
/// `seen`, then blocks on it.
#[rustyray::remote]
fn parent(gate: ObjectRef<()>, seen: ActorHandle<RefBox>) -> i64 {
    let ray = rustyray::current().expect("inside a task");
    let child = echo_after::remote(&ray, 5, gate).expect("submit child");
    ray.get(&seen.set(child.clone()).expect("set")).expect("set");
    ray.get(&child).unwrap_or(-1)
}

both_modes! {
    fn queued_task_never_runs(ray) {
        let (latch, gate) = common::latch(ray);
        // The task waits for `gate`, so it is still queued when cancelled.
        let r = after::remote(ray, 1, &gate)?;
        ray.cancel(&r)?;
        assert!(matches!(ray.get(&r), Err(Error::TaskCancelled(_))));
        latch.open()?;
        // Still cancelled after its dependency resolved.
        assert!(matches!(ray.get(&r), Err(Error::TaskCancelled(_))));
        Ok(())
    }
}

#[test]
fn running_sync_task_sees_the_flag() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let (started, started_ref) = common::latch(&ray);
    let r = spin_until_cancelled::remote(&ray, started.clone())?;
    ray.get_timeout(&started_ref, LONG)?;
    ray.cancel(&r)?;
    assert!(matches!(ray.get(&r), Err(Error::TaskCancelled(_))));
    // The task saw the flag and ended: its CPU comes back.
    common::wait_until("the cancelled task never ended", || {
        ray.available_resources().get(CPU) >= 2.0
    });
    Ok(())
}

#[test]
fn running_async_task_is_aborted() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let (_latch, gate) = common::latch(&ray);
    let (started, started_ref) = common::latch(&ray);
    let r = wait_forever::remote(&ray, gate, started)?;
    ray.get_timeout(&started_ref, LONG)?;
    ray.cancel(&r)?;
    assert!(matches!(ray.get(&r), Err(Error::TaskCancelled(_))));
    common::wait_until("the aborted task kept its CPU", || {
        ray.available_resources().get(CPU) >= 2.0
    });
    Ok(())
}

#[test]
fn recursive_cancel_reaches_children() -> rustyray::Result<()> {
    for recursive in [true, false] {
        let ray = common::runtime(2.0, false);
        let (latch, gate) = common::latch(&ray);
        let seen = RefBox::remote(&ray)?;
        let p = parent::remote(&ray, gate, seen.clone())?;
        let mut child = None;
        common::wait_until("the parent never submitted its child", || {
            child = ray.get(&seen.get().expect("call")).expect("get");
            child.is_some()
        });
        let child = child.expect("seen above");
        ray.cancel_with(
            &p,
            CancelOptions {
                force: false,
                recursive,
            },
        )?;
        assert!(matches!(ray.get(&p), Err(Error::TaskCancelled(_))));
        if recursive {
            assert!(matches!(ray.get(&child), Err(Error::TaskCancelled(_))));
        } else {
            latch.open()?;
            assert_eq!(ray.get(&child)?, 5);
        }
    }
    Ok(())
}

#[test]
fn finished_tasks_and_puts_are_not_affected() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let p = ray.put(3_i64)?;
    ray.cancel(&p)?;
    assert_eq!(ray.get(&p)?, 3);
    let (latch, gate) = common::latch(&ray);
    latch.open()?;
    let r = echo_after::remote(&ray, 4, gate)?;
    assert_eq!(ray.get(&r)?, 4);
    ray.cancel(&r)?;
    assert_eq!(ray.get(&r)?, 4);
    Ok(())
}

/// Counts attempts in an actor so retries are observable across attempts.
#[rustyray::actor]
struct Attempts {
    n: AtomicU32,
}

#[rustyray::actor]
impl Attempts {
    fn new() -> Self {
        Attempts { n: AtomicU32::new(0) }
    }

    fn next(&self) -> u32 {
        self.n.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// Panics until the attempt counter reaches `succeed_at`.
#[rustyray::remote]
fn flaky_panic(counter: ActorHandle<Attempts>, succeed_at: u32) -> u32 {
    let ray = rustyray::current().expect("inside a task");
    let n = ray.get(&counter.next().expect("call")).expect("count");
    if n < succeed_at {
        panic!("attempt {n} fails");
    }
    n
}

/// Returns `Err` until the attempt counter reaches `succeed_at`.
#[rustyray::remote]
fn flaky_err(counter: ActorHandle<Attempts>, succeed_at: u32) -> Result<u32, String> {
    let ray = rustyray::current().expect("inside a task");
    let n = ray.get(&counter.next().expect("call")).expect("count");
    if n < succeed_at {
        return Err(format!("attempt {n} fails"));
    }
    Ok(n)
}

both_modes! {
    fn max_retries_reruns_panicking_tasks(ray) {
        let c = Attempts::remote(ray)?;
        let r = flaky_panic::options().max_retries(3).remote(ray, c.clone(), 3)?;
        assert_eq!(ray.get(&r)?, 3);
        let c = Attempts::remote(ray)?;
        let r = flaky_panic::options().max_retries(1).remote(ray, c, 5)?;
        match ray.get(&r) {
            Err(Error::Task { failure: TaskFailure::Panicked, attempts, message, .. }) => {
                assert_eq!(attempts, 2);
                assert_eq!(message, "attempt 2 fails");
            }
            other => panic!("expected a panic after 2 attempts, got {other:?}"),
        }
        Ok(())
    }
}

both_modes! {
    fn retry_exceptions_also_retries_err(ray) {
        // Without retry_exceptions an Err is final at once.
        let c = Attempts::remote(ray)?;
        let r = flaky_err::options().max_retries(3).remote(ray, c, 2)?;
        assert!(matches!(ray.get(&r), Err(Error::Task { attempts: 1, .. })));
        let c = Attempts::remote(ray)?;
        let r = flaky_err::options().max_retries(3).retry_exceptions(true).remote(ray, c, 3)?;
        assert_eq!(ray.get(&r)?, 3);
        let c = Attempts::remote(ray)?;
        let r = flaky_err::options().max_retries(2).retry_exceptions(true).remote(ray, c, 10)?;
        match ray.get(&r) {
            Err(Error::Task { failure: TaskFailure::Returned, attempts, .. }) => assert_eq!(attempts, 3),
            other => panic!("expected an error after 3 attempts, got {other:?}"),
        }
        Ok(())
    }
}

#[rustyray::remote(num_cpus = 0.5)]
fn half(x: i64) -> i64 {
    x
}

#[rustyray::remote(num_gpus = 1.0)]
fn needs_gpu() -> u8 {
    1
}

#[rustyray::remote(resource = ("disk", 2.0))]
fn needs_disk() -> u8 {
    2
}

/// Reports the CPUs available while it runs.
#[rustyray::remote]
fn available_cpus_inside() -> f64 {
    rustyray::current().expect("task").available_resources().get(CPU)
}

both_modes! {
    fn unsatisfiable_requests_fail_clearly(ray) {
        let r = needs_gpu::remote(ray)?;
        match ray.get(&r) {
            Err(Error::Unschedulable { what, requested, .. }) => {
                assert!(what.contains("needs_gpu"), "{what}");
                assert!(requested.contains("GPU"), "{requested}");
            }
            other => panic!("expected Unschedulable, got {other:?}"),
        }
        let r = half::options().num_cpus(64.0).remote(ray, 1)?;
        assert!(matches!(ray.get(&r), Err(Error::Unschedulable { .. })));
        assert!(matches!(half::options().num_cpus(-1.0).remote(ray, 1), Err(Error::InvalidArgument(_))));
        Ok(())
    }
}

#[test]
fn custom_and_fractional_resources() -> rustyray::Result<()> {
    let ray = rustyray::init_with(Config::new().num_cpus(1.0).num_gpus(0.0).resource("disk", 2.0))?;
    assert_eq!(ray.cluster_resources().get("disk"), 2.0);
    assert_eq!(ray.cluster_resources().get(GPU), 0.0);
    assert_eq!(ray.get(&needs_disk::remote(&ray)?)?, 2);
    // A half-CPU task leaves half a CPU while it runs.
    let inside = available_cpus_inside::options().num_cpus(0.5).remote(&ray)?;
    assert_eq!(ray.get(&inside)?, 0.5);
    let refs: Vec<_> = (0..20).map(|i| half::remote(&ray, i)).collect::<Result<_, _>>()?;
    assert_eq!(ray.get_many(&refs)?.iter().sum::<i64>(), 190);
    assert_eq!(ray.available_resources().get(CPU), 1.0);
    Ok(())
}

#[test]
fn default_config_uses_every_core() -> rustyray::Result<()> {
    let ray = rustyray::init()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(ray.cluster_resources().get(CPU), cores as f64);
    Ok(())
}

#[test]
fn force_cancel_of_a_running_sync_task() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let (started, started_ref) = common::latch(&ray);
    let r = spin_until_cancelled::remote(&ray, started)?;
    ray.get_timeout(&started_ref, LONG)?;
    ray.cancel_with(
        &r,
        CancelOptions {
            force: true,
            recursive: true,
        },
    )?;
    assert!(matches!(ray.get(&r), Err(Error::TaskCancelled(_))));
    Ok(())
}

#[rustyray::actor]
struct Sleeper {
    _unused: u8,
}

#[rustyray::actor]
impl Sleeper {
    fn new() -> Self {
        Sleeper { _unused: 0 }
    }

    async fn nap(&self, gate: ObjectRef<()>, started: ActorHandle<common::Latch>) -> u8 {
        started.open().expect("signal start");
        let _ = gate.await;
        1
    }

    async fn ping(&self) -> u8 {
        2
    }
}

#[test]
fn cancelling_a_running_async_actor_call() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let (_latch, gate) = common::latch(&ray);
    let (started, started_ref) = common::latch(&ray);
    let s = Sleeper::remote(&ray)?;
    let r = s.nap(gate, started)?;
    ray.get_timeout(&started_ref, LONG)?;
    ray.cancel(&r)?;
    assert!(matches!(ray.get(&r), Err(Error::TaskCancelled(_))));
    // The actor lives on.
    assert_eq!(ray.get_timeout(&s.ping()?, LONG)?, 2);
    Ok(())
}

#[rustyray::remote]
fn big(n: usize) -> Vec<u8> {
    vec![7; n]
}

#[test]
fn task_results_beyond_the_store_limit_are_object_store_full() -> rustyray::Result<()> {
    let ray = rustyray::init_with(
        Config::new()
            .num_cpus(1.0)
            .object_store_memory(10_000)
            .object_store_full_timeout(std::time::Duration::from_millis(20)),
    )?;
    let held = ray.get(&big::remote(&ray, 100)?)?;
    assert_eq!(held.len(), 100);
    let kept = big::remote(&ray, 6_000)?;
    ray.get(&kept)?;
    assert!(matches!(
        ray.get(&big::remote(&ray, 6_000)?),
        Err(Error::ObjectStoreFull { .. })
    ));
    drop(kept);
    assert_eq!(ray.get(&big::remote(&ray, 6_000)?)?.len(), 6_000);
    Ok(())
}
