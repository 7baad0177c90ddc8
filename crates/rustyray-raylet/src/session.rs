//! A node's session directory — Ray's `/tmp/ray/session_*` folders and
//! their `session_latest` link.
//!
//! # Design
//!
//! Everything a node writes to disk (spilled objects in `spill/`, worker
//! logs in `logs/`) lives under one directory per runtime:
//! `<tmp>/rustyray-<uid>/session-<pid>-<tag>`, with a `session_latest`
//! link to the newest. The runtime holds an exclusive lock (`flock`) on
//! the session's `lock` file for as long as it lives, and the kernel drops
//! it when the process dies, however it dies. Each start removes the
//! sessions whose lock it can take, so a driver that was SIGKILLed leaves
//! its spill files behind only until the next runtime starts. The lock,
//! not the pid, tells a live session: it holds across pid namespaces that
//! share `/tmp` (containers) and against recycled pids. A session is made
//! under a temporary name, locked, then renamed into place, so no start
//! ever sees one that exists but is not locked yet.
//!
//! The root is per user and must be a directory of ours that no one else
//! may enter (mode `0700`, not a link): another local user cannot read the
//! logs, plant files for us to remove, or point the root elsewhere. When
//! it fails these checks (another user made it first, say), or the user
//! cannot be told (no `/proc`), the session goes in a fresh private
//! directory of its own instead, with a warning: it is not shared, so no
//! start cleans it up after a crash, but nothing is refused.
//!
//! # Failure
//!
//! Removing a dead session is best effort: one that cannot be removed is
//! left for the next start and logged.

use rustyray_common::error::{Error, Result};
use std::fs::{File, TryLockError};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The name of the link to the newest session.
const LATEST: &str = "session_latest";
/// The file a live session's runtime holds locked.
const LOCK: &str = "lock";

/// A runtime's session directory, locked for as long as this value lives.
#[derive(Debug)]
pub(crate) struct Session {
    dir: PathBuf,
    /// Held locked: the session is live while this file is open.
    _lock: File,
    /// The private root made for this session alone, removed with it.
    own_root: Option<PathBuf>,
}

impl Session {
    /// Creates this runtime's session under the user's root in the
    /// system's temporary directory, after removing the sessions whose
    /// runtime is gone; in a private directory of its own if the root
    /// cannot be used.
    pub(crate) fn create(tag: &str) -> Result<Session> {
        let tmp = std::env::temp_dir();
        let shared = std::fs::metadata("/proc/self")
            .map(|m| tmp.join(format!("rustyray-{}", m.uid())))
            .map_err(|e| io("reading this process's owner", &e))
            .and_then(|root| Session::create_in(&root, tag));
        match shared {
            Ok(s) => Ok(s),
            Err(e) => {
                let own = tmp.join(format!("rustyray-{:032x}", rustyray_common::ids::random_token()));
                tracing::warn!(error = %e, dir = %own.display(), "the shared session root cannot be used; using a private one");
                let mut s = Session::create_in(&own, tag)?;
                s.own_root = Some(own);
                Ok(s)
            }
        }
    }

