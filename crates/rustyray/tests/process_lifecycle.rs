//! The lifecycle of worker processes: shutdown, workers that die with
//! their driver (and the session it leaves), and a worker program
//! without the worker entry.

mod common;
#[path = "common/process.rs"]
mod process;
use common::{wait_until, LONG};
use process::{add, gone, process_runtime, whoami};
use rustyray::prelude::*;
use rustyray::{WorkerCommand, WorkerMode};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The entry point of the worker processes the tests start: this binary,
/// run with arguments that select this test, in worker mode.
#[test]
#[ignore = "entry point of worker processes started by the other tests"]
fn rustyray_worker() {
    rustyray::worker_entry();
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
