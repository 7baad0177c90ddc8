//! Per-call options for tasks and actors — Ray's `.options(...)`.

use crate::error::{Error, Result};
use crate::resources::{ResourceSet, CPU, GPU};
use std::ffi::OsString;
use std::path::PathBuf;

/// Options of one task submission. Unset fields fall back to the
/// function's attribute, then to Ray's defaults (1 CPU, 3 retries, `Err`
/// returns not retried).
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    #[doc(hidden)]
    pub num_cpus: Option<f64>,
    #[doc(hidden)]
    pub num_gpus: Option<f64>,
    #[doc(hidden)]
    pub resources: Vec<(String, f64)>,
    #[doc(hidden)]
    pub max_retries: Option<i32>,
    #[doc(hidden)]
    pub retry_exceptions: Option<bool>,
    #[doc(hidden)]
    pub name: Option<String>,
}

/// Ray's default `max_retries` for tasks.
pub const DEFAULT_MAX_RETRIES: i32 = 3;

/// Options of one actor creation. Unset fields fall back to the class's
/// attribute, then to Ray's defaults.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ActorOptions {
    #[doc(hidden)]
    pub num_cpus: Option<f64>,
    #[doc(hidden)]
    pub num_gpus: Option<f64>,
    #[doc(hidden)]
    pub resources: Vec<(String, f64)>,
    #[doc(hidden)]
    pub max_restarts: Option<i32>,
    #[doc(hidden)]
    pub max_task_retries: Option<i32>,
    #[doc(hidden)]
    pub max_concurrency: Option<u32>,
    #[doc(hidden)]
    pub name: Option<String>,
    #[doc(hidden)]
    pub get_if_exists: bool,
    #[doc(hidden)]
    pub detached: bool,
}

#[doc(hidden)]
pub fn resource_request(
    num_cpus: f64,
    num_gpus: f64,
    declared: &[(&str, f64)],
    custom: &[(String, f64)],
) -> Result<ResourceSet> {
    let mut r = ResourceSet::new();
    r.set(CPU, num_cpus)?;
    r.set(GPU, num_gpus)?;
    for (n, v) in declared {
        r.set(n, *v)?;
    }
    for (n, v) in custom {
        r.set(n, *v)?;
    }
    Ok(r)
}

impl TaskOptions {
    #[doc(hidden)]
    pub fn request(&self, d: &DeclaredOptions) -> Result<ResourceSet> {
        resource_request(
            self.num_cpus.or(d.num_cpus).unwrap_or(1.0),
            self.num_gpus.unwrap_or(d.num_gpus),
            d.resources,
            &self.resources,
        )
    }

    /// The task's `max_retries` (this call's, else its function's, else
    /// [`DEFAULT_MAX_RETRIES`]) and `retry_exceptions`.
    #[doc(hidden)]
    pub fn retries(&self, d: &DeclaredOptions) -> (i32, bool) {
        (
            self.max_retries.or(d.max_retries).unwrap_or(DEFAULT_MAX_RETRIES),
            self.retry_exceptions.unwrap_or(d.retry_exceptions),
        )
    }
}

/// The builder methods shared by every task's options (`f::options()`).
pub trait TaskOptionsBuilder: Sized {
    /// The options being built.
    fn task_options(&mut self) -> &mut TaskOptions;

    /// CPUs the task holds while it runs (fractions allowed; default 1).
    fn num_cpus(mut self, n: f64) -> Self {
        self.task_options().num_cpus = Some(n);
        self
    }

    /// GPUs the task holds while it runs.
    fn num_gpus(mut self, n: f64) -> Self {
        self.task_options().num_gpus = Some(n);
        self
    }

    /// An amount of a custom resource the task holds while it runs.
    fn resource(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.task_options().resources.push((name.into(), amount));
        self
    }

    /// How many times a task that panicked is re-run (-1: forever;
    /// default 3).
    fn max_retries(mut self, n: i32) -> Self {
        self.task_options().max_retries = Some(n);
        self
    }

    /// Whether a task that returned `Err` is retried too.
    fn retry_exceptions(mut self, yes: bool) -> Self {
        self.task_options().retry_exceptions = Some(yes);
        self
    }

    /// A name shown in errors.
    fn name(mut self, name: impl Into<String>) -> Self {
        self.task_options().name = Some(name.into());
        self
    }
}

/// The builder methods of actor options (`Class::options()`).
pub trait ActorOptionsBuilder: Sized {
    /// The options being built.
    fn actor_options(&mut self) -> &mut ActorOptions;

    /// CPUs held for the actor's lifetime. Without it, an actor needs one
    /// CPU to be placed and holds none while it lives (Ray's default).
    fn num_cpus(mut self, n: f64) -> Self {
        self.actor_options().num_cpus = Some(n);
        self
    }

