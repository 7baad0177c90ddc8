//! Values and their bytes — Ray's serialization layer.
//!
//! Inside one process a value travels as an `Arc<dyn Any>` and is never
//! encoded; across processes (and in the runtime's "serialize everything"
//! mode, which proves that every path has a bytes form) it travels as
//! postcard bytes. Both forms live behind [`Value`], and the typed surface
//! converts at the edge: [`Value::local`] erases a `T`, [`Value::take`] gets
//! it back and reports a type mismatch as an error.
//!
//! # Nested references
//!
//! A value may contain `ObjectRef`s and actor handles. In the local form the
//! value owns them, so they stay alive exactly as long as the value. When a
//! value is encoded, every nested reference that is serialized is collected
//! (see [`EncodeScope`]) and kept alive beside the bytes; when bytes are
//! decoded, the references are rebuilt against the runtime named by the
//! [`DecodeScope`] in force. Both scopes are thread-local and last for one
//! encode or decode call, so no state outlives a call or leaks across
//! runtimes.

use crate::error::{Error, Result};
use crate::runtime::Inner;
use crate::shm::{SharedBytes, ShmObject};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

/// Something that must stay alive as long as an encoded value mentions it:
/// a reference-counted object reference or actor handle.
pub(crate) type KeepAlive = Arc<dyn Any + Send + Sync>;

/// The bound every value passed to or returned from a remote function, and
/// every object, satisfies.
pub trait Data: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Data for T {}

type EncodeFn = fn(&(dyn Any + Send + Sync)) -> Result<Vec<u8>>;
type EncodeIntoFn = fn(&(dyn Any + Send + Sync), &mut [u8]) -> Result<()>;
type SizeFn = fn(&(dyn Any + Send + Sync)) -> Result<usize>;

/// An erased value: a task argument, a return value or an object.
/// Cloning is a reference-count increment.
#[derive(Clone)]
pub struct Value(Arc<Repr>);

/// Small on purpose: every live object holds one.
enum Repr {
    Local {
        any: Arc<dyn Any + Send + Sync>,
        vt: &'static LocalVt,
    },
    Encoded(Box<Encoded>),
}

/// What a local value's type knows how to do, one static table per type.
struct LocalVt {
    type_name: fn() -> &'static str,
    encode: EncodeFn,
    encode_into: EncodeIntoFn,
    size: SizeFn,
    encoded_len: SizeFn,
}

/// A value in bytes form.
struct Encoded {
    bytes: Payload,
    type_name: Cow<'static, str>,
    /// References the bytes mention, kept alive with them; their ids go
    /// with the bytes to another process.
    nested: Vec<KeepAlive>,
}

/// Where encoded bytes live.
enum Payload {
    /// On the heap of this process.
    Heap(Vec<u8>),
    /// In the node's shared memory, pinned and mapped here.
    Pinned(SharedBytes),
    /// In the node's shared memory, held by its owner and not pinned (it may
    /// be on disk): reading pins it.
    Stored(ShmObject),
}

impl Payload {
    /// The bytes, pinned for as long as the returned guard lives.
    fn read(&self) -> Result<Readable<'_>> {
        Ok(match self {
            Payload::Heap(v) => Readable::Borrowed(v),
            Payload::Pinned(b) => Readable::Shared(b.clone()),
            Payload::Stored(o) => Readable::Shared(o.pin()?),
        })
    }

    fn len(&self) -> usize {
        match self {
            Payload::Heap(v) => v.len(),
            Payload::Pinned(b) => b.len(),
            Payload::Stored(o) => o.len,
        }
    }
}

/// Bytes ready to decode.
enum Readable<'a> {
    Borrowed(&'a [u8]),
    Shared(SharedBytes),
}

impl Readable<'_> {
    fn decode<T: Data>(&self, rt: &Arc<Inner>) -> Result<T> {
        match self {
            Readable::Borrowed(b) => decode(b, rt),
            Readable::Shared(s) => decode_shared(s, rt),
        }
    }
}

/// The [`LocalVt`] of `T`.
struct VtOf<T>(std::marker::PhantomData<T>);

impl<T: Data> VtOf<T> {
    const VT: LocalVt = LocalVt {
        type_name: std::any::type_name::<T>,
        encode: encode_any::<T>,
        encode_into: encode_into_any::<T>,
        size: size_any::<T>,
        encoded_len: encoded_len_any::<T>,
    };
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Repr::Local { vt, .. } => write!(f, "Value::Local({})", (vt.type_name)()),
            Repr::Encoded(e) => {
                write!(f, "Value::Encoded({}, {} bytes)", e.type_name, e.bytes.len())
            }
        }
    }
}

