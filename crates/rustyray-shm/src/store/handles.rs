//! The handles a store gives out: [`Writer`] for an object being created,
//! [`Pinned`] for reading a sealed one.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::shared::Shared;
use super::state::Slot;
use crate::ShmError;

/// Unwraps the region of a block the allocator handed out, which always lies
/// inside the arena. A failed check means the store's bookkeeping is
/// corrupt; carrying on would read or write the wrong bytes, so it panics.
pub(super) fn in_arena<T>(region: Result<T, ShmError>) -> T {
    match region {
        Ok(region) => region,
        Err(err) => panic!("shared-memory store bookkeeping is corrupt: {err}"),
    }
}

/// The single writer of a newly created object: fill its bytes, then
/// [`seal`](Writer::seal) to publish it. Dropping an unsealed writer aborts
/// the create and frees the space.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
/// let mut writer = store.create(1, 8)?;
/// writer.write_at(0, b"abcd")?;
/// writer.write_at(4, b"efgh")?;
/// assert!(writer.write_at(6, b"xyz").is_err());
/// writer.seal();
/// assert_eq!(&store.get(1)?[..], b"abcdefgh");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Writer {
    shared: Arc<Shared>,
    id: u128,
    offset: usize,
    len: usize,
    /// Set by `seal`, so that the drop that follows keeps the object.
    sealed: bool,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("id", &self.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl Writer {
    /// The writer of object `id`, which is Writing at `offset`.
    pub(super) fn new(shared: Arc<Shared>, id: u128, offset: usize, len: usize) -> Writer {
        Writer {
            shared,
            id,
            offset,
            len,
            sealed: false,
        }
    }

    /// The object's id.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert_eq!(store.create(11, 1)?.id(), 11);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn id(&self) -> u128 {
        self.id
    }

    /// The object's offset in the arena (a multiple of 64).
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert_eq!(store.create(11, 1)?.offset() % 64, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The object's length in bytes.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert_eq!(store.create(11, 100)?.len(), 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the object is empty.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// assert!(store.create(11, 0)?.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The object's bytes, exactly [`len`](Writer::len) of them, to fill in
    /// place. Fresh space may hold bytes of an earlier object.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// let mut writer = store.create(2, 3)?;
    /// writer.as_mut_slice().fill(9);
    /// writer.seal();
    /// assert_eq!(&store.get(2)?[..], &[9, 9, 9]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the object is Writing and this `Writer`, which is neither
        // `Clone` nor shared mutably, is the single holder of its allocation:
        // nobody can pin an unsealed object, and the block is freed only when
        // the writer is dropped. `&mut self` makes the slice exclusive.
        let region = unsafe { self.shared.arena.region_mut(self.offset, self.len) };
        in_arena(region)
    }

    /// Copies `bytes` into the object at `offset`; fails with
    /// [`ShmError::OutOfRange`] if they do not fit inside the object.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// let mut writer = store.create(3, 4)?;
    /// writer.write_at(2, b"hi")?;
    /// assert!(writer.write_at(3, b"hi").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) -> Result<(), ShmError> {
        let out_of_range = || ShmError::OutOfRange {
            offset: offset as u64,
            len: bytes.len() as u64,
            size: self.len as u64,
        };
        let end = offset
            .checked_add(bytes.len())
            .filter(|&end| end <= self.len)
            .ok_or_else(out_of_range)?;
        self.as_mut_slice()[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    /// Seals the object: from now on it is immutable, readable with
    /// [`get`](crate::ShmStore::get), and may be spilled. If the owner deleted it
    /// while it was being written, it is freed instead.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// let writer = store.create(4, 0)?;
    /// assert!(store.get(4).is_err());
    /// writer.seal();
    /// assert!(store.get(4)?.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn seal(mut self) {
        let mut state = self.shared.state.lock();
        if let Some(entry) = state.objects.get_mut(&self.id) {
            debug_assert_eq!(entry.slot, Slot::Writing { offset: self.offset });
            entry.slot = Slot::Resident {
                offset: self.offset,
                tick: 0,
            };
            state.settle_unpinned(self.id);
        }
        self.sealed = true;
    }
}

impl Drop for Writer {
    /// Aborts the create unless the object was sealed: frees the space and
    /// forgets the id.
    fn drop(&mut self) {
        if !self.sealed {
            self.shared.state.lock().free_resident(self.id, self.offset);
        }
    }
}

/// A pinned, sealed object: derefs to its bytes, which stay in the arena —
/// never spilled, moved or freed — until the last clone is dropped.
///
/// `Pinned` is `Send + Sync`; cloning takes another pin. Its
/// [`offset`](Pinned::offset) and [`len`](Pinned::len) locate the bytes for
/// a reader in another process that maps the same arena.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
/// store.put(8, b"pinned")?;
/// let a = store.get(8)?;
/// let b = a.clone();
/// drop(a);
/// assert_eq!(&b[..], b"pinned");
/// assert_eq!(b.id(), 8);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Pinned {
    shared: Arc<Shared>,
    id: u128,
    offset: usize,
    len: usize,
}

impl fmt::Debug for Pinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinned")
            .field("id", &self.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl Pinned {
    /// A handle for a pin on object `id` that the caller has already taken.
    pub(super) fn new(shared: Arc<Shared>, id: u128, offset: usize, len: usize) -> Pinned {
        Pinned {
            shared,
            id,
            offset,
            len,
        }
    }

    /// The object's id.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(12, b"x")?;
    /// assert_eq!(store.get(12)?.id(), 12);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn id(&self) -> u128 {
        self.id
    }

    /// The object's offset in the arena.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(12, b"x")?;
    /// let pinned = store.get(12)?;
    /// // SAFETY: the object is sealed and pinned, so nobody writes it.
    /// let bytes = unsafe { store.arena().region(pinned.offset(), pinned.len())? };
    /// assert_eq!(bytes, b"x");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The object's length in bytes.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(12, b"xyz")?;
    /// assert_eq!(store.get(12)?.len(), 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the object is empty.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// # let store = rustyray_shm::ShmStore::new(rustyray_shm::StoreConfig::new(1 << 20, dir.path()))?;
    /// store.put(12, b"")?;
    /// assert!(store.get(12)?.is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Deref for Pinned {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: this handle holds a pin on a sealed object (Resident or
        // Spilling): sealed objects are never written again, and a pinned
        // object's block is never freed or reallocated, so nobody writes the
        // region while `self`, and so the slice, lives.
        let region = unsafe { self.shared.arena.region(self.offset, self.len) };
        in_arena(region)
    }
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Clone for Pinned {
    fn clone(&self) -> Pinned {
        let mut state = self.shared.state.lock();
        if let Some(entry) = state.objects.get_mut(&self.id) {
            debug_assert!(entry.pins > 0);
            entry.pins += 1;
        }
        Pinned {
            shared: Arc::clone(&self.shared),
            id: self.id,
            offset: self.offset,
            len: self.len,
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let released = self.shared.unpin(self.id);
        debug_assert!(released.is_ok(), "{released:?}");
    }
}
