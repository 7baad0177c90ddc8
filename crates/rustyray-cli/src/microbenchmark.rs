//! `rustyray microbenchmark` — Ray's `ray microbenchmark`
//! (`python/ray/_private/ray_perf.py`), row for row: the same row names,
//! the same shapes (batch sizes, actor counts, object sizes) and the same
//! timing method (a warm-up second, then four trials of at least two
//! seconds each; the figure is the mean ± standard deviation of the trials'
//! rates). Rows whose feature RustyRay does not have yet are reported as
//! not supported, never with a number.

use rustyray::prelude::*;
use serde::Serialize;
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
    /// small object with 1M objects).
    #[arg(long)]
    pub scale: bool,
    /// Where tasks and actors run: `threads` (the embedded worker threads).
    /// Worker processes come with the worker-process mode.
    #[arg(long, default_value = "threads")]
    pub mode: String,
}

/// The outcome of one row.
#[derive(Debug, Clone, Serialize)]
pub struct RowResult {
    /// Ray's row name.
    pub name: String,
    /// Mean rate over the trials (operations per second, times the row's
    /// multiplier, as Ray reports it); `None` when not supported.
    pub per_second: Option<f64>,
    /// Standard deviation of the trials' rates.
    pub std_dev: Option<f64>,
    /// Why the row has no figure.
    pub not_supported: Option<String>,
}

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always "rustyray".
    pub system: &'static str,
    /// The crate version.
    pub version: &'static str,
    /// Execution mode.
    pub mode: String,
    /// CPUs the runtime used.
    pub num_cpus: usize,
    /// One entry per row, in Ray's order.
    pub rows: Vec<RowResult>,
    /// Plain memcpy bandwidth, the limit of the "put gigabytes" rows
    /// (measured when one of them runs).
    pub memcpy: Option<Memcpy>,
    /// Scale figures, with `--scale`.
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

/// Measures [`Scale`].
pub fn measure_scale(ray: &Ray) -> rustyray::Result<Scale> {
    const TASKS: u64 = 1_000_000;
    const ACTORS: u64 = 10_000;
    const OBJECTS: u64 = 1_000_000;

    // 1M small objects kept alive.
    let before = rss_bytes();
    let objects = (0..OBJECTS)
        .map(|i| ray.put(i as i64))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let bytes_per_live_object = rss_bytes().saturating_sub(before) as f64 / OBJECTS as f64;
    drop(objects);

    // 1M tasks queued behind one pending object.
    let gate = Gate::options().num_cpus(0.0).remote(ray)?;
    let pending = gate.wait()?;
    let before = rss_bytes();
    let mut refs = Vec::with_capacity(TASKS as usize);
    for i in 0..TASKS {
        refs.push(after_gate::remote(ray, &pending, i as u32)?);
    }
    let bytes_per_queued_task = rss_bytes().saturating_sub(before) as f64 / TASKS as f64;
    ray.get(&gate.open()?)?;
    for r in refs.iter().step_by(1000) {
        ray.get(r)?;
    }
    ray.wait(&refs, refs.len(), None)?;
    drop(refs);

    // 10k actors, each created and called once.
    let start = Instant::now();
    let actors = (0..ACTORS)
        .map(|_| Actor::remote(ray))
        .collect::<rustyray::Result<Vec<_>>>()?;
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

/// Plain memcpy bandwidth of one 800 MiB array (100 Mi `i64`, the array of
/// Ray's "put gigabytes" rows) into a buffer allocated and faulted in
/// beforehand, in Ray's unit for those rows: 0.8 "GB" per array copied.
/// This is the physical limit of a put that copies.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memcpy {
    /// Copies of the array per second, times 0.8.
    pub gb_per_s: f64,
}