fn encoded(bytes: Vec<u8>, type_name: Cow<'static, str>, nested: Vec<KeepAlive>) -> Value {
    with_payload(Payload::Heap(bytes), type_name, nested)
}

fn with_payload(bytes: Payload, type_name: Cow<'static, str>, nested: Vec<KeepAlive>) -> Value {
    Value(Arc::new(Repr::Encoded(Box::new(Encoded {
        bytes,
        type_name,
        nested,
    }))))
}

fn encode_into_any<T: Data>(any: &(dyn Any + Send + Sync), buf: &mut [u8]) -> Result<()> {
    match raw::write(any, buf) {
        Some(true) => return Ok(()),
        Some(false) => {
            return Err(Error::serialization(
                "value encoded to a different size than measured",
            ))
        }
        None => {}
    }
    match any.downcast_ref::<T>() {
        Some(v) => {
            let used = postcard::to_slice(v, buf).map_err(Error::serialization)?.len();
            if used == buf.len() {
                Ok(())
            } else {
                Err(Error::serialization(
                    "value encoded to a different size than measured",
                ))
            }
        }
        None => Err(Error::serialization("value does not have its recorded type")),
    }
}

/// Flat vectors of numbers travel as their raw little-endian elements (as
/// Ray keeps numpy arrays), not as postcard's varints: a large put,
/// argument or result is then one plain copy. Only a top-level value takes
/// this form (its type is always known where it is decoded); inside other
/// values they are ordinary postcard.
mod raw {
    use std::any::{Any, TypeId};

    macro_rules! each_raw {
        ($mac:ident) => {
            $mac!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64)
        };
    }

    /// The raw bytes form's length, when `any` is a flat vector of numbers.
    pub(super) fn len(any: &dyn Any) -> Option<usize> {
        macro_rules! try_len {
            ($($e:ty),*) => { $(if let Some(v) = any.downcast_ref::<Vec<$e>>() {
                return Some(std::mem::size_of_val(v.as_slice()));
            })* };
        }
        each_raw!(try_len);
        None
    }

    /// Writes the raw form into `buf` (exactly [`len`] long).
    pub(super) fn write(any: &dyn Any, buf: &mut [u8]) -> Option<bool> {
        macro_rules! try_write {
            ($($e:ty),*) => { $(if let Some(v) = any.downcast_ref::<Vec<$e>>() {
                return Some(rustyray_shm::plain::write_le(v, buf));
            })* };
        }
        each_raw!(try_write);
        None
    }

    /// The raw form, when `any` is a flat vector of numbers.
    pub(super) fn to_vec(any: &dyn Any) -> Option<Vec<u8>> {
        let mut out = vec![0_u8; len(any)?];
        write(any, &mut out).map(|_| out)
    }

    /// Reads `T` from its raw form, when `T` is a flat vector of numbers.
    pub(super) fn read<T: 'static>(bytes: &[u8]) -> Option<Result<T, String>> {
        macro_rules! try_read {
            ($($e:ty),*) => { $(if TypeId::of::<T>() == TypeId::of::<Vec<$e>>() {
                let Some(v) = rustyray_shm::plain::read_le::<$e>(bytes) else {
                    return Some(Err(format!("{} raw bytes are not a whole number of elements", bytes.len())));
                };
                let boxed: Box<dyn Any> = Box::new(v);
                return boxed.downcast::<T>().ok().map(|b| Ok(*b));
            })* };
        }
        each_raw!(try_read);
        None
    }
}

/// The raw bytes form's length of a flat vector of numbers.
pub(crate) fn raw_len<T: Data>(v: &T) -> Option<usize> {
    raw::len(v)
}

/// Writes a flat vector of numbers' raw bytes form into `buf` (exactly
/// [`raw_len`] long); false for any other value.
pub(crate) fn raw_write<T: Data>(v: &T, buf: &mut [u8]) -> bool {
    raw::write(v, buf) == Some(true)
}

fn encode_any<T: Data>(any: &(dyn Any + Send + Sync)) -> Result<Vec<u8>> {
    if let Some(v) = raw::to_vec(any) {
        return Ok(v);
    }
    match any.downcast_ref::<T>() {
        Some(v) => postcard::to_allocvec(v).map_err(Error::serialization),
        None => Err(Error::serialization("value does not have its recorded type")),
    }
}

