//! Helpers shared by the worker-process tests (`process_*.rs`): the
//! worker command that starts the test binary itself as the worker,
//! the process runtimes, and remote functions several of them use.
//! Each test binary includes it and has its own `rustyray_worker` entry.
#![allow(dead_code)]

use crate::common::wait_until;
use rustyray::prelude::*;
use rustyray::{WorkerCommand, WorkerMode};
use std::path::{Path, PathBuf};

pub(crate) fn worker_command() -> WorkerCommand {
    let exe = std::env::current_exe().expect("test binary path");
    WorkerCommand::new(
        exe,
        [
            "rustyray_worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ],
    )
}

/// Where the workers of this test process keep their output (the test
/// harness in each worker prints a few lines); [`TestRay`] removes it.
pub(crate) fn test_logs() -> PathBuf {
    std::env::temp_dir().join(format!("rr-wp-{}-worker-logs", std::process::id()))
}

/// A process runtime that shuts down and removes its workers' log
/// directory when the test drops it.
pub(crate) struct TestRay(pub(crate) Ray);

impl std::ops::Deref for TestRay {
    type Target = Ray;
    fn deref(&self) -> &Ray {
        &self.0
    }
}

impl Drop for TestRay {
    fn drop(&mut self) {
        // Shut down first: it waits for the workers' last lines.
        let _ = self.0.shutdown();
        let _ = std::fs::remove_dir_all(test_logs());
    }
}

/// The configuration of the tests' process runtimes.
pub(crate) fn process_config() -> Config {
    Config::new()
        .num_cpus(2.0)
        .worker_mode(WorkerMode::Processes)
        .worker_command(worker_command())
        .log_dir(test_logs())
}

pub(crate) fn process_runtime() -> TestRay {
    TestRay(rustyray::init_with(process_config()).expect("runtime"))
}

/// A scratch directory of one test, removed when the value goes (also
/// when the test fails).
pub(crate) struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh scratch directory for one test.
pub(crate) fn scratch(name: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("rr-wp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    Scratch(d)
}

/// Whether process `pid` is gone (exited and reaped, or a zombie).
pub(crate) fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Kills process `pid` with SIGKILL (the test fails if it cannot).
pub(crate) fn kill9(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    assert!(status.is_ok_and(|s| s.success()), "kill -KILL {pid}");
}

#[rustyray::remote]
pub(crate) fn whoami() -> u32 {
    std::process::id()
}

#[rustyray::remote]
pub(crate) fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Writes its pid into `dir/pid`, then waits until it is cancelled or its
/// process is killed.
#[rustyray::remote]
pub(crate) fn park_forever(dir: String) -> u32 {
    let _ = std::fs::write(Path::new(&dir).join("pid.tmp"), std::process::id().to_string());
    let _ = std::fs::rename(Path::new(&dir).join("pid.tmp"), Path::new(&dir).join("pid"));
    while !rustyray::is_cancelled() {
        std::thread::park_timeout(std::time::Duration::from_millis(5));
    }
    0
}

pub(crate) fn read_pid(dir: &Path) -> u32 {
    let file = dir.join("pid");
    wait_until("the task wrote its pid", || file.exists());
    std::fs::read_to_string(&file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid")
}

pub(crate) fn shm_runtime(memory: u64, spill: &Path) -> TestRay {
    TestRay(
        rustyray::init_with(process_config().object_store_memory(memory).spill_dir(spill)).expect("runtime"),
    )
}
