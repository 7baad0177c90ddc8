//! Tasks in worker processes: the test binary itself is the worker (its
//! `rustyray_worker` entry), as a user's program is.

mod common;
use common::{wait_until, LONG};
use rustyray::prelude::*;
use rustyray::{WorkerCommand, WorkerMode};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
}

fn worker_command() -> WorkerCommand {
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
fn test_logs() -> PathBuf {
    std::env::temp_dir().join(format!("rr-wp-{}-worker-logs", std::process::id()))
}

/// A process runtime that shuts down and removes its workers' log
/// directory when the test drops it.
struct TestRay(Ray);

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
fn process_config() -> Config {
    Config::new()
        .num_cpus(2.0)
        .worker_mode(WorkerMode::Processes)
        .worker_command(worker_command())
        .log_dir(test_logs())
}

fn process_runtime() -> TestRay {
    TestRay(rustyray::init_with(process_config()).expect("runtime"))
}

/// A scratch directory of one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rr-wp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Whether process `pid` is gone (exited and reaped, or a zombie).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[rustyray::remote]
fn whoami() -> u32 {
    std::process::id()
}

#[rustyray::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
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

/// Writes its pid into `dir/pid`, then waits until it is cancelled or its
/// process is killed.
#[rustyray::remote]
fn park_forever(dir: String) -> u32 {
    let _ = std::fs::write(Path::new(&dir).join("pid.tmp"), std::process::id().to_string());
    let _ = std::fs::rename(Path::new(&dir).join("pid.tmp"), Path::new(&dir).join("pid"));
    while !rustyray::is_cancelled() {
        std::thread::park_timeout(std::time::Duration::from_millis(5));
    }
    0
}

fn read_pid(dir: &Path) -> u32 {
    let file = dir.join("pid");
    wait_until("the task wrote its pid", || file.exists());
    std::fs::read_to_string(&file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid")
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
    let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()));
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

#[test]
fn shutdown_leaves_no_worker_process() -> rustyray::Result<()> {
    let ray = process_runtime();
    ray.get_timeout(&whoami::remote(&ray)?, LONG)?;
    let pids = ray.worker_pids();
    assert!(!pids.is_empty());
    ray.shutdown()?;
    for pid in pids {
        assert!(gone(pid), "worker {pid} outlived shutdown");
    }
    Ok(())
}

#[test]
fn a_program_without_worker_entry_fails_the_task_clearly() -> rustyray::Result<()> {
    let ray = rustyray::init_with(
        Config::new()
            .num_cpus(1.0)
            .worker_mode(WorkerMode::Processes)
            .worker_command(WorkerCommand::new("/bin/true", Vec::<String>::new())),
    )?;
    match ray.get_timeout(&add::options().max_retries(0).remote(&ray, 1, 1)?, LONG) {
        Err(Error::WorkerStart(reason)) => assert!(reason.contains("worker_entry"), "{reason}"),
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    Ok(())
}

/// The driver of `workers_die_with_their_driver`: started as a separate
/// process, it prints its workers' pids and waits to be killed.
#[test]
#[ignore = "driver process started by workers_die_with_their_driver"]
fn orphan_driver() {
    if std::env::var_os("RR_ORPHAN_DRIVER").is_none() {
        return;
    }
    let ray = process_runtime();
    let pid = ray
        .get_timeout(&whoami::remote(&ray).expect("submit"), LONG)
        .expect("task");
    let mut pids = ray.worker_pids();
    assert!(pids.contains(&pid));
    pids.sort_unstable();
    let line = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    let arena = arena_holders(std::process::id())
        .into_iter()
        .next()
        .expect("the driver maps the node's arena");
    println!("ARENA {arena}");
    println!("SESSION {}", ray.session_dir().expect("a session").display());
    println!("WORKERS {line}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

/// The inodes of the shared-memory arenas process `pid` holds open.
fn arena_holders(pid: u32) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:rustyray-plasma"))
        })
        .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| m.ino()))
        .collect()
}

/// Processes that hold the arena with inode `ino` open.
fn processes_holding(ino: u64) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| arena_holders(*pid).contains(&ino))
        .collect()
}