/// Plain-data types whose size and copies need no serde walk: flat
/// vectors of numbers, strings, and the numbers themselves. Copying them is
/// `Clone`, and their size is their payload's length in memory (for
/// `Vec<u8>` and `String` that is also their postcard length).
#[rustfmt::skip]
macro_rules! plain_scalars {
    ($mac:ident) => {
        $mac!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, f32, f64, bool, char, ())
    };
}

#[rustfmt::skip]
macro_rules! plain_types {
    ($mac:ident) => {
        $mac!(Vec<u8>, Vec<i8>, Vec<u16>, Vec<i16>, Vec<u32>, Vec<i32>, Vec<u64>, Vec<i64>, Vec<f32>,
              Vec<f64>, String);
        plain_scalars!($mac);
    };
}

/// The payload size of a plain-data value, without walking it.
fn plain_size(any: &(dyn Any + Send + Sync)) -> Option<usize> {
    trait Payload {
        fn payload(&self) -> usize;
    }
    impl<E: Copy> Payload for Vec<E> {
        /// The capacity, not the length: that is the memory it holds (a
        /// recycled buffer may be larger than its contents).
        fn payload(&self) -> usize {
            self.capacity() * std::mem::size_of::<E>() + 8
        }
    }
    impl Payload for String {
        fn payload(&self) -> usize {
            self.len() + 8
        }
    }
    macro_rules! scalar {
        ($($t:ty),*) => { $(impl Payload for $t {
            fn payload(&self) -> usize { std::mem::size_of::<$t>() }
        })* };
    }
    plain_scalars!(scalar);
    macro_rules! try_types {
        ($($t:ty),*) => { $(if let Some(v) = any.downcast_ref::<$t>() {
            return Some(v.payload());
        })* };
    }
    plain_types!(try_types);
    None
}

/// A `Clone` copy of a plain-data value, without a serde round trip.
fn plain_copy<T: Data>(value: &T) -> Option<T> {
    let any: &dyn Any = value;
    macro_rules! try_types {
        ($($t:ty),*) => { $(if let Some(v) = any.downcast_ref::<$t>() {
            let boxed: Box<dyn Any> = Box::new(v.clone());
            return boxed.downcast::<T>().ok().map(|b| *b);
        })* };
    }
    plain_types!(try_types);
    // A blob's clone shares its bytes.
    try_types!(crate::Blob);
    None
}

/// Plain-data vector types whose buffers the store recycles.
macro_rules! plain_vec_elems {
    ($mac:ident) => {
        $mac!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64)
    };
}

/// A copy of `value` made into a recycled store buffer, when `value` is a
/// plain-data vector and a large enough buffer is kept.
pub(crate) fn recycled_copy<T: Data>(value: &T, store: &crate::store::Store) -> Option<T> {
    let any: &dyn Any = value;
    macro_rules! try_elems {
        ($($e:ty),*) => { $(if let Some(v) = any.downcast_ref::<Vec<$e>>() {
            if (std::mem::size_of_val(v.as_slice()) as u64) < crate::store::RECYCLE_MIN {
                return None;
            }
            let mut buf = store.take_buffer::<$e>(v.len())?;
            // A buffer of the same length (the usual case: the same array
            // put again) is copied over in place, on several threads when
            // large; another is refilled.
            if !rustyray_shm::plain::copy(v, &mut buf) {
                buf.clear();
                buf.extend_from_slice(v);
            }
            let boxed: Box<dyn Any> = Box::new(buf);
            return boxed.downcast::<T>().ok().map(|b| *b);
        })* };
    }
    plain_vec_elems!(try_elems);
    None
}

fn size_any<T: Data>(any: &(dyn Any + Send + Sync)) -> Result<usize> {
    if let Some(n) = plain_size(any) {
        return Ok(n);
    }
    encoded_len_any::<T>(any)
}

fn encoded_len_any<T: Data>(any: &(dyn Any + Send + Sync)) -> Result<usize> {
    if let Some(n) = raw::len(any) {
        return Ok(n);
    }
    match any.downcast_ref::<T>() {
        Some(v) => postcard::serialize_with_flavor::<T, postcard::ser_flavors::Size, usize>(
            v,
            postcard::ser_flavors::Size::default(),
        )
        .map_err(Error::serialization),
        None => Err(Error::serialization("value does not have its recorded type")),
    }
}

