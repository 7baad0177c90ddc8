//! The link-time registry of remote functions, actor classes and actor
//! methods — what Ray's function manager does by pickling, done at link
//! time.
//!
//! `#[rustyray::remote]` and `#[rustyray::actor]` add one entry each to the
//! distributed slices below. The slices are immutable and identical in every
//! process started from one executable, so a task can name its function by a
//! stable string and any process can run it. Each runtime builds its own
//! name index at `init` and reports unknown or duplicate names as errors.

use crate::codec::Value;
use crate::error::{Error, Result};
use crate::task::ArgList;
pub use rustyray_common::options::DeclaredOptions;
use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why one invocation produced no value.
#[derive(Debug)]
pub enum InvokeError {
    /// The user's code returned `Err`; the message is its `Display`.
    User(String),
    /// The runtime could not run the code (e.g. an argument of the wrong
    /// type). Never retried.
    System(Error),
}

impl From<Error> for InvokeError {
    fn from(e: Error) -> Self {
        InvokeError::System(e)
    }
}

/// What one invocation of a registered function or method returns.
pub type InvokeResult = std::result::Result<Value, InvokeError>;

/// How a remote function runs.
#[derive(Clone, Copy)]
pub enum FunctionBody {
    /// A plain function: runs on a worker thread.
    Sync(fn(ArgList) -> InvokeResult),
    /// An `async fn`: runs on the runtime's async executor.
    Async(fn(ArgList) -> BoxFuture<InvokeResult>),
}

impl std::fmt::Debug for FunctionBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FunctionBody::Sync(_) => "Sync",
            FunctionBody::Async(_) => "Async",
        })
    }
}

/// One registered remote function.
#[derive(Debug)]
pub struct FunctionEntry {
    /// The stable name: `module::path::function`.
    pub name: &'static str,
    /// The body, erased.
    pub body: FunctionBody,
    /// Options from the attribute.
    pub options: DeclaredOptions,
}

/// An actor's state, erased.
pub type State = Box<dyn Any + Send + Sync>;

/// An erased actor instance, shared by the calls that run on it. The
/// runtime takes its lock (shared for `&self` methods, exclusive for
/// `&mut self` ones) in submission order before a call starts.
pub type Instance = Arc<tokio::sync::RwLock<State>>;

/// The instance as a `&self` async method holds it.
pub type SharedGuard = tokio::sync::OwnedRwLockReadGuard<State>;

/// The instance as a `&mut self` async method holds it.
pub type ExclusiveGuard = tokio::sync::OwnedRwLockWriteGuard<State>;

/// How an actor method runs.
#[derive(Clone, Copy)]
pub enum MethodBody {
    /// A plain `&self` method: runs on a worker thread.
    SyncRef(fn(&(dyn Any + Send + Sync), ArgList) -> InvokeResult),
    /// A plain `&mut self` method: runs on a worker thread.
    SyncMut(fn(&mut (dyn Any + Send + Sync), ArgList) -> InvokeResult),
    /// An `async fn` taking `&self`: runs on the async executor and may
    /// interleave with other `&self` calls at its awaits.
    AsyncRef(fn(SharedGuard, ArgList) -> BoxFuture<InvokeResult>),
    /// An `async fn` taking `&mut self`: runs on the async executor with
    /// the instance to itself until it returns.
    AsyncMut(fn(ExclusiveGuard, ArgList) -> BoxFuture<InvokeResult>),
}

impl MethodBody {
    /// Whether the method needs the instance to itself.
    pub fn is_exclusive(&self) -> bool {
        matches!(self, MethodBody::SyncMut(_) | MethodBody::AsyncMut(_))
    }
}

impl std::fmt::Debug for MethodBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MethodBody::SyncRef(_) => "SyncRef",
            MethodBody::SyncMut(_) => "SyncMut",
            MethodBody::AsyncRef(_) => "AsyncRef",
            MethodBody::AsyncMut(_) => "AsyncMut",
        })
    }
}

/// One registered actor method.
#[derive(Debug)]
pub struct MethodEntry {
    /// The stable name: `module::path::Class::method`.
    pub name: &'static str,
    /// The class this method belongs to (its `ActorEntry::name`).
    pub class: &'static str,
    /// The body, erased.
    pub body: MethodBody,
}

