//! Actors: construction, sync and async methods, ordering, concurrency,
//! handles passed around, names, kill, restarts and retries, `Self` in
//! method signatures and `#[rustyray(local)]` helpers.

mod common;
use common::{both_modes, LONG};
use rustyray::prelude::*;
use rustyray::ActorClass;
use serde::{Deserialize, Serialize};

#[rustyray::actor]
struct Counter {
    n: i64,
    log: Vec<i64>,
}

#[rustyray::actor]
impl Counter {
    fn new(start: i64) -> Self {
        Counter {
            n: start,
            log: Vec::new(),
        }
    }

    fn incr(&mut self, by: i64) -> i64 {
        self.n += by;
        self.log.push(by);
        self.n
    }

    async fn read(&self) -> i64 {
        self.n
    }

    fn log(&self) -> Vec<i64> {
        self.log.clone()
    }

    fn fail(&self) -> Result<i64, String> {
        Err(format!("refused at {}", self.n))
    }

    fn crash(&mut self) -> i64 {
        panic!("crash at {}", self.n)
    }
}

#[rustyray::remote]
fn bump(c: ActorHandle<Counter>, by: i64) -> i64 {
    let ray = rustyray::current().expect("inside a task");
    ray.get(&c.incr(by).expect("call")).expect("incr")
}

both_modes! {
    fn calls_run_in_submission_order(ray) {
        let c = Counter::remote(ray, 10)?;
        let refs: Vec<_> = (1..=50).map(|i| c.incr(i)).collect::<Result<_, _>>()?;
        let values = ray.get_many(&refs)?;
        let mut expect = 10;
        for (i, v) in values.iter().enumerate() {
            expect += i as i64 + 1;
            assert_eq!(*v, expect);
        }
        assert_eq!(ray.get(&c.log()?)?, (1..=50).collect::<Vec<_>>());
        assert_eq!(ray.get(&c.read()?)?, expect);
        Ok(())
    }
}

both_modes! {
    fn refs_as_method_arguments(ray) {
        let c = Counter::remote(ray, 0)?;
        let five = ray.put(5_i64)?;
        let r = c.incr(&five)?;
        let r2 = c.incr(&r)?; // 5 + 5
        assert_eq!(ray.get(&r2)?, 10);
        Ok(())
    }
}

both_modes! {
    fn handles_travel_to_tasks(ray) {
        let c = Counter::remote(ray, 0)?;
        let a = bump::remote(ray, c.clone(), 3)?;
        let b = bump::remote(ray, c.clone(), 4)?;
        ray.get(&a)?;
        ray.get(&b)?;
        assert_eq!(ray.get(&c.read()?)?, 7);
        Ok(())
    }
}

both_modes! {
    fn err_returns_do_not_kill_the_actor(ray) {
        let c = Counter::remote(ray, 1)?;
        assert!(matches!(ray.get(&c.fail()?), Err(Error::Task { .. })));
        assert_eq!(ray.get(&c.incr(1)?)?, 2);
        Ok(())
    }
}

both_modes! {
    fn named_actors(ray) {
        let c = Counter::options().name("counter").remote(ray, 100)?;
        let again: ActorHandle<Counter> = ray.get_actor("counter")?;
        assert_eq!(again.id(), c.id());
        ray.get(&again.incr(1)?)?;
        assert_eq!(ray.get(&c.read()?)?, 101);
        // Taken name.
        assert!(matches!(Counter::options().name("counter").remote(ray, 0), Err(Error::InvalidArgument(_))));
        // get_if_exists returns the existing actor.
        let same = Counter::options().name("counter").get_if_exists(true).remote(ray, 0)?;
        assert_eq!(same.id(), c.id());
        assert!(matches!(ray.get_actor::<Counter>("nobody"), Err(Error::ActorNotFound { .. })));
        // Wrong class.
        assert!(matches!(ray.get_actor::<Echo>("counter"), Err(Error::TypeMismatch { .. })));
        Ok(())
    }
}

