//! `rustyray microbenchmark` — Ray's `ray microbenchmark`
//! (`python/ray/_private/ray_perf.py`), row for row: the same row names,
//! the same shapes (batch sizes, actor counts, object sizes) and the same
//! timing method (a warm-up second, then four trials of at least two
//! seconds each; the figure is the mean ± standard deviation of the trials'
//! rates). Rows whose feature RustyRay does not have yet are reported as
//! not supported, never with a number.
//!
//! `--mode` picks where tasks run: `threads` (the embedded worker threads),
//! `processes` (worker processes, Ray's layout: this binary started again
//! as a worker) or `both`, one mode after the other, each on its own
//! runtime. A row that fails in a mode (say, an object reference that would
//! have to cross processes) is reported as not supported in that mode,
//! with the error, and the run goes on.
//!
//! Every human row line is Ray's (`<row> per second <mean> +- <std>`)
//! followed by the mode in brackets (`[threads]`, `[processes]`); `--json`
//! gives each row a `mode` field.

use rustyray::prelude::*;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of `rustyray microbenchmark`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Only run rows whose name contains this text (Ray's TESTS_TO_RUN).
    #[arg(long, env = "TESTS_TO_RUN")]
    pub filter: Option<String>,
    /// Print the results as JSON (one object) on standard output.
    #[arg(long)]
    pub json: bool,
    /// Seconds of each timed trial.
    #[arg(long, default_value_t = 2.0)]
    pub trial_secs: f64,
    /// Number of timed trials per row.
    #[arg(long, default_value_t = 4)]
    pub trials: u32,
    /// Seconds of the warm-up run before the trials.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Also measure the scale figures (memory per queued task with 1M
    /// tasks pending, actor creation rate for 10k actors, memory per live
    /// small object with 1M objects), in the threads mode only: in the
    /// processes mode 10k actors would be 10k worker processes.
    #[arg(long)]
    pub scale: bool,
    /// Seconds a row may go without completing a call before it is
    /// reported as stalled (and the run goes on).
    #[arg(long, default_value_t = 30.0)]
    pub stall_secs: f64,
    /// Where tasks run: `threads` (the embedded worker threads),
    /// `processes` (worker processes of the node, this binary started
    /// again; see `rustyray::WorkerMode::Processes` for what runs there) or
    /// `both`, one after the other.
    #[arg(long, value_enum, default_value_t = ModeChoice::Threads)]
    pub mode: ModeChoice,
}

/// The modes `--mode` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeChoice {
    /// Tasks on the embedded worker threads.
    Threads,
    /// Tasks in worker processes.
    Processes,
    /// The threads mode, then the processes mode.
    Both,
}

impl ModeChoice {
    /// The modes to run, in order.
    pub fn modes(self) -> &'static [Mode] {
        match self {
            ModeChoice::Threads => &[Mode::Threads],
            ModeChoice::Processes => &[Mode::Processes],
            ModeChoice::Both => &[Mode::Threads, Mode::Processes],
        }
    }
}

/// Where one row's tasks ran ([`rustyray::WorkerMode`], named as in the
/// output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// On the embedded worker threads.
    Threads,
    /// In worker processes.
    Processes,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Threads => "threads",
            Mode::Processes => "processes",
        })
    }
}

/// The outcome of one row.
#[derive(Debug, Clone, Serialize)]
pub struct RowResult {
    /// Ray's row name.
    pub name: String,
    /// The mode the row ran in.
    pub mode: Mode,
    /// Mean rate over the trials (operations per second, times the row's
    /// multiplier, as Ray reports it); `None` when not supported.
    pub per_second: Option<f64>,
    /// Standard deviation of the trials' rates.
    pub std_dev: Option<f64>,
    /// Why the row has no figure: the missing feature, or the error the
    /// row met in its mode.
    pub not_supported: Option<String>,
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always "rustyray".
    pub system: &'static str,
    /// The crate version.
    pub version: &'static str,
    /// The modes run (`--mode`).
    pub mode: ModeChoice,
    /// CPUs the runtime used.
    pub num_cpus: usize,
    /// One entry per row and mode: every row of the first mode in Ray's
    /// order, then every row of the next.
    pub rows: Vec<RowResult>,
    /// Memory copy bandwidth, the limit of the "put gigabytes" rows
    /// (measured when one of them runs).
    pub memcpy: Option<Memcpy>,
    /// Bare round trips per second between two processes over the node's
    /// socket transport, the limit of the processes mode's sync rows
    /// (measured when the processes mode runs a sync row).
    pub process_round_trip: Option<f64>,
    /// Scale figures, with `--scale` in a run that includes the threads
    /// mode.
    pub scale: Option<Scale>,
}

