//! The wire protocol between owners, node daemons and worker processes —
//! Ray's `core_worker.proto` / `node_manager.proto` hot path, as a lean
//! framed protocol over Unix sockets (ARCHITECTURE.md decision 8). The
//! core worker and the node daemon meet only in these messages.
//!
//! The embedded threads mode does not use it; the worker-process mode
//! (`Config::worker_mode(WorkerMode::Processes)`) speaks it between the
//! node daemon, which lives in the driver, and each worker process. The
//! environment a node daemon hands the worker processes it starts is part
//! of the contract too ([`mod@env`]), and so is the marker line a worker
//! writes to its output when it starts hosting an actor
//! ([`ACTOR_LOG_MARKER`]).
//!
//! ```
//! use rustyray_proto::{encode_frame, FrameDecoder, Message};
//! let mut dec = FrameDecoder::default();
//! dec.push(&encode_frame(&Message::Ping { nonce: 7 })?);
//! assert_eq!(dec.next_message()?, Some(Message::Ping { nonce: 7 }));
//! # Ok::<(), rustyray_proto::WireError>(())
//! ```
//!
//! # Frames
//!
//! Every message is one frame: a 4-byte little-endian payload length, then
//! the payload, a postcard-encoded [`Message`]. Frames larger than the
//! decoder's limit are refused before any allocation. A connection starts
//! with a handshake: the connecting side sends [`Message::Hello`] (magic,
//! protocol version, role, process id, the node's token), the accepting
//! side answers [`Message::Welcome`] or [`Message::Refused`] and closes.
//! The token is a random number the node daemon hands to the worker
//! processes it starts (in their environment): a process that does not
//! know it cannot join.
//!
//! A worker process opens two connections to its node daemon, each with
//! its own handshake: the first (role [`Role::Worker`]) carries the node's
//! messages to the worker, the second ([`Role::WorkerUp`]) the worker's
//! messages to the node. Each side reads only one connection and writes
//! only the other: a thread blocked reading a Unix socket would otherwise
//! be woken every time the peer reads what this side wrote on it.
//!
//! # Failure
//!
//! A malformed frame (bad length, undecodable payload, a message out of
//! place) is a [`WireError`]: the reader closes that one connection and
//! logs why; other connections are unaffected, and the owner treats the
//! peer as dead (its tasks are retried per `max_retries`, its actors
//! restarted per `max_restarts`). A truncated frame is not an error until
//! the connection ends: the decoder waits for the rest.

#![forbid(unsafe_code)]

use rustyray_common::ids::{ActorId, ObjectId, TaskId};
use rustyray_common::Error;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
pub mod service;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 10;

/// The first bytes of every `Hello`.
pub const MAGIC: [u8; 4] = *b"RRAY";

/// The default largest frame a decoder accepts (64 MiB; large objects go
/// through shared memory, not frames).
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A driver or worker that owns tasks and objects.
    Owner,
    /// A worker process of the node's pool, on its first connection: the
    /// one that carries the node's messages to the worker.
    Worker,
    /// The same worker process on its second connection, which carries
    /// its messages to the node. One connection per direction: a thread
    /// blocked reading a Unix socket is woken each time the peer takes
    /// bytes this process wrote on that same socket, so a connection that
    /// is read and written by both sides wakes its readers for nothing.
    WorkerUp,
    /// A node daemon.
    NodeDaemon,
    /// A worker process on a connection to another worker's own endpoint
    /// (direct actor calls and their answers). It writes on the connection
    /// it opened and reads the one the other side opens back.
    Peer,
}