impl Value {
    /// Erases a value without encoding it.
    pub fn local<T: Data>(value: T) -> Self {
        Value(Arc::new(Repr::Local {
            any: Arc::new(value),
            vt: &VtOf::<T>::VT,
        }))
    }

    /// Encodes a typed value straight to bytes, collecting the references
    /// it mentions.
    pub fn encode<T: Data>(value: &T) -> Result<Self> {
        if let Some(bytes) = raw::to_vec(value) {
            return Ok(encoded(
                bytes,
                Cow::Borrowed(std::any::type_name::<T>()),
                Vec::new(),
            ));
        }
        let (bytes, nested) = EncodeScope::run(|| postcard::to_allocvec(value))?;
        Ok(encoded(bytes, Cow::Borrowed(std::any::type_name::<T>()), nested))
    }

    /// Encodes a typed value, keeping `keep` alive with the bytes besides
    /// the references serialized in it.
    pub(crate) fn encode_keeping<T: Data>(value: &T, mut keep: Vec<KeepAlive>) -> Result<Self> {
        let (bytes, nested) = EncodeScope::run(|| postcard::to_allocvec(value))?;
        keep.extend(nested);
        Ok(encoded(bytes, Cow::Borrowed(std::any::type_name::<T>()), keep))
    }

    /// Wraps bytes received from elsewhere.
    pub fn from_bytes(bytes: Vec<u8>, type_name: impl Into<Cow<'static, str>>) -> Self {
        encoded(bytes, type_name.into(), Vec::new())
    }

    /// Wraps bytes received from elsewhere that refer to objects: `keep`
    /// holds them alive with the value.
    pub(crate) fn from_bytes_keeping(
        bytes: Vec<u8>,
        type_name: impl Into<Cow<'static, str>>,
        keep: Vec<KeepAlive>,
    ) -> Self {
        encoded(bytes, type_name.into(), keep)
    }

    /// The ids of the objects an encoded value refers to.
    pub(crate) fn nested_object_ids(&self) -> Vec<crate::ids::ObjectId> {
        match &*self.0 {
            Repr::Encoded(e) => e
                .nested
                .iter()
                .filter_map(crate::object_ref::kept_object)
                .collect(),
            Repr::Local { .. } => Vec::new(),
        }
    }

    /// The references an encoded value holds (new handles on them).
    pub(crate) fn nested_refs(&self) -> Vec<crate::RawRef> {
        match &*self.0 {
            Repr::Encoded(e) => e.nested.iter().filter_map(crate::object_ref::kept_ref).collect(),
            Repr::Local { .. } => Vec::new(),
        }
    }

    /// The actor handles an encoded value holds (new handles on them).
    pub(crate) fn nested_actors(&self) -> Vec<crate::actor::RawActor> {
        match &*self.0 {
            Repr::Encoded(e) => e.nested.iter().filter_map(crate::actor::kept_actor).collect(),
            Repr::Local { .. } => Vec::new(),
        }
    }

    /// What an encoded value names, as the wire lists it: its objects and
    /// its actors.
    pub(crate) fn named(&self) -> (Vec<crate::ids::ObjectId>, Vec<crate::wire::NamedActor>) {
        let actors = self
            .nested_actors()
            .iter()
            .map(crate::actor::RawActor::named)
            .collect();
        (self.nested_object_ids(), actors)
    }

    /// Wraps bytes in shared memory, pinned here.
    pub(crate) fn from_shared(bytes: SharedBytes, type_name: impl Into<Cow<'static, str>>) -> Self {
        with_payload(Payload::Pinned(bytes), type_name.into(), Vec::new())
    }

    /// Wraps an object of the node's store that this owner holds.
    pub(crate) fn from_stored(object: ShmObject, type_name: impl Into<Cow<'static, str>>) -> Self {
        with_payload(Payload::Stored(object), type_name.into(), Vec::new())
    }

    /// The node-store object holding this value's bytes, if any.
    pub(crate) fn stored(&self) -> Option<&ShmObject> {
        match &*self.0 {
            Repr::Encoded(e) => match &e.bytes {
                Payload::Stored(o) => Some(o),
                _ => None,
            },
            Repr::Local { .. } => None,
        }
    }