/// How RustyRay scales: memory per queued task and per live object, and
/// the rate of actor creation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scale {
    /// Tasks queued behind one pending dependency.
    pub queued_tasks: u64,
    /// Resident memory they add, per task, in bytes.
    pub bytes_per_queued_task: f64,
    /// Actors created (and each called once).
    pub actors: u64,
    /// Actors created per second.
    pub actors_per_second: f64,
    /// Small objects (`put(i64)`) kept alive.
    pub live_objects: u64,
    /// Resident memory they add, per object, in bytes.
    pub bytes_per_live_object: f64,
}

/// Resident memory of this process, in bytes (Linux `/proc/self/status`).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// A gate: `wait()` gives an object that stays pending until `open()`.
#[rustyray::actor]
#[derive(Debug)]
pub struct Gate {
    open: tokio::sync::watch::Sender<bool>,
}

#[rustyray::actor]
impl Gate {
    fn new() -> Self {
        Gate {
            open: tokio::sync::watch::channel(false).0,
        }
    }

    /// Completes once the gate opens.
    pub async fn wait(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// Opens the gate.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A task that waits for its argument.
#[rustyray::remote]
pub fn after_gate(_gate: (), x: u32) -> u32 {
    x
}

/// Measures [`Scale`] on `ray`, whose mode is `mode`.
pub fn measure_scale(ray: &Ray) -> rustyray::Result<Scale> {
    scale_figures(ray, &Progress::default())
}

/// [`measure_scale`], ticking `progress` as it goes.
fn scale_figures(ray: &Ray, progress: &Progress) -> rustyray::Result<Scale> {
    const TICK: u64 = 10_000;
    const TASKS: u64 = 1_000_000;
    const ACTORS: u64 = 10_000;
    const OBJECTS: u64 = 1_000_000;

    // 1M small objects kept alive.
    let before = rss_bytes();
    let objects = (0..OBJECTS)
        .map(|i| {
            progress.tick_every(i, TICK);
            ray.put(i as i64)
        })
        .collect::<rustyray::Result<Vec<_>>>()?;
    let bytes_per_live_object = rss_bytes().saturating_sub(before) as f64 / OBJECTS as f64;
    drop(objects);

    // 1M tasks queued behind one pending object.
    let gate = Gate::options().num_cpus(0.0).remote(ray)?;
    let pending = gate.wait()?;
    let before = rss_bytes();
    let mut refs = Vec::with_capacity(TASKS as usize);
    for i in 0..TASKS {
        progress.tick_every(i, TICK);
        refs.push(after_gate::remote(ray, &pending, i as u32)?);
    }
    let bytes_per_queued_task = rss_bytes().saturating_sub(before) as f64 / TASKS as f64;
    ray.get(&gate.open()?)?;
    for r in refs.iter().step_by(1000) {
        ray.get(r)?;
        progress.tick();
    }
    ray.wait(&refs, refs.len(), None)?;
    drop(refs);

    // 10k actors, each created and called once.
    let start = Instant::now();
    let actors = (0..ACTORS)
        .map(|_| Actor::remote(ray))
        .collect::<rustyray::Result<Vec<_>>>()?;
    progress.tick();
    let pings = actors
        .iter()
        .map(|a| a.small_value())
        .collect::<rustyray::Result<Vec<_>>>()?;
    ray.get_many(&pings)?;
    let actors_per_second = ACTORS as f64 / start.elapsed().as_secs_f64();
    drop(pings);
    drop(actors);

    Ok(Scale {
        queued_tasks: TASKS,
        bytes_per_queued_task,
        actors: ACTORS,
        actors_per_second,
        live_objects: OBJECTS,
        bytes_per_live_object,
    })
}

/// Memory copy bandwidth for one 800 MiB array (100 Mi `i64`, the array of
/// Ray's "put gigabytes" rows) into a buffer allocated and faulted in
/// beforehand, in Ray's unit for those rows: 0.8 "GB" per array copied.
/// A put that copies cannot be faster than the split copy, which is the one
/// RustyRay's large puts make.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memcpy {
    /// One `memcpy` on one thread: copies of the array per second, times 0.8.
    pub gb_per_s: f64,
    /// The same copy split across the machine's cores
    /// (`rustyray_shm::plain::copy`), in the same unit.
    pub split_gb_per_s: f64,
}

/// Measures [`Memcpy`]: the mean of a few copies each way, from the same
/// kind of source the "put gigabytes" row uses (a zeroed array, as numpy's
/// `np.zeros` in Ray's suite).
pub fn measure_memcpy() -> Memcpy {
    const GB_PER_COPY: f64 = 8.0 * 0.1;
    const COPIES: u32 = 5;
    let src = vec![0_i64; 100 * 1024 * 1024];
    let mut dst = vec![1_i64; src.len()];
    let mut rate = |copy: &dyn Fn(&[i64], &mut [i64])| {
        // One untimed copy first: the first pass over fresh pages is slower.
        copy(&src, &mut dst);
        let start = Instant::now();
        for _ in 0..COPIES {
            // black_box: the optimizer must not see that both sides are known.
            copy(std::hint::black_box(&src), std::hint::black_box(&mut dst));
        }
        GB_PER_COPY / (start.elapsed().as_secs_f64() / f64::from(COPIES))
    };
    let gb_per_s = rate(&|s, d| d.copy_from_slice(s));
    let split_gb_per_s = rate(&|s, d| {
        rustyray_shm::plain::copy(s, d);
    });
    Memcpy {
        gb_per_s,
        split_gb_per_s,
    }
}

// ----- the remote code the rows run (ray_perf.py's functions) ----------

/// Ray's `small_value`: returns `b"ok"`.
#[rustyray::remote]
pub fn small_value() -> Vec<u8> {
    b"ok".to_vec()
}

/// Ray's `do_put_small`: 100 small puts from inside a task.
#[rustyray::remote]
pub fn do_put_small() -> rustyray::Result<()> {
    let ray = rustyray::current()?;
    for _ in 0..100 {
        ray.put(0_i64)?;
    }
    Ok(())
}

/// Ray's `do_put`: 10 puts of 80 MiB arrays from inside a task.
#[rustyray::remote]
pub fn do_put() -> rustyray::Result<()> {
    let ray = rustyray::current()?;
    for _ in 0..10 {
        ray.put(vec![0_i64; 10 * 1024 * 1024])?;
    }
    Ok(())
}

/// Ray's `create_object_containing_ref`: 10 000 puts, returned as a list.
#[rustyray::remote]
pub fn create_object_containing_ref() -> rustyray::Result<Vec<ObjectRef<i64>>> {
    let ray = rustyray::current()?;
    (0..10_000).map(|_| ray.put(1_i64)).collect()
}

/// Ray's `work`: `n` calls spread over `actors`, then get them all.
#[rustyray::remote]
pub fn work(actors: Vec<ActorHandle<Actor>>, n: usize) -> rustyray::Result<()> {
    let ray = rustyray::current()?;
    batch(&ray, n, |i| actors[i % actors.len()].small_value())
}

/// Ray's `async_actor_work`: like `work`, for async actors.
#[rustyray::remote]
pub fn async_actor_work(actors: Vec<ActorHandle<AsyncActor>>, n: usize) -> rustyray::Result<()> {
    let ray = rustyray::current()?;
    batch(&ray, n, |i| actors[i % actors.len()].small_value())
}

/// Ray's `Actor` (`num_cpus=0`).
#[rustyray::actor]
#[derive(Debug)]
pub struct Actor;

#[rustyray::actor(num_cpus = 0)]
impl Actor {
    fn new() -> Self {
        Actor
    }

