//! Tasks in worker processes: the test binary itself is the worker (its
//! `rustyray_worker` entry), as a user's program is. Results and
//! errors, crashes and retries, cancels, and tasks submitted inside
//! workers.

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

#[rustyray::remote]
async fn add_async(a: i64, b: i64) -> i64 {
    a + b
}

#[rustyray::remote]
fn concat(parts: Vec<String>, sep: String) -> String {
    parts.join(&sep)
}

#[rustyray::remote]
fn refuse(n: i64) -> Result<i64, String> {
    Err(format!("no {n}"))
}

#[rustyray::remote]
fn explode() -> i64 {
    panic!("explode ran")
}

#[rustyray::remote]
fn abort_now() -> i64 {
    std::process::abort()
}

/// Aborts the process on its first run (leaving its pid in `dir`), and
/// returns its pid on the next.
#[rustyray::remote]
fn abort_once(dir: String) -> u32 {
    let marker = Path::new(&dir).join("crashed");
    if !marker.exists() && std::fs::write(&marker, std::process::id().to_string()).is_ok() {
        std::process::abort();
    }
    std::process::id()
}

#[test]
fn tasks_run_in_worker_processes() -> rustyray::Result<()> {
    let ray = process_runtime();
    let pid = ray.get_timeout(&whoami::remote(&ray)?, LONG)?;
    assert_ne!(pid, std::process::id(), "the task ran in the driver");
    assert!(
        ray.worker_pids().contains(&pid),
        "{pid} is not one of the node's workers"
    );
    // Values and references mix; sync and async functions; many tasks
    // reuse the pool's processes.
    let x = add::remote(&ray, 1, 2)?;
    let y = add_async::remote(&ray, &x, 10)?;
    assert_eq!(ray.get_timeout(&y, LONG)?, 13);
    let refs = (0..50)
        .map(|i| add::remote(&ray, i, i))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let sums = ray.get_many_timeout(&refs, LONG)?;
    assert_eq!(sums, (0..50).map(|i| 2 * i).collect::<Vec<_>>());
    let words = ray.put(vec!["a".to_owned(), "b".to_owned()])?;
    assert_eq!(
        ray.get_timeout(&concat::remote(&ray, &words, "-".to_owned())?, LONG)?,
        "a-b"
    );
    assert!(ray.worker_pids().len() <= 4, "{:?}", ray.worker_pids());
    Ok(())
}

