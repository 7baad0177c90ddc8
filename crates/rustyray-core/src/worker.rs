//! Worker mode — Ray's worker process: the main loop of a process the node
//! daemon started, receiving tasks and sending back their outcomes.
//!
//! The user's own executable is the worker. [`worker_entry`], called first
//! thing in `main` (the `#[rustyray::main]` attribute does it), finds the
//! node daemon's socket in the environment, connects, and serves tasks
//! until the connection ends; then the process exits without returning to
//! the user's `main`. Started any other way, it returns at once. Because
//! the process runs the same executable, its link-time registry is the
//! driver's, entry for entry.
//!
//! A worker runs each pushed task on an embedded runtime of its own: sync
//! functions on its worker threads, async ones on its executor, with the
//! task's context set, so `rustyray::is_cancelled()` works and the code
//! runs exactly as it does in the threads mode. A reader thread owns the
//! socket; replies are written whole, under a lock, by whichever thread
//! finishes a task. When the connection ends (the driver exited or was
//! killed) the process exits at once, even in the middle of a task, so no
//! worker outlives its driver.

use crate::codec::Value;
use crate::context::{self, TaskContext};
use crate::error::{Error, Result};
use crate::ids::TaskId;
use crate::node::{TOKEN_ENV, WORKER_ENV};
use crate::object_ref::Arg;
use crate::registry::FunctionBody;
use crate::resources::ResourceSet;
use crate::runtime::{CatchUnwind, Config, Inner, Outcome};
use crate::task::{ArgList, Target, TaskSpec, TaskState};
use crate::wire::{self, FrameDecoder, Message, Role, WireOutcome};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// Runs the worker loop and exits the process when this process was
/// started as a worker by a node daemon; returns at once otherwise.
///
/// Call it first thing in `main` (or put `#[rustyray::main]` on `main`) of
/// every program that runs with [`crate::WorkerMode::Processes`]:
///
/// ```no_run
/// rustyray_core::worker_entry();
/// // The driver's code: only reached when not started as a worker.
/// let ray = rustyray_core::init_with(
///     rustyray_core::Config::new().worker_mode(rustyray_core::WorkerMode::Processes),
/// );
/// ```
pub fn worker_entry() {
    let Some(socket) = std::env::var_os(WORKER_ENV) else {
        return;
    };
    let code = match serve(&socket.to_string_lossy()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("rustyray worker process {}: {e}", std::process::id());
            1
        }
    };
    std::process::exit(code);
}

/// Whether this process was started as a worker.
pub(crate) fn started_as_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// The connection's writing side, shared by the threads that finish tasks.
#[derive(Clone)]
struct Replies(Arc<Mutex<UnixStream>>);

impl Replies {
    fn send(&self, msg: &Message) {
        let written = wire::encode_frame(msg)
            .map_err(|e| e.to_string())
            .and_then(|frame| self.0.lock().write_all(&frame).map_err(|e| e.to_string()));
        if let Err(e) = written {
            // The driver is gone (or the frame cannot be built, which the
            // driver would see as a lost task anyway): nothing is left to
            // serve.
            eprintln!(
                "rustyray worker process {}: cannot reply: {e}",
                std::process::id()
            );
            std::process::exit(1);
        }
    }

    fn done(&self, task_id: TaskId, outcome: WireOutcome) {
        self.send(&Message::TaskDone { task_id, outcome });
    }
}

type Running = Arc<Mutex<HashMap<TaskId, Arc<TaskState>>>>;

fn serve(socket: &str) -> Result<()> {
    let token = std::env::var(TOKEN_ENV)
        .ok()
        .and_then(|t| u128::from_str_radix(&t, 16).ok())
        .ok_or_else(|| Error::invalid(format!("{TOKEN_ENV} is missing or malformed")))?;
    let io = |what: &str, e: std::io::Error| Error::invalid(format!("{what}: {e}"));
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(socket.as_bytes())
        .map_err(|e| io("bad node socket name", e))?;
    let mut stream =
        UnixStream::connect_addr(&addr).map_err(|e| io("cannot connect to the node daemon", e))?;
    let replies = Replies(Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(|e| io("cannot share the connection", e))?,
    )));
    let mut dec = FrameDecoder::default();
    replies.send(&Message::hello(Role::Worker, token));
    match read(&mut stream, &mut dec)? {
        Some(Message::Welcome { .. }) => {}
        Some(Message::Refused { reason }) => {
            return Err(Error::invalid(format!("refused by the node: {reason}")))
        }
        other => return Err(Error::invalid(format!("expected Welcome, got {other:?}"))),
    }
    let rt = Inner::start(Config::default())?;
    let running: Running = Arc::default();
    loop {
        match read(&mut stream, &mut dec)? {
            Some(Message::PushTask { task_id, spec, .. }) => {
                run_task(&rt, task_id, spec, &replies, &running);
            }
            Some(Message::CancelTask { task_id, .. }) => {
                let state = running.lock().get(&task_id).cloned();
                if let Some(s) = state {
                    s.mark_cancelled();
                    s.abort_running();
                }
            }
            Some(Message::Ping { nonce }) => replies.send(&Message::Pong { nonce }),
            Some(Message::Shutdown) | None => return Ok(()),
            Some(other) => return Err(Error::invalid(format!("unexpected message {other:?}"))),
        }
    }
}