    /// Returns `b"ok"`.
    pub fn small_value(&self) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Returns `b"ok"`, taking one argument.
    pub fn small_value_arg(&self, _x: i64) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Submits `n` `small_value` tasks and gets them.
    pub fn small_value_batch(&self, n: usize) -> rustyray::Result<()> {
        let ray = rustyray::current()?;
        batch(&ray, n, |_| small_value::remote(&ray))
    }
}

/// Ray's `AsyncActor`.
#[rustyray::actor]
#[derive(Debug)]
pub struct AsyncActor;

#[rustyray::actor]
impl AsyncActor {
    fn new() -> Self {
        AsyncActor
    }

    /// Returns `b"ok"`.
    pub async fn small_value(&self) -> Vec<u8> {
        b"ok".to_vec()
    }

    /// Returns `b"ok"`, taking one argument.
    pub async fn small_value_with_arg(&self, _x: i64) -> Vec<u8> {
        b"ok".to_vec()
    }
}

/// Ray's `Client` (`num_cpus=0`) over sync actors.
#[rustyray::actor]
#[derive(Debug)]
pub struct Client {
    servers: Vec<ActorHandle<Actor>>,
}

#[rustyray::actor(num_cpus = 0)]
impl Client {
    fn new(servers: Vec<ActorHandle<Actor>>) -> Self {
        Client { servers }
    }