/// One protocol message. Each variant says who sends it, whether
/// receiving it twice is harmless, and what a failure means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Connecting side → accepting side, first message. Idempotent: no
    /// (a second `Hello` on a connection is malformed). A wrong magic or
    /// version gets `Refused` and the connection closes.
    Hello {
        /// Always [`MAGIC`].
        magic: [u8; 4],
        /// The sender's [`PROTOCOL_VERSION`].
        version: u16,
        /// The sender's role.
        role: Role,
        /// The sender's process id, for logs and for killing it.
        pid: u32,
        /// The node's token.
        token: u128,
    },
    /// Accepting side → connecting side: the handshake succeeded.
    Welcome {
        /// The version both sides speak.
        version: u16,
    },
    /// Accepting side → connecting side: the handshake failed; the
    /// connection closes after it.
    Refused {
        /// Why.
        reason: String,
    },
    /// Owner → worker: run a task. Not idempotent: the owner sends each
    /// attempt once, to one worker (a duplicate would run the task twice
    /// and lend its arguments twice). If the worker dies before
    /// `TaskDone`, the owner retries the task elsewhere.
    PushTask {
        /// The task.
        task_id: TaskId,
        /// The actor it runs on, for actor calls.
        actor: Option<ActorId>,
        /// The task spec's bytes form (registry names, encoded arguments).
        spec: Vec<u8>,
        /// The CPU the task holds (0 for actor calls): a task blocked on a
        /// child still queued in the worker runs it there if it fits.
        cpu: f64,
    },
    /// Worker → owner: a task finished. Idempotent by `task_id`: the owner
    /// keeps the first completion. A worker that dies first sends nothing:
    /// the owner sees the connection end instead.
    TaskDone {
        /// The task.
        task_id: TaskId,
        /// How it ended.
        outcome: WireOutcome,
    },
    /// Owner → worker: host an actor, running its constructor (the spec
    /// of a constructor task, arguments inline). The worker answers
    /// `TaskDone` for `task_id` once the constructor ran. The worker is the
    /// actor's alone from then on; method calls arrive as `PushTask` with
    /// `actor` set, in the caller's submission order. Not idempotent: sent
    /// once per start of the actor, each time to a fresh worker. If the
    /// worker dies, the owner restarts the actor in a new worker per
    /// `max_restarts`.
    CreateActor {
        /// The actor.
        actor_id: ActorId,
        /// The constructor task, answered by `TaskDone`.
        task_id: TaskId,
        /// The constructor task's spec bytes.
        spec: Vec<u8>,
        /// How many calls may run at once.
        max_concurrency: u32,
    },
    /// Worker → owner: asks for an allocation of `len` bytes in the node's
    /// shared memory, for a large result the worker is about to write.
    /// Answered by `ObjectSlot`. Not idempotent (a second request for the
    /// same id is refused). If the worker dies before the result is
    /// sealed, the allocation is freed.
    CreateObject {
        /// The new object's id (minted by the worker).
        id: u128,
        /// Its size in bytes.
        len: u64,
    },
    /// Owner → worker: the allocation for `CreateObject`, at `slot` bytes
    /// into the arena, or why there is none (the store is full).
    ObjectSlot {
        /// The object.
        id: u128,
        /// Its offset in the arena, or the failure.
        slot: Result<u64, Error>,
    },
    /// Borrower → owner: the borrower dropped its last reference to an
    /// object of the owner's that the owner counts for it: one count per
    /// time it was lent (a reference inside a message the owner sent, one
    /// another worker lent it with `Lend`, or, from the node's owner to a
    /// worker, one the worker lent it: an object of the worker's own that
    /// a message of the worker named). The owner drops `count` of them.
    /// Not idempotent: each count is given back once. A worker that dies
    /// has its counts dropped for it.
    Release {
        /// The object.
        id: ObjectId,
        /// How many counts go back.
        count: u32,
    },
    /// Worker → owner: the worker dropped its last handle to an actor of
    /// the owner that the owner lent it (a handle inside a value it sent,
    /// or the answer to `SpawnActor`/`GetActor`): the owner drops `count`
    /// of the handles it kept for the worker. Not idempotent. A worker
    /// that dies has its handles dropped for it.
    ReleaseActor {
        /// The actor.
        actor: ActorId,
        /// How many handles go back.
        count: u32,
    },
    /// Worker → owner: code in the worker creates an actor. The owner
    /// creates it as its own (in a worker process of its own) and answers
    /// `ObjectReady` for `task_id` with a handle to it (lent), or the
    /// error (a taken name, say). Not idempotent.
    SpawnActor {
        /// The request, answered by `ObjectReady`.
        task_id: TaskId,
        /// The constructor task's spec bytes (arguments inline or as
        /// object ids).
        spec: Vec<u8>,
        /// The objects of the worker's own that the spec names, each lent
        /// to the owner once (see `Lend`).
        refs: Vec<ObjectId>,
        /// The creation's options.
        options: rustyray_common::ActorOptions,
    },
    /// Worker → owner: code in the worker looks up a named actor. Answered
    /// by `ObjectReady` for `task_id` with a handle (lent), or
    /// `ActorNotFound`. Idempotent.
    GetActor {
        /// The request.
        task_id: TaskId,
        /// The actor's name.
        name: String,
    },
    /// Worker → owner: code in the worker kills an actor of the owner
    /// (`no_restart`: for good; otherwise restarted if it has restarts
    /// left). Idempotent for `no_restart`.
    KillActor {
        /// The actor.
        actor: ActorId,
        /// Do not restart it.
        no_restart: bool,
    },
    /// Borrower → owner: code in the borrower looked at an object the
    /// owner lent it (it holds a count on it, so the object exists). The
    /// owner answers `Fetched` once the object is complete (a worker asked
    /// by the node's owner for an object of its own answers from a pool
    /// thread: a large value waits for its slot in shared memory).
    /// Idempotent: a second answer for the same object is ignored.
    Fetch {
        /// The object.
        id: ObjectId,
    },
    /// Owner → borrower: the value (or error) of an object the borrower
    /// asked for with `Fetch`. Idempotent: the first answer completes the
    /// object and later ones are dropped (releasing what they lend).
    Fetched {
        /// The object.
        id: ObjectId,
        /// Its value inline (lending the references it holds), pinned in
        /// shared memory (`Pinned`), or the error.
        outcome: WireOutcome,
    },
    /// Worker → owner: the worker gives up the allocation `ObjectSlot`
    /// gave it (it could not write the result); the owner frees it.
    /// Idempotent.
    AbortObject {
        /// The object.
        id: u128,
    },
    /// Worker → owner: the worker dropped its last view of an object the
    /// owner pinned for it (a shared-memory argument, or a `Pinned` value
    /// in `ObjectReady` or `Fetched`). Idempotent per pin:
    /// each pin the owner took is released by one `Unpin`; a worker that
    /// dies has its pins released for it.
    Unpin {
        /// The object.
        id: u128,
    },
    /// Worker → owner: a call, made by code running in the worker, on an
    /// actor of the owner (whose handle the worker received). The owner
    /// runs it as if it had made it and answers `ObjectReady` for
    /// `task_id` (minted by the worker) with its outcome. The result is
    /// the worker's, as a direct call's is: the owner keeps nothing once it
    /// answered (a reference to it that leaves the worker is lent as the
    /// worker's other objects are). Not idempotent. If the worker dies
    /// first, the answer is dropped.
    CallActor {
        /// The owner's actor.
        actor_id: ActorId,
        /// The call.
        task_id: TaskId,
        /// The call's spec bytes, arguments inline.
        spec: Vec<u8>,
        /// The objects of the worker's own that the spec names, each lent
        /// to the owner once (see `Lend`).
        refs: Vec<ObjectId>,
        /// The call was sent straight to the actor's process once and lost
        /// with it: one attempt of its retries is spent.
        attempted: bool,
    },
    /// Worker → worker (on a `Peer` connection): a call on an actor the
    /// receiving process hosts, made by code in the sending process, whose
    /// answer comes back as `TaskDone` on the connection the receiver opens
    /// back. The objects and actors the spec names were lent to the
    /// receiver by their owner first (`Lend`). Not idempotent.
    ActorCall {
        /// The actor.
        actor_id: ActorId,
        /// The call (minted by the caller).
        task_id: TaskId,
        /// The call's spec in bytes form (values inline, references as
        /// ids).
        spec: Vec<u8>,
        /// The objects passed as arguments by reference, each lent once.
        refs: Vec<ObjectId>,
    },
    /// Worker → owner: the answer to a call another worker (`to`) made
    /// straight to the actor hosted here, when it cannot go straight back
    /// (it is large, lives in shared memory, or names objects or actors):
    /// the owner passes it on as `Answered`, lending what it names. Not
    /// idempotent.
    Answer {
        /// The worker that made the call.
        to: u32,
        /// The call.
        task_id: TaskId,
        /// Its outcome, as a worker reports it to its owner.
        outcome: WireOutcome,
    },
    /// Owner → worker: the answer to a call the worker made straight to an
    /// actor's process, passed on by the owner (see `Answer`). Idempotent:
    /// a second one for the same call is dropped.
    Answered {
        /// The call.
        task_id: TaskId,
        /// The worker that answered.
        from: u32,
        /// Its outcome: inline (lending what it names), pinned in shared
        /// memory, or the error.
        outcome: WireOutcome,
    },
    /// Worker → its owner's side, first message on a worker's uplink or a
    /// `Peer` connection: the endpoint where this process accepts `Peer`
    /// connections. Idempotent.
    Listening {
        /// The endpoint's name (a Unix socket in the abstract namespace).
        endpoint: String,
        /// The tag in the upper half of the ids this process mints: the
        /// objects whose ids carry it are this process's own.
        tag: u64,
    },
    /// Worker → owner: lend the owner's objects and actors to worker `to`
    /// (by process id), which the sender is about to send a message naming
    /// them; counted for `to` as if the owner had sent the message, and
    /// given back by its `Release`/`ReleaseActor`, which may arrive first.
    /// Objects of the sender's own among `refs` (their ids carry its tag)
    /// the owner borrows from the sender first, one count each (the sender
    /// lent them to it), and then lends to `to`. Not idempotent.
    Lend {
        /// The receiving worker.
        to: u32,
        /// The objects, one count each.
        refs: Vec<ObjectId>,
        /// The actors, one handle each.
        actors: Vec<ActorId>,
    },
    /// Owner → worker: the actor the worker made calls on through the owner
    /// (`CallActor`) is alive in a worker process, at `actor.route`. Once
    /// every call it sent through the owner on that actor is answered, the
    /// worker sends its later calls straight there (so its calls keep
    /// their order). Idempotent: a route already known is kept.
    Route {
        /// The actor and the way to its process.
        actor: NamedActor,
    },
    /// Worker → owner (Ray's `RequestWorkerLease`): lease a worker process
    /// for tasks of one resource shape that code in the sender submitted.
    /// The owner admits the request as it admits a task (resources
    /// reserved, queued while none are free), leases a worker from the
    /// node and answers `LeaseGranted`, or `LeaseRefused` when no worker
    /// can be had or no node could ever meet the shape. Not idempotent: a
    /// second request is a second lease. If the sender dies first, a
    /// lease granted to it is ended and its worker killed.
    RequestLease {
        /// The lease (minted by the sender).
        lease_id: TaskId,
        /// The shape: what each task run on the lease holds.
        resources: Vec<(String, f64)>,
    },
    /// Owner → worker: the lease asked for is granted: push tasks straight
    /// to the leased worker process (`LeasedTask`), one at a time, until
    /// `ReturnLease`. Idempotent by `lease_id`.
    LeaseGranted {
        /// The lease.
        lease_id: TaskId,
        /// The leased worker's process.
        pid: u32,
        /// Where the leased worker accepts `Peer` connections.
        endpoint: String,
    },
    /// Owner → worker: the lease cannot be granted; the tasks waiting for
    /// it fail with `error`. Idempotent by `lease_id`.
    LeaseRefused {
        /// The lease.
        lease_id: TaskId,
        /// Why (no worker could start, or the shape is unschedulable).
        error: Error,
    },
    /// Worker → owner (Ray's `ReturnWorker`): the sender is done with a
    /// lease; the worker goes back to the node's pool and the resources to
    /// the scheduler. With `broken`, the sender lost its connection to the
    /// leased worker, which is killed instead of reused. Idempotent: an
    /// unknown lease is ignored.
    ReturnLease {
        /// The lease.
        lease_id: TaskId,
        /// The connection to the leased worker failed.
        broken: bool,
    },
    /// Worker → worker (on a `Peer` connection): run a function task on a
    /// worker leased by the sender, which owns the task; the answer comes
    /// back as `TaskDone` on the connection the receiver opens back (or as
    /// `Answered` through the owner, when large or naming objects). The
    /// objects and actors the spec names were lent to the receiver first
    /// (`Lend`). Not idempotent. If the receiver dies first, the sender
    /// retries the task per its `max_retries`.
    LeasedTask {
        /// The lease it runs under (a task that blocks reports `Blocked`
        /// under the lease's id, whose CPU the owner then lends).
        lease_id: TaskId,
        /// The task (minted by the sender).
        task_id: TaskId,
        /// The task's spec in bytes form (values inline, references as
        /// ids).
        spec: Vec<u8>,
        /// The objects passed as arguments by reference, each lent once.
        refs: Vec<ObjectId>,
        /// The CPU the task holds.
        cpu: f64,
    },
    /// Worker → owner: the task `task_id` running in the worker blocks
    /// (in `get`/`wait`): the owner lends its CPU to other tasks until
    /// `Unblocked`. If the task it waits for (the one that makes `on`) is
    /// still queued, the owner pushes that task to this worker, on the
    /// CPU the blocked task lends (as a blocked thread runs a queued child
    /// in the threads mode), so a recursive tree needs processes by its
    /// depth, not its size. A worker leased by another worker reports its
    /// tasks' blocking under the lease's id (`LeasedTask`), whose CPU the
    /// owner then lends. Ignored for a task the owner does not know.
    Blocked {
        /// The task.
        task_id: TaskId,
        /// The object it waits for, if one.
        on: Option<ObjectId>,
    },
    /// Worker → owner: the task `task_id` resumes after `Blocked`.
    Unblocked {
        /// The task.
        task_id: TaskId,
    },
    /// Owner → worker: the answer to a `CallActor`,
    /// `SpawnActor` or `GetActor`. Idempotent: a second one for the same
    /// request is ignored (what it lends is given back at once).
    ObjectReady {
        /// The call.
        task_id: TaskId,
        /// Its outcome: a value inline (lending the references it holds),
        /// pinned in shared memory (`Pinned`), or the error.
        outcome: WireOutcome,
    },
    /// Owner → worker: cancel a task. Idempotent. With `force` the daemon
    /// kills the worker process instead.
    CancelTask {
        /// The task.
        task_id: TaskId,
        /// Kill the worker.
        force: bool,
    },
    /// Either side: liveness probe. Idempotent.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// Reply to `Ping`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Daemon → worker: finish running tasks and exit. Idempotent.
    Shutdown,
}