#[test]
fn workers_die_with_their_driver() {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("test binary path");
    let mut driver = Command::new(exe)
        .args([
            "orphan_driver",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RR_ORPHAN_DRIVER", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the driver");
    let out = driver.stdout.take().expect("stdout");
    // The workers share the driver's stdout, so the report may follow
    // their output on the same line.
    let mut lines = std::io::BufReader::new(out).lines().map_while(Result::ok);
    let arena: u64 = lines
        .find_map(|l| l.split_once("ARENA ").map(|(_, ino)| ino.trim().to_owned()))
        .expect("the driver reported its arena")
        .parse()
        .expect("an inode");
    let session: PathBuf = lines
        .find_map(|l| l.split_once("SESSION ").map(|(_, dir)| dir.trim().into()))
        .expect("the driver reported its session");
    let line = lines
        .find_map(|l| l.split_once("WORKERS ").map(|(_, pids)| pids.to_owned()))
        .expect("the driver reported its workers");
    let pids: Vec<u32> = line.split_whitespace().map(|p| p.parse().expect("pid")).collect();
    assert!(!pids.is_empty());
    assert!(pids.iter().all(|p| !gone(*p)));
    let holders = processes_holding(arena);
    assert!(holders.contains(&driver.id()), "{holders:?}");
    assert!(
        pids.iter().all(|p| holders.contains(p)),
        "workers map the arena: {holders:?}"
    );
    driver.kill().expect("kill the driver");
    driver.wait().expect("reap the driver");
    for pid in pids {
        wait_until(&format!("worker {pid} exits after its driver died"), || gone(pid));
    }
    // No process holds the arena any more: the memfd, and its memory, are
    // gone with the last of them.
    wait_until("the arena is released", || processes_holding(arena).is_empty());
    // The killed driver left its session (its spill directory); the next
    // runtime to start removes it.
    assert!(session.is_dir(), "{}", session.display());
    let next = process_runtime();
    assert!(
        !session.exists(),
        "a killed driver's session outlived the next start"
    );
    assert_ne!(next.session_dir(), Some(session.as_path()));
    drop(next);
    // The killed driver could not remove its workers' logs.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("rr-wp-{}-worker-logs", driver.id())));
}

#[rustyray::remote]
fn byte_len(v: Vec<u8>) -> usize {
    v.len()
}

/// Hands the owner a second object while the owner's store is full of the
/// first, then lets go of the first: the `Release` that makes room is
/// queued behind the `Put` that needs it.
#[rustyray::remote]
fn put_while_full() -> rustyray::Result<usize> {
    let ray = rustyray::current()?;
    let first = ray.put(vec![1_u8; 60_000])?;
    let n = ray.get(&byte_len::remote(&ray, first.clone())?)?;
    let second = ray.put(vec![2_u8; 60_000])?;
    let m = byte_len::remote(&ray, second)?;
    drop(first);
    Ok(n + ray.get(&m)?)
}

/// A process runtime whose owner's store holds 100 kB, with a full
/// timeout long enough that a wait for room that is never satisfied
/// fails the test.
fn small_store_runtime() -> rustyray::Result<TestRay> {
    let config = process_config()
        .object_store_memory(100_000)
        .object_store_full_timeout(LONG);
    Ok(TestRay(rustyray::init_with(config)?))
}

#[test]
fn a_put_waiting_for_room_does_not_hold_up_the_release_behind_it() -> rustyray::Result<()> {
    // Room for one of the two objects (both below the shared-memory
    // threshold, so both live in the owner's store). The full timeout is
    // long: a reader that waited for room itself would wait all of it and
    // then fail the second object.
    let ray = small_store_runtime()?;
    assert_eq!(ray.get_timeout(&put_while_full::remote(&ray)?, LONG)?, 120_000);
    Ok(())
}

/// Holds references the driver lent it, and returns results that need
/// the room they take.
#[rustyray::actor]
struct Keeper {
    held: Vec<ObjectRef<Vec<u8>>>,
}

#[rustyray::actor]
impl Keeper {
    fn new() -> Self {
        Keeper { held: Vec::new() }
    }

    fn keep(&mut self, refs: Vec<ObjectRef<Vec<u8>>>) -> usize {
        self.held.extend(refs);
        self.held.len()
    }

    fn bytes(&self, n: usize) -> Vec<u8> {
        vec![3; n]
    }

    fn forget(&mut self) -> usize {
        self.held.clear();
        0
    }
}

#[test]
fn a_result_waiting_for_room_does_not_hold_up_the_release_behind_it() -> rustyray::Result<()> {
    // The owner's store has room for one of the two 60 kB values; the
    // first is kept only for the actor. The actor's result comes in before
    // the `Release` of the first, on the same connection.
    let ray = small_store_runtime()?;
    let keeper = Keeper::remote(&ray)?;
    let first = ray.put(vec![1_u8; 60_000])?;
    assert_eq!(ray.get_timeout(&keeper.keep(vec![first])?, LONG)?, 1);
    let result = keeper.bytes(60_000)?;
    let forgot = keeper.forget()?;
    assert_eq!(ray.get_timeout(&forgot, LONG)?, 0);
    assert_eq!(ray.get_timeout(&result, LONG)?.len(), 60_000);
    Ok(())
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
    assert_eq!(ray.log_dir(), Some(dir.as_path()));
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
        .env("RR_PRINTING_DRIVER", &dir)
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

// ----- actors ------------------------------------------------------------

#[rustyray::actor]
struct Tally {
    n: i64,
    pid: u32,
    barrier: std::sync::Barrier,
}

#[rustyray::actor(max_concurrency = 4)]
impl Tally {
    fn new(start: i64) -> Result<Self, String> {
        if start < 0 {
            return Err(format!("negative start {start}"));
        }
        Ok(Tally {
            n: start,
            pid: std::process::id(),
            barrier: std::sync::Barrier::new(4),
        })
    }

    fn add(&mut self, by: i64) -> i64 {
        self.n += by;
        self.n
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn explode(&self) -> i64 {
        panic!("tally exploded")
    }

    /// Passes only when four calls run at once.
    fn meet(&self) -> bool {
        self.barrier.wait();
        true
    }

    /// Aborts the process the first time (leaving its pid in `dir`).
    fn abort_once(&self, dir: String) -> u32 {
        let marker = Path::new(&dir).join("crashed");
        if !marker.exists() && std::fs::write(&marker, std::process::id().to_string()).is_ok() {
            std::process::abort();
        }
        std::process::id()
    }
}

/// Counts the calls its current process ran, and crashes its process on
/// cue.
#[rustyray::actor]
struct Sequence {
    count: u32,
}

#[rustyray::actor]
impl Sequence {
    fn new() -> Self {
        Sequence { count: 0 }
    }

    /// Call `i`: this process's pid and how many calls it ran. Aborts the
    /// process at each `i` in `crash_at` the first time it reaches it
    /// (markers in `dir`); sleeps `nap_ms` first.
    fn step(&mut self, i: u32, crash_at: Vec<u32>, dir: String, nap_ms: u64) -> (u32, u32) {
        std::thread::sleep(std::time::Duration::from_millis(nap_ms));
        if crash_at.contains(&i) {
            let marker = Path::new(&dir).join(format!("crashed-at-{i}"));
            if !marker.exists() && std::fs::write(&marker, b"").is_ok() {
                std::process::abort();
            }
        }
        self.count += 1;
        (std::process::id(), self.count)
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

/// Checks that calls `0..n` ran in submission order in each process that
/// ran them: within a process the count goes up by one from call to call,
/// and each process ran one unbroken range of calls.
fn assert_ran_in_order(results: &[(u32, u32)]) {
    let mut seen = Vec::new();
    for (i, w) in results.windows(2).enumerate() {
        let ((p0, c0), (p1, c1)) = (w[0], w[1]);
        if p0 == p1 {
            assert_eq!(c1, c0 + 1, "call {} ran out of order: {results:?}", i + 1);
        } else {
            assert!(!seen.contains(&p1), "process {p1} ran two ranges: {results:?}");
            assert_eq!(
                c1,
                1,
                "call {} is not the first in its process: {results:?}",
                i + 1
            );
            seen.push(p0);
        }
    }
}

#[test]
fn calls_keep_their_order_across_restarts_of_a_crashing_actor() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("order-crash");
    let s = Sequence::options()
        .max_restarts(2)
        .max_task_retries(-1)
        .remote(&ray)?;
    let d = dir.display().to_string();
    let refs = (0..100)
        .map(|i| s.step(i, vec![30, 60], d.clone(), 0))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let results = ray.get_many_timeout(&refs, LONG)?;
    assert_ran_in_order(&results);
    let pids: std::collections::HashSet<_> = results.iter().map(|r| r.0).collect();
    assert_eq!(pids.len(), 3, "two crashes, three processes: {results:?}");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn calls_keep_their_order_when_the_actors_process_is_killed() -> rustyray::Result<()> {
    let ray = process_runtime();
    let s = Sequence::options()
        .max_restarts(1)
        .max_task_retries(-1)
        .remote(&ray)?;
    let first = ray.get_timeout(&s.pid()?, LONG)?;
    let refs = (0..100)
        .map(|i| s.step(i, Vec::new(), String::new(), 10))
        .collect::<rustyray::Result<Vec<_>>>()?;
    // Killed while calls are in flight and queued in the process.
    ray.get_timeout(&refs[20], LONG)?;
    let status = Command::new("kill").args(["-KILL", &first.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()));
    let results = ray.get_many_timeout(&refs, LONG)?;
    assert_ran_in_order(&results);
    assert!(
        results.iter().any(|r| r.0 != first),
        "the kill came too late: {results:?}"
    );
    Ok(())
}

#[rustyray::actor]
struct Echo;

#[rustyray::actor]
impl Echo {
    fn new() -> Self {
        Echo
    }

    async fn echo(&self, s: String) -> String {
        tokio::task::yield_now().await;
        s
    }
}

#[test]
fn actors_live_in_worker_processes_and_keep_call_order() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 0)?;
    let pid = ray.get_timeout(&t.pid()?, LONG)?;
    assert_ne!(pid, std::process::id());
    assert!(ray.worker_pids().contains(&pid));
    let refs = (0..100).map(|_| t.add(1)).collect::<rustyray::Result<Vec<_>>>()?;
    assert_eq!(ray.get_many_timeout(&refs, LONG)?, (1..=100).collect::<Vec<_>>());
    // A reference argument is resolved by the owner.
    let five = ray.put(5_i64)?;
    assert_eq!(ray.get_timeout(&t.add(&five)?, LONG)?, 105);
    // max_concurrency holds in the process: four calls meet at a barrier.
    let meets = (0..4).map(|_| t.meet()).collect::<rustyray::Result<Vec<_>>>()?;
    for m in &meets {
        assert!(ray.get_timeout(m, LONG)?);
    }
    let e = Echo::remote(&ray)?;
    assert_eq!(ray.get_timeout(&e.echo("hi".to_owned())?, LONG)?, "hi");
    Ok(())
}

#[test]
fn a_crashed_actor_process_restarts_per_max_restarts() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::options().max_restarts(1).remote(&ray, 10)?;
    let first = ray.get_timeout(&t.pid()?, LONG)?;
    assert_eq!(ray.get_timeout(&t.add(1)?, LONG)?, 11);
    // A panic takes the process down; the call fails, the actor restarts
    // in a new process with its constructor's state.
    assert!(matches!(
        ray.get_timeout(&t.explode()?, LONG),
        Err(Error::ActorDied { .. })
    ));
    let second = ray.get_timeout(&t.pid()?, LONG)?;
    assert_ne!(first, second);
    wait_until("the first actor process is gone", || gone(first));
    assert_eq!(ray.get_timeout(&t.add(1)?, LONG)?, 11);
    // No restarts left: a killed process ends the actor.
    let status = Command::new("kill").args(["-KILL", &second.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()));
    wait_until("the actor is dead", || {
        matches!(
            ray.get_timeout(&t.pid().expect("submit"), LONG),
            Err(Error::ActorDied { .. })
        )
    });
    Ok(())
}

#[test]
fn a_call_lost_with_its_process_is_retried_per_max_task_retries() -> rustyray::Result<()> {
    let ray = process_runtime();
    let dir = scratch("actor-retry");
    let t = Tally::options()
        .max_restarts(1)
        .max_task_retries(1)
        .remote(&ray, 0)?;
    let pid = ray.get_timeout(&t.abort_once(dir.display().to_string())?, LONG)?;
    let crashed: u32 = std::fs::read_to_string(dir.join("crashed"))
        .expect("marker")
        .trim()
        .parse()
        .expect("pid");
    assert_ne!(pid, crashed);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[test]
fn kill_and_constructor_errors_end_process_actors() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 1)?;
    let pid = ray.get_timeout(&t.pid()?, LONG)?;
    ray.kill(&t)?;
    assert!(matches!(
        ray.get_timeout(&t.add(1)?, LONG),
        Err(Error::ActorDied { .. })
    ));
    wait_until("the killed actor's process is gone", || gone(pid));
    let bad = Tally::remote(&ray, -1)?;
    match ray.get_timeout(&bad.add(1)?, LONG) {
        Err(Error::ActorDied {
            cause: Some(cause), ..
        }) => {
            assert!(cause.to_string().contains("negative start -1"), "{cause}");
        }
        other => panic!("expected ActorDied with the constructor's error, got {other:?}"),
    }
    Ok(())
}

// ----- shared memory -----------------------------------------------------

/// A deterministic pattern for object `k`.
fn pattern(k: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ k.wrapping_mul(131)) as u8)
        .collect()
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[rustyray::remote]
fn checksum_of(v: Vec<u8>) -> u64 {
    checksum(&v)
}