    /// `n` calls to every server, then get them all.
    pub fn small_value_batch(&self, n: usize) -> rustyray::Result<()> {
        let ray = rustyray::current()?;
        batch(&ray, n * self.servers.len(), |i| {
            self.servers[i / n].small_value()
        })
    }

    /// `n` calls with a put argument to every server, then get them all.
    pub fn small_value_batch_arg(&self, n: usize) -> rustyray::Result<()> {
        let ray = rustyray::current()?;
        let x = ray.put(0_i64)?;
        batch(&ray, n * self.servers.len(), |i| {
            self.servers[i / n].small_value_arg(&x)
        })
    }
}

/// Ray's `Client` over async actors.
#[rustyray::actor]
#[derive(Debug)]
pub struct AsyncClient {
    servers: Vec<ActorHandle<AsyncActor>>,
}

#[rustyray::actor(num_cpus = 0)]
impl AsyncClient {
    fn new(servers: Vec<ActorHandle<AsyncActor>>) -> Self {
        AsyncClient { servers }
    }

    /// `n` calls to every server, then get them all.
    pub fn small_value_batch(&self, n: usize) -> rustyray::Result<()> {
        let ray = rustyray::current()?;
        batch(&ray, n * self.servers.len(), |i| {
            self.servers[i / n].small_value()
        })
    }
}

/// Submits `n` calls with `submit` and gets them all (a batch row's body).
fn batch<T: rustyray::Data>(
    ray: &Ray,
    n: usize,
    submit: impl FnMut(usize) -> rustyray::Result<ObjectRef<T>>,
) -> rustyray::Result<()> {
    let refs = (0..n).map(submit).collect::<rustyray::Result<Vec<_>>>()?;
    ray.get_many(&refs).map(drop)
}

// ----- timing ----------------------------------------------------------

/// A row's figure: the mean rate over the trials and its standard
/// deviation.
#[derive(Debug, Clone, Copy)]
struct Figure {
    mean: f64,
    std_dev: f64,
}

/// Ray's `timeit`: a warm-up, then timed trials.
#[derive(Debug, Clone, Copy)]
struct Timing {
    warmup: Duration,
    trial: Duration,
    trials: u32,
}

impl Timing {
    fn new(args: &Args) -> Self {
        Timing {
            warmup: Duration::from_secs_f64(args.warmup_secs),
            trial: Duration::from_secs_f64(args.trial_secs),
            trials: args.trials.max(1),
        }
    }

