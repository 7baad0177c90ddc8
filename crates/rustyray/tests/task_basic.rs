//! Remote functions: sync and async bodies, typed results, errors, panics,
//! options, mixed value/reference arguments and nested references.

mod common;
use common::both_modes;
use rustyray::prelude::*;
use rustyray::TaskFailure;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[rustyray::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[rustyray::remote]
async fn add_async(a: i64, b: i64) -> i64 {
    tokio::task::yield_now().await;
    a + b
}

#[derive(Debug)]
struct MyError(String);

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "my error: {}", self.0)
    }
}

#[rustyray::remote(max_retries = 0)]
fn checked_div(a: i64, b: i64) -> Result<i64, MyError> {
    if b == 0 {
        Err(MyError(format!("{a} / 0")))
    } else {
        Ok(a / b)
    }
}

#[rustyray::remote(max_retries = 0)]
fn boom(msg: String) -> i64 {
    panic!("{}", msg)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    x: f64,
    y: f64,
    tags: Vec<String>,
}

#[rustyray::remote]
fn shift(p: Point, dx: f64) -> Point {
    Point { x: p.x + dx, ..p }
}

#[rustyray::remote]
fn word_lengths(words: Vec<String>) -> HashMap<String, usize> {
    words.into_iter().map(|w| (w.clone(), w.len())).collect()
}

#[rustyray::remote]
fn unit() {}

#[rustyray::remote]
fn sum_refs(refs: Vec<ObjectRef<i64>>) -> i64 {
    let ray = rustyray::current().expect("inside a task");
    refs.iter()
        .map(|r| ray.get(r).expect("nested ref readable"))
        .sum()
}

#[rustyray::remote]
fn make_refs(n: i64) -> Vec<ObjectRef<i64>> {
    let ray = rustyray::current().expect("inside a task");
    (0..n).map(|i| ray.put(i).expect("put")).collect()
}

#[rustyray::remote]
fn thread_name() -> String {
    std::thread::current().name().unwrap_or("").to_owned()
}

both_modes! {
    fn sync_and_async_functions(ray) {
        let x = add::remote(ray, 1, 2)?;
        let y = add::remote(ray, &x, 10)?;
        assert_eq!(ray.get(&y)?, 13);
        let z = add_async::remote(ray, &y, x.clone())?;
        assert_eq!(ray.get(&z)?, 16);
        assert_eq!(ray.get(&x)?, 3);
        Ok(())
    }
}

both_modes! {
    fn rich_types(ray) {
        let p = Point { x: 1.0, y: 2.0, tags: vec!["a".into()] };
        let q = shift::remote(ray, p.clone(), 2.5)?;
        assert_eq!(ray.get(&q)?, Point { x: 3.5, ..p });
        let m = word_lengths::remote(ray, vec!["ab".to_string(), "xyz".to_string()])?;
        assert_eq!(ray.get(&m)?.get("xyz"), Some(&3));
        let u = unit::remote(ray)?;
        ray.get(&u)?;
        Ok(())
    }
}

both_modes! {
    fn err_return_is_a_task_error(ray) {
        assert_eq!(ray.get(&checked_div::remote(ray, 7, 2)?)?, 3);
        let bad = checked_div::remote(ray, 7, 0)?;
        match ray.get(&bad) {
            Err(Error::Task { function, failure, message, attempts, .. }) => {
                assert!(function.ends_with("checked_div"), "{function}");
                assert_eq!(failure, TaskFailure::Returned);
                assert_eq!(message, "my error: 7 / 0");
                assert_eq!(attempts, 1);
            }
            other => panic!("expected a task error, got {other:?}"),
        }
        Ok(())
    }
}

both_modes! {
    fn panic_is_a_task_error(ray) {
        let r = boom::remote(ray, "kaboom".to_string())?;
        match ray.get(&r) {
            Err(Error::Task { failure: TaskFailure::Panicked, message, .. }) => assert_eq!(message, "kaboom"),
            other => panic!("expected a panic error, got {other:?}"),
        }
        // The runtime is unharmed.
        assert_eq!(ray.get(&add::remote(ray, 1, 1)?)?, 2);
        Ok(())
    }
}

both_modes! {
    fn nested_refs_stay_references(ray) {
        let refs: Vec<ObjectRef<i64>> = (1..=4).map(|i| ray.put(i)).collect::<Result<_, _>>()?;
        let total = sum_refs::remote(ray, refs.clone())?;
        assert_eq!(ray.get(&total)?, 10);
        let made = make_refs::remote(ray, 5)?;
        let inner = ray.get(&made)?;
        assert_eq!(ray.get_many(&inner)?, vec![0, 1, 2, 3, 4]);
        Ok(())
    }
}

