//! Typed object references — Ray's `ObjectRef`.
//!
//! An [`ObjectRef<T>`] is a typed, cloneable, sendable handle on one object.
//! All clones share one reference handle ([`RawRef`]), and the object lives
//! while any handle does: the store's count is the number of live handles.
//! A reference nested inside an argument or a stored value is owned by that
//! value, so it keeps its object alive exactly as long as the value lives,
//! in both the local and the bytes form (see [`crate::codec`]).
//!
//! Awaiting a reference is plain safe code: the future registers its waker
//! with the store and is woken when the object completes.

use crate::codec::{Data, DecodeScope, EncodeScope, Value};
use crate::context;
use crate::error::{Error, Result};
use crate::ids::ObjectId;
use crate::runtime::{Inner, Ray};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// One reference handle: holds one count on the object in its runtime's
/// store and gives it back when dropped.
struct RefHandle {
    id: ObjectId,
    rt: Arc<Inner>,
}

impl Drop for RefHandle {
    fn drop(&mut self) {
        // Counts another process keeps on the object for this one (it lent
        // the object here) go back with the last handle.
        if let Some(lent @ 1..) = self.rt.store.release(self.id) {
            self.rt.mode.give_back(self.id, lent);
        }
    }
}

/// The object a kept-alive handle (see [`crate::codec::KeepAlive`]) holds,
/// if it is an object reference.
pub(crate) fn kept_object(keep: &crate::codec::KeepAlive) -> Option<ObjectId> {
    keep.downcast_ref::<RefHandle>().map(|h| h.id)
}

/// The reference a kept-alive handle is, if it is one (sharing its count).
pub(crate) fn kept_ref(keep: &crate::codec::KeepAlive) -> Option<RawRef> {
    keep.clone().downcast::<RefHandle>().ok().map(RawRef)
}

/// An untyped object reference: the core's currency. Clones share one
/// reference count.
#[derive(Clone)]
pub struct RawRef(Arc<RefHandle>);

impl std::fmt::Debug for RawRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawRef({:?})", self.0.id)
    }
}

impl RawRef {
    /// Takes over the count a freshly created object starts with.
    pub(crate) fn adopt(id: ObjectId, rt: Arc<Inner>) -> Self {
        RawRef(Arc::new(RefHandle { id, rt }))
    }

    /// Adds a count on an object that exists.
    pub(crate) fn acquire(id: ObjectId, rt: Arc<Inner>) -> Result<Self> {
        rt.store.add_ref(id)?;
        Ok(Self::adopt(id, rt))
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.0.id
    }

    pub(crate) fn runtime(&self) -> &Arc<Inner> {
        &self.0.rt
    }

    /// This reference as something a value keeps alive.
    pub(crate) fn keep_alive(&self) -> crate::codec::KeepAlive {
        self.0.clone()
    }

    /// Types this reference. Reading it as the wrong type is reported by
    /// `get`, not here.
    pub fn typed<T>(self) -> ObjectRef<T> {
        ObjectRef {
            raw: self,
            _t: PhantomData,
        }
    }
}

impl Serialize for RawRef {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        EncodeScope::note(|| self.0.clone());
        self.0.id.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let id = ObjectId::deserialize(d)?;
        if let Some(Ok(handle)) = DecodeScope::replayed().map(|k| k.downcast::<RefHandle>()) {
            if handle.id == id {
                return Ok(RawRef(handle));
            }
        }
        let rt = DecodeScope::runtime().ok_or_else(|| {
            DecodeScope::fail::<D::Error>(Error::serialization(
                "an ObjectRef can only be decoded by a RustyRay runtime",
            ))
        })?;
        rt.acquire_named(id).map_err(DecodeScope::fail)
    }
}

/// A typed reference to an object that holds (or will hold) a `T`.
///
/// `ObjectRef` is `Clone + Send + Sync` and serde-serializable: put it in
/// arguments, return values and other objects, and it stays a reference.
/// Read it with [`Ray::get`] or `.await`.
pub struct ObjectRef<T> {
    raw: RawRef,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ObjectRef<T> {
    fn clone(&self) -> Self {
        ObjectRef {
            raw: self.raw.clone(),
            _t: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for ObjectRef<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectRef<{}>({})", std::any::type_name::<T>(), self.raw.id())
    }
}

impl<T> PartialEq for ObjectRef<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw.id() == other.raw.id()
    }
}

