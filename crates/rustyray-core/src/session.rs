//! A node's session directory — Ray's `/tmp/ray/session_*` folders and
//! their `session_latest` link.
//!
//! # Design
//!
//! Everything a node writes to disk (spilled objects in `spill/`, worker
//! logs in `logs/`) lives under one directory per runtime:
//! `<tmp>/rustyray-<uid>/session-<pid>-<start>-<tag>`, where `<start>` is
//! the process's start time in clock ticks since boot, as the kernel
//! reports it in `/proc/<pid>/stat`. A session is live while a process
//! with that pid and that start time runs, so a recycled pid never keeps a
//! dead session alive. Each start removes the sessions whose process is
//! gone, so a driver that was SIGKILLed leaves its spill files behind only
//! until the next runtime starts on the machine. `session_latest` points at
//! the newest session.
//!
//! The root is per user and must be a directory of ours that no one else
//! may enter (mode `0700`, not a link): another local user cannot read the
//! logs, plant files for us to remove, or point the root somewhere else. A
//! root that fails these checks is an error, never silently used.
//!
//! # Failure
//!
//! Removing a dead session is best effort: one that cannot be removed
//! (another user's files, a race with another start) is left for the next
//! start and logged.

use crate::error::{Error, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The name of the link to the newest session.
const LATEST: &str = "session_latest";

/// A runtime's session directory.
#[derive(Debug)]
pub(crate) struct Session {
    dir: PathBuf,
}

impl Session {
    /// Creates this runtime's session under the user's root in the
    /// system's temporary directory, after removing the sessions of
    /// processes that are gone.
    pub(crate) fn create(tag: &str) -> Result<Session> {
        let uid = std::fs::metadata("/proc/self")
            .map_err(|e| io("reading this process's owner", &e))?
            .uid();
        Session::create_in(&std::env::temp_dir().join(format!("rustyray-{uid}")), tag)
    }

    /// Creates a session under `root` (made if missing, checked if not).
    pub(crate) fn create_in(root: &Path, tag: &str) -> Result<Session> {
        private_dir(root)?;
        remove_dead_sessions(root);
        let pid = std::process::id();
        let start = start_time(pid).ok_or_else(|| Error::Io {
            what: "reading this process's start time".into(),
            message: "/proc/self/stat is unreadable".into(),
        })?;
        let dir = root.join(format!("session-{pid}-{start}-{tag}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io(format!("creating session directory {}", dir.display()), &e))?;
        point_latest_at(root, &dir);
        Ok(Session { dir })
    }

    /// The session's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the session at a clean shutdown if nothing is left in it
    /// (logs stay, as Ray's session logs do, until the next start after
    /// this process is gone), with the `session_latest` link if it points
    /// here.
    pub(crate) fn close(&self) {
        for sub in ["logs", "spill"] {
            let _ = std::fs::remove_dir(self.dir.join(sub));
        }
        if std::fs::remove_dir(&self.dir).is_err() {
            return;
        }
        if let (Some(root), Some(name)) = (self.dir.parent(), self.dir.file_name()) {
            let latest = root.join(LATEST);
            if std::fs::read_link(&latest).is_ok_and(|l| l.as_os_str() == name) {
                let _ = std::fs::remove_file(latest);
            }
        }
    }
}

fn io(what: impl Into<String>, e: &std::io::Error) -> Error {
    Error::Io {
        what: what.into(),
        message: e.to_string(),
    }
}

/// Makes `dir` if missing; checks that it is a directory (not a link)
/// owned by this process's user that no one else may enter.
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(format!("creating {}", dir.display()), &e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io(format!("inspecting {}", dir.display()), &e))?;
    let me = std::fs::metadata("/proc/self")
        .map_err(|e| io("reading this process's owner", &e))?
        .uid();
    let refusal = if !meta.file_type().is_dir() {
        Some("it is not a directory")
    } else if meta.uid() != me {
        Some("another user owns it")
    } else if meta.permissions().mode() & 0o077 != 0 {
        Some("other users may enter it")
    } else {
        None
    };
    match refusal {
        Some(why) => Err(Error::Io {
            what: format!("using {} as the session root", dir.display()),
            message: why.to_owned(),
        }),
        None => Ok(()),
    }
}

/// The start time of process `pid` in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`), or `None` if no such process runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The pid and start time a session's directory name records.
fn owner_of(name: &str) -> Option<(u32, u64)> {
    let mut parts = name.strip_prefix("session-")?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    Some((pid, start))
}

/// Removes the sessions under `root` whose process is gone.
fn remove_dead_sessions(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, start)) = name.to_str().and_then(owner_of) else {
            continue;
        };
        if start_time(pid) == Some(start) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::debug!(dir = %path.display(), "removed the session of a process that is gone"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(dir = %path.display(), error = %e, "cannot remove a dead session"),
        }
    }
}

/// Points `root/session_latest` at `dir`, replacing the link atomically.
fn point_latest_at(root: &Path, dir: &Path) {
    let Some(name) = dir.file_name() else { return };
    let tmp = root.join(format!(".{LATEST}-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let made = std::os::unix::fs::symlink(name, &tmp).and_then(|()| std::fs::rename(&tmp, root.join(LATEST)));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(error = %e, "cannot update the session_latest link");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_root() -> PathBuf {
        let root = std::env::temp_dir().join(format!("rr-sessions-{:x}", crate::ids::random_token()));
        private_dir(&root).expect("root");
        root
    }

    /// The pid of a process that has exited (and been reaped).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    }

    #[test]
    fn a_new_session_removes_the_sessions_of_processes_that_are_gone() {
        let root = scratch_root();
        // A SIGKILLed driver's session, with spill files and logs in it.
        let dead = root.join(format!("session-{}-12345-rr000001", dead_pid()));
        std::fs::create_dir_all(dead.join("spill")).expect("dead session");
        std::fs::write(dead.join("spill").join("obj-1"), b"spilled").expect("spill file");
        // A live process whose pid was recycled: same pid, other start time.
        let me = std::process::id();
        let recycled = root.join(format!("session-{me}-1-rr000002"));
        std::fs::create_dir_all(&recycled).expect("recycled session");
        // Another live session of this very process.
        let start = start_time(me).expect("start time");
        let live = root.join(format!("session-{me}-{start}-rr000003"));
        std::fs::create_dir_all(&live).expect("live session");

        let s = Session::create_in(&root, "rr000004").expect("session");
        assert!(!dead.exists(), "a dead driver's session is left behind");
        assert!(!recycled.exists(), "a recycled pid kept a dead session");
        assert!(live.exists(), "a live session was removed");
        assert!(s.dir().is_dir());
        let latest = std::fs::read_link(root.join(LATEST)).expect("latest link");
        assert_eq!(Some(latest.as_os_str()), s.dir().file_name());
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_root_others_may_enter_or_that_is_a_link_is_refused() {
        let root = scratch_root();
        let open = root.join("open");
        std::fs::create_dir(&open).expect("dir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(Session::create_in(&open, "t"), Err(Error::Io { .. })));
        let link = root.join("link");
        std::os::unix::fs::symlink(&open, &link).expect("symlink");
        assert!(matches!(Session::create_in(&link, "t"), Err(Error::Io { .. })));
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn the_start_time_of_a_process_is_read_and_a_gone_one_has_none() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(start_time(dead_pid()), None);
        assert_eq!(owner_of("session-12-34-rr0001"), Some((12, 34)));
        assert_eq!(owner_of("session_latest"), None);
    }
}