/// One registered actor class.
#[derive(Debug)]
pub struct ActorEntry {
    /// The stable name: `module::path::Class`.
    pub name: &'static str,
    /// Runs the constructor (on a worker thread).
    pub construct: fn(ArgList) -> std::result::Result<Instance, InvokeError>,
    /// Whether any method is `async`: such actors default to a
    /// concurrency of 1000 and interleave calls at their awaits.
    pub is_async: bool,
    /// Options from the attribute.
    pub options: DeclaredOptions,
}

/// Every remote function in the executable.
#[linkme::distributed_slice]
pub static REMOTE_FUNCTIONS: [FunctionEntry];

/// Every actor class in the executable.
#[linkme::distributed_slice]
pub static ACTOR_CLASSES: [ActorEntry];

/// Every actor method in the executable.
#[linkme::distributed_slice]
pub static ACTOR_METHODS: [MethodEntry];

/// A name index over the registry, built once per runtime.
#[derive(Debug)]
pub struct Registry {
    functions: HashMap<&'static str, &'static FunctionEntry>,
    classes: HashMap<&'static str, &'static ActorEntry>,
    methods: HashMap<&'static str, &'static MethodEntry>,
}

impl Registry {
    /// Indexes the executable's registry, rejecting duplicate names.
    pub fn build() -> Result<Self> {
        Self::from_slices(&REMOTE_FUNCTIONS, &ACTOR_CLASSES, &ACTOR_METHODS)
    }

    /// Indexes the given entries, rejecting duplicate names.
    pub fn from_slices(
        functions: &'static [FunctionEntry],
        classes: &'static [ActorEntry],
        methods: &'static [MethodEntry],
    ) -> Result<Self> {
        fn index<T>(
            items: &'static [T],
            name: impl Fn(&T) -> &'static str,
        ) -> Result<HashMap<&'static str, &'static T>> {
            let mut map = HashMap::with_capacity(items.len());
            for item in items {
                if map.insert(name(item), item).is_some() {
                    return Err(Error::DuplicateRegistration(name(item).to_owned()));
                }
            }
            Ok(map)
        }
        let reg = Registry {
            functions: index(functions, |f| f.name)?,
            classes: index(classes, |c| c.name)?,
            methods: index(methods, |m| m.name)?,
        };
        if let Some(name) = reg.functions.keys().find(|n| reg.classes.contains_key(*n)) {
            return Err(Error::DuplicateRegistration((*name).to_owned()));
        }
        Ok(reg)
    }

    /// The function registered as `name`.
    pub fn function(&self, name: &str) -> Result<&'static FunctionEntry> {
        self.functions
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownFunction(name.to_owned()))
    }

    /// The actor class registered as `name`.
    pub fn class(&self, name: &str) -> Result<&'static ActorEntry> {
        self.classes
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownFunction(name.to_owned()))
    }

    /// The actor method registered as `name`.
    pub fn method(&self, name: &str) -> Result<&'static MethodEntry> {
        self.methods
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownFunction(name.to_owned()))
    }

    /// How many functions, classes and methods are registered.
    pub fn len(&self) -> usize {
        self.functions.len() + self.classes.len() + self.methods.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of every registered function.
    pub fn function_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.functions.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop(_: ArgList) -> InvokeResult {
        Ok(Value::local(()))
    }

    const fn entry(name: &'static str) -> FunctionEntry {
        FunctionEntry {
            name,
            body: FunctionBody::Sync(noop),
            options: DeclaredOptions::DEFAULT,
        }
    }

    static UNIQUE: [FunctionEntry; 2] = [entry("m::a"), entry("m::b")];
    static DUPLICATED: [FunctionEntry; 3] = [entry("m::a"), entry("m::b"), entry("m::a")];

    #[test]
    fn resolves_names_and_reports_unknown_ones() {
        let reg = Registry::from_slices(&UNIQUE, &[], &[]).unwrap();
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.function("m::b").unwrap().name, "m::b");
        assert_eq!(
            reg.function("m::zzz").unwrap_err(),
            Error::UnknownFunction("m::zzz".into())
        );
        assert!(matches!(reg.class("m::a"), Err(Error::UnknownFunction(_))));
    }

    #[test]
    fn duplicate_names_are_an_error() {
        let err = Registry::from_slices(&DUPLICATED, &[], &[]).unwrap_err();
        assert_eq!(err, Error::DuplicateRegistration("m::a".into()));
        assert!(err.to_string().contains("registered twice"), "{err}");
    }
}