both_modes! {
    fn options_per_call(ray) {
        let r = add::options().num_cpus(0.5).max_retries(1).name("x").remote(ray, 2, 3)?;
        assert_eq!(ray.get(&r)?, 5);
        let r = add::options().num_cpus(0.0).remote(ray, 2, 3)?;
        assert_eq!(ray.get(&r)?, 5);
        Ok(())
    }
}

both_modes! {
    fn type_mismatch_is_an_error(ray) {
        let r = ray.put(5_i64)?;
        let wrong: ObjectRef<String> = r.raw().clone().typed();
        assert!(matches!(ray.get(&wrong), Err(Error::TypeMismatch { .. })), "{:?}", ray.get(&wrong));
        // The same object read with the right type still works.
        assert_eq!(ray.get(&r)?, 5);
        Ok(())
    }
}

#[test]
fn sync_code_runs_on_worker_threads_not_the_executor() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let name = ray.get(&thread_name::remote(&ray)?)?;
    assert_eq!(name, format!("{}-w", ray.thread_prefix()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refs_can_be_awaited() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let x = add::remote(&ray, 20, 22)?;
    assert_eq!((&x).await?, 42);
    assert_eq!(x.await?, 42);
    let ray2 = ray.clone();
    // Blocking calls belong off the async threads; shutdown joins threads.
    tokio::task::spawn_blocking(move || ray2.shutdown())
        .await
        .expect("join")?;
    Ok(())
}

#[test]
fn current_outside_a_task_is_an_error() {
    assert!(matches!(rustyray::current(), Err(Error::InvalidArgument(_))));
}

#[test]
fn registry_is_populated_and_resolves_names() -> rustyray::Result<()> {
    let ray = common::runtime(1.0, false);
    let reg = ray.registry();
    assert!(!reg.is_empty());
    assert!(reg.function(add::NAME).is_ok());
    assert!(add::NAME.ends_with("task_basic::add"), "{}", add::NAME);
    assert!(matches!(
        reg.function("no::such::fn"),
        Err(Error::UnknownFunction(_))
    ));
    Ok(())
}

/// A type whose `Serialize` panics: user code the runtime runs when it
/// stores a result.
#[derive(Debug, Deserialize)]
struct Explodes;

impl Serialize for Explodes {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("Serialize exploded")
    }
}

#[rustyray::remote(max_retries = 0)]
fn explode() -> Explodes {
    Explodes
}

both_modes! {
    fn a_panicking_serialize_fails_the_object(ray) {
        match ray.get_timeout(&explode::remote(ray)?, common::LONG) {
            Err(Error::Serialization(msg)) => assert!(msg.contains("Serialize exploded"), "{msg}"),
            other => panic!("expected a serialization error, got {other:?}"),
        }
        Ok(())
    }
}

both_modes! {
    fn huge_timeouts_do_not_overflow(ray) {
        let r = ray.put(1_u8)?;
        assert_eq!(ray.get_timeout(&r, std::time::Duration::MAX)?, 1);
        let (ready, _) = ray.wait(std::slice::from_ref(&r), 1, Some(std::time::Duration::MAX))?;
        assert_eq!(ready.len(), 1);
        assert_eq!(ray.get_many_timeout(&[r], std::time::Duration::MAX)?, vec![1]);
        Ok(())
    }
}

#[rustyray::remote]
async fn fib_blocking(n: u32) -> u64 {
    if n < 2 {
        return u64::from(n);
    }
    let ray = rustyray::current().expect("inside a task");
    let a = fib_blocking::remote(&ray, n - 1).expect("submit");
    let b = fib_blocking::remote(&ray, n - 2).expect("submit");
    // Blocking gets inside async code (`.await` is the better habit).
    ray.get(&a).expect("a") + ray.get(&b).expect("b")
}

#[test]
fn async_tasks_may_block_in_get() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    assert_eq!(
        ray.get_timeout(&fib_blocking::remote(&ray, 9)?, common::LONG)?,
        34
    );
    // The executor still serves other async work afterwards.
    assert_eq!(ray.get_timeout(&add_async::remote(&ray, 1, 1)?, common::LONG)?, 2);
    Ok(())
}
