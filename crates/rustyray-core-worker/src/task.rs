//! Task specifications, their bytes form, and per-task state — Ray's
//! `TaskSpecification` and the owner's task manager entry.
//!
//! A [`TaskSpec`] says what to run (a function, an actor constructor or an
//! actor method, by registry entry) and with which arguments. It always has
//! a bytes form ([`TaskSpec::to_bytes`] / [`TaskSpec::from_bytes`]) in which
//! functions are named by their registry name and arguments are encoded
//! values or object ids; the embedded runtime skips it unless configured to
//! serialize everything, and worker processes will use it as their wire
//! format.

use crate::codec::{Data, Value};
use crate::error::{Error, Result};
use crate::ids::{ActorId, ObjectId, TaskId};
use crate::object_ref::{Arg, RawRef};
use crate::registry::{ActorEntry, FunctionEntry, MethodEntry, Registry};
use crate::runtime::Inner;
use crate::shm::{Lent, Loan, NodeStore};
use crate::wire::NamedActor;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// What a task runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    Function(&'static FunctionEntry),
    Constructor(&'static ActorEntry),
    Method(ActorId, &'static MethodEntry),
}

impl Target {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Target::Function(f) => f.name,
            Target::Constructor(c) => c.name,
            Target::Method(_, m) => m.name,
        }
    }
}

/// A task: what to run and its arguments.
#[derive(Debug)]
pub(crate) struct TaskSpec {
    pub(crate) id: TaskId,
    pub(crate) target: Target,
    pub(crate) args: Vec<Arg>,
    /// The name given with the `name` option.
    pub(crate) name: Option<Arc<str>>,
}

#[derive(Serialize, Deserialize)]
enum WireTarget {
    Function(String),
    Constructor(String),
    Method(ActorId, String),
}

#[derive(Serialize, Deserialize)]
enum WireArg {
    Value {
        type_name: String,
        bytes: Vec<u8>,
        /// The objects the value refers to: the sender keeps them alive
        /// until the receiver holds them (an owner lends them to a worker,
        /// see [`Loan`]).
        refs: Vec<ObjectId>,
        /// The actors the value holds handles to, kept alive likewise.
        actors: Vec<NamedActor>,
    },
    Ref(RawRef),
    /// A value in the node's shared memory, pinned for the receiver.
    Shared {
        type_name: String,
        id: u128,
        offset: u64,
        len: u64,
    },
}

/// Makes the value of a shared-memory argument in a worker process:
/// `(type name, object id, offset, length)`.
pub(crate) type SharedArg<'a> = &'a dyn Fn(String, u128, u64, u64) -> Result<Value>;

#[derive(Serialize, Deserialize)]
struct WireSpec {
    id: TaskId,
    target: WireTarget,
    args: Vec<WireArg>,
    name: Option<String>,
}

impl TaskSpec {
    /// Encodes the spec: registry names for code, bytes for values, ids for
    /// references. The returned value keeps the references alive.
    pub(crate) fn to_bytes(&self) -> Result<Value> {
        let target = self.wire_target();
        let mut args = Vec::with_capacity(self.args.len());
        // What argument values name, kept alive with the bytes (a loan
        // that is never handed to a worker).
        let mut named = Loan::none();
        for a in &self.args {
            args.push(match a {
                Arg::Value(v) => {
                    let enc = v.to_encoded()?;
                    let (refs, actors) = named.lend_named(&enc);
                    WireArg::Value {
                        type_name: enc.type_name().to_owned(),
                        bytes: enc.bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                        refs,
                        actors,
                    }
                }
                Arg::Ref(r) => WireArg::Ref(r.clone()),
            });
        }
        let (_, refs, actors) = named.hand_over();
        let keep = refs
            .iter()
            .map(RawRef::keep_alive)
            .chain(actors.iter().map(crate::actor::RawActor::keep_alive))
            .collect();
        Value::encode_keeping(
            &WireSpec {
                id: self.id,
                target,
                args,
                name: self.name.as_deref().map(str::to_owned),
            },
            keep,
        )
    }

    /// The bytes a worker process receives: the spec with `values` (the
    /// resolved arguments, in order) inline.
    /// Values in (or large enough for) the node's shared memory travel as
    /// their location, pinned for the receiver; the objects values refer to
    /// are lent to it: both in the returned [`Loan`].
    pub(crate) fn to_wire(&self, values: &[Value], node: Option<&Arc<NodeStore>>) -> Result<(Vec<u8>, Loan)> {
        // A user type's `Serialize` may panic: that is this task's error.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.to_wire_inner(values, node)))
            .unwrap_or_else(|p| {
                Err(Error::Serialization(format!(
                    "Serialize panicked: {}",
                    crate::runtime::panic_message(p.as_ref())
                )))
            })
    }