/// An actor a value holds a handle to: enough for the receiver to make
/// its own handle before the value is decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedActor {
    /// The actor.
    pub id: ActorId,
    /// Its class's registry name.
    pub class: String,
    /// Where its calls may go straight to, when the owner lends it to a
    /// worker while the actor is alive in a worker process.
    pub route: Option<ActorRoute>,
}

/// The way to an actor's worker process, for calls that skip its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorRoute {
    /// The hosting process's `Peer` endpoint.
    pub endpoint: String,
    /// Its process id.
    pub pid: u32,
    /// The actor's `max_task_retries` (-1: without limit).
    pub max_task_retries: i32,
}

/// How one attempt of a task ended in a worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// It returned a value: its type name and bytes form.
    Value {
        /// The value's type name.
        type_name: String,
        /// The encoded value.
        bytes: Vec<u8>,
        /// The objects it refers to, kept alive with the value, one entry
        /// per reference. An owner lends its own to a worker (counted until
        /// the worker's `Release`). A worker names objects its owner lent
        /// it, and lends its own (those whose ids carry its tag, see
        /// `Listening`): the owner borrows each from it, one count each,
        /// given back with `Release`.
        refs: Vec<ObjectId>,
        /// The actors it holds handles to, kept alive with the value: all
        /// of them the owner's; an owner lends them (counted until the
        /// worker's `ReleaseActor`).
        actors: Vec<NamedActor>,
    },
    /// Owner → worker: a value in the node's shared memory, pinned for the
    /// worker until its `Unpin` (a worker that dies has it unpinned).
    Pinned {
        /// The value's type name.
        type_name: String,
        /// The object holding its bytes.
        id: u128,
        /// Where they start in the arena.
        offset: u64,
        /// Their length.
        len: u64,
    },
    /// The user code returned an `Err`; its message.
    Returned(String),
    /// It returned a large value, written into the node's shared memory
    /// in the allocation `CreateObject` asked for; the owner seals it.
    Stored {
        /// The value's type name.
        type_name: String,
        /// The object holding its bytes.
        id: u128,
        /// Their length.
        len: u64,
    },
    /// The user code panicked; the panic message.
    Panicked(String),
    /// The runtime failed the attempt (a bad argument, a cancel, …).
    Failed(Error),
}

