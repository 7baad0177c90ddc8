//! Remote functions (tasks): the stateless half of Ray Core.
//!
//! The example shows
//!
//! * sync and async remote functions,
//! * arguments that mix plain values and `ObjectRef`s of earlier tasks,
//! * a small DAG (one input, two branches, one join) that is scheduled as
//!   its inputs become ready, without the driver waiting in between,
//! * a function returning `Result<T, MyError>` that fails, and the typed
//!   `rustyray::Error::Task { .. }` the caller gets, with the error's
//!   message (also through a task that depended on the failed one),
//! * per-call options (`num_cpus`, `max_retries`, `name`),
//! * `ray.wait` over a batch of tasks that finish at different times.
//!
//! Every result is checked; the example exits with an error if one is
//! wrong.
//!
//! Run it with `cargo run -p rustyray --example tasks`.

use rustyray::prelude::*;
use rustyray::TaskFailure;
use std::fmt;
use std::time::{Duration, Instant};

/// Adds two numbers (a sync task).
#[rustyray::remote]
pub fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Multiplies two numbers after a short pause (an async task: it waits
/// without holding a worker thread).
#[rustyray::remote]
pub async fn slow_mul(a: i64, b: i64, pause_ms: u64) -> i64 {
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    a * b
}

/// The numbers `0..n`: the DAG's input.
#[rustyray::remote]
pub fn range(n: i64) -> Vec<i64> {
    (0..n).collect()
}

/// The sum of the numbers.
#[rustyray::remote]
pub fn sum(xs: Vec<i64>) -> i64 {
    xs.iter().sum()
}

/// The sum of the squares of the numbers.
#[rustyray::remote(num_cpus = 1)]
pub fn sum_of_squares(xs: Vec<i64>) -> i64 {
    xs.iter().map(|x| x * x).sum()
}

/// The population variance from a count, a sum and a sum of squares.
#[rustyray::remote]
pub fn variance(n: i64, sum: i64, sum_sq: i64) -> f64 {
    let n = n as f64;
    let mean = sum as f64 / n;
    sum_sq as f64 / n - mean * mean
}

/// Why [`parse_port`] rejected its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortError {
    /// The text is not a number.
    NotANumber(String),
    /// The number does not fit in a port.
    OutOfRange(u64),
}

impl fmt::Display for PortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortError::NotANumber(s) => write!(f, "{s:?} is not a number"),
            PortError::OutOfRange(n) => write!(f, "port {n} is out of range (1..=65535)"),
        }
    }
}

impl std::error::Error for PortError {}

/// Parses a TCP port; fails with a [`PortError`].
#[rustyray::remote]
pub fn parse_port(text: String) -> Result<u16, PortError> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| PortError::NotANumber(text.clone()))?;
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PortError::OutOfRange(n)),
    }
}

/// The next port up (used to show a failure travelling along the DAG).
#[rustyray::remote]
pub fn next_port(port: u16) -> u16 {
    port.wrapping_add(1)
}

