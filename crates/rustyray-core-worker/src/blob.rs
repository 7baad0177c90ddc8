//! [`Blob`]: immutable bytes that are read in place — the byte-like
//! payload Ray hands out as a zero-copy view of the plasma store.

use crate::shm::SharedBytes;
use serde::de::Visitor;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::ops::Deref;
use std::sync::Arc;

/// Immutable bytes, cheap to clone, read without copying where they live.
///
/// In the threads mode a `Blob` moves between tasks and the object store
/// by reference count. In the worker-process mode a large `Blob` object
/// lives once in the node's shared memory, and getting it (in the driver,
/// or as a task argument in a worker) gives a view of those bytes in
/// place: no copy, and the object stays pinned in memory (never spilled)
/// until the last view of it is dropped. Anywhere else it is plain bytes.
///
/// ```
/// use rustyray_core_worker::Blob;
///
/// let b = Blob::from(vec![1_u8, 2, 3]);
/// let c = b.clone(); // no copy
/// assert_eq!(&c[..], &[1, 2, 3]);
/// assert_eq!(b.len(), 3);
/// ```
#[derive(Clone)]
pub struct Blob(Repr);

#[derive(Clone)]
enum Repr {
    Heap(Arc<[u8]>),
    Shared {
        bytes: SharedBytes,
        at: usize,
        len: usize,
    },
}

impl Blob {
    /// Whether the bytes are read in place from the node's shared memory.
    ///
    /// ```
    /// assert!(!rustyray_core_worker::Blob::from(vec![0_u8; 4]).is_shared());
    /// ```
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Repr::Shared { .. })
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob(Repr::Heap(v.into()))
    }
}

impl From<&[u8]> for Blob {
    fn from(v: &[u8]) -> Self {
        Blob(Repr::Heap(v.into()))
    }
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(b) => b,
            Repr::Shared { bytes, at, len } => bytes.get(*at..*at + *len).unwrap_or(&[]),
        }
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Blob {}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("len", &self.len())
            .field("shared", &self.is_shared())
            .finish()
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(BlobVisitor)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        // Bytes decoded from shared memory are borrowed in place.
        Ok(match crate::codec::shared_source_covering(v) {
            Some((bytes, at)) => Blob(Repr::Shared {
                bytes,
                at,
                len: v.len(),
            }),
            None => Blob::from(v),
        })
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(Blob::from(v))
    }
}
