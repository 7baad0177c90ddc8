//! The shared-memory arena — the memory behind Ray's plasma store: one
//! anonymous `memfd` mapped read/write and shared by every process of a node
//! that was handed its descriptor.
//!
//! The arena is anonymous: it has no name in any file system, so it cannot be
//! orphaned the way a `/dev/shm` file can. Its memory is returned to the
//! system when the last process holding the descriptor or a mapping exits.
//! The descriptor is sealed against shrinking and growing, so a mapping can
//! never lose its pages underneath a reader (which would raise `SIGBUS`).
//!
//! # Aliasing contract
//!
//! The arena hands out raw regions `(offset, len)`; it does not know which
//! bytes belong to which object. The [`ShmStore`](crate::ShmStore) keeps the
//! contract that makes those regions sound to touch, in this and in every
//! other process that maps the arena:
//!
//! - a region is written only by the single holder of its unsealed
//!   allocation (a [`Writer`](crate::Writer), or the store while restoring a
//!   spilled object into freshly allocated space);
//! - a region is read only while its object is sealed and pinned (a
//!   [`Pinned`](crate::Pinned), a remote pin, or the store while spilling it),
//!   and sealed objects are never written again;
//! - allocations never overlap, and a region is not freed while pinned.
//!
//! This module and `store` are the only ones in the crate that contain
//! `unsafe` code.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use memmap2::{MmapOptions, MmapRaw};

use crate::ShmError;

/// Seals every arena carries: its size can never change again.
const ARENA_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A shared, fixed-size, read/write memory mapping backed by a sealed
/// anonymous `memfd`.
///
/// `Arena` is `Send + Sync`; access to its bytes goes through the unsafe
/// [`region`](Arena::region) and [`region_mut`](Arena::region_mut), whose
/// callers uphold the [aliasing contract](self#aliasing-contract).
///
/// ```
/// use rustyray_shm::Arena;
///
/// let arena = Arena::create("doc-arena", 4096)?;
/// assert_eq!(arena.capacity(), 4096);
/// // SAFETY: this example is the only user of the arena; the mutable region
/// // is dropped before the region is read.
/// unsafe {
///     arena.region_mut(64, 5)?.copy_from_slice(b"hello");
///     assert_eq!(arena.region(64, 5)?, b"hello");
/// }
/// # Ok::<(), rustyray_shm::ShmError>(())
/// ```
pub struct Arena {
    /// The memfd; kept open so the arena can be handed to other processes.
    file: File,
    /// The mapping of the whole memfd, `capacity` bytes, shared and read/write.
    map: MmapRaw,
    capacity: usize,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("fd", &self.file.as_raw_fd())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Arena {
    /// Creates an arena of `capacity` bytes: an anonymous memfd named `name`
    /// (the name only shows in `/proc/<pid>/fd`), sized, sealed against
    /// resizing, and mapped shared read/write. Its pages start zeroed.
    ///
    /// Fails with [`ShmError::InvalidConfig`] for a zero capacity or a name
    /// containing a NUL byte, and with [`ShmError::Os`] when a system call
    /// fails (for example when `capacity` exceeds what the kernel allows).
    ///
    /// ```
    /// let arena = rustyray_shm::Arena::create("plasma", 1 << 20)?;
    /// assert_eq!(arena.capacity(), 1 << 20);
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    pub fn create(name: &str, capacity: usize) -> Result<Arena, ShmError> {
        if capacity == 0 {
            return Err(ShmError::InvalidConfig("arena capacity must be positive".into()));
        }
        let c_name = CString::new(name)
            .map_err(|_| ShmError::InvalidConfig(format!("arena name {name:?} contains a nul byte")))?;
        // SAFETY: `c_name` is a valid NUL-terminated string that outlives the
        // call; memfd_create reads nothing else.
        let raw = unsafe { libc::memfd_create(c_name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(ShmError::Os(io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just returned by memfd_create, so it is an open
        // descriptor that nothing else in this process owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(capacity as u64)?;
        // SAFETY: fcntl with F_ADD_SEALS takes an integer argument and only
        // changes the seals of the descriptor `file` owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, ARENA_SEALS) } < 0 {
            return Err(ShmError::Os(io::Error::last_os_error()));
        }
        Arena::map(file, capacity)
    }

    /// Maps an arena received from another process: `fd` must be a memfd
    /// made by [`Arena::create`] (sealed against shrinking) of at least
    /// `capacity` bytes, else [`ShmError::BadHandoff`].
    ///
    /// ```
    /// use rustyray_shm::Arena;
    ///
    /// let owner = Arena::create("owner", 8192)?;
    /// let fd = owner.fd().try_clone_to_owned()?;
    /// let other = Arena::open(fd, 8192)?;
    /// // SAFETY: this example is the only user of both mappings; each region
    /// // reference is dropped before the next one is made.
    /// unsafe {
    ///     owner.region_mut(0, 3)?.copy_from_slice(b"abc");
    ///     assert_eq!(other.region(0, 3)?, b"abc");
    /// }
    /// assert!(Arena::open(owner.fd().try_clone_to_owned()?, 16384).is_err());
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    pub fn open(fd: OwnedFd, capacity: usize) -> Result<Arena, ShmError> {
        if capacity == 0 {
            return Err(ShmError::BadHandoff("arena capacity must be positive".into()));
        }
        let file = File::from(fd);
        let size = file.metadata()?.len();
        if size < capacity as u64 {
            return Err(ShmError::BadHandoff(format!(
                "descriptor {} holds {size} bytes, fewer than the capacity {capacity}",
                file.as_raw_fd()
            )));
        }
        // SAFETY: fcntl with F_GET_SEALS takes no argument and only reads the
        // seals of the descriptor `file` owns.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(ShmError::BadHandoff(format!(
                "descriptor {} is not a memfd sealed against shrinking",
                file.as_raw_fd()
            )));
        }
        Arena::map(file, capacity)
    }