impl Message {
    /// A `Hello` from this build.
    pub fn hello(role: Role, token: u128) -> Self {
        Message::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role,
            pid: std::process::id(),
            token,
        }
    }
}

/// The environment a node daemon hands each worker process it starts.
pub mod env {
    /// Tells a process it was started as a worker: the node daemon's
    /// socket name (abstract namespace).
    pub const WORKER_SOCKET: &str = "RUSTYRAY_WORKER_SOCKET";
    /// The node's token (32 hex digits), checked in the handshake.
    pub const WORKER_TOKEN: &str = "RUSTYRAY_WORKER_TOKEN";
    /// The size from which values live in the node's shared memory.
    pub const SHM_THRESHOLD: &str = "RUSTYRAY_SHM_THRESHOLD";
    /// The descriptor of the node's shared-memory arena.
    pub const ARENA: &str = "RUSTYRAY_ARENA";
}

/// How the marker line starts that a worker writes to its stdout and
/// stderr when it starts hosting an actor (an ASCII record separator, then
/// a name no program prints by chance); the actor's class follows, then a
/// newline. The node daemon labels the worker's later lines with it.
pub const ACTOR_LOG_MARKER: &[u8] = b"\x1erustyray:actor=";

/// Marks this worker process's stdout and stderr with
/// [`ACTOR_LOG_MARKER`]: from here on it hosts an actor of `class` (its
/// registry name).
pub fn announce_actor(class: &str) {
    use std::io::Write;
    let line = [ACTOR_LOG_MARKER, class.as_bytes(), b"\n"].concat();
    // Lost only if nobody reads the output, where it does not matter.
    let _ = std::io::stdout().lock().write_all(&line);
    let _ = std::io::stderr().lock().write_all(&line);
}