    /// Runs `f` for the warm-up (at least once), then for each trial, and
    /// returns the trials' mean rate times `multiplier`. `progress` ticks
    /// after each warm-up call and each timed batch of calls (not each
    /// call: the fastest rows would feel it).
    fn measure(
        &self,
        progress: &Progress,
        multiplier: f64,
        mut f: impl FnMut() -> rustyray::Result<()>,
    ) -> rustyray::Result<Figure> {
        let start = Instant::now();
        let mut count = 0_u64;
        while start.elapsed() < self.warmup || count == 0 {
            f()?;
            progress.tick();
            count += 1;
        }
        let step = count / 10 + 1;
        let mut stats = Vec::with_capacity(self.trials as usize);
        for _ in 0..self.trials {
            let start = Instant::now();
            let mut count = 0_u64;
            while start.elapsed() < self.trial {
                for _ in 0..step {
                    f()?;
                }
                progress.tick();
                count += step;
            }
            stats.push(multiplier * count as f64 / start.elapsed().as_secs_f64());
        }
        let mean = stats.iter().sum::<f64>() / stats.len() as f64;
        let var = stats.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / stats.len() as f64;
        Ok(Figure {
            mean,
            std_dev: var.sqrt(),
        })
    }
}

/// Counts the calls a row has finished, so that its watchdog can tell a
/// slow row from a stuck one.
#[derive(Debug, Clone, Default)]
struct Progress(Arc<AtomicU64>);

impl Progress {
    fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Ticks when `i` is a multiple of `every`.
    fn tick_every(&self, i: u64, every: u64) {
        if i.is_multiple_of(every) {
            self.tick();
        }
    }

    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs `body` on its own thread and waits for its result while it makes
/// progress. A body that goes `stall` without a tick is abandoned (its
/// thread stays blocked until the runtime shuts down) and reported as
/// stalled: a call that never completes is a failure of the row, and it
/// must not hold up the rows after it.
fn guarded<T: Send + 'static>(
    ray: &Ray,
    stall: Duration,
    body: impl FnOnce(&Ray, &Progress) -> rustyray::Result<T> + Send + 'static,
) -> Result<T, String> {
    let progress = Progress::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let (ray, p) = (ray.clone(), progress.clone());
    std::thread::Builder::new()
        .name("microbenchmark".to_owned())
        .spawn(move || {
            let _ = tx.send(body(&ray, &p));
        })
        .map_err(|e| format!("cannot start a thread for the row: {e}"))?;
    let mut seen = progress.count();
    loop {
        match rx.recv_timeout(stall) {
            Ok(result) => return result.map_err(|e| e.to_string()),
            Err(RecvTimeoutError::Disconnected) => return Err("the row panicked".to_owned()),
            Err(RecvTimeoutError::Timeout) => {
                let now = progress.count();
                if now == seen {
                    return Err(format!(
                        "stalled: no call completed for {} s",
                        stall.as_secs_f64()
                    ));
                }
                seen = now;
            }
        }
    }
}

// ----- the suite -------------------------------------------------------

/// Starts the runtime of one mode. In the processes mode it also runs
/// batches of tasks as wide as the pool, which starts every worker process
/// the rows will use, so that no row's first trial pays for it.
fn start_runtime(mode: Mode) -> rustyray::Result<Ray> {
    match mode {
        Mode::Threads => rustyray::init(),
        Mode::Processes => {
            // The default worker command, the running executable, is this
            // binary: its main starts with `worker_entry`.
            let ray = rustyray::init_with(Config::new().worker_mode(WorkerMode::Processes))?;
            let want = (ray.cluster_resources().get(rustyray::CPU).ceil() as usize).max(1);
            // Batches as wide as the pool: a task that finds no idle worker
            // starts one, and every worker serves a few tasks.
            for _ in 0..4 {
                batch(&ray, want, |_| small_value::remote(&ray))?;
            }
            eprintln!("processes mode: worker processes {:?}", ray.worker_pids());
            Ok(ray)
        }
    }
}

/// Runs the rows of one mode on its runtime and records their outcomes.
struct Suite<'a> {
    args: &'a Args,
    mode: Mode,
    /// The mode's runtime, or why it could not be started.
    ray: Result<Ray, String>,
    rows: &'a mut Vec<RowResult>,
    index: &'a mut usize,
    total: usize,
}

impl Suite<'_> {
    fn stall(&self) -> Duration {
        Duration::from_secs_f64(self.args.stall_secs)
    }

    fn selected(&self, name: &str) -> bool {
        self.args.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    fn progress(&mut self, name: &str) {
        *self.index += 1;
        eprintln!("[{}/{}] {name} ({} mode) ...", self.index, self.total, self.mode);
    }

    /// Runs one row: `body` sets it up on the runtime and times it. An
    /// error makes the row "not supported in this mode", with the error,
    /// and the runtime is replaced by a fresh one so that whatever the
    /// failed row left behind cannot slow the next rows down.
    fn row(
        &mut self,
        name: &str,
        body: impl FnOnce(&Ray, &Progress) -> rustyray::Result<Figure> + Send + 'static,
    ) {
        if !self.selected(name) {
            return;
        }
        self.progress(name);
        let outcome = match &self.ray {
            Ok(ray) => guarded(ray, self.stall(), body),
            Err(why) => Err(why.clone()),
        };
        match outcome {
            Ok(fig) => {
                if !self.args.json {
                    println!(
                        "{name} per second {:.2} +- {:.2} [{}]",
                        fig.mean, fig.std_dev, self.mode
                    );
                }
                self.rows.push(RowResult {
                    name: name.to_owned(),
                    mode: self.mode,
                    per_second: Some(fig.mean),
                    std_dev: Some(fig.std_dev),
                    not_supported: None,
                });
            }
            Err(e) => {
                let e = one_line(&e);
                if !self.args.json {
                    println!(
                        "{name} per second not supported in {} mode ({e}) [{}]",
                        self.mode, self.mode
                    );
                }
                self.rows.push(RowResult {
                    name: name.to_owned(),
                    mode: self.mode,
                    per_second: None,
                    std_dev: None,
                    not_supported: Some(e),
                });
                self.restart();
            }
        }
    }

    /// Records a row whose feature RustyRay does not have (in any mode).
    fn unsupported(&mut self, name: &str, why: &str) {
        if !self.selected(name) {
            return;
        }
        self.progress(name);
        if !self.args.json {
            println!("{name} per second not supported ({why}) [{}]", self.mode);
        }
        self.rows.push(RowResult {
            name: name.to_owned(),
            mode: self.mode,
            per_second: None,
            std_dev: None,
            not_supported: Some(why.to_owned()),
        });
    }

    /// Replaces a running runtime with a fresh one.
    fn restart(&mut self) {
        if let Ok(ray) = &self.ray {
            if let Err(e) = ray.shutdown() {
                eprintln!("warning: shutting the {} mode runtime down: {e}", self.mode);
            }
            self.ray = start_runtime(self.mode).map_err(|e| e.to_string());
        }
    }
}