#[rustyray::remote]
fn sum_ints(v: Vec<i64>) -> i64 {
    v.iter().sum()
}

#[rustyray::remote]
fn blob_in_place(b: rustyray::Blob) -> (bool, u64) {
    (b.is_shared(), checksum(&b))
}

#[rustyray::remote]
fn make_bytes(k: u64, len: u64) -> Vec<u8> {
    pattern(k as usize, len as usize)
}

fn shm_runtime(memory: u64, spill: &Path) -> TestRay {
    TestRay(
        rustyray::init_with(process_config().object_store_memory(memory).spill_dir(spill)).expect("runtime"),
    )
}

#[test]
fn large_objects_are_written_once_into_shared_memory() -> rustyray::Result<()> {
    let dir = scratch("shm-large");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let stats = || ray.shared_store_stats().expect("process mode has a shared store");
    let data = pattern(1, 1 << 20);
    let r = ray.put(data.clone())?;
    assert_eq!(stats().objects_in_memory, 1, "{:?}", stats());
    // A worker reads it from shared memory; small objects stay inline.
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, &r)?, LONG)?,
        checksum(&data)
    );
    let small = ray.put(vec![1_u8; 100])?;
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, &small)?, LONG)?,
        checksum(&[1; 100])
    );
    assert_eq!(stats().objects_in_memory, 1);
    // A large result is written by the worker into shared memory.
    let made = make_bytes::remote(&ray, 7, 3 << 20)?;
    assert_eq!(ray.get_timeout(&made, LONG)?, pattern(7, 3 << 20));
    assert_eq!(stats().objects_in_memory, 2);
    // A large inline argument goes through shared memory too, then is freed.
    let inline = pattern(9, 200_000);
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, inline.clone())?, LONG)?,
        checksum(&inline)
    );
    // A copying put of a large flat vector writes it straight into
    // shared memory; a worker reads it back.
    let ints: Vec<i64> = (0..100_000).map(|i| i * 3 - 7).collect();
    let copied = ray.put_copy(&ints)?;
    assert_eq!(stats().objects_in_memory, 3);
    assert_eq!(ray.get_timeout(&copied, LONG)?, ints);
    assert_eq!(
        ray.get_timeout(&sum_ints::remote(&ray, &copied)?, LONG)?,
        ints.iter().sum::<i64>()
    );
    drop(copied);
    // Unreferenced objects are freed at once.
    drop((r, made));
    wait_until("the store is empty", || {
        stats().objects_in_memory == 0 && stats().used == 0
    });
    Ok(())
}