/// Why a connection is being closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame announced more bytes than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A frame's payload is not a message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The handshake failed.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Handshake(reason) => Error::Handshake(reason),
            WireError::Io(e) => Error::from_io("using a connection", &e),
            e @ (WireError::TooLarge { .. } | WireError::Malformed(_) | WireError::Truncated(_)) => {
                Error::Protocol(e.to_string())
            }
        }
    }
}

/// Encodes a message as one frame.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, WireError> {
    // Room for most frames at once (growing from a few bytes took several
    // reallocations per frame).
    let mut start = Vec::with_capacity(FRAME_START);
    start.extend_from_slice(&[0_u8; 4]);
    let mut out = postcard::to_extend(msg, start).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    if len > DEFAULT_MAX_FRAME {
        // The receiving side would refuse it and drop the connection.
        return Err(WireError::TooLarge {
            len,
            max: DEFAULT_MAX_FRAME,
        });
    }
    out[..4].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// The room a frame's buffer starts with: enough for calls, answers and
/// task pushes with small values.
const FRAME_START: usize = 256;

/// The most one read of a connection takes at once.
const READ_CHUNK: usize = 16 * 1024;

/// Splits a byte stream into messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the first byte not yet decoded lies in `buf`: decoded frames
    /// are dropped from the front once per read, not once per frame (a
    /// read may bring hundreds).
    start: usize,
    max: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder accepting frames up to `max` bytes.
    pub fn new(max: u32) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Changes the largest frame accepted from now on (a connection
    /// accepts only a small `Hello` until its handshake is done).
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Takes what one read returned; false when it returned nothing (the
    /// peer closed), which is clean only between frames.
    fn after_read(&mut self, got: &[u8]) -> Result<bool, WireError> {
        if got.is_empty() {
            return match self.pending() {
                0 => Ok(false),
                left => Err(WireError::Truncated(left)),
            };
        }
        self.push(got);
        Ok(true)
    }

    /// Bytes received but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The length of the next frame's payload, once its header is here.
    fn frame_len(&self) -> Option<u32> {
        let head = self.buf.get(self.start..self.start + 4)?;
        Some(u32::from_le_bytes([head[0], head[1], head[2], head[3]]))
    }

    /// The next complete message; `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        let Some(len) = self.frame_len() else {
            return Ok(None);
        };
        if len > self.max {
            return Err(WireError::TooLarge { len, max: self.max });
        }
        let end = self.start + 4 + len as usize;
        let Some(payload) = self.buf.get(self.start + 4..end) else {
            return Ok(None);
        };
        let msg = postcard::from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()));
        if end == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else {
            self.start = end;
        }
        msg.map(Some)
    }
}

/// Writes one message.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<(), WireError> {
    w.write_all(&encode_frame(msg)?).await?;
    Ok(())
}