both_modes! {
    fn kill_fails_later_calls(ray) {
        let c = Counter::remote(ray, 0)?;
        ray.get(&c.incr(1)?)?;
        ray.kill(&c)?;
        match ray.get(&c.incr(1)?) {
            Err(Error::ActorDied { class, .. }) => assert_eq!(class, Counter::entry().name),
            other => panic!("expected ActorDied, got {other:?}"),
        }
        Ok(())
    }
}

both_modes! {
    fn panic_without_restarts_kills_the_actor(ray) {
        let c = Counter::remote(ray, 7)?;
        match ray.get(&c.crash()?) {
            Err(Error::ActorDied { cause: Some(cause), .. }) => {
                assert!(cause.to_string().contains("crash at 7"), "{cause}");
            }
            other => panic!("expected ActorDied, got {other:?}"),
        }
        assert!(matches!(ray.get(&c.read()?), Err(Error::ActorDied { .. })));
        Ok(())
    }
}

both_modes! {
    fn max_restarts_reruns_the_constructor(ray) {
        let c = Counter::options().max_restarts(1).remote(ray, 7)?;
        ray.get(&c.incr(5)?)?;
        assert!(ray.get(&c.crash()?).is_err());
        // Restarted from the constructor's arguments.
        assert_eq!(ray.get(&c.read()?)?, 7);
        // The second crash exhausts the restarts.
        assert!(ray.get(&c.crash()?).is_err());
        assert!(matches!(ray.get(&c.read()?), Err(Error::ActorDied { .. })));
        Ok(())
    }
}

/// Counts attempts outside the actor, so restarts do not reset it.
#[rustyray::actor]
struct Tally {
    n: u32,
}

#[rustyray::actor]
impl Tally {
    fn new() -> Self {
        Tally { n: 0 }
    }

    fn next(&mut self) -> u32 {
        self.n += 1;
        self.n
    }
}

#[rustyray::actor]
struct Flaky {
    tally: ActorHandle<Tally>,
    fail_until: u32,
}

#[rustyray::actor]
impl Flaky {
    fn new(tally: ActorHandle<Tally>, fail_until: u32) -> Self {
        Flaky { tally, fail_until }
    }

    /// Panics (crashing the actor) until the tally reaches `fail_until`.
    fn work(&mut self) -> u32 {
        let ray = rustyray::current().expect("inside a call");
        let n = ray.get(&self.tally.next().expect("call")).expect("tally");
        if n < self.fail_until {
            panic!("attempt {n} fails");
        }
        n
    }
}

both_modes! {
    fn max_task_retries_retries_the_crashed_call(ray) {
        // The first attempt crashes the actor; it restarts and the retried
        // call succeeds on the new instance.
        let f = Flaky::options().max_restarts(1).max_task_retries(1).remote(ray, Tally::remote(ray)?, 2)?;
        assert_eq!(ray.get(&f.work()?)?, 2);
        assert_eq!(ray.get(&f.work()?)?, 3);
        // Without task retries the crashing call fails, the actor lives on.
        let f = Flaky::options().max_restarts(1).remote(ray, Tally::remote(ray)?, 2)?;
        assert!(matches!(ray.get(&f.work()?), Err(Error::ActorDied { .. })));
        assert_eq!(ray.get(&f.work()?)?, 2);
        // Retries beyond the restarts: the actor dies.
        let f = Flaky::options().max_restarts(1).max_task_retries(5).remote(ray, Tally::remote(ray)?, 10)?;
        assert!(matches!(ray.get(&f.work()?), Err(Error::ActorDied { .. })));
        assert!(matches!(ray.get(&f.work()?), Err(Error::ActorDied { .. })));
        Ok(())
    }
}

#[rustyray::actor]
struct Echo {
    gate_seen: u32,
}

#[rustyray::actor(max_concurrency = 4)]
impl Echo {
    fn new() -> Self {
        Echo { gate_seen: 0 }
    }

    /// Blocks until `gate` is ready: with max_concurrency 4, other calls
    /// run meanwhile.
    fn wait_for(&self, gate: ObjectRef<()>) -> u32 {
        let ray = rustyray::current().expect("inside a call");
        ray.get(&gate).expect("gate");
        1
    }

    fn ping(&self) -> u32 {
        self.gate_seen
    }
}