#[test]
fn blobs_are_read_in_place_from_shared_memory() -> rustyray::Result<()> {
    let dir = scratch("shm-blob");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let data = pattern(3, 2 << 20);
    let r = ray.put(rustyray::Blob::from(data.clone()))?;
    // In the worker: a view of the arena, no copy.
    let (shared, sum) = ray.get_timeout(&blob_in_place::remote(&ray, &r)?, LONG)?;
    assert!(shared, "the worker's blob was copied");
    assert_eq!(sum, checksum(&data));
    // In the driver: a view too, pinned while held.
    let view = ray.get_timeout(&r, LONG)?;
    assert!(view.is_shared());
    assert_eq!(&view[..], &data[..]);
    drop(r);
    let stats = ray.shared_store_stats().expect("stats");
    assert!(
        stats.used >= 2 << 20,
        "the view keeps the object's memory: {stats:?}"
    );
    assert_eq!(&view[..], &data[..]);
    drop(view);
    wait_until("the object is freed with its last view", || {
        ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    // Threads mode: the same type, shared by reference count.
    let threads = rustyray::init_with(Config::new().num_cpus(1.0))?;
    let b = threads.put(rustyray::Blob::from(vec![5_u8; 10]))?;
    assert_eq!(&threads.get(&b)?[..], &[5; 10]);
    Ok(())
}

#[test]
fn referenced_objects_spill_to_disk_and_come_back() -> rustyray::Result<()> {
    let dir = scratch("shm-spill");
    let spill = dir.join("spill");
    // 8 MiB of shared memory, 24 MiB of live objects.
    let ray = shm_runtime(8 << 20, &spill);
    let n = 24;
    let refs = (0..n)
        .map(|k| ray.put(pattern(k, 1 << 20)))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let stats = ray.shared_store_stats().expect("stats");
    assert!(stats.objects_spilled > 0, "{stats:?}");
    assert!(stats.used <= stats.capacity);
    // Every byte comes back, in the driver and in workers.
    for (k, r) in refs.iter().enumerate() {
        assert_eq!(ray.get_timeout(r, LONG)?, pattern(k, 1 << 20), "object {k}");
    }
    let sums = refs
        .iter()
        .map(|r| checksum_of::remote(&ray, r))
        .collect::<rustyray::Result<Vec<_>>>()?;
    for (k, s) in sums.iter().enumerate() {
        assert_eq!(
            ray.get_timeout(s, LONG)?,
            checksum(&pattern(k, 1 << 20)),
            "object {k} in a worker"
        );
    }
    let stats = ray.shared_store_stats().expect("stats");
    assert!(stats.restores > 0, "{stats:?}");
    // Dropping the references frees memory and spill files at once.
    drop(refs);
    wait_until("memory and disk are free", || {
        ray.shared_store_stats()
            .is_some_and(|s| s.objects_in_memory == 0 && s.objects_spilled == 0 && s.spill_files == 0)
    });
    ray.shutdown()?;
    assert!(!spill.exists(), "the spill directory outlived shutdown");
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[rustyray::remote]
fn abort_holding(v: rustyray::Blob) -> u64 {
    if !v.is_empty() {
        std::process::abort();
    }
    0
}

#[test]
fn a_dead_worker_releases_its_pins() -> rustyray::Result<()> {
    let dir = scratch("shm-pins");
    let ray = shm_runtime(16 << 20, &dir.join("spill"));
    let r = ray.put(rustyray::Blob::from(pattern(4, 1 << 20)))?;
    match ray.get_timeout(&abort_holding::options().max_retries(0).remote(&ray, &r)?, LONG) {
        Err(Error::WorkerCrashed { .. }) => {}
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    drop(r);
    wait_until("the object is freed although its reader died", || {
        ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    Ok(())
}

// ----- edge cases found in review ------------------------------------------

#[test]
fn kill_with_restart_in_quick_succession_keeps_a_process_actor_usable() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::options().max_restarts(10).remote(&ray, 5)?;
    // Right after creation, and twice in a row.
    ray.kill_raw(t.raw(), false)?;
    ray.kill_raw(t.raw(), false)?;
    assert_eq!(ray.get_timeout(&t.add(1)?, LONG)?, 6);
    let pid = ray.get_timeout(&t.pid()?, LONG)?;
    ray.kill_raw(t.raw(), false)?;
    // A call made right after the kill waits for the restarted actor.
    assert_eq!(ray.get_timeout(&t.add(2)?, LONG)?, 7);
    assert_ne!(ray.get_timeout(&t.pid()?, LONG)?, pid);
    Ok(())
}

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

#[rustyray::actor]
struct Waiter;

#[rustyray::actor]
impl Waiter {
    fn new() -> Self {
        Waiter
    }

    fn wait_for_cancel(&self) -> bool {
        while !rustyray::is_cancelled() {
            std::thread::park_timeout(std::time::Duration::from_millis(5));
        }
        true
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }
}

#[test]
fn a_forced_cancel_does_not_kill_an_actor_process() -> rustyray::Result<()> {
    let ray = process_runtime();
    let w = Waiter::remote(&ray)?;
    let pid = ray.get_timeout(&w.pid()?, LONG)?;
    let r = w.wait_for_cancel()?;
    ray.cancel_with(
        &r,
        rustyray::CancelOptions {
            force: true,
            ..Default::default()
        },
    )?;
    assert!(matches!(ray.get_timeout(&r, LONG), Err(Error::TaskCancelled(_))));
    // The actor (no restarts) is alive, in the same process.
    assert_eq!(ray.get_timeout(&w.pid()?, LONG)?, pid);
    Ok(())
}

/// A large value that holds a reference made inside the worker (whose
/// allocation in shared memory is given up: it goes inline).
#[rustyray::remote]
fn large_with_ref() -> (Vec<u8>, ObjectRef<u8>) {
    let ray = rustyray::current().expect("inside a task");
    (vec![7; 300_000], ray.put(1_u8).expect("put"))
}

/// A value whose `Serialize` panics.
#[derive(Debug, serde::Deserialize)]
struct Bomb;

impl serde::Serialize for Bomb {
    fn serialize<S: serde::Serializer>(&self, _s: S) -> Result<S::Ok, S::Error> {
        panic!("Bomb cannot be serialized")
    }
}

#[rustyray::remote]
fn take_bomb(_b: Bomb) -> u8 {
    0
}

#[test]
fn unsendable_values_are_errors_that_leak_nothing() -> rustyray::Result<()> {
    let dir = scratch("unsendable");
    let ray = shm_runtime(16 << 20, &dir.join("spill"));
    // A large value holding a reference made in the worker travels inline
    // with it (not through shared memory); nothing is left allocated.
    for _ in 0..3 {
        let (big, inner) = ray.get_timeout(&large_with_ref::options().max_retries(0).remote(&ray)?, LONG)?;
        assert_eq!(big.len(), 300_000);
        assert_eq!(ray.get_timeout(&inner, LONG)?, 1);
    }
    wait_until("abandoned result allocations are freed", || {
        ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    match ray.get_timeout(&take_bomb::remote(&ray, Bomb)?, LONG) {
        Err(Error::Serialization(m)) => assert!(m.contains("Bomb cannot be serialized"), "{m}"),
        other => panic!("expected a serialization error, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

// ----- handles across processes ---------------------------------------------

#[rustyray::actor]
struct Relay {
    target: ActorHandle<Tally>,
}

#[rustyray::actor]
impl Relay {
    fn new(target: ActorHandle<Tally>) -> Self {
        Relay { target }
    }

    fn add_via(&self, by: i64) -> Result<i64, String> {
        let ray = rustyray::current().map_err(|e| e.to_string())?;
        let r = self.target.add(by).map_err(|e| e.to_string())?;
        ray.get(&r).map_err(|e| e.to_string())
    }
}

#[rustyray::remote]
fn add_through(t: ActorHandle<Tally>, by: i64) -> Result<i64, String> {
    let ray = rustyray::current().map_err(|e| e.to_string())?;
    let r = t.add(by).map_err(|e| e.to_string())?;
    ray.get(&r).map_err(|e| e.to_string())
}

#[test]
fn workers_call_the_owners_actors_through_their_handles() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 0)?;
    let relay = Relay::remote(&ray, t.clone())?;
    assert_eq!(ray.get_timeout(&relay.add_via(5)?, LONG)?, 5);
    assert_eq!(
        ray.get_timeout(&add_through::remote(&ray, t.clone(), 2)?, LONG)?,
        7
    );
    // Many calls from several processes land on the one actor, each once.
    let calls = (0..20)
        .map(|_| relay.add_via(1))
        .collect::<rustyray::Result<Vec<_>>>()?;
    ray.get_many_timeout(&calls, LONG)?;
    assert_eq!(ray.get_timeout(&t.add(0)?, LONG)?, 27);
    // A dead actor's error reaches the caller in the worker.
    ray.kill(&t)?;
    match ray.get_timeout(&relay.add_via(1)?, LONG) {
        Err(Error::Task { message, .. }) => assert!(message.contains("died"), "{message}"),
        other => panic!("expected the actor's death, got {other:?}"),
    }
    Ok(())
}

/// Puts objects inside a worker and returns references to them.
#[rustyray::remote]
fn put_many(n: u32) -> Vec<ObjectRef<u32>> {
    let ray = rustyray::current().expect("inside a task");
    (0..n).map(|i| ray.put(i).expect("put")).collect()
}

#[rustyray::remote]
fn put_large() -> ObjectRef<Vec<u8>> {
    let ray = rustyray::current().expect("inside a task");
    ray.put(pattern(11, 500_000)).expect("put")
}

#[test]
fn objects_put_in_a_worker_outlive_it_in_the_owner() -> rustyray::Result<()> {
    let dir = scratch("worker-puts");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let refs = ray.get_timeout(&put_many::remote(&ray, 2_000)?, LONG)?;
    assert_eq!(refs.len(), 2_000);
    let values = ray.get_many_timeout(&refs, LONG)?;
    assert_eq!(values, (0..2_000).collect::<Vec<_>>());
    let large = ray.get_timeout(&put_large::remote(&ray)?, LONG)?;
    assert_eq!(ray.get_timeout(&large, LONG)?, pattern(11, 500_000));
    // A worker reads it too.
    assert_eq!(
        ray.get_timeout(&checksum_of::remote(&ray, &large)?, LONG)?,
        checksum(&pattern(11, 500_000))
    );
    let before = ray.store_stats();
    drop((refs, large));
    wait_until("the worker's objects are freed once nobody holds them", || {
        ray.store_stats().num_objects < before.num_objects.saturating_sub(1_999)
            && ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

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

/// Reads every object of a list it was handed (inside a worker, where the
/// objects are the owner's).
#[rustyray::remote]
fn sum_lent(refs: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    Ok(ray.get_many(&refs)?.iter().sum())
}

/// Checksums lent large objects, read in place from shared memory.
#[rustyray::remote]
fn checksums_lent(refs: Vec<ObjectRef<rustyray::Blob>>) -> rustyray::Result<Vec<(bool, u64)>> {
    let ray = rustyray::current()?;
    refs.iter()
        .map(|r| ray.get(r).map(|b| (b.is_shared(), checksum(&b))))
        .collect()
}

/// Hands lent references back, unread.
#[rustyray::remote]
fn pass_back(refs: Vec<ObjectRef<i64>>) -> Vec<ObjectRef<i64>> {
    refs
}

/// Reads a list of references that a nested task returned to this worker.
#[rustyray::remote]
fn sum_nested(n: u32) -> rustyray::Result<u64> {
    let ray = rustyray::current()?;
    let refs = ray.get(&put_many::remote(&ray, n)?)?;
    Ok(ray.get_many(&refs)?.into_iter().map(u64::from).sum())
}

/// Waits for the object of a lent reference whose task is still running.
#[rustyray::remote]
fn await_lent(refs: Vec<ObjectRef<u32>>) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    Ok(ray.get_many(&refs)?.into_iter().sum())
}

/// Waits for lent references with `wait`, then awaits them.
#[rustyray::remote]
async fn wait_then_await(refs: Vec<ObjectRef<i64>>) -> rustyray::Result<i64> {
    let ray = rustyray::current()?;
    let (ready, rest) = ray.wait(&refs, refs.len(), Some(LONG))?;
    if !rest.is_empty() {
        return Err(rustyray::Error::InvalidArgument("wait returned early".into()));
    }
    let mut sum = 0;
    for r in ready {
        sum += r.await?;
    }
    Ok(sum)
}

#[test]
fn references_inside_values_are_lent_to_workers() -> rustyray::Result<()> {
    let dir = scratch("lent-refs");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let baseline = ray.store_stats().num_entries;
    let small = (1..=100_i64)
        .map(|i| ray.put(i))
        .collect::<rustyray::Result<Vec<_>>>()?;
    assert_eq!(
        ray.get_timeout(&sum_lent::remote(&ray, small.clone())?, LONG)?,
        5050
    );
    assert_eq!(
        ray.get_timeout(&wait_then_await::remote(&ray, small[..10].to_vec())?, LONG)?,
        55
    );
    // Large objects are read in place, whether put in the driver or made
    // by a task in a worker.
    let blobs = [
        ray.put(rustyray::Blob::from(pattern(1, 300_000)))?,
        ray.put(rustyray::Blob::from(pattern(2, 200_000)))?,
    ];
    let got = ray.get_timeout(&checksums_lent::remote(&ray, blobs.to_vec())?, LONG)?;
    assert_eq!(
        got,
        vec![
            (true, checksum(&pattern(1, 300_000))),
            (true, checksum(&pattern(2, 200_000)))
        ]
    );
    // References a worker hands back unread are still good.
    let back = ray.get_timeout(&pass_back::remote(&ray, small[..3].to_vec())?, LONG)?;
    assert_eq!(ray.get_many_timeout(&back, LONG)?, vec![1, 2, 3]);
    // A nested task's list of references reaches the worker that made it.
    assert_eq!(ray.get_timeout(&sum_nested::remote(&ray, 300)?, LONG)?, 44_850);
    // A reference to an object not made yet: the worker waits for it.
    let gate = scratch("lent-refs-gate");
    let slow = park_forever::remote(&ray, gate.to_string_lossy().into_owned())?;
    let waiting = await_lent::remote(&ray, vec![slow.clone()])?;
    read_pid(&gate);
    ray.cancel(&slow)?;
    match ray.get_timeout(&waiting, LONG) {
        Err(Error::Task { message, .. }) => assert!(message.contains("cancel"), "{message}"),
        other => panic!("expected the cancelled task's error, got {other:?}"),
    }
    // Every count lent to the workers comes back: with the driver's
    // references gone, so are the objects.
    drop((small, blobs, back, slow, waiting));
    wait_until("lent objects are freed once nobody holds them", || {
        ray.store_stats().num_entries <= baseline && ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(gate);
    Ok(())
}

/// Puts objects and drops them, keeping nothing.
#[rustyray::remote]
fn put_and_drop(n: u32) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    for i in 0..n {
        ray.put(vec![i; 1_000])?;
    }
    let kept = ray.put(7_u32)?;
    ray.get(&kept)
}

/// Returns a put object that refers to two other put objects.
#[rustyray::remote]
fn put_nested() -> rustyray::Result<ObjectRef<Vec<ObjectRef<Vec<u8>>>>> {
    let ray = rustyray::current()?;
    let large = ray.put(pattern(3, 200_000))?;
    let small = ray.put(pattern(4, 10))?;
    ray.put(vec![large, small])
}

/// Passes an object put here to a task it submits.
#[rustyray::remote]
fn put_then_submit() -> rustyray::Result<u64> {
    let ray = rustyray::current()?;
    let x = ray.put(pattern(5, 1_000))?;
    let nested = ray.put(vec![x.clone()])?;
    let direct = ray.get(&checksum_of::remote(&ray, &x)?)?;
    let inside = ray.get(&checksums_nested::remote(&ray, nested)?)?;
    Ok(direct ^ inside)
}

#[rustyray::remote]
fn checksums_nested(refs: Vec<ObjectRef<Vec<u8>>>) -> rustyray::Result<u64> {
    let ray = rustyray::current()?;
    Ok(ray
        .get_many(&refs)?
        .iter()
        .map(|v| checksum(v))
        .fold(0, |a, b| a ^ b.rotate_left(1)))
}

#[test]
fn objects_put_in_a_worker_stay_there_until_a_reference_leaves() -> rustyray::Result<()> {
    let dir = scratch("local-puts");
    let ray = shm_runtime(64 << 20, &dir.join("spill"));
    let baseline = ray.store_stats().num_entries;
    // Nothing left the worker: the owner was handed none of its puts (a
    // `Put` would have reached it before the task's result).
    assert_eq!(ray.get_timeout(&put_and_drop::remote(&ray, 100)?, LONG)?, 7);
    assert_eq!(ray.store_stats().num_entries, baseline);
    assert!(ray.shared_store_stats().is_some_and(|s| s.used == 0));
    // A returned reference takes its object along, and the objects that
    // object names.
    let outer = ray.get_timeout(&put_nested::remote(&ray)?, LONG)?;
    let inner = ray.get_timeout(&outer, LONG)?;
    assert_eq!(
        ray.get_many_timeout(&inner, LONG)?,
        vec![pattern(3, 200_000), pattern(4, 10)]
    );
    // So does a reference passed to a task, directly or inside a value.
    let expected = checksum(&pattern(5, 1_000)) ^ checksum(&pattern(5, 1_000)).rotate_left(1);
    assert_eq!(ray.get_timeout(&put_then_submit::remote(&ray)?, LONG)?, expected);
    drop((outer, inner));
    wait_until("shared objects are freed once nobody holds them", || {
        ray.store_stats().num_entries <= baseline && ray.shared_store_stats().is_some_and(|s| s.used == 0)
    });
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Creates an actor and returns its handle, with this worker's pid.
#[rustyray::remote]
fn make_tally(start: i64) -> rustyray::Result<(ActorHandle<Tally>, u32)> {
    let ray = rustyray::current()?;
    let t = Tally::remote(&ray, start)?;
    ray.get(&t.add(1)?)?;
    Ok((t, std::process::id()))
}

/// Creates an actor, uses it and drops it; returns the actor's pid.
#[rustyray::remote]
fn use_and_drop_tally() -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    let t = Tally::remote(&ray, 0)?;
    ray.get(&t.pid()?)
}

/// Creates a named actor.
#[rustyray::remote]
fn make_named(name: String) -> rustyray::Result<u32> {
    let ray = rustyray::current()?;
    let t = Tally::options().name(&name).remote(&ray, 100)?;
    // Reachable by name while this handle keeps it alive.
    let found: ActorHandle<Tally> = ray.get_actor(&name)?;
    ray.get(&found.add(1)?)?;
    ray.get(&t.pid()?)
}

/// Kills the actor it was handed.
#[rustyray::remote]
fn kill_it(t: ActorHandle<Tally>) -> rustyray::Result<()> {
    let ray = rustyray::current()?;
    ray.kill(&t)
}

#[test]
fn actors_created_in_workers_are_the_owners_in_their_own_processes() -> rustyray::Result<()> {
    let ray = process_runtime();
    // The actor lives in a process of its own, neither the driver nor the
    // worker that created it, and the driver may use the handle.
    let (t, creator) = ray.get_timeout(&make_tally::remote(&ray, 10)?, LONG)?;
    let home = ray.get_timeout(&t.pid()?, LONG)?;
    assert_ne!(home, creator);
    assert_ne!(home, std::process::id());
    assert_eq!(ray.get_timeout(&t.add(5)?, LONG)?, 16);
    // Killed from a worker, it is dead for everyone.
    ray.get_timeout(&kill_it::remote(&ray, t.clone())?, LONG)?;
    match ray.get_timeout(&t.add(1)?, LONG) {
        Err(Error::ActorDied { .. }) => {}
        other => panic!("expected ActorDied, got {other:?}"),
    }
    // An actor whose handles all went (the worker's last one with its
    // task) ends, and its process with it.
    let pid = ray.get_timeout(&use_and_drop_tally::remote(&ray)?, LONG)?;
    wait_until("an actor with no handles left ends its process", || gone(pid));
    // Names are the owner's: a worker finds the actor it named.
    let named = ray.get_timeout(&make_named::remote(&ray, "tally-from-worker".to_owned())?, LONG)?;
    wait_until("the named actor ends with its last handle", || gone(named));
    Ok(())
}

/// Calls the owner's actor with a reference to a result not made yet, and
/// returns the call's reference unread.
#[rustyray::remote]
fn call_with_pending(t: ActorHandle<Tally>) -> rustyray::Result<ObjectRef<i64>> {
    let ray = rustyray::current()?;
    let by = add::remote(&ray, 2, 3)?;
    t.add(&by)
}

#[test]
fn workers_pass_references_to_the_owners_actors_and_return_call_results() -> rustyray::Result<()> {
    let ray = process_runtime();
    let t = Tally::remote(&ray, 10)?;
    let call = ray.get_timeout(&call_with_pending::remote(&ray, t.clone())?, LONG)?;
    assert_eq!(ray.get_timeout(&call, LONG)?, 15);
    assert_eq!(ray.get_timeout(&t.add(0)?, LONG)?, 15);
    Ok(())
}

// ----- regressions found in review -------------------------------------

#[rustyray::actor]
struct Seq {
    seen: Vec<u32>,
}

#[rustyray::actor]
impl Seq {
    fn new() -> Self {
        Seq { seen: Vec::new() }
    }

    fn push(&mut self, i: u32) -> u32 {
        self.seen.push(i);
        i
    }

    fn seen(&self) -> Vec<u32> {
        self.seen.clone()
    }
}

#[test]
fn actor_calls_keep_their_order_on_a_worker_that_ran_tasks() -> rustyray::Result<()> {
    let ray = process_runtime();
    for _ in 0..3 {
        let refs = (0..20)
            .map(|i| add::remote(&ray, i, 1))
            .collect::<rustyray::Result<Vec<_>>>()?;
        ray.get_many_timeout(&refs, LONG)?;
    }
    for _ in 0..3 {
        let s = Seq::remote(&ray)?;
        let refs = (0..2000)
            .map(|i| s.push(i))
            .collect::<rustyray::Result<Vec<_>>>()?;
        ray.get_many_timeout(&refs, LONG)?;
        let seen = ray.get_timeout(&s.seen()?, LONG)?;
        assert_eq!(seen, (0..2000).collect::<Vec<_>>());
    }
    Ok(())
}

#[rustyray::remote]
fn first_len(v: (Vec<u8>, ObjectRef<i64>)) -> u64 {
    v.0.len() as u64
}

#[test]
fn a_task_too_large_to_send_lends_nothing() -> rustyray::Result<()> {
    let dir = scratch("too-large");
    let ray = shm_runtime(256 << 20, &dir.join("spill"));
    assert_eq!(ray.get_timeout(&add::remote(&ray, 1, 1)?, LONG)?, 2);
    let baseline = ray.store_stats().num_entries;
    let r = ray.put(5_i64)?;
    // A value holding a reference travels inline, and this one is over
    // the frame limit.
    let res = first_len::options()
        .max_retries(0)
        .remote(&ray, (vec![1_u8; 65 << 20], r.clone()))?;
    assert!(ray.get_timeout(&res, LONG).is_err());
    drop((r, res));
    wait_until("the referenced object is freed", || {
        ray.store_stats().num_entries <= baseline
    });
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[rustyray::actor]
struct Crasher;

#[rustyray::actor]
impl Crasher {
    fn new() -> Self {
        Crasher
    }

    /// Aborts the process the first time; then puts an object and returns
    /// its reference.
    fn put_after_crash(&self, dir: String) -> rustyray::Result<ObjectRef<u64>> {
        let marker = Path::new(&dir).join("crashed");
        if !marker.exists() && std::fs::write(&marker, std::process::id().to_string()).is_ok() {
            std::process::abort();
        }
        rustyray::current()?.put(42_u64)
    }
}

#[test]
fn a_retried_call_may_return_a_reference_to_an_object_it_put() -> rustyray::Result<()> {
    let ray = process_runtime();
    for i in 0..5 {
        let dir = scratch(&format!("retry-put-{i}"));
        let c = Crasher::options()
            .max_restarts(1)
            .max_task_retries(1)
            .remote(&ray)?;
        let r = ray.get_timeout(&c.put_after_crash(dir.display().to_string())?, LONG)?;
        assert_eq!(ray.get_timeout(&r, LONG)?, 42);
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

#[rustyray::actor]
struct Big;

#[rustyray::actor]
impl Big {
    fn new() -> Self {
        Big
    }

    /// A result above the shared-memory threshold.
    fn big(&self, k: u32) -> Vec<u8> {
        vec![k as u8; 120_000]
    }
}

#[test]
fn large_actor_results_never_stall_the_actors_reader() -> rustyray::Result<()> {
    let dir = scratch("big-actor");
    let ray = shm_runtime(512 << 20, &dir.join("spill"));
    let b = Big::remote(&ray)?;
    for _ in 0..10 {
        let refs = (0..200).map(|k| b.big(k)).collect::<rustyray::Result<Vec<_>>>()?;
        let got = ray.get_many_timeout(&refs, LONG)?;
        assert!(got
            .iter()
            .enumerate()
            .all(|(k, v)| v.len() == 120_000 && v[0] == k as u8));
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