fn main() -> anyhow::Result<()> {
    let ray = rustyray::init()?;

    // Sync and async tasks; values and references mix freely.
    let x = add::remote(&ray, 1, 2)?; // ObjectRef<i64>
    let y = add::remote(&ray, &x, 10)?; // a reference and a value
    let z = slow_mul::remote(&ray, &y, x.clone(), 20)?; // two references, one value
    let z = ray.get(&z)?;
    println!(
        "add(1, 2) = {}, add(x, 10) = {}, slow_mul(y, x) = {z}",
        ray.get(&x)?,
        ray.get(&y)?
    );
    anyhow::ensure!(z == 13 * 3, "slow_mul(13, 3) gave {z}");

    // A DAG: range -> (sum, sum_of_squares) -> variance. Everything is
    // submitted at once; each task starts when its inputs exist.
    let n = 1_000;
    let xs = range::remote(&ray, n)?;
    let s = sum::remote(&ray, &xs)?;
    let sq = sum_of_squares::remote(&ray, &xs)?;
    let var = ray.get(&variance::remote(&ray, n, &s, &sq)?)?;
    let expected = (n * n - 1) as f64 / 12.0; // variance of 0..n
    println!("variance of 0..{n} = {var} (expected {expected})");
    anyhow::ensure!((var - expected).abs() < 1e-6, "variance {var} != {expected}");

    // A typed failure: the function's `Err` comes back as `Error::Task`
    // carrying the error's `Display`.
    let good = ray.get(&parse_port::remote(&ray, "8080".to_owned())?)?;
    anyhow::ensure!(good == 8080, "parse_port(8080) gave {good}");
    let bad = parse_port::remote(&ray, "70000".to_owned())?;
    match ray.get(&bad) {
        Err(Error::Task {
            function,
            failure: TaskFailure::Returned,
            message,
            attempts,
            ..
        }) => {
            println!("{function} failed after {attempts} attempt(s): {message}");
            anyhow::ensure!(
                message == PortError::OutOfRange(70_000).to_string(),
                "message was {message:?}"
            );
        }
        other => anyhow::bail!("expected a task error, got {other:?}"),
    }
    // A task whose argument failed fails too, with the original error as
    // its cause.
    match ray.get(&next_port::remote(&ray, &bad)?) {
        Err(
            e @ Error::Task {
                failure: TaskFailure::DependencyFailed,
                ..
            },
        ) => {
            println!("next_port(bad) failed because its argument did: {e}");
            let cause = std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default();
            anyhow::ensure!(cause.contains("out of range"), "unexpected cause {cause:?}");
        }
        other => anyhow::bail!("expected a dependency failure, got {other:?}"),
    }

    // Per-call options: resources, retries and a task name.
    let half = add::options()
        .num_cpus(0.5)
        .name("add-on-half-a-cpu")
        .remote(&ray, 20, 22)?;
    anyhow::ensure!(ray.get(&half)? == 42, "add with options gave a wrong answer");
    let named_failure = parse_port::options()
        .name("parse-port-from-config")
        .max_retries(0)
        .remote(&ray, "http".to_owned())?;
    let err = ray.get(&named_failure).expect_err("\"http\" is not a port");
    println!("with options: add = 42; named task error: {err}");
    if let Error::Task { message, .. } = &err {
        anyhow::ensure!(message == "\"http\" is not a number", "message was {message:?}");
    } else {
        anyhow::bail!("expected a task error, got {err:?}");
    }

    // ray.wait: take results as they come. Task i pauses (8 - i) * 30 ms;
    // each asks for a tenth of a CPU, so all eight run at once and the last
    // submitted finish first.
    let start = Instant::now();
    let batch = (0..8)
        .map(|i| {
            slow_mul::options()
                .num_cpus(0.1)
                .remote(&ray, i, i, (8 - i as u64) * 30)
        })
        .collect::<rustyray::Result<Vec<_>>>()?;
    let (ready, not_ready) = ray.wait(&batch, 3, Some(Duration::from_secs(10)))?;
    let first = ray.get_many(&ready)?;
    println!(
        "wait: first 3 ready after {:?}: {first:?}, {} still running",
        start.elapsed(),
        not_ready.len()
    );
    anyhow::ensure!(
        ready.len() == 3 && not_ready.len() == 5,
        "wait split {}/{}",
        ready.len(),
        not_ready.len()
    );
    let (rest, none_left) = ray.wait(&not_ready, not_ready.len(), None)?;
    anyhow::ensure!(
        none_left.is_empty(),
        "wait with no timeout left {} objects",
        none_left.len()
    );
    let total: i64 = first.iter().sum::<i64>() + ray.get_many(&rest)?.iter().sum::<i64>();
    let expected: i64 = (0..8).map(|i| i * i).sum();
    println!(
        "wait: all 8 done after {:?}, sum of squares = {total}",
        start.elapsed()
    );
    anyhow::ensure!(total == expected, "sum of squares {total} != {expected}");

    println!("ok");
    Ok(())
}