both_modes! {
    fn threaded_actor_runs_calls_concurrently(ray) {
        let (latch, gate) = common::latch(ray);
        let e = Echo::remote(ray)?;
        let blocked = e.wait_for(gate)?;
        // ping completes while wait_for still runs.
        assert_eq!(ray.get_timeout(&e.ping()?, LONG)?, 0);
        assert!(!blocked.is_ready());
        latch.open()?;
        assert_eq!(ray.get(&blocked)?, 1);
        Ok(())
    }
}

/// A threaded actor whose calls block on a plain `std` barrier, which the
/// runtime cannot see: only `max_concurrency` calls running at once let
/// them all pass.
#[rustyray::actor]
struct Meeting {
    barrier: std::sync::Barrier,
}

#[rustyray::actor(max_concurrency = 4)]
impl Meeting {
    fn new() -> Self {
        Meeting {
            barrier: std::sync::Barrier::new(4),
        }
    }

    fn meet(&self) -> bool {
        self.barrier.wait();
        true
    }
}

both_modes! {
    fn threaded_actor_reaches_its_concurrency_when_calls_block(ray) {
        let m = Meeting::remote(ray)?;
        let calls = (0..4).map(|_| m.meet()).collect::<rustyray::Result<Vec<_>>>()?;
        for c in &calls {
            assert!(ray.get_timeout(c, LONG)?);
        }
        Ok(())
    }
}

#[rustyray::actor]
struct AsyncBox {
    value: tokio::sync::Mutex<Option<i64>>,
    ready: tokio::sync::Notify,
}

#[rustyray::actor]
impl AsyncBox {
    fn new() -> Self {
        AsyncBox {
            value: tokio::sync::Mutex::new(None),
            ready: tokio::sync::Notify::new(),
        }
    }

    async fn take(&self) -> i64 {
        loop {
            let notified = self.ready.notified();
            if let Some(v) = *self.value.lock().await {
                return v;
            }
            notified.await;
        }
    }

    async fn give(&self, v: i64) {
        *self.value.lock().await = Some(v);
        self.ready.notify_waiters();
    }
}

both_modes! {
    fn async_actor_interleaves_at_awaits(ray) {
        let b = AsyncBox::remote(ray)?;
        // `take` is submitted first and waits; `give` runs while it waits.
        let t = b.take()?;
        let g = b.give(42)?;
        ray.get(&g)?;
        assert_eq!(ray.get_timeout(&t, LONG)?, 42);
        Ok(())
    }
}

#[rustyray::actor]
struct Failing;

#[rustyray::actor]
impl Failing {
    fn new(ok: bool) -> Result<Self, String> {
        if ok {
            Ok(Failing)
        } else {
            Err("no way".into())
        }
    }

    fn hi(&self) -> u8 {
        1
    }
}

both_modes! {
    fn constructor_errors_kill_the_actor(ray) {
        let good = Failing::remote(ray, true)?;
        assert_eq!(ray.get(&good.hi()?)?, 1);
        let bad = Failing::remote(ray, false)?;
        match ray.get(&bad.hi()?) {
            Err(Error::ActorDied { cause: Some(c), .. }) => assert!(c.to_string().contains("no way"), "{c}"),
            other => panic!("expected ActorDied, got {other:?}"),
        }
        Ok(())
    }
}

/// A serializable actor whose methods name its own type through `Self`,
/// with a plain `#[rustyray(local)]` helper that takes a `&str`.
#[rustyray::actor]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Tags {
    prefix: String,
    tags: Vec<String>,
}

#[rustyray::actor]
impl Tags {
    fn new(prefix: String) -> Self {
        Tags {
            prefix,
            tags: Vec::new(),
        }
    }

    fn add(&mut self, name: String) -> usize {
        let tag = self.tagged(&name);
        self.tags.push(tag);
        self.tags.len()
    }

    /// The stub returns an `ObjectRef<Tags>`.
    fn snapshot(&self) -> Self {
        self.clone()
    }

    /// Takes `Self`, alone and nested, and returns it nested.
    fn merge(&mut self, other: Self, more: Vec<Self>) -> Option<Self> {
        if other.prefix != self.prefix {
            return None;
        }
        let before = self.clone();
        self.tags.extend(other.tags);
        self.tags.extend(more.into_iter().flat_map(|t| t.tags));
        Some(before)
    }