/// Reads the next message; `Ok(None)` when the peer closed cleanly between
/// frames.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    dec: &mut FrameDecoder,
) -> Result<Option<Message>, WireError> {
    loop {
        if let Some(msg) = dec.next_message()? {
            return Ok(Some(msg));
        }
        let mut chunk = [0_u8; READ_CHUNK];
        let n = r.read(&mut chunk).await?;
        if !dec.after_read(&chunk[..n])? {
            return Ok(None);
        }
    }
}

/// Reads the next message from a blocking stream; `Ok(None)` when the
/// peer closed cleanly between frames.
pub fn read_message_blocking<R: std::io::Read>(
    r: &mut R,
    dec: &mut FrameDecoder,
) -> Result<Option<Message>, WireError> {
    loop {
        if let Some(msg) = dec.next_message()? {
            return Ok(Some(msg));
        }
        // Made only when a read is due: a message already received costs
        // no buffer to be zeroed.
        let mut chunk = [0_u8; READ_CHUNK];
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if !dec.after_read(&chunk[..n])? {
            return Ok(None);
        }
    }
}

/// What the connecting side makes of the answer to its `Hello`.
fn welcomed(answer: Option<Message>) -> Result<u16, WireError> {
    match answer {
        Some(Message::Welcome { version }) => Ok(version),
        Some(Message::Refused { reason }) => Err(WireError::Handshake(reason)),
        Some(other) => Err(WireError::Malformed(format!("expected Welcome, got {other:?}"))),
        None => Err(WireError::Handshake("the peer closed the connection".into())),
    }
}

/// What the accepting side makes of the first message: the peer's role
/// and process id, or why it is refused (`Err(Ok(reason))`, answered with
/// `Refused`) or dropped (`Err(Err(error))`, not answered).
fn check_hello(first: Option<Message>, token: u128) -> Result<(Role, u32, u16), Result<String, WireError>> {
    match first {
        Some(Message::Hello {
            magic,
            version,
            role,
            pid,
            token: theirs,
        }) => {
            if magic != MAGIC {
                Err(Ok("bad magic".to_owned()))
            } else if version != PROTOCOL_VERSION {
                Err(Ok(format!(
                    "protocol version {version} is not {PROTOCOL_VERSION}"
                )))
            } else if !same_token(theirs, token) {
                Err(Ok("wrong token".to_owned()))
            } else {
                Ok((role, pid, version))
            }
        }
        Some(other) => Err(Err(WireError::Malformed(format!(
            "expected Hello, got {other:?}"
        )))),
        None => Err(Err(WireError::Handshake("the peer closed before Hello".into()))),
    }
}

/// Compares tokens in time that does not depend on where they differ.
fn same_token(a: u128, b: u128) -> bool {
    let diff = (a ^ b).to_le_bytes();
    diff.iter().fold(0_u8, |acc, d| acc | d) == 0
}

/// The connecting side's handshake: sends `Hello`, expects `Welcome`.
pub async fn connect_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    dec: &mut FrameDecoder,
    role: Role,
    token: u128,
) -> Result<u16, WireError> {
    write_message(s, &Message::hello(role, token)).await?;
    welcomed(read_message(s, dec).await?)
}

/// The accepting side's handshake: expects `Hello` carrying `token`,
/// answers `Welcome` or `Refused`. Returns the peer's role and process id.
pub async fn accept_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    dec: &mut FrameDecoder,
    token: u128,
) -> Result<(Role, u32), WireError> {
    match check_hello(read_message(s, dec).await?, token) {
        Ok((role, pid, version)) => {
            write_message(s, &Message::Welcome { version }).await?;
            Ok((role, pid))
        }
        Err(Ok(reason)) => {
            write_message(
                s,
                &Message::Refused {
                    reason: reason.clone(),
                },
            )
            .await?;
            Err(WireError::Handshake(reason))
        }
        Err(Err(e)) => Err(e),
    }
}

/// [`connect_handshake`] on a blocking stream.
pub fn connect_handshake_blocking<S: std::io::Read + std::io::Write>(
    s: &mut S,
    dec: &mut FrameDecoder,
    role: Role,
    token: u128,
) -> Result<u16, WireError> {
    s.write_all(&encode_frame(&Message::hello(role, token))?)?;
    welcomed(read_message_blocking(s, dec)?)
}