    fn to_wire_inner(&self, values: &[Value], node: Option<&Arc<NodeStore>>) -> Result<(Vec<u8>, Loan)> {
        let mut args = Vec::with_capacity(values.len());
        let mut loan = Loan::none();
        for v in values {
            let type_name = v.type_name().to_owned();
            args.push(match loan.lend(v, node)? {
                Lent::Shared { id, offset, len } => WireArg::Shared {
                    type_name,
                    id,
                    offset,
                    len,
                },
                Lent::Inline { bytes, refs, actors } => WireArg::Value {
                    type_name,
                    bytes,
                    refs,
                    actors,
                },
            });
        }
        let wire = WireSpec {
            id: self.id,
            target: self.wire_target(),
            args,
            name: self.name.as_deref().map(str::to_owned),
        };
        let bytes = postcard::to_allocvec(&wire).map_err(|e| Error::serialization(e.to_string()))?;
        Ok((bytes, loan))
    }

    fn wire_target(&self) -> WireTarget {
        match self.target {
            Target::Function(f) => WireTarget::Function(f.name.to_owned()),
            Target::Constructor(c) => WireTarget::Constructor(c.name.to_owned()),
            Target::Method(a, m) => WireTarget::Method(a, m.name.to_owned()),
        }
    }

    /// Decodes a spec, resolving names through `registry`.
    pub(crate) fn from_bytes(bytes: &Value, rt: &Arc<Inner>, registry: &Registry) -> Result<Self> {
        Self::from_wire(bytes, rt, registry, None)
    }

    /// Decodes a spec; `shared` makes the values of shared-memory
    /// arguments (in a worker process).
    pub(crate) fn from_wire(
        bytes: &Value,
        rt: &Arc<Inner>,
        registry: &Registry,
        shared: Option<SharedArg<'_>>,
    ) -> Result<Self> {
        let raw = bytes
            .bytes()
            .ok_or_else(|| Error::serialization("a task spec must be in bytes form"))?;
        let wire: WireSpec = crate::codec::decode(raw, rt)?;
        let args = wire
            .args
            .into_iter()
            .map(|a| {
                Ok(match a {
                    WireArg::Value {
                        type_name,
                        bytes,
                        refs,
                        actors,
                    } if refs.is_empty() && actors.is_empty() => {
                        Arg::Value(Value::from_bytes(bytes, type_name))
                    }
                    WireArg::Value {
                        type_name,
                        bytes,
                        refs,
                        actors,
                    } => Arg::Value(Value::from_bytes_keeping(
                        bytes,
                        type_name,
                        rt.hold_received(&refs, &actors)?,
                    )),
                    WireArg::Ref(r) => Arg::Ref(r),
                    WireArg::Shared {
                        type_name,
                        id,
                        offset,
                        len,
                    } => match shared {
                        Some(make) => Arg::Value(make(type_name, id, offset, len)?),
                        None => {
                            return Err(Error::invalid(
                                "a shared-memory argument outside a worker process",
                            ))
                        }
                    },
                })
            })
            // Every argument is taken before the first error is reported,
            // so what the others lend goes back when they drop.
            .collect::<Vec<Result<Arg>>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let target = match wire.target {
            WireTarget::Function(n) => Target::Function(registry.function(&n)?),
            WireTarget::Constructor(n) => Target::Constructor(registry.class(&n)?),
            WireTarget::Method(a, n) => Target::Method(a, registry.method(&n)?),
        };
        Ok(TaskSpec {
            id: wire.id,
            target,
            args,
            name: wire.name.map(Arc::from),
        })
    }
}

/// The resolved arguments of one invocation, handed to the registered
/// function, which takes them out by position and type.
#[derive(Debug)]
pub struct ArgList {
    values: Vec<Option<Value>>,
    rt: Arc<Inner>,
    function: &'static str,
}

impl ArgList {
    pub(crate) fn new(values: Vec<Value>, rt: Arc<Inner>, function: &'static str) -> Self {
        ArgList {
            values: values.into_iter().map(Some).collect(),
            rt,
            function,
        }
    }

    /// Checks the number of arguments.
    pub fn expect_len(&self, n: usize) -> Result<()> {
        if self.values.len() == n {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "{} takes {n} argument(s), {} given",
                self.function,
                self.values.len()
            )))
        }
    }

    /// Takes argument `index` as a `T`.
    pub fn take<T: Data>(&mut self, index: usize) -> Result<T> {
        let v = self
            .values
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| Error::invalid(format!("{}: argument {index} is missing", self.function)))?;
        v.take(&self.rt).map_err(|e| match e {
            Error::TypeMismatch { expected, found } => Error::invalid(format!(
                "{}: argument {index} has type {found}, expected {expected}",
                self.function
            )),
            other => other,
        })
    }
}