    /// The exact length of the value's bytes form (where [`Value::size`]
    /// may count a plain-data value's payload alone).
    pub(crate) fn encoded_len(&self) -> Result<usize> {
        match &*self.0 {
            Repr::Local { any, vt } => (vt.encoded_len)(&**any),
            Repr::Encoded(e) => Ok(e.bytes.len()),
        }
    }

    /// Writes the value's bytes form into `buf`, which is exactly
    /// [`Value::encoded_len`] long. False when the value holds object references,
    /// which bytes elsewhere cannot keep alive.
    pub(crate) fn encode_into(&self, buf: &mut [u8]) -> Result<bool> {
        match &*self.0 {
            Repr::Local { any, vt } => {
                let nested = EncodeScope::run(|| (vt.encode_into)(&**any, buf))?.1;
                Ok(nested.is_empty())
            }
            Repr::Encoded(e) if !e.nested.is_empty() => Ok(false),
            Repr::Encoded(e) => {
                let bytes = e.bytes.read()?;
                let src: &[u8] = match &bytes {
                    Readable::Borrowed(b) => b,
                    Readable::Shared(s) => s,
                };
                if src.len() != buf.len() {
                    return Err(Error::serialization("encoded value does not fit its buffer"));
                }
                buf.copy_from_slice(src);
                Ok(true)
            }
        }
    }

    /// The bytes form of this value: itself if already encoded, else a new
    /// encoded value.
    pub fn to_encoded(&self) -> Result<Value> {
        match &*self.0 {
            Repr::Encoded(_) => Ok(self.clone()),
            Repr::Local { any, vt } => {
                let (bytes, nested) = EncodeScope::run(|| (vt.encode)(&**any))?;
                Ok(encoded(bytes, Cow::Borrowed((vt.type_name)()), nested))
            }
        }
    }

    /// The buffer of a local plain-data vector nobody else holds, for reuse.
    pub(crate) fn into_plain_buffer(self) -> Option<Box<dyn Any + Send + Sync>> {
        let Repr::Local { mut any, .. } = Arc::try_unwrap(self.0).ok()? else {
            return None;
        };
        macro_rules! try_elems {
            ($($e:ty),*) => { $(
                match any.downcast::<Vec<$e>>() {
                    Ok(arc) => return Arc::try_unwrap(arc).ok().map(|v| Box::new(v) as Box<dyn Any + Send + Sync>),
                    Err(back) => any = back,
                }
            )* };
        }
        plain_vec_elems!(try_elems);
        drop(any);
        None
    }

    /// Whether this value is in bytes form.
    pub fn is_encoded(&self) -> bool {
        matches!(*self.0, Repr::Encoded(_))
    }

    /// The encoded bytes, when in bytes form and mapped in this process
    /// (`None` for a local value, and for one held in the node's store,
    /// which must be pinned to be read).
    pub fn bytes(&self) -> Option<&[u8]> {
        match &*self.0 {
            Repr::Encoded(e) => match &e.bytes {
                Payload::Heap(v) => Some(v),
                Payload::Pinned(b) => Some(b),
                Payload::Stored(_) => None,
            },
            Repr::Local { .. } => None,
        }
    }

    /// The Rust type name the value was created with.
    pub fn type_name(&self) -> &str {
        match &*self.0 {
            Repr::Local { vt, .. } => (vt.type_name)(),
            Repr::Encoded(e) => &e.type_name,
        }
    }

    /// The value's size in bytes: its encoded length, computed without
    /// allocating for a local value.
    pub fn size(&self) -> Result<usize> {
        match &*self.0 {
            Repr::Local { any, vt } => (vt.size)(&**any),
            Repr::Encoded(e) => Ok(e.bytes.len()),
        }
    }

