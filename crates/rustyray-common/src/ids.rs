//! Identifiers for objects, tasks and actors — Ray's `ObjectID`, `TaskID` and
//! `ActorID`.
//!
//! Every id is 128 bits: the upper half names the runtime (the owner) that
//! minted it, the lower half is a counter local to that runtime. Ids are
//! therefore unique across all runtimes of a process, and stay unique once
//! several processes and nodes exchange them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(u128);

        impl $name {
            /// Builds an id from its raw 128-bit value.
            pub const fn from_u128(raw: u128) -> Self {
                Self(raw)
            }

            /// The raw 128-bit value of this id.
            pub const fn as_u128(self) -> u128 {
                self.0
            }

            /// The runtime (owner) that minted this id.
            pub const fn owner(self) -> u64 {
                (self.0 >> 64) as u64
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:016x}:{:x})", $prefix, self.owner(), self.0 as u64)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:016x}{:016x}", self.owner(), self.0 as u64)
            }
        }
    };
}

id_type!(
    /// Names one object. A task's return object shares the task's counter
    /// value, so the id of a return object leads back to its task.
    ObjectId,
    "ObjectId"
);
id_type!(
    /// Names one task (or one actor method call).
    TaskId,
    "TaskId"
);
id_type!(
    /// Names one actor.
    ActorId,
    "ActorId"
);

impl TaskId {
    /// The id of the object this task returns.
    pub const fn return_object(self) -> ObjectId {
        ObjectId(self.0)
    }
}

impl ObjectId {
    /// The task whose return value this object is (or would be, for a
    /// `put` object, an id that names no task).
    pub const fn task(self) -> TaskId {
        TaskId(self.0)
    }
}

/// Mints ids for one runtime: the runtime's random 64-bit tag in the upper
/// half, a counter in the lower half.
#[derive(Debug)]
#[doc(hidden)]
pub struct IdGen {
    owner: u64,
    next: AtomicU64,
}

impl IdGen {
    #[doc(hidden)]
    pub fn new() -> Self {
        Self {
            owner: random_u64(),
            next: AtomicU64::new(1),
        }
    }

    #[doc(hidden)]
    pub fn owner(&self) -> u64 {
        self.owner
    }

    fn next_raw(&self) -> u128 {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (u128::from(self.owner) << 64) | u128::from(n)
    }

    #[doc(hidden)]
    pub fn task(&self) -> TaskId {
        TaskId(self.next_raw())
    }

    #[doc(hidden)]
    pub fn object(&self) -> ObjectId {
        ObjectId(self.next_raw())
    }

    #[doc(hidden)]
    pub fn actor(&self) -> ActorId {
        ActorId(self.next_raw())
    }
}

/// A random 64-bit value from the standard library's per-process random
/// hasher keys, mixed with the clock and a stack address: enough to keep
/// runtimes apart without a random-number dependency.
/// A secret for a node's token: 16 bytes of the kernel's randomness, or
/// (should `/dev/urandom` be unreadable) two hashed seeds.
#[doc(hidden)]
pub fn random_token() -> u128 {
    use std::io::Read;
    let mut b = [0_u8; 16];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u128::from_le_bytes(b),
        Err(_) => (u128::from(random_u64()) << 64) | u128::from(random_u64()),
    }
}

fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    let local = 0u8;
    h.write_usize(std::ptr::addr_of!(local) as usize);
    h.finish()
}

/// A hasher for ids: they are already well mixed (a random tag and a
/// counter), so one multiply spreads them; far cheaper than SipHash on the
/// hot paths that hash many ids (`wait`'s uniqueness check).
#[derive(Debug, Default, Clone, Copy)]
#[doc(hidden)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    /// Ids are hashed alone (one `write_u128` per key), so this replaces
    /// the state rather than mixing into it; keys made of several fields
    /// should not use this hasher.
    fn write_u128(&mut self, v: u128) {
        self.0 = ((v as u64) ^ ((v >> 64) as u64).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

/// A `HashSet`/`HashMap` builder using [`IdHasher`].
#[doc(hidden)]
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;