    /// GPUs held for the actor's lifetime.
    fn num_gpus(mut self, n: f64) -> Self {
        self.actor_options().num_gpus = Some(n);
        self
    }

    /// An amount of a custom resource held for the actor's lifetime.
    fn resource(mut self, name: impl Into<String>, amount: f64) -> Self {
        self.actor_options().resources.push((name.into(), amount));
        self
    }

    /// How many times the actor is restarted after it crashes (-1:
    /// forever; default 0).
    fn max_restarts(mut self, n: i32) -> Self {
        self.actor_options().max_restarts = Some(n);
        self
    }

    /// How many times a call that crashed the actor is retried on the
    /// restarted actor (-1: forever; default 0).
    fn max_task_retries(mut self, n: i32) -> Self {
        self.actor_options().max_task_retries = Some(n);
        self
    }

    /// How many calls may run at once (default 1; 1000 for async actors).
    fn max_concurrency(mut self, n: u32) -> Self {
        self.actor_options().max_concurrency = Some(n);
        self
    }

    /// Registers the actor under a name, for `Ray::get_actor`.
    fn name(mut self, name: impl Into<String>) -> Self {
        self.actor_options().name = Some(name.into());
        self
    }

    /// With a name: return the existing actor of that name instead of
    /// failing.
    fn get_if_exists(mut self, yes: bool) -> Self {
        self.actor_options().get_if_exists = yes;
        self
    }

    /// Keeps the actor alive after its last handle is dropped, until it is
    /// killed or the runtime shuts down (Ray's `lifetime="detached"`).
    fn detached(mut self, yes: bool) -> Self {
        self.actor_options().detached = yes;
        self
    }
}

/// Options of `Ray::cancel_with`.
#[derive(Debug, Clone, Copy)]
pub struct CancelOptions {
    /// Kill the worker running the task. In the embedded threads mode a
    /// thread cannot be killed: a running sync task is flagged as for a
    /// normal cancel, and its result is discarded.
    pub force: bool,
    /// Also cancel the tasks the task submitted (Ray's default: true).
    pub recursive: bool,
}

impl Default for CancelOptions {
    fn default() -> Self {
        CancelOptions {
            force: false,
            recursive: true,
        }
    }
}

/// Default options declared on a function or actor by its attribute.
#[derive(Debug, Clone, Copy)]
pub struct DeclaredOptions {
    /// CPUs per call (tasks) or held for the actor's lifetime (actors);
    /// `None` means the default (1 for tasks, see actors).
    pub num_cpus: Option<f64>,
    /// GPUs requested.
    pub num_gpus: f64,
    /// Custom resources requested.
    pub resources: &'static [(&'static str, f64)],
    /// Retries for tasks; restarts for actors. `None` keeps the default.
    pub max_retries: Option<i32>,
    /// Whether `Err` returns are retried (tasks).
    pub retry_exceptions: bool,
    /// How many calls run at once (actors). `None` keeps the default.
    pub max_concurrency: Option<u32>,
    /// Retries of a failed call on a restarted actor (actors).
    pub max_task_retries: i32,
}

impl DeclaredOptions {
    /// No declared options.
    pub const DEFAULT: DeclaredOptions = DeclaredOptions {
        num_cpus: None,
        num_gpus: 0.0,
        resources: &[],
        max_retries: None,
        retry_exceptions: false,
        max_concurrency: None,
        max_task_retries: 0,
    };
}

/// The program a node daemon starts as its worker processes: by default
/// the running executable with no arguments.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    #[doc(hidden)]
    pub program: PathBuf,
    #[doc(hidden)]
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// Runs `program` with `args`. The program must call
    /// `rustyray::worker_entry` before anything else in `main`.
    pub fn new(program: impl Into<PathBuf>, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        WorkerCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The running executable, with no arguments.
    pub fn current_exe() -> Result<Self> {
        let program = std::env::current_exe()
            .map_err(|e| Error::WorkerStart(format!("cannot find the running executable: {e}")))?;
        Ok(WorkerCommand {
            program,
            args: Vec::new(),
        })
    }
}

/// How a driver's node daemon is started (the worker-process mode): what
/// the core worker hands the node daemon from the user's `Config`.
#[doc(hidden)]
#[derive(Debug)]
pub struct NodeOptions {
    /// What starts a worker process.
    pub command: WorkerCommand,
    /// How many workers to start ahead of time.
    pub prestart: usize,
    /// Names the node's threads and its session directory.
    pub name: String,
    /// Where spilled objects go (else the session directory).
    pub spill_dir: Option<PathBuf>,
    /// Where the workers' logs go (else the session directory).
    pub log_dir: Option<PathBuf>,
    /// Whether the workers' output is echoed to the driver's.
    pub log_to_driver: bool,
    /// The shared-memory store's size in bytes.
    pub capacity: usize,
    /// Values whose bytes form is at least this long go to shared memory.
    pub threshold: usize,
}
