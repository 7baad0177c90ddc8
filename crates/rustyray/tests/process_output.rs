//! Worker output: each worker process's stdout and stderr kept in log
//! files, and echoed to the driver with the process's prefix.

mod common;
#[path = "common/process.rs"]
mod process;
use common::LONG;
use process::{process_config, scratch};
use rustyray::prelude::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

// ----- worker output -----------------------------------------------------

#[rustyray::remote]
fn say(out: String, err: String) -> u32 {
    println!("{out}");
    eprintln!("{err}");
    std::process::id()
}

#[rustyray::actor]
struct Greeter;

#[rustyray::actor]
impl Greeter {
    fn new() -> Self {
        println!("a greeter is born");
        Greeter
    }

    fn greet(&self, line: String) -> u32 {
        println!("{line}");
        std::process::id()
    }
}

/// A process runtime whose workers' output goes to `dir` only.
fn quiet_runtime(dir: &Path) -> Ray {
    rustyray::init_with(process_config().log_dir(dir).log_to_driver(false)).expect("runtime")
}

#[test]
fn worker_output_is_kept_in_one_log_file_per_stream_and_process() -> rustyray::Result<()> {
    let dir = scratch("logs");
    let ray = quiet_runtime(&dir);
    assert_eq!(ray.log_dir(), Some(&*dir));
    let pid = ray.get_timeout(
        &say::remote(
            &ray,
            "to stdout from a task".to_owned(),
            "to stderr from a task".to_owned(),
        )?,
        LONG,
    )?;
    let g = Greeter::remote(&ray)?;
    let actor_pid = ray.get_timeout(&g.greet("from an actor".to_owned())?, LONG)?;
    // Shutdown waits for the stopped workers' last lines.
    ray.shutdown()?;
    let read =
        |name: String| std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let out = read(format!("worker-{pid}.out"));
    let err = read(format!("worker-{pid}.err"));
    assert!(out.lines().any(|l| l.ends_with("to stdout from a task")), "{out}");
    assert!(!out.contains("to stderr"), "{out}");
    assert!(err.lines().any(|l| l.ends_with("to stderr from a task")), "{err}");
    let actor_out = read(format!("worker-{actor_pid}.out"));
    assert!(
        actor_out.lines().any(|l| l.ends_with("from an actor")),
        "{actor_out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A driver in its own process for `worker_output_reaches_the_driver_prefixed`:
/// its workers print, it reports their pids and shuts down.
#[test]
#[ignore = "driver process started by worker_output_reaches_the_driver_prefixed"]
fn printing_driver() {
    let Some(dir) = std::env::var_os("RR_PRINTING_DRIVER") else {
        return;
    };
    let ray = rustyray::init_with(process_config().log_dir(PathBuf::from(dir))).expect("runtime");
    let submitted = say::remote(
        &ray,
        "hello from a task".to_owned(),
        "warning from a task".to_owned(),
    );
    let pid = ray.get_timeout(&submitted.expect("submit"), LONG).expect("task");
    let g = Greeter::remote(&ray).expect("actor");
    let actor_pid = ray
        .get_timeout(&g.greet("hello from an actor".to_owned()).expect("call"), LONG)
        .expect("call");
    ray.shutdown().expect("shutdown");
    println!("TASK_PID {pid}");
    println!("ACTOR_PID {actor_pid}");
}

#[test]
fn worker_output_reaches_the_driver_prefixed() {
    let dir = scratch("echo");
    let exe = std::env::current_exe().expect("test binary path");
    let driver = Command::new(exe)
        .args([
            "printing_driver",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RR_PRINTING_DRIVER", &*dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the driver");
    // Waited for on another thread, so a hung driver fails the test (and
    // is killed) instead of hanging it.
    let pid = driver.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(driver.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(LONG) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the driver did not finish within {LONG:?}");
    };
    let output = output.expect("the driver's output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let pid_after = |key: &str| -> u32 {
        stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, pid)| pid.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {key} in {stdout}"))
            .parse()
            .expect("a pid")
    };
    let (pid, actor_pid) = (pid_after("TASK_PID "), pid_after("ACTOR_PID "));
    // A worker's line may follow the test harness's own words (this
    // binary is the worker), but it carries its process's prefix.
    let has = |text: &str, prefix: String, line: &str| {
        text.lines().any(|l| l.starts_with(&prefix) && l.ends_with(line))
    };
    assert!(
        has(&stdout, format!("(pid={pid}) "), "hello from a task"),
        "{stdout}"
    );
    assert!(
        has(&stderr, format!("(pid={pid}) "), "warning from a task"),
        "{stderr}"
    );
    assert!(
        has(
            &stdout,
            format!("(Greeter pid={actor_pid}) "),
            "hello from an actor"
        ),
        "{stdout}"
    );
    // The constructor's lines are the actor's too, even in a process
    // that ran tasks before.
    assert!(
        has(
            &stdout,
            format!("(Greeter pid={actor_pid}) "),
            "a greeter is born"
        ),
        "{stdout}"
    );
    // Echoed lines are also in the files.
    let out = std::fs::read_to_string(dir.join(format!("worker-{pid}.out"))).expect("the task's log");
    assert!(out.lines().any(|l| l.ends_with("hello from a task")), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