/// `s` on one line (an error's text goes inside one row line).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Ray's row names, in Ray's order.
pub const ROWS: &[&str] = &[
    "single client get calls (Plasma Store)",
    "single client put calls (Plasma Store)",
    "multi client put calls (Plasma Store)",
    "single client put gigabytes",
    "single client tasks and get batch",
    "multi client put gigabytes",
    "single client get object containing 10k refs",
    "single client wait 1k refs",
    "single client tasks sync",
    "single client tasks async",
    "multi client tasks async",
    "1:1 actor calls sync",
    "1:1 actor calls async",
    "1:1 actor calls concurrent",
    "1:n actor calls async",
    "n:n actor calls async",
    "n:n actor calls with arg async",
    "1:1 async-actor calls sync",
    "1:1 async-actor calls async",
    "1:1 async-actor calls with args async",
    "1:n async-actor calls async",
    "n:n async-actor calls async",
    "placement group create/removal",
    "client: get calls",
    "client: put calls",
    "client: put gigabytes",
    "client: tasks and put batch",
    "client: 1:1 actor calls sync",
    "client: 1:1 actor calls async",
    "client: 1:1 actor calls concurrent",
    "client: tasks and get batch",
];

/// Runs the suite and prints its results.
pub fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let report = run_suite(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Runs every selected row in each selected mode (all rows of one mode,
/// then all of the next) and returns the results. A row that fails is
/// recorded as not supported in its mode, with the error, and the run goes
/// on.
pub fn run_suite(args: &Args) -> rustyray::Result<Report> {
    let modes = args.mode.modes();
    let per_mode = ROWS
        .iter()
        .filter(|n| args.filter.as_deref().is_none_or(|f| n.contains(f)))
        .count();
    let mut rows = Vec::new();
    let mut index = 0;
    let mut scale = None;
    let mut num_cpus = None;
    let measure_scale_in = |mode| args.scale && mode == Mode::Threads;
    if args.scale && !modes.iter().any(|&m| measure_scale_in(m)) {
        eprintln!("scale figures are measured in the threads mode only");
    }
    for &mode in modes {
        let any_row = per_mode > 0 || measure_scale_in(mode);
        let ray = if any_row {
            start_runtime(mode).map_err(|e| e.to_string())
        } else {
            Err("no row selected".to_owned())
        };
        if let Ok(r) = &ray {
            num_cpus.get_or_insert(r.cluster_resources().get(rustyray::CPU) as usize);
        }
        let mut suite = Suite {
            args,
            mode,
            ray,
            rows: &mut rows,
            index: &mut index,
            total: per_mode * modes.len(),
        };
        run_rows(&mut suite);
        if let (true, Ok(ray)) = (measure_scale_in(mode), &suite.ray) {
            eprintln!("scale figures ({mode} mode) ...");
            match guarded(ray, suite.stall(), scale_figures) {
                Ok(s) => {
                    if !args.json {
                        println!(
                            "scale: {} queued tasks use {:.0} bytes each; {} actors created at {:.0} per \
                             second; {} live small objects use {:.0} bytes each [{mode}]",
                            s.queued_tasks,
                            s.bytes_per_queued_task,
                            s.actors,
                            s.actors_per_second,
                            s.live_objects,
                            s.bytes_per_live_object
                        );
                    }
                    scale = Some(s);
                }
                Err(e) => {
                    if !args.json {
                        println!("scale: not supported in {mode} mode ({}) [{mode}]", one_line(&e));
                    }
                }
            }
        }
        if let Ok(ray) = &suite.ray {
            if let Err(e) = ray.shutdown() {
                eprintln!("warning: shutting the {mode} mode runtime down: {e}");
            }
        }
    }
    let selected = |name: &str| args.filter.as_deref().is_none_or(|f| name.contains(f));
    let memcpy = (selected(ROWS[3]) || selected(ROWS[5])).then(measure_memcpy);
    if let (Some(m), false) = (memcpy, args.json) {
        println!(
            "memcpy of the 800 MiB array (reference) per second {:.2} GB on one thread, {:.2} GB split across cores",
            m.gb_per_s, m.split_gb_per_s
        );
    }
    let sync_row = ROWS.iter().any(|r| r.contains("sync") && selected(r));
    let process_round_trip = if sync_row && modes.contains(&Mode::Processes) {
        match crate::roundtrip::measure(args.trial_secs) {
            Ok(rate) => Some(rate),
            Err(e) => {
                eprintln!("warning: the process round-trip reference failed: {e}");
                None
            }
        }
    } else {
        None
    };
    if let (Some(rate), false) = (process_round_trip, args.json) {
        println!("process round trip over the node's socket (reference) per second {rate:.2}");
    }
    Ok(Report {
        memcpy,
        process_round_trip,
        scale,
        system: "rustyray",
        version: env!("CARGO_PKG_VERSION"),
        mode: args.mode,
        num_cpus: num_cpus.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        rows,
    })
}

/// Ray's rows, in Ray's order, on the suite's runtime.
fn run_rows(t: &mut Suite<'_>) {
    let timing = Timing::new(t.args);
    // ray_perf.py: multiprocessing.cpu_count() // 2 actors in the 1:n and
    // n:n rows (at least one).
    let n_cpu = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1);

    t.row(ROWS[0], move |ray, p| {
        let value = ray.put(0_i64)?;
        timing.measure(p, 1.0, || ray.get(&value).map(drop))
    });
    t.row(ROWS[1], move |ray, p| {
        timing.measure(p, 1.0, || ray.put(0_i64).map(drop))
    });
    t.row(ROWS[2], move |ray, p| {
        timing.measure(p, 1000.0, || batch(ray, 10, |_| do_put_small::remote(ray)))
    });
    t.row(ROWS[3], move |ray, p| {
        // Ray puts one 800 MB numpy array (100 Mi int64) and keeps it, so
        // every put copies it: `put_copy` does the same.
        let arr = vec![0_i64; 100 * 1024 * 1024];
        timing.measure(p, 8.0 * 0.1, || ray.put_copy(&arr).map(drop))
    });
    t.row(ROWS[4], move |ray, p| {
        timing.measure(p, 1.0, || batch(ray, 1000, |_| small_value::remote(ray)))
    });
    t.row(ROWS[5], move |ray, p| {
        timing.measure(p, 10.0 * 8.0 * 0.1, || batch(ray, 10, |_| do_put::remote(ray)))
    });
    t.row(ROWS[6], move |ray, p| {
        let containing = create_object_containing_ref::remote(ray)?;
        timing.measure(p, 1.0, || ray.get(&containing).map(drop))
    });
    t.row(ROWS[7], move |ray, p| {
        timing.measure(p, 1.0, || {
            let mut not_ready = (0..1000)
                .map(|_| small_value::remote(ray))
                .collect::<rustyray::Result<Vec<_>>>()?;
            while !not_ready.is_empty() {
                let (_ready, rest) = ray.wait(&not_ready, 1, None)?;
                not_ready = rest;
            }
            Ok(())
        })
    });
    t.row(ROWS[8], move |ray, p| {
        timing.measure(p, 1.0, || ray.get(&small_value::remote(ray)?).map(drop))
    });
    t.row(ROWS[9], move |ray, p| {
        timing.measure(p, 1000.0, || batch(ray, 1000, |_| small_value::remote(ray)))
    });
    t.row(ROWS[10], move |ray, p| {
        let (n, m) = (10_000, 4);
        let actors = (0..m)
            .map(|_| Actor::remote(ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        timing.measure(p, (n * m) as f64, || {
            let refs = actors
                .iter()
                .map(|a| a.small_value_batch(n))
                .collect::<rustyray::Result<Vec<_>>>()?;
            ray.get_many(&refs).map(drop)
        })
    });
    t.row(ROWS[11], move |ray, p| {
        let a = Actor::remote(ray)?;
        timing.measure(p, 1.0, || ray.get(&a.small_value()?).map(drop))
    });
    t.row(ROWS[12], move |ray, p| {
        let a = Actor::remote(ray)?;
        timing.measure(p, 1000.0, || batch(ray, 1000, |_| a.small_value()))
    });
    t.row(ROWS[13], move |ray, p| {
        let a = Actor::options().max_concurrency(16).remote(ray)?;
        timing.measure(p, 1000.0, || batch(ray, 1000, |_| a.small_value()))
    });
    t.row(ROWS[14], move |ray, p| {
        let n = 5000;
        let actors = (0..n_cpu)
            .map(|_| Actor::remote(ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        // The driver keeps its handles, as ray_perf.py's `actors` list.
        let client = Client::remote(ray, actors.clone())?;
        let fig = timing.measure(p, (n * n_cpu) as f64, || ray.get(&client.small_value_batch(n)?));
        drop(actors);
        fig
    });
    t.row(ROWS[15], move |ray, p| {
        let (n, m) = (5000, 4);
        let actors = (0..n_cpu)
            .map(|_| Actor::remote(ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        timing.measure(p, (m * n) as f64, || {
            batch(ray, m, |_| work::remote(ray, actors.clone(), n))
        })
    });
    t.row(ROWS[16], move |ray, p| {
        let n = 1000;
        let clients = (0..n_cpu)
            .map(|_| Client::remote(ray, vec![Actor::remote(ray)?]))
            .collect::<rustyray::Result<Vec<_>>>()?;
        timing.measure(p, (n * clients.len()) as f64, || {
            let refs = clients
                .iter()
                .map(|c| c.small_value_batch_arg(n))
                .collect::<rustyray::Result<Vec<_>>>()?;
            ray.get_many(&refs).map(drop)
        })
    });
    t.row(ROWS[17], move |ray, p| {
        let a = AsyncActor::remote(ray)?;
        timing.measure(p, 1.0, || ray.get(&a.small_value()?).map(drop))
    });
    t.row(ROWS[18], move |ray, p| {
        let a = AsyncActor::remote(ray)?;
        timing.measure(p, 1000.0, || batch(ray, 1000, |_| a.small_value()))
    });
    t.row(ROWS[19], move |ray, p| {
        let a = AsyncActor::remote(ray)?;
        timing.measure(p, 1000.0, || {
            batch(ray, 1000, |i| a.small_value_with_arg(i as i64))
        })
    });
    t.row(ROWS[20], move |ray, p| {
        let n = 5000;
        let actors = (0..n_cpu)
            .map(|_| AsyncActor::remote(ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        // The driver keeps its handles, as ray_perf.py's `actors` list.
        let client = AsyncClient::remote(ray, actors.clone())?;
        let fig = timing.measure(p, (n * n_cpu) as f64, || ray.get(&client.small_value_batch(n)?));
        drop(actors);
        fig
    });
    t.row(ROWS[21], move |ray, p| {
        let (n, m) = (5000, 4);
        let actors = (0..n_cpu)
            .map(|_| AsyncActor::remote(ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        timing.measure(p, (m * n) as f64, || {
            batch(ray, m, |_| async_actor_work::remote(ray, actors.clone(), n))
        })
    });
    t.unsupported(ROWS[22], "placement groups are not implemented yet");
    for name in &ROWS[23..] {
        t.unsupported(name, "Ray Client (a remote driver) is not implemented yet");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_row_is_reported_and_released_by_shutdown() -> rustyray::Result<()> {
        let ray = rustyray::init_with(Config::new().num_cpus(1.0))?;
        let gate = Gate::options().num_cpus(0.0).remote(&ray)?;
        let never = gate.wait()?;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let stuck = guarded(&ray, Duration::from_millis(50), move |ray, _| {
            let got = ray.get(&never);
            let _ = done_tx.send(got.is_err());
            got
        });
        assert!(stuck.is_err_and(|e| e.starts_with("stalled")));
        // Shutting the runtime down ends the abandoned call.
        ray.shutdown()?;
        assert_eq!(done_rx.recv().ok(), Some(true));
        Ok(())
    }

    #[test]
    fn a_failing_row_reports_its_error() -> rustyray::Result<()> {
        let ray = rustyray::init_with(Config::new().num_cpus(1.0))?;
        let timing = Timing {
            warmup: Duration::ZERO,
            trial: Duration::from_millis(1),
            trials: 1,
        };
        let failed = guarded(&ray, Duration::from_secs(60), move |ray, p| {
            let a = Actor::remote(ray)?;
            ray.kill(&a)?;
            timing.measure(p, 1.0, || ray.get(&a.small_value()?).map(drop))
        });
        assert!(failed.is_err(), "{failed:?}");
        Ok(())
    }
}