    fn check_type<T: 'static>(&self) -> Result<()> {
        let expected = std::any::type_name::<T>();
        if self.type_name() == expected {
            Ok(())
        } else {
            Err(Error::TypeMismatch {
                expected: expected.to_owned(),
                found: self.type_name().to_owned(),
            })
        }
    }

    /// Gets the typed value back. A local value that nobody else holds is
    /// moved out; a shared one is copied through its bytes form, as Ray
    /// copies every argument it deserializes.
    pub(crate) fn take<T: Data>(self, rt: &Arc<Inner>) -> Result<T> {
        self.check_type::<T>()?;
        let repr = match Arc::try_unwrap(self.0) {
            Ok(repr) => repr,
            Err(shared) => return Value(shared).copy_out(rt),
        };
        match repr {
            Repr::Local { any, .. } => match any.downcast::<T>() {
                Ok(arc) => match Arc::try_unwrap(arc) {
                    Ok(v) => Ok(v),
                    Err(arc) => copy_typed(&*arc, rt),
                },
                Err(_) => Err(Error::TypeMismatch {
                    expected: std::any::type_name::<T>().to_owned(),
                    found: "a value of another type".to_owned(),
                }),
            },
            Repr::Encoded(e) => e.bytes.read()?.decode(rt),
        }
    }

    fn copy_out<T: Data>(&self, rt: &Arc<Inner>) -> Result<T> {
        match &*self.0 {
            Repr::Local { any, .. } => match any.downcast_ref::<T>() {
                Some(v) => copy_typed(v, rt),
                None => Err(Error::TypeMismatch {
                    expected: std::any::type_name::<T>().to_owned(),
                    found: "a value of another type".to_owned(),
                }),
            },
            Repr::Encoded(e) => e.bytes.read()?.decode(rt),
        }
    }
}

/// Copies a value through its bytes form, rebuilding nested references.
fn copy_typed<T: Data>(value: &T, rt: &Arc<Inner>) -> Result<T> {
    if let Some(v) = plain_copy(value) {
        return Ok(v);
    }
    let (bytes, nested) = EncodeScope::run(|| postcard::to_allocvec(value))?;
    // The original is alive and mentions the same references in the same
    // order: the copy shares their handles instead of taking new counts.
    /// Empties the replay queue, also when a `Deserialize` unwinds.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            let left = REPLAY.with(|c| std::mem::take(&mut *c.borrow_mut()));
            drop(left);
        }
    }
    REPLAY.with(|c| *c.borrow_mut() = nested.into());
    let _clear = Clear;
    decode(&bytes, rt)
}

