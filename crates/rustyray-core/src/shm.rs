//! Large objects in the node's shared memory — the owner's and the
//! worker's side of Ray's plasma store, over `rustyray-shm`.
//!
//! In the worker-process mode the driver's node daemon owns a
//! [`ShmStore`]: values whose bytes form reaches the threshold (100 KiB by
//! default) are written into it once, where every process of the node
//! reads them in place. The owner's value then holds a [`ShmObject`]: not
//! pinned, so the store may spill it to disk when memory runs short and
//! restore it on the next read; freed at once when the last holder goes.
//! Reading pins it ([`SharedBytes`]), and a [`crate::Blob`] decoded from
//! pinned bytes keeps the pin and reads them without a copy.
//!
//! A task argument in shared memory travels as its location, pinned for
//! the worker that receives it ([`Pins`]); the worker's view tells the
//! daemon to unpin when the worker drops it, and a worker that dies has
//! its pins released for it. A large result is written by the worker
//! straight into an allocation the daemon made for it, then sealed.

use crate::error::{Error, Result};
use rustyray_shm::{Pinned, RemoteView, ShmError, ShmStore, StoreConfig};
use std::ops::Deref;
use std::sync::Arc;

/// The environment variable that hands the node's arena to a worker.
pub(crate) const ARENA_ENV: &str = "RUSTYRAY_ARENA";

/// Values whose bytes form is at least this long go to shared memory.
pub(crate) const DEFAULT_THRESHOLD: usize = 100 * 1024;

/// The node's shared-memory store and its policy.
#[derive(Debug)]
pub(crate) struct NodeStore {
    pub(crate) store: ShmStore,
    pub(crate) threshold: usize,
    /// Mints object ids: a random tag and a counter, like every other id.
    ids: crate::ids::IdGen,
}

impl NodeStore {
    pub(crate) fn new(capacity: usize, spill_dir: std::path::PathBuf, threshold: usize) -> Result<Arc<Self>> {
        let store = ShmStore::new(StoreConfig::new(capacity, spill_dir)).map_err(shm_error)?;
        Ok(Arc::new(NodeStore {
            store,
            threshold,
            ids: crate::ids::IdGen::new(),
        }))
    }

    /// Writes a borrowed value's bytes form into the store when it is
    /// large enough for shared memory and a flat vector of numbers (whose
    /// length is known without encoding it); `None` otherwise.
    pub(crate) fn store_borrowed<T: crate::Data>(self: &Arc<Self>, v: &T) -> Result<Option<ShmObject>> {
        let Some(len) = crate::codec::raw_len(v) else {
            return Ok(None);
        };
        if len < self.threshold {
            return Ok(None);
        }
        self.write_new(len, |buf| Ok(crate::codec::raw_write(v, buf)))
    }

    /// Writes a value's bytes form into the store. `None` when the value
    /// holds object references (those stay in the owner's memory).
    pub(crate) fn store_value(self: &Arc<Self>, v: &crate::Value) -> Result<Option<ShmObject>> {
        self.write_new(v.encoded_len()?, |buf| v.encode_into(buf))
    }

    /// Makes a new object of `len` bytes that `fill` writes; `None` (and
    /// nothing kept) when `fill` declines.
    fn write_new(
        self: &Arc<Self>,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<bool>,
    ) -> Result<Option<ShmObject>> {
        let id = self.ids.object().as_u128();
        let mut w = self.store.create(id, len).map_err(shm_error)?;
        if !fill(w.as_mut_slice())? {
            return Ok(None);
        }
        w.seal();
        Ok(Some(ShmObject {
            node: self.clone(),
            id,
            len,
        }))
    }

    /// Pins object `id` for a reader in another process.
    pub(crate) fn pin_remote(&self, id: u128) -> Result<(u64, u64)> {
        self.store.pin(id).map_err(shm_error)
    }
}

/// An object in the node's store as its owner holds it: unpinned, freed
/// when dropped.
pub(crate) struct ShmObject {
    pub(crate) node: Arc<NodeStore>,
    pub(crate) id: u128,
    pub(crate) len: usize,
}

impl std::fmt::Debug for ShmObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShmObject({:x}, {} bytes)", self.id, self.len)
    }
}

impl ShmObject {
    /// Pins the object (restoring it from disk if it was spilled).
    pub(crate) fn pin(&self) -> Result<SharedBytes> {
        self.node
            .store
            .get(self.id)
            .map(SharedBytes::Owner)
            .map_err(shm_error)
    }
}

impl Drop for ShmObject {
    fn drop(&mut self) {
        if let Err(e) = self.node.store.delete(self.id) {
            tracing::warn!(id = self.id, error = %e, "could not free a shared-memory object");
        }
    }
}

/// Bytes of an object, pinned and mapped in this process.
#[derive(Clone, Debug)]
pub(crate) enum SharedBytes {
    /// In the node daemon's process.
    Owner(Pinned),
    /// In a worker process: pinned by the daemon for it.
    Worker(RemoteView),
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            SharedBytes::Owner(p) => p,
            SharedBytes::Worker(v) => v,
        }
    }
}

/// Pins taken on behalf of a worker that is about to receive a spec; they
/// go back to the store unless [`Pins::hand_over`] gives them to the
/// worker.
#[derive(Debug)]
pub(crate) struct Pins {
    node: Option<Arc<NodeStore>>,
    ids: Vec<u128>,
}

impl Pins {
    pub(crate) fn none() -> Self {
        Pins {
            node: None,
            ids: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, node: &Arc<NodeStore>, id: u128) {
        self.node.get_or_insert_with(|| node.clone());
        self.ids.push(id);
    }

    /// The pinned ids, now the receiver's to release.
    pub(crate) fn hand_over(mut self) -> Vec<u128> {
        self.node = None;
        std::mem::take(&mut self.ids)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            for id in self.ids.drain(..) {
                let _ = node.store.unpin(id);
            }
        }
    }
}

/// The runtime's error for a store failure.
pub(crate) fn shm_error(e: ShmError) -> Error {
    match e {
        ShmError::Full {
            requested,
            capacity,
            pinned,
            ..
        } => Error::ObjectStoreFull {
            needed: requested,
            used: pinned,
            capacity,
        },
        e @ ShmError::OutOfDisk { .. } => Error::OutOfDisk(e.to_string()),
        ShmError::NotFound(id) => Error::ObjectLost(crate::ids::ObjectId::from_u128(id)),
        other => Error::invalid(format!("shared-memory store: {other}")),
    }
}
