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
//! the worker that receives it ([`Loan`]); the worker's view tells the
//! daemon to unpin when the worker drops it, and a worker that dies has
//! its pins released for it. A large result is written by the worker
//! straight into an allocation the daemon made for it, then sealed.

use crate::error::{Error, Result};
use rustyray_shm::{Pinned, RemoteView, ShmStore};
use std::ops::Deref;
use std::sync::Arc;

/// Values whose bytes form is at least this long go to shared memory.
pub(crate) const DEFAULT_THRESHOLD: usize = 100 * 1024;

/// The node's shared-memory store and its policy.
#[derive(Debug)]
pub(crate) struct NodeStore {
    pub(crate) store: Arc<ShmStore>,
    pub(crate) threshold: usize,
    /// Mints object ids: a random tag and a counter, like every other id.
    ids: crate::ids::IdGen,
}

impl NodeStore {
    /// The owner's side of the node's store `store` (the node daemon made
    /// it), writing values of at least `threshold` bytes.
    pub(crate) fn over(store: Arc<ShmStore>, threshold: usize) -> Arc<Self> {
        Arc::new(NodeStore {
            store,
            threshold,
            ids: crate::ids::IdGen::new(),
        })
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
        failpoint!("shm::create", |_| Err(crate::Error::OutOfDisk(
            "allocating in shared memory (failpoint shm::create)".to_owned()
        )));
        let id = self.ids.object().as_u128();
        let mut w = self.store.create(id, len).map_err(Error::from)?;
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
        self.store.pin(id).map_err(Error::from)
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
            .map_err(Error::from)
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

/// What a message lends the worker that receives it: pins on
/// shared-memory objects (its arguments or a value it fetched) and counts
/// on the owner's objects that the message's values refer to. Both go
/// back when the loan drops, unless [`Loan::hand_over`] gives them to the
/// worker, which returns them with `Unpin` and `Release`.
#[derive(Debug)]
pub(crate) struct Loan {
    node: Option<Arc<NodeStore>>,
    ids: Vec<u128>,
    refs: Vec<crate::RawRef>,
    actors: Vec<crate::actor::RawActor>,
}

/// What a loan hands over to its worker: pinned node-store ids, and the
/// owner's objects and actors lent.
pub(crate) type HandedOver = (Vec<u128>, Vec<crate::RawRef>, Vec<crate::actor::RawActor>);

impl Loan {
    pub(crate) fn none() -> Self {
        Loan {
            node: None,
            ids: Vec::new(),
            refs: Vec::new(),
            actors: Vec::new(),
        }
    }

    /// Pins object `id` of `node`; returns where its bytes lie.
    pub(crate) fn pin(&mut self, node: &Arc<NodeStore>, id: u128) -> Result<(u64, u64)> {
        let at = node.pin_remote(id)?;
        self.node.get_or_insert_with(|| node.clone());
        self.ids.push(id);
        Ok(at)
    }

    /// Lends the objects and actors an encoded value names; returns them
    /// as the wire lists them.
    pub(crate) fn lend_named(
        &mut self,
        value: &crate::Value,
    ) -> (Vec<crate::ids::ObjectId>, Vec<crate::wire::NamedActor>) {
        let refs = value.nested_refs();
        let ids = refs.iter().map(crate::RawRef::id).collect();
        self.refs.extend(refs);
        let actors = value.nested_actors();
        let named = actors.iter().map(crate::actor::RawActor::named).collect();
        self.actors.extend(actors);
        (ids, named)
    }

    /// Lends a value to the worker receiving it: its location when it is in
    /// `node`'s shared memory (written there first when large enough and
    /// not there yet), pinned; else its bytes, lending the objects they
    /// refer to.
    pub(crate) fn lend(&mut self, v: &crate::Value, node: Option<&Arc<NodeStore>>) -> Result<Lent> {
        let fresh;
        let stored = match (v.stored(), node) {
            (Some(o), _) => Some(o),
            (None, Some(node)) if v.size()? >= node.threshold => {
                // Freed once the worker unpins it: nothing else holds it.
                fresh = node.store_value(v)?;
                fresh.as_ref()
            }
            _ => None,
        };
        if let Some(o) = stored {
            let (offset, len) = self.pin(&o.node, o.id)?;
            return Ok(Lent::Shared {
                id: o.id,
                offset,
                len,
            });
        }
        let enc = v.to_encoded()?;
        let (refs, actors) = self.lend_named(&enc);
        Ok(Lent::Inline {
            bytes: enc.bytes().map(<[u8]>::to_vec).unwrap_or_default(),
            refs,
            actors,
        })
    }

    /// The pinned ids and the lent objects and actors, now the receiver's.
    pub(crate) fn hand_over(mut self) -> HandedOver {
        self.node = None;
        (
            std::mem::take(&mut self.ids),
            std::mem::take(&mut self.refs),
            std::mem::take(&mut self.actors),
        )
    }
}

/// A value as a worker receives it (see [`Loan::lend`]).
#[derive(Debug)]
pub(crate) enum Lent {
    /// In the node's shared memory, pinned for the worker.
    Shared {
        /// The node-store object.
        id: u128,
        /// Where its bytes start in the arena.
        offset: u64,
        /// Their length.
        len: u64,
    },
    /// Its bytes, with what they name (lent).
    Inline {
        /// The bytes form.
        bytes: Vec<u8>,
        /// The lent objects.
        refs: Vec<crate::ids::ObjectId>,
        /// The lent actors.
        actors: Vec<crate::wire::NamedActor>,
    },
}

impl Lent {
    /// The value as an outcome a worker receives.
    pub(crate) fn into_outcome(self, type_name: String) -> crate::wire::WireOutcome {
        use crate::wire::WireOutcome;
        match self {
            Lent::Shared { id, offset, len } => WireOutcome::Pinned {
                type_name,
                id,
                offset,
                len,
            },
            Lent::Inline { bytes, refs, actors } => WireOutcome::Value {
                type_name,
                bytes,
                refs,
                actors,
            },
        }
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            for id in self.ids.drain(..) {
                let _ = node.store.unpin(id);
            }
        }
    }
}