impl<T> Eq for ObjectRef<T> {}

impl<T> std::hash::Hash for ObjectRef<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.raw.id().hash(state)
    }
}

impl<T> ObjectRef<T> {
    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.raw.id()
    }

    /// The untyped reference.
    pub fn raw(&self) -> &RawRef {
        &self.raw
    }

    /// Whether the object is complete (holds a value or an error).
    pub fn is_ready(&self) -> bool {
        self.raw.runtime().store.is_complete(self.raw.id())
    }
}

impl<T> Serialize for ObjectRef<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl<'de, T> Deserialize<'de> for ObjectRef<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        RawRef::deserialize(d).map(RawRef::typed)
    }
}

/// The future of an object's value: what `.await` on an [`ObjectRef`]
/// gives. While it waits inside a task, the task's CPU is lent back to the
/// scheduler, as a blocking `get` does.
#[derive(Debug)]
pub struct GetFuture<T> {
    raw: RawRef,
    blocked: Option<context::Blocked>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Data> Future for GetFuture<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let rt = self.raw.runtime().clone();
        match rt.store.poll_value(self.raw.id(), cx) {
            Poll::Ready(v) => {
                self.blocked = None;
                Poll::Ready(v.and_then(|v| v.take::<T>(&rt)))
            }
            Poll::Pending => {
                if self.blocked.is_none() {
                    rt.will_wait();
                    self.blocked = context::Blocked::enter(Some(self.raw.id()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: Data> IntoFuture for ObjectRef<T> {
    type Output = Result<T>;
    type IntoFuture = GetFuture<T>;

    fn into_future(self) -> GetFuture<T> {
        GetFuture {
            raw: self.raw,
            blocked: None,
            _t: PhantomData,
        }
    }
}

impl<T: Data> IntoFuture for &ObjectRef<T> {
    type Output = Result<T>;
    type IntoFuture = GetFuture<T>;

    fn into_future(self) -> GetFuture<T> {
        self.clone().into_future()
    }
}

/// One argument of a task or actor call: a value, or a reference the task
/// waits for and receives the value of.
#[derive(Debug, Clone)]
pub enum Arg {
    /// A value passed inline.
    Value(Value),
    /// An object whose value is passed once it is ready.
    Ref(RawRef),
}

impl Arg {
    /// The inline value, if this is one.
    pub(crate) fn into_value(self) -> Option<Value> {
        match self {
            Arg::Value(v) => Some(v),
            Arg::Ref(_) => None,
        }
    }
}

/// What a parameter of type `T` accepts: a `T`, an `ObjectRef<T>` or a
/// `&ObjectRef<T>`. This is how values and references mix freely.
pub trait IntoArg<T> {
    /// Converts into an argument for a task of `ray`.
    fn into_arg(self, ray: &Ray) -> Result<Arg>;
}

impl<T: Data> IntoArg<T> for T {
    fn into_arg(self, ray: &Ray) -> Result<Arg> {
        Ok(Arg::Value(ray.inner().make_value(self)?))
    }
}

fn ref_arg(raw: RawRef, ray: &Ray) -> Result<Arg> {
    if !Arc::ptr_eq(raw.runtime(), ray.inner()) {
        return Err(Error::invalid(format!(
            "object {} belongs to another runtime",
            raw.id()
        )));
    }
    Ok(Arg::Ref(raw))
}

impl<T: Data> IntoArg<T> for ObjectRef<T> {
    fn into_arg(self, ray: &Ray) -> Result<Arg> {
        ref_arg(self.raw, ray)
    }
}

impl<T: Data> IntoArg<T> for &ObjectRef<T> {
    fn into_arg(self, ray: &Ray) -> Result<Arg> {
        ref_arg(self.raw.clone(), ray)
    }
}
