//! Actors: a stateful `Counter` shared by the driver and by remote tasks.
//!
//! The example shows
//!
//! * an actor with a sync `&mut self` method (`incr`) and an async `&self`
//!   read method (`value`),
//! * several calls from the driver, whose results come back as
//!   `ObjectRef`s,
//! * an `ActorHandle` passed as an argument to remote tasks, which call the
//!   actor themselves,
//! * a named actor, found again with `ray.get_actor::<Counter>("name")`.
//!
//! It checks the final count and exits with an error if it is wrong.
//!
//! Run it with `cargo run -p rustyray --example counter`.

use rustyray::prelude::*;

/// A counter that lives in an actor: its state survives between calls.
#[rustyray::actor]
#[derive(Debug)]
pub struct Counter {
    value: i64,
    increments: u64,
}

#[rustyray::actor]
impl Counter {
    /// Creates a counter starting at `start`.
    pub fn new(start: i64) -> Self {
        Counter {
            value: start,
            increments: 0,
        }
    }

    /// Adds `by` and returns the new value. Takes the actor alone.
    pub fn incr(&mut self, by: i64) -> i64 {
        self.value += by;
        self.increments += 1;
        self.value
    }

    /// Reads the value. Shares the actor with other readers.
    pub async fn value(&self) -> i64 {
        self.value
    }

    /// How many times `incr` ran.
    pub fn increments(&self) -> u64 {
        self.increments
    }
}

/// A task that calls the actor it is handed `times` times, adding `by`
/// each time, and returns the value it saw last.
#[rustyray::remote]
pub fn bump(counter: ActorHandle<Counter>, times: u32, by: i64) -> rustyray::Result<i64> {
    // Inside a task, `current()` is the runtime running it.
    let ray = rustyray::current()?;
    let mut last = 0;
    for _ in 0..times {
        last = ray.get(&counter.incr(by)?)?;
    }
    Ok(last)
}

/// A task that looks the named counter up by itself and adds `by` once.
#[rustyray::remote]
pub async fn bump_by_name(name: String, by: i64) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    let counter = ray.get_actor::<Counter>(&name)?;
    counter.incr(by)?.await
}

fn main() -> anyhow::Result<()> {
    let ray = rustyray::init()?;

    // A plain actor, driven from main. `Counter` has an async method, so it
    // is an async actor whose `&self` calls may run concurrently; each
    // `&mut self` call takes the actor alone, and the runtime hands the
    // actor to calls in the order they were submitted.
    let counter = Counter::remote(&ray, 10)?;
    let refs = (1..=5)
        .map(|i| counter.incr(i))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let seen = ray.get_many(&refs)?;
    println!("driver increments returned {seen:?}");
    anyhow::ensure!(seen == [11, 13, 16, 20, 25], "calls ran out of order: {seen:?}");
    // 10 + 1 + 2 + 3 + 4 + 5
    let after_driver = ray.get(&counter.value()?)?;
    println!("value after the driver's increments: {after_driver}");
    anyhow::ensure!(
        after_driver == 25,
        "expected 25 after the driver's increments, got {after_driver}"
    );

    // The handle travels to tasks, which call the actor concurrently.
    let tasks = (0..4)
        .map(|_| bump::remote(&ray, counter.clone(), 10, 2))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let last_seen = ray.get_many(&tasks)?;
    println!("tasks saw as their last value {last_seen:?}");
    let after_tasks = ray.get(&counter.value()?)?;
    let calls = ray.get(&counter.increments()?)?;
    println!("value after 4 tasks x 10 increments of 2: {after_tasks} ({calls} increments in all)");
    anyhow::ensure!(
        after_tasks == 25 + 4 * 10 * 2,
        "expected 105 after the tasks, got {after_tasks}"
    );
    anyhow::ensure!(calls == 5 + 40, "expected 45 increments, got {calls}");

    // A named actor, created once and found by name from the driver and
    // from tasks. With `max_concurrency(1)` it runs one call at a time.
    let name = "global-counter";
    let named = Counter::options().name(name).max_concurrency(1).remote(&ray, 0)?;
    let first = named.incr(100)?;
    let found = ray.get_actor::<Counter>(name)?;
    anyhow::ensure!(found.id() == named.id(), "get_actor returned another actor");
    let second = found.incr(1)?;
    let in_order = ray.get_many(&[first, second])?;
    println!("named actor: incr(100), then incr(1) through the looked-up handle returned {in_order:?}");
    anyhow::ensure!(in_order == [100, 101], "calls ran out of order: {in_order:?}");
    let by_name = (0..3)
        .map(|_| bump_by_name::remote(&ray, name.to_owned(), 7))
        .collect::<rustyray::Result<Vec<_>>>()?;
    ray.get_many(&by_name)?;
    let named_value = ray.get(&named.value()?)?;
    println!("named actor {name:?} ({:?}) holds {named_value}", found.id());
    anyhow::ensure!(
        named_value == 100 + 1 + 3 * 7,
        "expected 122 in the named actor, got {named_value}"
    );

    // Unknown names fail with a typed error.
    match ray.get_actor::<Counter>("no-such-counter") {
        Err(rustyray::Error::ActorNotFound { name }) => println!("looking up {name:?} fails as expected"),
        other => anyhow::bail!("expected ActorNotFound, got {other:?}"),
    }

    println!("ok: counter = {after_tasks}, named counter = {named_value}");
    Ok(())
}