/// Decodes bytes in shared memory as a `T`: a [`crate::Blob`] inside
/// borrows them in place (keeping them pinned) instead of copying.
pub(crate) fn decode_shared<T: Data>(bytes: &SharedBytes, rt: &Arc<Inner>) -> Result<T> {
    struct Clear(Option<SharedBytes>);
    impl Drop for Clear {
        fn drop(&mut self) {
            let prev = self.0.take();
            SHARED_SOURCE.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = SHARED_SOURCE.with(|c| c.borrow_mut().replace(bytes.clone()));
    let _clear = Clear(prev);
    decode(bytes, rt)
}

/// The shared-memory bytes being decoded on this thread, if any: a
/// [`crate::Blob`] whose bytes lie inside borrows them.
pub(crate) fn shared_source_covering(part: &[u8]) -> Option<(SharedBytes, usize)> {
    SHARED_SOURCE.with(|c| {
        let src = c.borrow();
        let s = src.as_ref()?;
        let base = s.as_ptr() as usize;
        let at = (part.as_ptr() as usize).checked_sub(base)?;
        (at + part.len() <= s.len()).then(|| (s.clone(), at))
    })
}

/// Decodes bytes as a `T`, rebuilding nested references against `rt`.
pub(crate) fn decode<T: Data>(bytes: &[u8], rt: &Arc<Inner>) -> Result<T> {
    if let Some(v) = raw::read::<T>(bytes) {
        return v.map_err(Error::serialization);
    }
    DecodeScope::run(rt, || {
        postcard::from_bytes(bytes).map_err(|e| {
            // postcard drops the text of custom errors; ours were stashed.
            DECODE_ERROR
                .with(|c| c.borrow_mut().take())
                .unwrap_or_else(|| Error::serialization(e))
        })
    })
}

thread_local! {
    static SHARED_SOURCE: RefCell<Option<SharedBytes>> = const { RefCell::new(None) };
    static ENCODE: RefCell<Option<Vec<KeepAlive>>> = const { RefCell::new(None) };
    static DECODE: RefCell<Option<Arc<Inner>>> = const { RefCell::new(None) };
    static DECODE_ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
    static REPLAY: RefCell<std::collections::VecDeque<KeepAlive>> =
        const { RefCell::new(std::collections::VecDeque::new()) };
}

/// The scope of one encode call: nested references serialized inside it
/// are collected so the bytes can keep them alive.
#[derive(Debug)]
pub(crate) struct EncodeScope;

impl EncodeScope {
    fn run<R, E: std::fmt::Display>(
        f: impl FnOnce() -> std::result::Result<R, E>,
    ) -> Result<(R, Vec<KeepAlive>)> {
        /// Restores the enclosing scope, also when `f` unwinds.
        struct Restore(Option<Option<Vec<KeepAlive>>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(saved) = self.0.take() {
                    ENCODE.with(|c| *c.borrow_mut() = saved);
                }
            }
        }
        let mut restore = Restore(Some(ENCODE.with(|c| c.borrow_mut().replace(Vec::new()))));
        let out = f();
        let saved = restore.0.take().unwrap_or_default();
        let nested = ENCODE.with(|c| std::mem::replace(&mut *c.borrow_mut(), saved));
        let bytes = out.map_err(Error::serialization)?;
        Ok((bytes, nested.unwrap_or_default()))
    }

    /// Records a reference serialized inside the current encode call.
    pub(crate) fn note(keep: impl FnOnce() -> KeepAlive) {
        ENCODE.with(|c| {
            if let Some(list) = c.borrow_mut().as_mut() {
                list.push(keep());
            }
        });
    }
}

/// The scope of one decode call: names the runtime nested references are
/// rebuilt against.
#[derive(Debug)]
pub(crate) struct DecodeScope;

impl DecodeScope {
    fn run<R>(rt: &Arc<Inner>, f: impl FnOnce() -> R) -> R {
        /// Restores the enclosing scope, also when `f` unwinds.
        struct Restore(Option<Arc<Inner>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let saved = self.0.take();
                DECODE.with(|c| *c.borrow_mut() = saved);
                DECODE_ERROR.with(|c| c.borrow_mut().take());
            }
        }
        let _restore = Restore(DECODE.with(|c| c.borrow_mut().replace(rt.clone())));
        DECODE_ERROR.with(|c| c.borrow_mut().take());
        f()
    }

    /// The next reference handle of the value being copied, when decoding
    /// a copy of a live value (see `copy_typed`).
    pub(crate) fn replayed() -> Option<KeepAlive> {
        REPLAY.with(|c| c.borrow_mut().pop_front())
    }

    /// Fails the decode call in progress with `err`, keeping its message
    /// (the codec only carries a generic error through `serde`).
    pub(crate) fn fail<E: serde::de::Error>(err: Error) -> E {
        let msg = err.to_string();
        DECODE_ERROR.with(|c| *c.borrow_mut() = Some(err));
        E::custom(msg)
    }

    /// The runtime of the decode call in progress, if any.
    pub(crate) fn runtime() -> Option<Arc<Inner>> {
        DECODE.with(|c| c.borrow().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Config;

    #[test]
    fn flat_number_vectors_travel_raw_and_come_back() -> Result<()> {
        let rt = Inner::start(Config::new().num_cpus(1.0))?;
        let ints: Vec<i64> = (0..1000).map(|i| i * 7919 - 3_000_000).collect();
        let enc = Value::encode(&ints)?;
        assert_eq!(enc.bytes().map(<[u8]>::len), Some(8 * ints.len()));
        assert_eq!(enc.clone().take::<Vec<i64>>(&rt)?, ints);
        // The erased path agrees with the typed one, also into a buffer.
        let local = Value::local(ints.clone());
        assert_eq!(local.encoded_len()?, 8 * ints.len());
        let mut buf = vec![0_u8; local.encoded_len()?];
        assert!(local.encode_into(&mut buf)?);
        assert_eq!(Some(&buf[..]), enc.bytes());
        let floats = vec![1.5_f64, -0.0, f64::MAX];
        assert_eq!(Value::encode(&floats)?.take::<Vec<f64>>(&rt)?, floats);
        let bytes = vec![1_u8, 2, 3];
        assert_eq!(Value::encode(&bytes)?.take::<Vec<u8>>(&rt)?, bytes);
        // Bytes that are not whole elements are an error, not a panic.
        assert!(matches!(
            Value::from_bytes(vec![1, 2, 3], std::any::type_name::<Vec<u32>>()).take::<Vec<u32>>(&rt),
            Err(Error::Serialization(_))
        ));
        // Inside other values they are ordinary postcard.
        let nested = (ints.clone(), 5_u8);
        assert_eq!(Value::encode(&nested)?.take::<(Vec<i64>, u8)>(&rt)?, nested);
        rt.shutdown_for_tests();
        Ok(())
    }
}