    /// Maps the arena a parent process handed down with [`inherit_arena`]:
    /// reads `env_var` (`"<fd>:<capacity>"`), duplicates the inherited
    /// descriptor and maps it. Returns `Ok(None)` when the variable is not
    /// set, and [`ShmError::BadHandoff`] when its text is malformed or names
    /// a descriptor that is not an arena; it never panics.
    ///
    /// The inherited descriptor itself is left open and marked close-on-exec,
    /// so calling `from_env` twice maps the same memory twice and this
    /// process's own children do not inherit it by accident.
    ///
    /// ```
    /// use rustyray_shm::{Arena, ShmError};
    ///
    /// assert!(Arena::from_env("RUSTYRAY_DOC_NO_SUCH_VAR")?.is_none());
    /// # Ok::<(), ShmError>(())
    /// ```
    pub fn from_env(env_var: &str) -> Result<Option<Arena>, ShmError> {
        let Some(value) = std::env::var_os(env_var) else {
            return Ok(None);
        };
        let text = value
            .to_str()
            .ok_or_else(|| ShmError::BadHandoff(format!("{env_var} is not valid unicode")))?;
        Arena::from_handoff(env_var, text).map(Some)
    }

    /// Maps the arena described by hand-off `text` (the value of `env_var`).
    fn from_handoff(env_var: &str, text: &str) -> Result<Arena, ShmError> {
        let (fd, capacity) = parse_handoff(text)
            .ok_or_else(|| ShmError::BadHandoff(format!("{env_var}={text:?} is not \"<fd>:<capacity>\"")))?;
        // SAFETY: F_DUPFD_CLOEXEC takes an integer argument; on a descriptor
        // that is not open it fails with EBADF and touches nothing.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            let err = io::Error::last_os_error();
            return Err(ShmError::BadHandoff(format!(
                "{env_var} names descriptor {fd}: {err}"
            )));
        }
        // SAFETY: `dup` was just returned by fcntl(F_DUPFD_CLOEXEC), so it is
        // an open descriptor that nothing else in this process owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        // SAFETY: F_SETFD takes an integer argument and only changes the
        // close-on-exec flag of descriptor `fd`, which fcntl just showed open.
        // A failure here is harmless: the flag only matters to grandchildren.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Arena::open(owned, capacity)
    }

    fn map(file: File, capacity: usize) -> Result<Arena, ShmError> {
        let map = MmapOptions::new().len(capacity).map_raw(&file)?;
        Ok(Arena { file, map, capacity })
    }

    /// The arena's memfd, for handing to another process (over a Unix socket
    /// with `SCM_RIGHTS`, or by [`inherit_arena`]).
    ///
    /// ```
    /// use std::os::fd::AsRawFd;
    ///
    /// let arena = rustyray_shm::Arena::create("fd", 4096)?;
    /// assert!(arena.fd().as_raw_fd() >= 0);
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Size of the arena in bytes.
    ///
    /// ```
    /// assert_eq!(rustyray_shm::Arena::create("cap", 65536)?.capacity(), 65536);
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The memfd's inode number, unique among live memfds.
    pub(crate) fn inode(&self) -> Result<u64, ShmError> {
        Ok(self.file.metadata()?.ino())
    }

    /// Checks that `(offset, len)` lies inside the arena and returns a
    /// pointer to its first byte.
    fn region_ptr(&self, offset: usize, len: usize) -> Result<*mut u8, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => {
                debug_assert!(self.map.len() >= self.capacity);
                // `wrapping_add` stays inside the mapping because
                // `offset <= capacity <= map.len()`.
                Ok(self.map.as_mut_ptr().wrapping_add(offset))
            }
            _ => Err(ShmError::OutOfRange {
                offset: offset as u64,
                len: len as u64,
                size: self.capacity as u64,
            }),
        }
    }

    /// The bytes of region `(offset, len)`, bounds-checked
    /// ([`ShmError::OutOfRange`] when it does not lie inside the arena).
    ///
    /// # Safety
    ///
    /// For as long as the returned slice lives, no thread of any process that
    /// maps this arena may write any byte of the region: its object must be
    /// sealed and pinned (see the [aliasing contract](self#aliasing-contract)).
    ///
    /// ```
    /// let arena = rustyray_shm::Arena::create("read", 4096)?;
    /// // SAFETY: nothing writes this fresh arena while the slice lives.
    /// let zeros = unsafe { arena.region(128, 16)? };
    /// assert!(zeros.iter().all(|&b| b == 0));
    /// // SAFETY: an out-of-range region is refused before any access.
    /// assert!(unsafe { arena.region(4090, 16) }.is_err());
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    pub unsafe fn region(&self, offset: usize, len: usize) -> Result<&[u8], ShmError> {
        let ptr = self.region_ptr(offset, len)?;
        // SAFETY: `ptr..ptr+len` lies inside the live mapping (checked by
        // `region_ptr`), which stays mapped while `self` is borrowed; its
        // bytes are initialised (memfd pages start zeroed); `u8` needs no
        // alignment; and the caller guarantees nobody writes the region while
        // the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// The bytes of region `(offset, len)` for writing, bounds-checked
    /// ([`ShmError::OutOfRange`] when it does not lie inside the arena).
    ///
    /// # Safety
    ///
    /// For as long as the returned slice lives, no other reference to any
    /// byte of the region may exist or be made, in this or any other process
    /// that maps this arena: the caller must be the single holder of the
    /// region's unsealed allocation (see the
    /// [aliasing contract](self#aliasing-contract)).
    ///
    /// ```
    /// let arena = rustyray_shm::Arena::create("write", 4096)?;
    /// // SAFETY: this example is the only user of the arena.
    /// unsafe { arena.region_mut(0, 4)?.copy_from_slice(&[1, 2, 3, 4]) };
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    #[allow(clippy::mut_from_ref)] // Exclusivity is the caller's obligation, stated above.
    pub unsafe fn region_mut(&self, offset: usize, len: usize) -> Result<&mut [u8], ShmError> {
        let ptr = self.region_ptr(offset, len)?;
        // SAFETY: as in `region`, the range is inside the live, initialised
        // mapping; the mapping is writable (MAP_SHARED, PROT_READ|PROT_WRITE);
        // and the caller guarantees this is the only reference to the region.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }
}

/// Parses `"<fd>:<capacity>"` with a non-negative descriptor and a positive
/// capacity.
fn parse_handoff(text: &str) -> Option<(RawFd, usize)> {
    let (fd, capacity) = text.split_once(':')?;
    let fd: RawFd = fd.parse().ok()?;
    let capacity: usize = capacity.parse().ok()?;
    (fd >= 0 && capacity > 0).then_some((fd, capacity))
}

/// Arranges that a child started from `cmd` inherits `arena` and can map it
/// with [`Arena::from_env`]`(env_var)`.
///
/// The arena's descriptor is duplicated now (close-on-exec, number ≥ 3); the
/// duplicate lives as long as `cmd`, and a `pre_exec` hook clears its
/// close-on-exec flag in the forked child so it survives `exec`. `env_var`
/// is set to `"<fd>:<capacity>"` for the child. The arena itself may be
/// dropped before the child is spawned. Fails with [`ShmError::Os`] when the
/// descriptor cannot be duplicated.
///
/// ```no_run
/// use std::process::Command;
///
/// let arena = rustyray_shm::Arena::create("plasma", 1 << 20)?;
/// let mut cmd = Command::new("/proc/self/exe");
/// rustyray_shm::inherit_arena(&mut cmd, &arena, "RUSTYRAY_ARENA")?;
/// let _child = cmd.spawn()?;
/// // In the child: `Arena::from_env("RUSTYRAY_ARENA")?` maps the same memory.
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn inherit_arena(cmd: &mut Command, arena: &Arena, env_var: &str) -> Result<(), ShmError> {
    // `try_clone_to_owned` duplicates with F_DUPFD_CLOEXEC and a minimum of
    // 3, so the number cannot collide with the child's standard streams.
    let dup = arena.fd().try_clone_to_owned()?;
    let fd = dup.as_raw_fd();
    cmd.env(env_var, format!("{fd}:{}", arena.capacity()));
    let hook = move || -> io::Result<()> {
        // Keeps the duplicate open for as long as the command may spawn.
        let fd = dup.as_raw_fd();
        // SAFETY: between fork and exec only
        // async-signal-safe functions may run; fcntl is one, and this closure
        // neither allocates nor locks (`last_os_error` reads errno into a
        // plain value).
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; F_SETFD takes an integer and only changes the
        // child's copy of the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: `pre_exec` requires a hook that is safe to run in the forked
    // child before exec: `hook` only calls fcntl and reads errno, both
    // async-signal-safe, and touches no lock or allocator.
    unsafe { cmd.pre_exec(hook) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_text_is_validated() {
        assert_eq!(parse_handoff("7:4096"), Some((7, 4096)));
        for bad in [
            "", "7", ":", "7:", ":4096", "-1:4096", "7:0", "7:-5", "x:1", "7:1:2", " 7:1",
        ] {
            assert_eq!(parse_handoff(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn zero_capacity_and_nul_names_are_refused() {
        assert!(matches!(Arena::create("a", 0), Err(ShmError::InvalidConfig(_))));
        assert!(matches!(
            Arena::create("a\0b", 64),
            Err(ShmError::InvalidConfig(_))
        ));
    }

    #[test]
    fn open_refuses_files_that_are_not_sealed_arenas() -> Result<(), Box<dyn std::error::Error>> {
        let file = tempfile::tempfile()?;
        file.set_len(4096)?;
        let err = Arena::open(OwnedFd::from(file), 4096).err();
        assert!(matches!(err, Some(ShmError::BadHandoff(_))), "{err:?}");
        Ok(())
    }

    #[test]
    fn open_refuses_a_capacity_larger_than_the_memfd() -> Result<(), ShmError> {
        let arena = Arena::create("small", 4096)?;
        let err = Arena::open(arena.fd().try_clone_to_owned()?, 8192).err();
        assert!(matches!(err, Some(ShmError::BadHandoff(_))), "{err:?}");
        Ok(())
    }

    #[test]
    fn arenas_cannot_be_resized() -> Result<(), ShmError> {
        let arena = Arena::create("sealed", 4096)?;
        let file = File::from(arena.fd().try_clone_to_owned()?);
        assert!(file.set_len(0).is_err());
        assert!(file.set_len(8192).is_err());
        Ok(())
    }

    #[test]
    fn regions_are_bounds_checked() -> Result<(), ShmError> {
        let arena = Arena::create("bounds", 4096)?;
        // SAFETY: nothing in this test writes the arena.
        unsafe {
            assert_eq!(arena.region(0, 4096)?.len(), 4096);
            assert_eq!(arena.region(4096, 0)?.len(), 0);
            assert!(matches!(arena.region(4096, 1), Err(ShmError::OutOfRange { .. })));
            assert!(matches!(
                arena.region(usize::MAX, 2),
                Err(ShmError::OutOfRange { .. })
            ));
        }
        Ok(())
    }

    #[test]
    fn malformed_handoff_text_is_a_typed_error() -> Result<(), ShmError> {
        // The text is passed directly: setting environment variables while
        // other test threads read the environment is not thread-safe.
        for bad in ["nonsense", "3:", "99999:4096", "0:18446744073709551616"] {
            let result = Arena::from_handoff("VAR", bad);
            assert!(
                matches!(result, Err(ShmError::BadHandoff(_))),
                "{bad:?}: {result:?}"
            );
        }
        // A descriptor that is open but not an arena is refused too.
        let file = tempfile::tempfile()?;
        let text = format!("{}:4096", file.as_raw_fd());
        assert!(matches!(
            Arena::from_handoff("VAR", &text),
            Err(ShmError::BadHandoff(_))
        ));
        Ok(())
    }
}