/// Measures [`Memcpy`]: the mean of a few copies, from the same kind of
/// source the "put gigabytes" row uses (a zeroed array, as numpy's
/// `np.zeros` in Ray's suite).
pub fn measure_memcpy() -> Memcpy {
    const GB_PER_COPY: f64 = 8.0 * 0.1;
    const COPIES: u32 = 5;
    let src = vec![0_i64; 100 * 1024 * 1024];
    let mut dst = vec![1_i64; src.len()];
    // One untimed copy first: the first pass over fresh pages is slower.
    std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
    let start = Instant::now();
    for _ in 0..COPIES {
        // black_box: the optimizer must not see that both sides are known.
        std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
    }
    let secs = start.elapsed().as_secs_f64() / f64::from(COPIES);
    Memcpy {
        gb_per_s: GB_PER_COPY / secs,
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

/// Times `f` the way Ray's `timeit` does.
struct Timer<'a> {
    args: &'a Args,
    rows: Vec<RowResult>,
    index: usize,
    total: usize,
}

impl Timer<'_> {
    fn selected(&self, name: &str) -> bool {
        self.args.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    fn progress(&mut self, name: &str) {
        self.index += 1;
        eprintln!("[{}/{}] {name} ...", self.index, self.total);
    }

    fn timeit(
        &mut self,
        name: &str,
        multiplier: f64,
        mut f: impl FnMut() -> rustyray::Result<()>,
    ) -> rustyray::Result<()> {
        if !self.selected(name) {
            return Ok(());
        }
        self.progress(name);
        let warmup = Duration::from_secs_f64(self.args.warmup_secs);
        let start = Instant::now();
        let mut count = 0_u64;
        while start.elapsed() < warmup || count == 0 {
            f()?;
            count += 1;
        }
        let step = count / 10 + 1;
        let trial = Duration::from_secs_f64(self.args.trial_secs);
        let mut stats = Vec::with_capacity(self.args.trials as usize);
        for _ in 0..self.args.trials.max(1) {
            let start = Instant::now();
            let mut count = 0_u64;
            while start.elapsed() < trial {
                for _ in 0..step {
                    f()?;
                }
                count += step;
            }
            stats.push(multiplier * count as f64 / start.elapsed().as_secs_f64());
        }
        let mean = stats.iter().sum::<f64>() / stats.len() as f64;
        let var = stats.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / stats.len() as f64;
        let sd = var.sqrt();
        if !self.args.json {
            println!("{name} per second {:.2} +- {:.2}", mean, sd);
        }
        self.rows.push(RowResult {
            name: name.to_owned(),
            per_second: Some(mean),
            std_dev: Some(sd),
            not_supported: None,
        });
        Ok(())
    }

    fn unsupported(&mut self, name: &str, why: &str) {
        if !self.selected(name) {
            return;
        }
        self.progress(name);
        if !self.args.json {
            println!("{name} per second not supported ({why})");
        }
        self.rows.push(RowResult {
            name: name.to_owned(),
            per_second: None,
            std_dev: None,
            not_supported: Some(why.to_owned()),
        });
    }
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
    if args.mode != "threads" {
        return Err(format!(
            "mode {:?} is not available yet: worker processes come with the worker-process mode",
            args.mode
        )
        .into());
    }
    let report = run_suite(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Runs every selected row and returns the results.
pub fn run_suite(args: &Args) -> rustyray::Result<Report> {
    let total = ROWS
        .iter()
        .filter(|n| args.filter.as_deref().is_none_or(|f| n.contains(f)))
        .count();
    let mut t = Timer {
        args,
        rows: Vec::new(),
        index: 0,
        total,
    };
    let ray = rustyray::init()?;
    let num_cpus = ray.cluster_resources().get(rustyray::CPU) as usize;
    // ray_perf.py: multiprocessing.cpu_count() // 2 actors in the 1:n and
    // n:n rows (at least one).
    let n_cpu = (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1);

    let value = ray.put(0_i64)?;
    t.timeit(ROWS[0], 1.0, || ray.get(&value).map(drop))?;
    t.timeit(ROWS[1], 1.0, || ray.put(0_i64).map(drop))?;
    t.timeit(ROWS[2], 1000.0, || {
        batch(&ray, 10, |_| do_put_small::remote(&ray))
    })?;
    if t.selected(ROWS[3]) {
        // Ray puts one 800 MB numpy array (100 Mi int64) and keeps it, so
        // every put copies it: `put_copy` does the same.
        let arr = vec![0_i64; 100 * 1024 * 1024];
        t.timeit(ROWS[3], 8.0 * 0.1, || ray.put_copy(&arr).map(drop))?;
    }
    t.timeit(ROWS[4], 1.0, || batch(&ray, 1000, |_| small_value::remote(&ray)))?;
    t.timeit(ROWS[5], 10.0 * 8.0 * 0.1, || {
        batch(&ray, 10, |_| do_put::remote(&ray))
    })?;
    if t.selected(ROWS[6]) {
        let containing = create_object_containing_ref::remote(&ray)?;
        t.timeit(ROWS[6], 1.0, || ray.get(&containing).map(drop))?;
    }
    t.timeit(ROWS[7], 1.0, || {
        let mut not_ready = (0..1000)
            .map(|_| small_value::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        while !not_ready.is_empty() {
            let (_ready, rest) = ray.wait(&not_ready, 1, None)?;
            not_ready = rest;
        }
        Ok(())
    })?;
    t.timeit(ROWS[8], 1.0, || ray.get(&small_value::remote(&ray)?).map(drop))?;
    t.timeit(ROWS[9], 1000.0, || {
        batch(&ray, 1000, |_| small_value::remote(&ray))
    })?;
    if t.selected(ROWS[10]) {
        let (n, m) = (10_000, 4);
        let actors = (0..m)
            .map(|_| Actor::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        t.timeit(ROWS[10], (n * m) as f64, || {
            let refs = actors
                .iter()
                .map(|a| a.small_value_batch(n))
                .collect::<rustyray::Result<Vec<_>>>()?;
            ray.get_many(&refs).map(drop)
        })?;
    }
    if t.selected(ROWS[11]) {
        let a = Actor::remote(&ray)?;
        t.timeit(ROWS[11], 1.0, || ray.get(&a.small_value()?).map(drop))?;
    }
    if t.selected(ROWS[12]) {
        let a = Actor::remote(&ray)?;
        t.timeit(ROWS[12], 1000.0, || batch(&ray, 1000, |_| a.small_value()))?;
    }
    if t.selected(ROWS[13]) {
        let a = Actor::options().max_concurrency(16).remote(&ray)?;
        t.timeit(ROWS[13], 1000.0, || batch(&ray, 1000, |_| a.small_value()))?;
    }
    if t.selected(ROWS[14]) {
        let n = 5000;
        let actors = (0..n_cpu)
            .map(|_| Actor::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        let client = Client::remote(&ray, actors)?;
        t.timeit(ROWS[14], (n * n_cpu) as f64, || {
            ray.get(&client.small_value_batch(n)?)
        })?;
    }
    if t.selected(ROWS[15]) {
        let (n, m) = (5000, 4);
        let actors = (0..n_cpu)
            .map(|_| Actor::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        t.timeit(ROWS[15], (m * n) as f64, || {
            batch(&ray, m, |_| work::remote(&ray, actors.clone(), n))
        })?;
    }
    if t.selected(ROWS[16]) {
        let n = 1000;
        let clients = (0..n_cpu)
            .map(|_| Client::remote(&ray, vec![Actor::remote(&ray)?]))
            .collect::<rustyray::Result<Vec<_>>>()?;
        t.timeit(ROWS[16], (n * clients.len()) as f64, || {
            let refs = clients
                .iter()
                .map(|c| c.small_value_batch_arg(n))
                .collect::<rustyray::Result<Vec<_>>>()?;
            ray.get_many(&refs).map(drop)
        })?;
    }
    if t.selected(ROWS[17]) {
        let a = AsyncActor::remote(&ray)?;
        t.timeit(ROWS[17], 1.0, || ray.get(&a.small_value()?).map(drop))?;
    }
    if t.selected(ROWS[18]) {
        let a = AsyncActor::remote(&ray)?;
        t.timeit(ROWS[18], 1000.0, || batch(&ray, 1000, |_| a.small_value()))?;
    }
    if t.selected(ROWS[19]) {
        let a = AsyncActor::remote(&ray)?;
        t.timeit(ROWS[19], 1000.0, || {
            batch(&ray, 1000, |i| a.small_value_with_arg(i as i64))
        })?;
    }
    if t.selected(ROWS[20]) {
        let n = 5000;
        let actors = (0..n_cpu)
            .map(|_| AsyncActor::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        let client = AsyncClient::remote(&ray, actors)?;
        t.timeit(ROWS[20], (n * n_cpu) as f64, || {
            ray.get(&client.small_value_batch(n)?)
        })?;
    }
    if t.selected(ROWS[21]) {
        let (n, m) = (5000, 4);
        let actors = (0..n_cpu)
            .map(|_| AsyncActor::remote(&ray))
            .collect::<rustyray::Result<Vec<_>>>()?;
        t.timeit(ROWS[21], (m * n) as f64, || {
            batch(&ray, m, |_| async_actor_work::remote(&ray, actors.clone(), n))
        })?;
    }
    t.unsupported(ROWS[22], "placement groups are not implemented yet");
    for name in &ROWS[23..] {
        t.unsupported(name, "Ray Client (a remote driver) is not implemented yet");
    }
    let scale = if args.scale {
        eprintln!("scale figures ...");
        let s = measure_scale(&ray)?;
        if !args.json {
            println!(
                "scale: {} queued tasks use {:.0} bytes each; {} actors created at {:.0} per second; \
                 {} live small objects use {:.0} bytes each",
                s.queued_tasks,
                s.bytes_per_queued_task,
                s.actors,
                s.actors_per_second,
                s.live_objects,
                s.bytes_per_live_object
            );
        }
        Some(s)
    } else {
        None
    };
    ray.shutdown()?;
    let memcpy = (t.selected(ROWS[3]) || t.selected(ROWS[5])).then(measure_memcpy);
    if let (Some(m), false) = (memcpy, args.json) {
        println!(
            "memcpy of the 800 MiB array (reference) per second {:.2} GB",
            m.gb_per_s
        );
    }
    Ok(Report {
        memcpy,
        scale,
        system: "rustyray",
        version: env!("CARGO_PKG_VERSION"),
        mode: args.mode.clone(),
        num_cpus,
        rows: t.rows,
    })
}