    /// One actor state per tag; an error when there are none.
    fn split(&self) -> Result<Vec<Self>, String> {
        if self.tags.is_empty() {
            return Err(format!("no tags under {}", self.prefix));
        }
        Ok(self
            .tags
            .iter()
            .map(|t| Tags {
                prefix: self.prefix.clone(),
                tags: vec![t.clone()],
            })
            .collect())
    }

    /// A plain method: a `&str` parameter would be refused on a remote one.
    #[rustyray(local)]
    fn tagged(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }
}

both_modes! {
    fn self_in_signatures_and_local_helpers(ray) {
        let t = Tags::remote(ray, "a".to_string())?;
        assert!(matches!(ray.get(&t.split()?), Err(Error::Task { .. })));
        assert_eq!(ray.get(&t.add("x".to_string())?)?, 1);
        let snap: ObjectRef<Tags> = t.snapshot()?;
        let a = ray.get(&snap)?;
        assert_eq!(a, Tags { prefix: "a".into(), tags: vec!["a:x".into()] });
        // The local helper stays an ordinary method.
        assert_eq!(a.tagged("y"), "a:y");

        let u = Tags::remote(ray, "a".to_string())?;
        ray.get(&u.add("y".to_string())?)?;
        // `Self` arguments accept refs (another actor's snapshot) and values.
        let before: ObjectRef<Option<Tags>> = t.merge(&u.snapshot()?, vec![a.clone(), a.clone()])?;
        assert_eq!(ray.get(&before)?, Some(a.clone()));
        let other = Tags::new("b".into());
        assert_eq!(ray.get(&t.merge(other, Vec::new())?)?, None);
        let parts: ObjectRef<Vec<Tags>> = t.split()?;
        let tags: Vec<_> = ray.get(&parts)?.into_iter().flat_map(|p| p.tags).collect();
        assert_eq!(tags, ["a:x", "a:y", "a:x", "a:x"]);
        Ok(())
    }
}

#[test]
fn actor_ends_when_its_last_handle_goes() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let c = Counter::options().name("scoped").remote(&ray, 0)?;
    let last = c.incr(1)?;
    drop(c);
    // Queued calls still finish.
    assert_eq!(ray.get(&last)?, 1);
    // Then the actor goes, and its name with it.
    common::wait_until("actor never ended", || match ray.get_actor::<Counter>("scoped") {
        Err(Error::ActorNotFound { .. }) => true,
        Ok(_) => false,
        Err(e) => panic!("unexpected error: {e}"),
    });
    Ok(())
}

#[test]
fn actor_with_cpus_holds_them_for_its_lifetime() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let c = Counter::options().num_cpus(1.5).remote(&ray, 0)?;
    ray.get(&c.incr(1)?)?;
    assert_eq!(ray.available_resources().get(rustyray::CPU), 0.5);
    ray.kill(&c)?;
    assert_eq!(ray.available_resources().get(rustyray::CPU), 2.0);
    // Default actors hold no CPU once placed; num_cpus = 0 actors need none.
    let d = Counter::remote(&ray, 0)?;
    let z = Counter::options().num_cpus(0.0).remote(&ray, 0)?;
    ray.get(&d.incr(1)?)?;
    ray.get(&z.incr(1)?)?;
    assert_eq!(ray.available_resources().get(rustyray::CPU), 2.0);
    Ok(())
}

#[rustyray::actor]
struct Gatekeeper;

#[rustyray::actor]
impl Gatekeeper {
    fn new() -> Self {
        Gatekeeper
    }

    /// Runs once `gate` is ready (a resolved argument).
    fn after(&self, _gate: ()) -> u8 {
        1
    }

    fn ping(&self) -> u8 {
        2
    }
}

both_modes! {
    fn a_cancelled_queued_call_does_not_hold_up_the_next(ray) {
        let (_latch, gate) = common::latch(ray);
        let g = Gatekeeper::remote(ray)?;
        let stuck = g.after(&gate)?;
        ray.cancel(&stuck)?;
        assert!(matches!(ray.get(&stuck), Err(Error::TaskCancelled(_))));
        // The gate never opens, yet the next call runs.
        assert_eq!(ray.get_timeout(&g.ping()?, LONG)?, 2);
        Ok(())
    }
}