/// Where a task is in its life, for cancellation.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Waiting for dependencies, resources or its actor.
    Waiting,
    /// Running attempt `attempt`; async tasks can be aborted.
    Running {
        /// Which start this is (a retry starts again).
        attempt: u32,
        /// The async task to abort on cancel.
        abort: Option<tokio::task::AbortHandle>,
        /// The worker process running it, in the worker-process mode, and
        /// whether a forced cancel may kill it (not an actor's process).
        remote: Option<(Arc<crate::lease::Leased>, bool)>,
    },
    /// Finished, failed or cancelled.
    Done,
}

/// The owner's record of one task (or actor call): its cancellation flag,
/// phase and children.
#[derive(Debug)]
pub(crate) struct TaskState {
    pub(crate) id: TaskId,
    cancelled: AtomicBool,
    /// The cancel asked to kill the worker process.
    forced: AtomicBool,
    phase: Mutex<Phase>,
    children: Mutex<Children>,
}

/// A task's children, pruned of finished ones whenever the list doubles,
/// so recording a child stays O(1) amortized.
#[derive(Debug, Default)]
struct Children {
    list: Vec<Weak<TaskState>>,
    prune_at: usize,
}

impl TaskState {
    pub(crate) fn new(id: TaskId) -> Arc<Self> {
        Arc::new(TaskState {
            id,
            cancelled: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            phase: Mutex::new(Phase::Waiting),
            children: Mutex::new(Children::default()),
        })
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Sets the flag; returns whether it was already set.
    pub(crate) fn mark_cancelled(&self) -> bool {
        self.cancelled.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn add_child(&self, child: &Arc<TaskState>) {
        let mut c = self.children.lock();
        if c.list.len() >= c.prune_at {
            c.list.retain(|w| w.strong_count() > 0);
            c.prune_at = (c.list.len() * 2).max(16);
        }
        c.list.push(Arc::downgrade(child));
    }

    pub(crate) fn children(&self) -> Vec<Arc<TaskState>> {
        self.children
            .lock()
            .list
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Moves to `Running` as attempt `attempt`, unless cancelled first.
    /// Returns false when the task must not run.
    pub(crate) fn start(&self, attempt: u32) -> bool {
        let mut p = self.phase.lock();
        if self.is_cancelled() {
            *p = Phase::Done;
            return false;
        }
        *p = Phase::Running {
            attempt,
            abort: None,
            remote: None,
        };
        true
    }

    /// Records the abort handle of attempt `attempt` of a running async
    /// task; aborts at once if a cancel came in between. A handle that
    /// arrives after its attempt ended is ignored.
    pub(crate) fn set_abort(&self, attempt: u32, h: tokio::task::AbortHandle) {
        let mut p = self.phase.lock();
        if let Phase::Running {
            attempt: a, abort, ..
        } = &mut *p
        {
            if *a == attempt {
                if self.is_cancelled() {
                    h.abort();
                }
                *abort = Some(h);
            }
        }
    }

    /// Records the worker process running attempt `attempt` (call it once
    /// the task was sent); passes on a cancel that came in between. A
    /// forced cancel kills the process only when it is `killable` (a task's
    /// leased worker, not an actor's process: Ray refuses to force-cancel
    /// actor calls).
    pub(crate) fn set_remote(&self, attempt: u32, w: Arc<crate::lease::Leased>, killable: bool) {
        let mut p = self.phase.lock();
        if let Phase::Running {
            attempt: a, remote, ..
        } = &mut *p
        {
            if *a == attempt {
                if self.is_cancelled() {
                    w.cancel(self.id, killable && self.forced.load(Ordering::Acquire));
                }
                *remote = Some((w, killable));
            }
        }
    }

    /// Forgets the worker process of the attempt that just ended (before
    /// the worker goes back to the pool, so a late forced cancel cannot
    /// kill the next task's process).
    pub(crate) fn clear_remote(&self) {
        if let Phase::Running { remote, .. } = &mut *self.phase.lock() {
            *remote = None;
        }
    }

    /// Asks the worker process running the task, if any, to cancel it;
    /// with `force` a task's process is killed.
    pub(crate) fn cancel_remote(&self, force: bool) {
        if force {
            self.forced.store(true, Ordering::Release);
        }
        if let Phase::Running {
            remote: Some((w, killable)),
            ..
        } = &*self.phase.lock()
        {
            w.cancel(self.id, force && *killable);
        }
    }

    /// Aborts the running async attempt, if any.
    pub(crate) fn abort_running(&self) {
        if let Phase::Running { abort: Some(h), .. } = &*self.phase.lock() {
            h.abort();
        }
    }

    pub(crate) fn finish(&self) {
        *self.phase.lock() = Phase::Done;
    }

    /// Whether [`Self::finish`] ran.
    pub(crate) fn is_done(&self) -> bool {
        matches!(*self.phase.lock(), Phase::Done)
    }

    /// Whether the task waits (for dependencies, resources or its actor).
    pub(crate) fn is_waiting(&self) -> bool {
        matches!(*self.phase.lock(), Phase::Waiting)
    }

    pub(crate) fn back_to_waiting(&self) {
        *self.phase.lock() = Phase::Waiting;
    }
}
