//! Spill files — Ray's external storage for object spilling
//! (`FileSystemStorage` in `external_storage.py`): objects are copied out of
//! the arena into files of a spill directory, several small ones fused into
//! one file, and read back on access.
//!
//! This module does file I/O only; which objects to spill, and when, is the
//! store's decision. It never runs under the store's lock.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ShmError;

/// Creates and removes spill files: the seam that lets tests point spill
/// writes at a device that fails the way a full disk does.
pub(crate) trait SpillBackend: Send + Sync + fmt::Debug {
    /// Creates a new, empty spill file at `path` for writing; fails if it
    /// already exists.
    fn create(&self, path: &Path) -> io::Result<File>;
    /// Removes a spill file that is no longer needed.
    fn remove(&self, path: &Path) -> io::Result<()>;
}

/// Spill files are plain files in the spill directory.
#[derive(Debug)]
pub(crate) struct DiskBackend;

impl SpillBackend for DiskBackend {
    fn create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().write(true).create_new(true).open(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
}

/// Whether an I/O error means that the disk (or the user's quota) is full.
pub(crate) fn is_out_of_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(
            err.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// A failed spill write: the file it concerned and the error.
#[derive(Debug)]
pub(crate) struct WriteFailure {
    pub(crate) path: PathBuf,
    pub(crate) source: io::Error,
}

impl WriteFailure {
    /// Maps the failure of a spill made to fit object `id`, `needed` bytes in
    /// all: a full disk becomes [`ShmError::OutOfDisk`], anything else
    /// [`ShmError::Io`] naming the file.
    pub(crate) fn into_error(self, id: u128, needed: u64) -> ShmError {
        if is_out_of_space(&self.source) {
            ShmError::OutOfDisk {
                id,
                needed,
                available: None,
            }
        } else {
            ShmError::Io {
                path: self.path,
                source: self.source,
            }
        }
    }
}

/// Writes `parts` one after another into a new file at `path` and returns
/// the file's size. On failure the partial file is removed again.
pub(crate) fn write_file(
    backend: &dyn SpillBackend,
    path: &Path,
    parts: &[&[u8]],
) -> Result<u64, WriteFailure> {
    let fail = |source| WriteFailure {
        path: path.to_path_buf(),
        source,
    };
    let mut file = backend.create(path).map_err(fail)?;
    let written = parts
        .iter()
        .try_for_each(|part| file.write_all(part))
        .and_then(|()| file.flush());
    if let Err(source) = written {
        drop(file);
        remove_file(backend, path);
        return Err(fail(source));
    }
    Ok(parts.iter().map(|p| p.len() as u64).sum())
}

/// Reads exactly `buf.len()` bytes at `offset` of the spill file at `path`.
pub(crate) fn read_file(path: &Path, offset: u64, buf: &mut [u8]) -> Result<(), ShmError> {
    let io_err = |source| ShmError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    file.read_exact_at(buf, offset).map_err(io_err)
}

/// Removes a spill file, logging (not returning) a failure: the file holds
/// no live object any more, so a leftover only costs disk space.
pub(crate) fn remove_file(backend: &dyn SpillBackend, path: &Path) {
    if let Err(err) = backend.remove(path) {
        tracing::warn!(path = %path.display(), error = %err, "could not remove spill file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_parts_are_written_back_to_back() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let size = write_file(&DiskBackend, &path, &[b"abc", b"", b"defg"]).map_err(|f| f.source)?;
        assert_eq!(size, 7);
        let mut buf = [0; 4];
        read_file(&path, 3, &mut buf)?;
        assert_eq!(&buf, b"defg");
        assert!(matches!(read_file(&path, 5, &mut buf), Err(ShmError::Io { .. })));
        Ok(())
    }

    #[test]
    fn an_existing_file_is_never_overwritten() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        std::fs::write(&path, b"keep")?;
        let err = write_file(&DiskBackend, &path, &[b"x"])
            .err()
            .map(|f| f.into_error(1, 1));
        assert!(matches!(err, Some(ShmError::Io { .. })), "{err:?}");
        // The failed create must not have removed someone else's file.
        assert_eq!(std::fs::read(&path)?, b"keep");
        Ok(())
    }

    #[test]
    fn disk_full_errors_are_recognised() {
        assert!(is_out_of_space(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_out_of_space(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(!is_out_of_space(&io::Error::from_raw_os_error(libc::EACCES)));
    }
}