/// Reads the next message, blocking.
fn read(stream: &mut UnixStream, dec: &mut FrameDecoder) -> Result<Option<Message>> {
    let mut chunk = [0_u8; 8192];
    loop {
        if let Some(m) = dec
            .next_message()
            .map_err(|e| Error::invalid(format!("bad frame from the node daemon: {e}")))?
        {
            return Ok(Some(m));
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::invalid(format!(
                    "connection to the node daemon failed: {e}"
                )))
            }
        };
        if n == 0 {
            return Ok(None);
        }
        dec.push(&chunk[..n]);
    }
}

/// Sends a task's outcome when dropped: on completion with the outcome
/// set, or (for an aborted async task) as cancelled.
struct Finish {
    task_id: TaskId,
    replies: Replies,
    running: Running,
    outcome: Option<WireOutcome>,
}

impl Finish {
    fn complete(mut self, outcome: Outcome) {
        self.outcome = Some(outcome.into_wire());
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.running.lock().remove(&self.task_id);
        let outcome = self
            .outcome
            .take()
            .unwrap_or(WireOutcome::Failed(Error::TaskCancelled(self.task_id)));
        self.replies.done(self.task_id, outcome);
    }
}

fn run_task(rt: &Arc<Inner>, task_id: TaskId, spec: Vec<u8>, replies: &Replies, running: &Running) {
    let mut finish = Finish {
        task_id,
        replies: replies.clone(),
        running: running.clone(),
        outcome: None,
    };
    let (entry, args) = match decode(rt, spec) {
        Ok(x) => x,
        Err(e) => {
            finish.outcome = Some(WireOutcome::Failed(e));
            return;
        }
    };
    let state = TaskState::new(task_id);
    running.lock().insert(task_id, state.clone());
    state.start(1);
    let ctx = TaskContext::new(rt.clone(), state.clone(), ResourceSet::new(), false);
    match entry.body {
        FunctionBody::Sync(f) => {
            let job = Box::new(move || {
                let outcome = Outcome::from_invoke(context::with_sync(ctx, || {
                    std::panic::catch_unwind(AssertUnwindSafe(|| f(args)))
                }));
                finish.complete(outcome);
            });
            // A closed pool drops the job, which reports it cancelled.
            let _ = rt.pool.execute(job);
        }
        FunctionBody::Async(f) => {
            let ctx = TaskContext::new(rt.clone(), state.clone(), ResourceSet::new(), true);
            let h = rt.handle.spawn(async move {
                let outcome = Outcome::from_invoke(context::with_async(ctx, CatchUnwind(f(args))).await);
                finish.complete(outcome);
            });
            state.set_abort(1, h.abort_handle());
        }
    }
}

/// Decodes a pushed spec into its function and arguments, which the owner
/// resolved to values.
fn decode(rt: &Arc<Inner>, spec: Vec<u8>) -> Result<(&'static crate::registry::FunctionEntry, ArgList)> {
    let spec = TaskSpec::from_bytes(&Value::from_bytes(spec, "TaskSpec"), rt, &rt.registry)?;
    let Target::Function(entry) = spec.target else {
        return Err(Error::invalid(format!(
            "{}: actors do not run in worker processes yet",
            spec.target.name()
        )));
    };
    let values = spec
        .args
        .into_iter()
        .map(|a| match a {
            Arg::Value(v) => Ok(v),
            Arg::Ref(r) => Err(Error::invalid(format!(
                "{}: argument {} was not resolved by the owner",
                entry.name,
                r.id()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((entry, ArgList::new(values, rt.clone(), entry.name)))
}

impl Outcome {
    /// The outcome as a worker reports it.
    pub(crate) fn into_wire(self) -> WireOutcome {
        match self {
            Outcome::Value(v) => match v.to_encoded() {
                Ok(enc) => WireOutcome::Value {
                    type_name: enc.type_name().to_owned(),
                    bytes: enc.bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                },
                Err(e) => WireOutcome::Failed(e),
            },
            Outcome::Returned(m) => WireOutcome::Returned(m),
            Outcome::Panicked(m) => WireOutcome::Panicked(m),
            Outcome::Failed(e) => WireOutcome::Failed(e),
            Outcome::Crashed(m) => WireOutcome::Failed(Error::invalid(m)),
        }
    }

    /// The outcome a worker reported.
    pub(crate) fn from_wire(w: WireOutcome) -> Self {
        match w {
            WireOutcome::Value { type_name, bytes } => Outcome::Value(Value::from_bytes(bytes, type_name)),
            WireOutcome::Returned(m) => Outcome::Returned(m),
            WireOutcome::Panicked(m) => Outcome::Panicked(m),
            WireOutcome::Failed(e) => Outcome::Failed(e),
        }
    }
}