    /// Creates a session under `root` (made if missing, checked if not).
    pub(crate) fn create_in(root: &Path, tag: &str) -> Result<Session> {
        private_dir(root)?;
        remove_dead_sessions(root);
        let name = format!("session-{}-{tag}", std::process::id());
        let making = root.join(format!(".{name}"));
        let dir = root.join(&name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&making)
            .map_err(|e| io(format!("creating session directory {}", making.display()), &e))?;
        let lock = File::create(making.join(LOCK))
            .and_then(|f| f.try_lock().map_err(std::io::Error::from).map(|()| f))
            .and_then(|f| std::fs::rename(&making, &dir).map(|()| f))
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&making);
                io(format!("locking session directory {}", dir.display()), &e)
            })?;
        point_latest_at(root, &dir);
        Ok(Session {
            dir,
            _lock: lock,
            own_root: None,
        })
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
        let empty =
            std::fs::read_dir(&self.dir).is_ok_and(|mut d| d.all(|e| e.is_ok_and(|e| e.file_name() == LOCK)));
        // The lock file goes first: a start that looks meanwhile finds no
        // lock to take and leaves the directory alone.
        if !empty
            || std::fs::remove_file(self.dir.join(LOCK)).is_err()
            || std::fs::remove_dir(&self.dir).is_err()
        {
            return;
        }
        if let Some(root) = &self.own_root {
            let _ = std::fs::remove_file(root.join(LATEST));
            let _ = std::fs::remove_dir(root);
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
/// owned by this process's user that no one else may enter. A directory
/// this call made is ours and private (the umask only takes bits away), so
/// only one that was there already is checked, which needs `/proc` to tell
/// this process's user.
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
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

/// Removes the sessions under `root` whose runtime is gone: those whose
/// lock this process can take (held while they are removed, so no other
/// start takes them for live meanwhile).
fn remove_dead_sessions(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with("session-")) {
            continue;
        }
        let path = entry.path();
        let Ok(lock) = File::open(path.join(LOCK)) else {
            continue;
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => {
                tracing::debug!(dir = %path.display(), error = %e, "cannot tell whether a session is live");
                continue;
            }
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::debug!(dir = %path.display(), "removed the session of a runtime that is gone"),
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
        let root =
            std::env::temp_dir().join(format!("rr-sessions-{:x}", rustyray_common::ids::random_token()));
        private_dir(&root).expect("root");
        root
    }

    /// A session directory with an unlocked lock file, as a runtime that
    /// was SIGKILLed leaves it.
    fn dead_session(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("spill")).expect("dead session");
        std::fs::write(dir.join("spill").join("obj-1"), b"spilled").expect("spill file");
        File::create(dir.join(LOCK)).expect("lock file");
        dir
    }

    #[test]
    fn a_new_session_removes_the_sessions_whose_runtime_is_gone() {
        let root = scratch_root();
        let dead = dead_session(&root, "session-4242-rr000001");
        // A live runtime elsewhere (another pid namespace, say): its lock
        // is held, whatever its pid says.
        let live = dead_session(&root, "session-1-rr000002");
        let held = File::open(live.join(LOCK)).expect("open lock");
        held.lock().expect("hold the lock");
        // A directory without a lock file is none of ours to judge.
        let other = root.join("session-7-rr000003");
        std::fs::create_dir_all(&other).expect("other");

        let s = Session::create_in(&root, "rr000004").expect("session");
        assert!(!dead.exists(), "a dead runtime's session is left behind");
        assert!(live.exists(), "a live session was removed");
        assert!(other.exists());
        assert!(s.dir().is_dir());
        let latest = std::fs::read_link(root.join(LATEST)).expect("latest link");
        assert_eq!(Some(latest.as_os_str()), s.dir().file_name());

        // A second start sees this session live, then dead once dropped.
        let second = Session::create_in(&root, "rr000005").expect("second session");
        assert!(s.dir().exists());
        let first = s.dir().to_owned();
        drop(s);
        let third = Session::create_in(&root, "rr000006").expect("third session");
        assert!(!first.exists(), "a dropped session is live");
        assert!(second.dir().exists() && third.dir().exists());
        drop(held);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn a_clean_close_leaves_nothing_but_logs() {
        let root = scratch_root();
        let quiet = Session::create_in(&root, "rr000001").expect("session");
        std::fs::create_dir(quiet.dir().join("spill")).expect("spill dir");
        quiet.close();
        assert!(!quiet.dir().exists());
        assert!(
            std::fs::read_link(root.join(LATEST)).is_err(),
            "a link to nothing"
        );
        let chatty = Session::create_in(&root, "rr000002").expect("session");
        std::fs::create_dir(chatty.dir().join("logs")).expect("logs dir");
        std::fs::write(chatty.dir().join("logs").join("worker-1.out"), b"hello\n").expect("log");
        chatty.close();
        assert!(
            chatty.dir().join("logs").join("worker-1.out").exists(),
            "logs stay"
        );
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
}