/// [`accept_handshake`] on a blocking stream (bound its time with the
/// stream's read timeout).
pub fn accept_handshake_blocking<S: std::io::Read + std::io::Write>(
    s: &mut S,
    dec: &mut FrameDecoder,
    token: u128,
) -> Result<(Role, u32), WireError> {
    match check_hello(read_message_blocking(s, dec)?, token) {
        Ok((role, pid, version)) => {
            s.write_all(&encode_frame(&Message::Welcome { version })?)?;
            Ok((role, pid))
        }
        Err(Ok(reason)) => {
            s.write_all(&encode_frame(&Message::Refused {
                reason: reason.clone(),
            })?)?;
            Err(WireError::Handshake(reason))
        }
        Err(Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<Message> {
        vec![
            Message::hello(Role::Worker, 3),
            Message::Welcome {
                version: PROTOCOL_VERSION,
            },
            Message::Refused { reason: "no".into() },
            Message::PushTask {
                task_id: TaskId::from_u128(7),
                actor: Some(ActorId::from_u128(9)),
                spec: vec![1, 2, 3],
                cpu: 1.0,
            },
            Message::RequestLease {
                lease_id: TaskId::from_u128(11),
                resources: vec![("CPU".into(), 1.0)],
            },
            Message::Route {
                actor: NamedActor {
                    id: ActorId::from_u128(6),
                    class: "Counter".into(),
                    route: Some(ActorRoute {
                        endpoint: "rustyray-p-1-ab".into(),
                        pid: 1,
                        max_task_retries: 0,
                    }),
                },
            },
            Message::LeaseGranted {
                lease_id: TaskId::from_u128(11),
                pid: 42,
                endpoint: "rustyray-p-42".into(),
            },
            Message::ReturnLease {
                lease_id: TaskId::from_u128(11),
                broken: false,
            },
            Message::LeasedTask {
                lease_id: TaskId::from_u128(11),
                task_id: TaskId::from_u128(12),
                spec: vec![4],
                refs: vec![ObjectId::from_u128(5)],
                cpu: 1.0,
            },
            Message::TaskDone {
                task_id: TaskId::from_u128(7),
                outcome: WireOutcome::Value {
                    type_name: "i64".into(),
                    bytes: vec![42],
                    refs: vec![ObjectId::from_u128(5)],
                    actors: vec![NamedActor {
                        id: ActorId::from_u128(6),
                        class: "Counter".into(),
                        route: Some(ActorRoute {
                            endpoint: "rustyray-p-1-ab".into(),
                            pid: 1,
                            max_task_retries: -1,
                        }),
                    }],
                },
            },
            Message::TaskDone {
                task_id: TaskId::from_u128(8),
                outcome: WireOutcome::Failed(Error::TaskCancelled(TaskId::from_u128(8))),
            },
            Message::TaskDone {
                task_id: TaskId::from_u128(9),
                outcome: WireOutcome::Panicked("boom".into()),
            },
            Message::CreateActor {
                actor_id: ActorId::from_u128(9),
                task_id: TaskId::from_u128(10),
                spec: vec![4, 5],
                max_concurrency: 16,
            },
            Message::CancelTask {
                task_id: TaskId::from_u128(7),
                force: true,
            },
            Message::CreateObject { id: 3, len: 1 << 20 },
            Message::ObjectSlot {
                id: 3,
                slot: Ok(4096),
            },
            Message::Unpin { id: 3 },
            Message::AbortObject { id: 3 },
            Message::Release {
                id: ObjectId::from_u128(13),
                count: 2,
            },
            Message::Fetch {
                id: ObjectId::from_u128(13),
            },
            Message::ReleaseActor {
                actor: ActorId::from_u128(6),
                count: 3,
            },
            Message::SpawnActor {
                task_id: TaskId::from_u128(15),
                spec: vec![1, 2],
                refs: vec![ObjectId::from_u128(5)],
                options: rustyray_common::ActorOptions::default(),
            },
            Message::GetActor {
                task_id: TaskId::from_u128(16),
                name: "x".into(),
            },
            Message::KillActor {
                actor: ActorId::from_u128(6),
                no_restart: true,
            },
            Message::Fetched {
                id: ObjectId::from_u128(13),
                outcome: WireOutcome::Pinned {
                    type_name: "Vec<u8>".into(),
                    id: 3,
                    offset: 4096,
                    len: 1 << 20,
                },
            },
            Message::Blocked {
                task_id: TaskId::from_u128(14),
                on: Some(ObjectId::from_u128(15)),
            },
            Message::Unblocked {
                task_id: TaskId::from_u128(14),
            },
            Message::CallActor {
                actor_id: ActorId::from_u128(9),
                task_id: TaskId::from_u128(12),
                spec: vec![6],
                refs: Vec::new(),
                attempted: true,
            },
            Message::ActorCall {
                actor_id: ActorId::from_u128(9),
                task_id: TaskId::from_u128(13),
                spec: vec![6],
                refs: vec![ObjectId::from_u128(5)],
            },
            Message::Listening {
                endpoint: "rustyray-p-2-cd".into(),
                tag: 0x1234,
            },
            Message::Answer {
                to: 2,
                task_id: TaskId::from_u128(13),
                outcome: WireOutcome::Stored {
                    type_name: "Vec<u8>".into(),
                    id: 3,
                    len: 1 << 20,
                },
            },
            Message::Answered {
                task_id: TaskId::from_u128(13),
                from: 4,
                outcome: WireOutcome::Panicked("no".into()),
            },
            Message::Lend {
                to: 2,
                refs: vec![ObjectId::from_u128(5)],
                actors: vec![ActorId::from_u128(6)],
            },
            Message::ObjectReady {
                task_id: TaskId::from_u128(12),
                outcome: WireOutcome::Returned("no".into()),
            },
            Message::TaskDone {
                task_id: TaskId::from_u128(11),
                outcome: WireOutcome::Stored {
                    type_name: "Vec<u8>".into(),
                    id: 3,
                    len: 1 << 20,
                },
            },
            Message::Ping { nonce: 5 },
            Message::Pong { nonce: 5 },
            Message::Shutdown,
        ]
    }

    #[test]
    fn messages_round_trip_through_frames_split_anywhere() {
        let bytes: Vec<u8> = sample()
            .iter()
            .flat_map(|m| encode_frame(m).expect("encode"))
            .collect();
        for split in [1, 3, 7, 64, bytes.len()] {
            let mut dec = FrameDecoder::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(split) {
                dec.push(chunk);
                while let Some(m) = dec.next_message().expect("valid frames") {
                    got.push(m);
                }
            }
            assert_eq!(got, sample(), "split {split}");
            assert_eq!(dec.pending(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&1000_u32.to_le_bytes());
        assert!(matches!(
            dec.next_message(),
            Err(WireError::TooLarge { len: 1000, max: 16 })
        ));
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut dec = FrameDecoder::default();
        dec.push(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_message(), Err(WireError::Malformed(_))));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder: every call returns a
        /// message, "need more", or an error, and consumes what it decodes.
        #[test]
        fn decoder_survives_arbitrary_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut dec = FrameDecoder::new(1 << 16);
            for c in &chunks {
                dec.push(c);
                while let Ok(Some(_)) = dec.next_message() {}
            }
        }

        /// Valid frames followed by arbitrary bytes still decode first.
        #[test]
        fn valid_prefix_decodes_before_garbage(tail in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut dec = FrameDecoder::new(1 << 16);
            dec.push(&encode_frame(&Message::Ping { nonce: 1 }).expect("encode"));
            dec.push(&tail);
            prop_assert_eq!(dec.next_message().ok().flatten(), Some(Message::Ping { nonce: 1 }));
        }
    }

    #[tokio::test]
    async fn handshake_and_a_bad_connection_harm_nothing_else() {
        let dir = std::env::temp_dir().join(format!("rr-wire-{}-{}", std::process::id(), line!()));
        let _ = std::fs::remove_file(&dir);
        let listener = tokio::net::UnixListener::bind(&dir).expect("bind");
        let server = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..4 {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut dec = FrameDecoder::default();
                let outcome = match accept_handshake(&mut s, &mut dec, 5).await {
                    Ok(_) => match read_message(&mut s, &mut dec).await {
                        Ok(Some(Message::Ping { nonce })) => {
                            write_message(&mut s, &Message::Pong { nonce })
                                .await
                                .expect("pong");
                            "served".to_owned()
                        }
                        Ok(other) => format!("unexpected {other:?}"),
                        Err(e) => format!("closed: {e}"),
                    },
                    Err(e) => format!("closed: {e}"),
                };
                outcomes.push(outcome);
            }
            outcomes
        });
        // A good client.
        let mut c = tokio::net::UnixStream::connect(&dir).await.expect("connect");
        let mut dec = FrameDecoder::default();
        assert_eq!(
            connect_handshake(&mut c, &mut dec, Role::Worker, 5)
                .await
                .expect("hs"),
            PROTOCOL_VERSION
        );
        write_message(&mut c, &Message::Ping { nonce: 11 })
            .await
            .expect("ping");
        assert_eq!(
            read_message(&mut c, &mut dec).await.expect("read"),
            Some(Message::Pong { nonce: 11 })
        );
        // A client sending garbage after the handshake.
        let mut bad = tokio::net::UnixStream::connect(&dir).await.expect("connect");
        let mut bdec = FrameDecoder::default();
        connect_handshake(&mut bad, &mut bdec, Role::Owner, 5)
            .await
            .expect("hs");
        bad.write_all(&[2, 0, 0, 0, 0xff, 0xff]).await.expect("write");
        // A client with a wrong version.
        let mut old = tokio::net::UnixStream::connect(&dir).await.expect("connect");
        let frame = encode_frame(&Message::Hello {
            magic: MAGIC,
            version: 99,
            role: Role::Worker,
            pid: 1,
            token: 5,
        })
        .expect("encode");
        old.write_all(&frame).await.expect("write");
        let mut odec = FrameDecoder::default();
        assert!(matches!(
            read_message(&mut old, &mut odec).await,
            Ok(Some(Message::Refused { .. }))
        ));
        // A client that does not know the node's token.
        let mut stranger = tokio::net::UnixStream::connect(&dir).await.expect("connect");
        let mut sdec = FrameDecoder::default();
        assert!(matches!(
            connect_handshake(&mut stranger, &mut sdec, Role::Worker, 6).await,
            Err(WireError::Handshake(r)) if r == "wrong token"
        ));
        let outcomes = server.await.expect("server");
        assert_eq!(outcomes[0], "served");
        assert!(
            outcomes[1].starts_with("closed: malformed frame"),
            "{}",
            outcomes[1]
        );
        assert!(outcomes[2].contains("protocol version 99"), "{}", outcomes[2]);
        assert!(outcomes[3].contains("wrong token"), "{}", outcomes[3]);
        // The good connection still works after the bad ones.
        drop(c);
        let _ = std::fs::remove_file(&dir);
    }
}