#[test]
fn errors_and_panics_come_back_typed() -> rustyray::Result<()> {
    let ray = process_runtime();
    match ray.get_timeout(&refuse::remote(&ray, 7)?, LONG) {
        Err(Error::Task { failure, message, .. }) => {
            assert_eq!(failure, rustyray::TaskFailure::Returned);
            assert_eq!(message, "no 7");
        }
        other => panic!("expected a task error, got {other:?}"),
    }
    match ray.get_timeout(&explode::options().max_retries(1).remote(&ray)?, LONG) {
        Err(Error::Task {
            failure,
            message,
            attempts,
            ..
        }) => {
            assert_eq!(failure, rustyray::TaskFailure::Panicked);
            assert!(message.contains("explode ran"), "{message}");
            assert_eq!(attempts, 2);
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    // The pool still serves.
    assert_eq!(ray.get_timeout(&add::remote(&ray, 2, 2)?, LONG)?, 4);
    Ok(())
}

#[test]
fn a_worker_that_aborts_fails_only_its_task() -> rustyray::Result<()> {
    let ray = process_runtime();
    match ray.get_timeout(&abort_now::options().max_retries(0).remote(&ray)?, LONG) {
        Err(Error::WorkerCrashed { .. }) => {}
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    // Retried on a fresh worker: the first attempt's process is gone.
    let dir = scratch("abort-once");
    let pid = ray.get_timeout(
        &abort_once::options()
            .max_retries(1)
            .remote(&ray, dir.display().to_string())?,
        LONG,
    )?;
    let crashed: u32 = std::fs::read_to_string(dir.join("crashed"))
        .expect("marker")
        .trim()
        .parse()
        .expect("pid");
    assert_ne!(pid, crashed);
    wait_until("the crashed worker is reaped", || gone(crashed));
    assert_eq!(ray.get_timeout(&add::remote(&ray, 5, 5)?, LONG)?, 10);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn a_killed_worker_is_a_crash() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("sigkill");
    let r = park_forever::options()
        .max_retries(0)
        .remote(&ray, dir.display().to_string())?;
    let pid = read_pid(&dir);
    kill9(pid);
    match ray.get_timeout(&r, LONG) {
        Err(Error::WorkerCrashed { reason, .. }) => assert!(reason.contains(&pid.to_string()), "{reason}"),
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn cancel_flags_the_task_and_force_kills_its_worker() -> rustyray::Result<()> {
    let ray = process_runtime();
    // A plain cancel reaches the running task's flag in its process.
    let dir = scratch("cancel");
    let r = park_forever::remote(&ray, dir.display().to_string())?;
    let pid = read_pid(&dir);
    ray.cancel(&r)?;
    assert!(matches!(ray.get_timeout(&r, LONG), Err(Error::TaskCancelled(_))));
    assert!(!gone(pid), "a plain cancel must not kill the worker");
    // A forced cancel kills the process.
    let dir = scratch("force");
    let r = park_forever::remote(&ray, dir.display().to_string())?;
    let pid = read_pid(&dir);
    ray.cancel_with(
        &r,
        rustyray::CancelOptions {
            force: true,
            ..Default::default()
        },
    )?;
    assert!(matches!(ray.get_timeout(&r, LONG), Err(Error::TaskCancelled(_))));
    wait_until("the forced worker is gone", || gone(pid));
    assert_eq!(ray.get_timeout(&add::remote(&ray, 1, 1)?, LONG)?, 2);
    Ok(())
}

// ----- edge cases found in review ------------------------------------------

#[test]
fn forced_cancels_of_queued_and_running_tasks_free_the_workers() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dirs: Vec<_> = (0..4).map(|i| scratch(&format!("force-many-{i}"))).collect();
    let refs = dirs
        .iter()
        .map(|d| {
            park_forever::options()
                .max_retries(0)
                .remote(&ray, d.display().to_string())
        })
        .collect::<rustyray::Result<Vec<_>>>()?;
    for r in &refs {
        ray.cancel_with(
            r,
            rustyray::CancelOptions {
                force: true,
                ..Default::default()
            },
        )?;
    }
    for r in &refs {
        assert!(matches!(ray.get_timeout(r, LONG), Err(Error::TaskCancelled(_))));
    }
    // Both CPUs are free again.
    let sums = (0..4)
        .map(|i| add::remote(&ray, i, 1))
        .collect::<rustyray::Result<Vec<_>>>()?;
    assert_eq!(ray.get_many_timeout(&sums, LONG)?, vec![1, 2, 3, 4]);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

// ----- nested tasks --------------------------------------------------------

/// Fibonacci by nested tasks: every level blocks on its children.
#[rustyray::remote]
fn fib(n: u64) -> rustyray::Result<u64> {
    if n < 2 {
        return Ok(n);
    }
    let ray = rustyray::current()?;
    let a = fib::remote(&ray, n - 1)?;
    let b = fib::remote(&ray, n - 2)?;
    Ok(ray.get(&a)? + ray.get(&b)?)
}

/// Submits a task and returns the reference to its result.
#[rustyray::remote]
fn submit_and_return(x: i64) -> rustyray::Result<ObjectRef<i64>> {
    let ray = rustyray::current()?;
    add::remote(&ray, x, 1)
}

#[test]
fn tasks_submitted_in_workers_run_in_worker_processes_without_deadlock() -> rustyray::Result<()> {
    let ray = process_runtime();
    // Two CPUs, and every level waits for its children: the CPUs of
    // blocked tasks are lent to their children, as in the threads mode.
    assert_eq!(ray.get_timeout(&fib::remote(&ray, 7)?, LONG)?, 13);
    // A reference to a nested task's result leaves the worker.
    let inner = ray.get_timeout(&submit_and_return::remote(&ray, 41)?, LONG)?;
    assert_eq!(ray.get_timeout(&inner, LONG)?, 42);
    Ok(())
}

#[test]
fn a_tree_of_nested_tasks_needs_worker_processes_by_its_depth_not_its_size() -> rustyray::Result<()> {
    let ray = process_runtime();
    // fib(12) is 465 tasks, each blocking on its two children: a child
    // still queued when its parent blocks runs in the parent's process (it
    // once took a process for each blocked task, 169 for fib(12)).
    assert_eq!(ray.get_timeout(&fib::remote(&ray, 12)?, LONG)?, 144);
    let workers = ray.worker_pids().len();
    assert!(workers <= 40, "fib(12) used {workers} worker processes");
    Ok(())
}

/// Writes this process's pid to `dir/name`.
fn mark(dir: &str, name: &str) -> rustyray::Result<()> {
    std::fs::write(Path::new(dir).join(name), std::process::id().to_string())
        .map_err(|e| Error::InvalidArgument(format!("cannot write a marker: {e}")))
}

/// Waits for `gate`, marking `dir/child` when it starts and `dir/done`
/// when it is through.
#[rustyray::remote(max_retries = 0)]
fn child_after_gate(gate: ObjectRef<()>, dir: String) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    mark(&dir, "child")?;
    ray.get(&gate)?;
    mark(&dir, "done")?;
    Ok(std::process::id())
}

/// Submits `child_after_gate` and waits for it (marking `dir/parent`).
#[rustyray::remote(max_retries = 0)]
fn parent_of_gated_child(gate: ObjectRef<()>, dir: String) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    let child = child_after_gate::remote(&ray, gate, dir.clone())?;
    mark(&dir, "parent")?;
    ray.get(&child)
}

#[test]
fn a_forced_cancel_ends_the_parents_process_and_the_children_it_owns() -> rustyray::Result<()> {
    // One CPU: the child stays queued in its parent's process (which owns
    // it) until the parent blocks on it, and then runs there.
    let ray = process::TestRay(rustyray::init_with(process::process_config().num_cpus(1.0))?);
    let (_latch, gate) = common::latch(&ray);
    let dir = scratch("shared-cancel");
    let d = dir.display().to_string();
    let parent = parent_of_gated_child::remote(&ray, gate, d)?;
    let pid_in = |name: &str| {
        let file = dir.join(name);
        let read = || std::fs::read_to_string(&file).ok()?.trim().parse::<u32>().ok();
        wait_until(&format!("the task wrote {name}"), || read().is_some());
        read()
    };
    let pid = pid_in("parent");
    assert_eq!(pid_in("child"), pid, "the child runs in its parent's process");
    // A forced cancel kills the parent's process; the child, owned by that
    // process, shares its fate (as in Ray, where a dead owner's tasks go
    // with it). The driver is unharmed.
    ray.cancel_with(
        &parent,
        rustyray::CancelOptions {
            force: true,
            recursive: false,
        },
    )?;
    assert!(matches!(
        ray.get_timeout(&parent, LONG),
        Err(Error::TaskCancelled(_))
    ));
    let pid = pid.unwrap_or_default();
    wait_until("the parent's process is gone", || {
        !ray.worker_pids().contains(&pid)
    });
    assert!(!dir.join("done").exists(), "the child went with its owner");
    assert_eq!(ray.get_timeout(&add::remote(&ray, 1, 2)?, LONG)?, 3);
    Ok(())
}