both_modes! {
    fn calls_during_a_restart_wait_for_it(ray) {
        let c = Counter::options().max_restarts(5).max_concurrency(4).remote(ray, 3)?;
        for _ in 0..5 {
            ray.get(&c.incr(1)?)?;
            ray.kill_raw(c.raw(), false)?;
            // Submitted while the restart may still run: queued, not failed.
            assert_eq!(ray.get_timeout(&c.read()?, LONG)?, 3);
        }
        Ok(())
    }
}

both_modes! {
    fn handles_of_dead_actors_still_decode(ray) {
        let c = Counter::remote(ray, 0)?;
        let boxed = ray.put(vec![c.clone()])?;
        ray.kill(&c)?;
        drop(c);
        let handles = ray.get(&boxed)?;
        assert!(matches!(ray.get(&handles[0].incr(1)?), Err(Error::ActorDied { .. })));
        Ok(())
    }
}

both_modes! {
    fn detached_actors_outlive_their_handles(ray) {
        let c = Counter::options().name("kept").detached(true).remote(ray, 9)?;
        drop(c);
        let again: ActorHandle<Counter> = ray.get_actor("kept")?;
        assert_eq!(ray.get(&again.incr(1)?)?, 10);
        Ok(())
    }
}

/// Holds handles to itself or to other actors in its state.
#[rustyray::actor]
struct Holder {
    held: Vec<ActorHandle<Holder>>,
}

#[rustyray::actor]
impl Holder {
    fn new() -> Self {
        Holder { held: Vec::new() }
    }

    fn hold(&mut self, h: ActorHandle<Holder>) -> usize {
        self.held.push(h);
        self.held.len()
    }
}

#[test]
fn actors_holding_their_own_or_each_others_handles_shut_down() -> rustyray::Result<()> {
    for bytes in [false, true] {
        let ray = common::runtime(2.0, bytes);
        let prefix = ray.thread_prefix().to_owned();
        let me = Holder::remote(&ray)?;
        ray.get(&me.hold(me.clone())?)?;
        let (a, b) = (Holder::remote(&ray)?, Holder::remote(&ray)?);
        ray.get(&a.hold(b.clone())?)?;
        ray.get(&b.hold(a.clone())?)?;
        drop((me, a, b));
        ray.shutdown()?;
        // A shutdown that began on one of the runtime's own threads (the
        // last handle dropped there) stops its executor in the background:
        // its threads end just after.
        common::wait_until("the runtime's threads are gone", || {
            common::threads_named(&prefix) == 0
        });
    }
    Ok(())
}

#[rustyray::actor]
struct Acc {
    total: i64,
}

#[rustyray::actor]
impl Acc {
    fn new() -> Self {
        Acc { total: 0 }
    }

    fn add(&mut self, x: i64) {
        self.total += x;
    }

    fn total(&self) -> i64 {
        self.total
    }
}

#[rustyray::actor]
struct AsyncAcc {
    total: i64,
}

#[rustyray::actor]
impl AsyncAcc {
    fn new() -> Self {
        AsyncAcc { total: 0 }
    }

    async fn add(&mut self, x: i64) {
        self.total += x;
    }

    async fn total(&self) -> i64 {
        self.total
    }
}

#[rustyray::remote]
fn five_after(_gate: ()) -> i64 {
    5
}

both_modes! {
    fn fire_and_forget_calls_wait_for_their_arguments(ray) {
        let (latch, gate) = common::latch(ray);
        let slow = five_after::remote(ray, &gate)?;
        let acc = Acc::remote(ray)?;
        let aacc = AsyncAcc::remote(ray)?;
        // The result refs are dropped at once: the calls must still run,
        // after their argument is ready.
        drop(acc.add(&slow)?);
        drop(aacc.add(&slow)?);
        latch.open()?;
        assert_eq!(ray.get_timeout(&acc.total()?, LONG)?, 5);
        assert_eq!(ray.get_timeout(&aacc.total()?, LONG)?, 5);
        Ok(())
    }
}
