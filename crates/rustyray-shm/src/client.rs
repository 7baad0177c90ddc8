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
//! rules seen from the other side: across processes the daemon keeps them
//! (it is the same program, started by the same user, and never writes or
//! frees a region it pinned or handed out for writing); within this process
//! the client keeps them itself, refusing a write that overlaps a live view
//! or another write. Together they make the safe API here sound.
//!
//! [`inherit_arena`]: crate::inherit_arena

use crate::{Arena, ShmError};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// Regions of the arena this process reads or writes now. The client
/// refuses a write that overlaps a live view or another write, and a view
/// that overlaps a write in progress, so safe code in this process can
/// never hold a `&mut [u8]` aliased by another reference; across
/// processes, the node daemon's protocol keeps them apart.
#[derive(Debug, Default)]
struct Regions {
    /// Live views: `(offset, len)` → how many.
    reading: std::collections::HashMap<(usize, usize), usize>,
    /// Writes in progress.
    writing: Vec<(usize, usize)>,
}

fn overlap(a: (usize, usize), b: (usize, usize)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn conflict(offset: usize, len: usize) -> ShmError {
    ShmError::Conflict {
        offset: offset as u64,
        len: len as u64,
    }
}

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
    regions: Arc<Mutex<Regions>>,
}

impl ShmClient {
    /// Maps the arena this process inherited through `env_var`, if any.
    pub fn from_env(env_var: &str) -> Result<Option<ShmClient>, ShmError> {
        Ok(Arena::from_env(env_var)?.map(ShmClient::new))
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
            regions: Arc::default(),
        }
    }

    fn regions(&self) -> std::sync::MutexGuard<'_, Regions> {
        self.regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A view of the sealed object at `(offset, len)`, which the node
    /// daemon pinned for this process; `release` runs (to have it
    /// unpinned) when the last clone of the view is dropped. Out-of-range
    /// regions, and regions this process is writing, are refused.
    pub fn view(
        &self,
        offset: usize,
        len: usize,
        release: Box<dyn FnOnce() + Send + Sync>,
    ) -> Result<RemoteView, ShmError> {
        // SAFETY: checks only the bounds here; the slice is not kept.
        unsafe { self.arena.region(offset, len) }?;
        {
            let mut r = self.regions();
            if r.writing.iter().any(|w| overlap(*w, (offset, len))) {
                return Err(conflict(offset, len));
            }
            *r.reading.entry((offset, len)).or_insert(0) += 1;
        }
        Ok(RemoteView(Arc::new(ViewInner {
            arena: self.arena.clone(),
            regions: self.regions.clone(),
            offset,
            len,
            release: Mutex::new(Some(release)),
        })))
    }

    /// Fills the unsealed allocation at `(offset, len)`, which the node
    /// daemon made for this process to write, by calling `fill` on it.
    /// A region this process reads (a live view) or writes already is
    /// refused.
    pub fn write_with<R>(
        &self,
        offset: usize,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, ShmError> {
        // SAFETY: checks only the bounds here; the slice is not kept.
        unsafe { self.arena.region(offset, len) }?;
        {
            let mut r = self.regions();
            let busy = r.writing.iter().any(|w| overlap(*w, (offset, len)))
                || r.reading.keys().any(|v| overlap(*v, (offset, len)));
            if busy {
                return Err(conflict(offset, len));
            }
            r.writing.push((offset, len));
        }
        /// Ends the write, also when `fill` unwinds.
        struct Done<'a>(&'a ShmClient, (usize, usize));
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let mut r = self.0.regions();
                if let Some(i) = r.writing.iter().position(|w| *w == self.1) {
                    r.writing.swap_remove(i);
                }
            }
        }
        let _done = Done(self, (offset, len));
        // SAFETY: the region lies in the arena (checked above); no other
        // reference to it exists in this process (the region table above
        // refuses overlapping views and writes while this one lasts); and
        // the node daemon handed this allocation to this process alone and
        // does not read it before it is sealed, which happens after this
        // returns. The slice does not outlive the call.
        let region = unsafe { self.arena.region_mut(offset, len) }?;
        Ok(fill(region))
    }
}

struct ViewInner {
    arena: Arc<Arena>,
    regions: Arc<Mutex<Regions>>,
    offset: usize,
    len: usize,
    release: Mutex<Option<Box<dyn FnOnce() + Send + Sync>>>,
}

impl Drop for ViewInner {
    fn drop(&mut self) {
        {
            let mut r = self
                .regions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (self.offset, self.len);
            match r.reading.get_mut(&key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    r.reading.remove(&key);
                }
            }
        }
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
        // pinned objects are never written, moved or freed by the store,
        // and this process's client refuses writes overlapping a live
        // view. The bounds were checked when the view was made and the
        // arena's size never changes.
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

    #[test]
    fn overlapping_views_and_writes_are_refused() {
        let client = ShmClient::new(Arena::create("client-overlap", 8192).expect("arena"));
        let view = client.view(0, 100, Box::new(|| {})).expect("view");
        assert!(matches!(
            client.write_with(50, 100, |_| ()),
            Err(ShmError::Conflict { .. })
        ));
        assert!(client.write_with(100, 10, |_| ()).is_ok());
        let nested = client.write_with(200, 10, |_| client.write_with(205, 1, |_| ()).is_err());
        assert_eq!(nested.ok(), Some(true));
        let seen = client.write_with(300, 10, |_| client.view(300, 10, Box::new(|| {})).is_err());
        assert_eq!(seen.ok(), Some(true));
        drop(view);
        assert!(client.write_with(50, 100, |_| ()).is_ok());
    }
}
