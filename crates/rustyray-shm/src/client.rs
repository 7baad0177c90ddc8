//! The arena as a worker process sees it — Ray's plasma client: it maps
//! the node's arena (handed over at start, see [`inherit_arena`]) and
//! touches only the regions the node daemon tells it about.
//!
//! The node daemon keeps the store's bookkeeping; a worker never allocates
//! or frees. It reads an object the daemon pinned for it ([`RemoteView`],
//! which calls its release hook, where the worker tells the daemon to
//! unpin, when the last clone goes), and it writes an object into the
//! unsealed allocation the daemon made for it ([`ShmClient::write_with`])
//! before telling the daemon to seal it. Those are the arena's aliasing
//! rules seen from the other side, which is what makes the safe API here
//! sound: the daemon is the same program, started by the same user, and it
//! never writes or frees a region it pinned or handed out for writing.
//!
//! [`inherit_arena`]: crate::inherit_arena

use crate::{Arena, ShmError};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// A worker process's mapping of its node's arena.
///
/// ```
/// use rustyray_shm::ShmClient;
///
/// // Outside a worker started with an arena, there is none.
/// assert!(ShmClient::from_env("RUSTYRAY_DOC_NO_ARENA")?.is_none());
/// # Ok::<(), rustyray_shm::ShmError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ShmClient {
    arena: Arc<Arena>,
}

impl ShmClient {
    /// Maps the arena this process inherited through `env_var`, if any.
    pub fn from_env(env_var: &str) -> Result<Option<ShmClient>, ShmError> {
        Ok(Arena::from_env(env_var)?.map(|arena| ShmClient {
            arena: Arc::new(arena),
        }))
    }

    /// A client over an arena this process already mapped.
    ///
    /// ```
    /// let client = rustyray_shm::ShmClient::new(rustyray_shm::Arena::create("doc", 4096)?);
    /// client.write_with(0, 3, |b| b.copy_from_slice(b"abc"))?;
    /// let view = client.view(0, 3, Box::new(|| {}))?;
    /// assert_eq!(&view[..], b"abc");
    /// # Ok::<(), rustyray_shm::ShmError>(())
    /// ```
    pub fn new(arena: Arena) -> ShmClient {
        ShmClient {
            arena: Arc::new(arena),
        }
    }

    /// A view of the sealed object at `(offset, len)`, which the node
    /// daemon pinned for this process; `release` runs (to have it
    /// unpinned) when the last clone of the view is dropped. Out-of-range
    /// regions are refused.
    pub fn view(
        &self,
        offset: usize,
        len: usize,
        release: Box<dyn FnOnce() + Send + Sync>,
    ) -> Result<RemoteView, ShmError> {
        // SAFETY: checks only the bounds here; the slice is not kept.
        unsafe { self.arena.region(offset, len) }?;
        Ok(RemoteView(Arc::new(ViewInner {
            arena: self.arena.clone(),
            offset,
            len,
            release: Mutex::new(Some(release)),
        })))
    }

    /// Fills the unsealed allocation at `(offset, len)`, which the node
    /// daemon made for this process to write, by calling `fill` on it.
    pub fn write_with<R>(
        &self,
        offset: usize,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, ShmError> {
        // SAFETY: the daemon handed this allocation to this process alone
        // and does not read it before it is sealed, which happens after
        // this returns; the slice does not outlive the call.
        let region = unsafe { self.arena.region_mut(offset, len) }?;
        Ok(fill(region))
    }
}

struct ViewInner {
    arena: Arc<Arena>,
    offset: usize,
    len: usize,
    release: Mutex<Option<Box<dyn FnOnce() + Send + Sync>>>,
}

impl Drop for ViewInner {
    fn drop(&mut self) {
        let release = match self.release.get_mut() {
            Ok(r) => r.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(release) = release {
            release();
        }
    }
}

/// The bytes of an object in the node's arena, read in place. Cloning is
/// cheap and shares the pin.
#[derive(Clone)]
pub struct RemoteView(Arc<ViewInner>);

impl fmt::Debug for RemoteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteView")
            .field("offset", &self.0.offset)
            .field("len", &self.0.len)
            .finish()
    }
}

impl Deref for RemoteView {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the daemon pinned this sealed object for this process
        // until the view's release hook runs, which happens only when the
        // last clone (and so every borrow of this slice) is gone; sealed,
        // pinned objects are never written, moved or freed. The bounds were
        // checked when the view was made and the arena's size never changes.
        match unsafe { self.0.arena.region(self.0.offset, self.0.len) } {
            Ok(bytes) => bytes,
            Err(_) => &[],
        }
    }
}

impl AsRef<[u8]> for RemoteView {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn views_release_once_with_their_last_clone_and_refuse_bad_ranges() {
        let client = ShmClient::new(Arena::create("client-test", 8192).expect("arena"));
        let written = client.write_with(100, 4, |b| b.copy_from_slice(b"abcd"));
        assert!(written.is_ok());
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let view = client
            .view(
                100,
                4,
                Box::new(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .expect("view");
        let again = view.clone();
        drop(view);
        assert_eq!(released.load(Ordering::SeqCst), 0);
        assert_eq!(&again[..], b"abcd");
        drop(again);
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert!(client.view(8190, 4, Box::new(|| {})).is_err());
        assert!(client.write_with(8192, 1, |_| ()).is_err());
    }
}
