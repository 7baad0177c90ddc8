//! Worker processes: the same program, with tasks and actors running in
//! processes of their own, as in Ray.
//!
//! The example shows
//!
//! * `#[rustyray::main]`, which turns this executable into its own worker
//!   when the node daemon starts it again,
//! * tasks running in worker processes (their process ids differ from the
//!   driver's),
//! * a crash (`std::process::abort`) that fails only its task, with the
//!   typed `Error::WorkerCrashed`,
//! * a large `Blob` written once into the node's shared memory and read in
//!   place by a worker,
//! * an actor in a process of its own, keeping its state across calls.
//!
//! Every result is checked; the example exits with an error if one is
//! wrong.
//!
//! Run it with `cargo run -p rustyray --example processes`.

use rustyray::prelude::*;
use rustyray::Blob;

/// The process a task runs in.
#[rustyray::remote]
fn whoami() -> u32 {
    std::process::id()
}

/// Crashes its worker process.
#[rustyray::remote]
fn crash() -> u32 {
    std::process::abort()
}

/// Sums bytes read in place from shared memory; says whether they were.
#[rustyray::remote]
fn sum_in_place(b: Blob) -> (bool, u64) {
    (b.is_shared(), b.iter().map(|&x| u64::from(x)).sum())
}

/// A counter living in its own worker process.
#[rustyray::actor]
struct Counter {
    n: u64,
}

#[rustyray::actor]
impl Counter {
    fn new() -> Self {
        Counter { n: 0 }
    }

    fn add(&mut self, by: u64) -> (u32, u64) {
        self.n += by;
        (std::process::id(), self.n)
    }
}

#[rustyray::main]
fn main() -> anyhow::Result<()> {
    let ray = rustyray::init_with(Config::new().num_cpus(2.0).worker_mode(WorkerMode::Processes))?;
    let driver = std::process::id();

    let pids = ray.get_many(
        &(0..4)
            .map(|_| whoami::remote(&ray))
            .collect::<Result<Vec<_>, _>>()?,
    )?;
    anyhow::ensure!(pids.iter().all(|&p| p != driver), "a task ran in the driver");
    println!("4 tasks ran in worker processes {pids:?} (driver {driver})");

    match ray.get(&crash::options().max_retries(0).remote(&ray)?) {
        Err(Error::WorkerCrashed { reason, .. }) => println!("a crashing task failed alone: {reason}"),
        other => anyhow::bail!("expected WorkerCrashed, got {other:?}"),
    }

    let blob = ray.put(Blob::from(vec![1_u8; 4 << 20]))?;
    let (in_place, sum) = ray.get(&sum_in_place::remote(&ray, &blob)?)?;
    anyhow::ensure!(in_place && sum == 4 << 20, "blob read wrongly: {in_place} {sum}");
    println!("a worker summed a 4 MiB blob in place from shared memory: {sum}");

    let c = Counter::remote(&ray)?;
    c.add(1)?;
    let (pid, n) = ray.get(&c.add(41)?)?;
    anyhow::ensure!(n == 42 && pid != driver, "counter: {pid} {n}");
    println!("the counter actor in process {pid} counted to {n}");
    Ok(())
}
