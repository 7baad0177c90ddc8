//! Estimates pi by Monte Carlo sampling, spread over many tasks.
//!
//! Each task throws `SAMPLES_PER_TASK` random points into the unit square
//! and counts those inside the quarter circle; the fraction inside tends to
//! pi / 4. Every task has its own pseudo-random generator, seeded from the
//! task's index, so the run is reproducible and the tasks share nothing.
//! The generator (SplitMix64) is written out below to keep the example free
//! of dependencies.
//!
//! The example checks that the estimate is within 0.01 of pi and exits with
//! an error otherwise.
//!
//! Run it with `cargo run -p rustyray --example monte_carlo_pi`
//! (add `--release` for a faster run).

use std::time::Instant;

/// Number of sampling tasks.
const TASKS: u64 = 100;
/// Points thrown by each task.
const SAMPLES_PER_TASK: u64 = 200_000;
/// Seed of the whole run; task `i` derives its own from it.
const SEED: u64 = 0x5eed_0fc0_ffee;

/// SplitMix64: a tiny, fast, statistically sound 64-bit generator
/// (Steele, Lea and Flood, 2014). Good enough for sampling; not for
/// cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`, from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Throws `samples` points with a generator seeded by `seed`; returns how
/// many fell inside the quarter circle of radius 1.
#[rustyray::remote]
pub fn count_inside(seed: u64, samples: u64) -> u64 {
    let mut rng = SplitMix64::new(seed);
    let mut inside = 0;
    for _ in 0..samples {
        let (x, y) = (rng.next_f64(), rng.next_f64());
        if x * x + y * y < 1.0 {
            inside += 1;
        }
    }
    inside
}

/// The seed of task `index`: the run's seed scrambled with the index, so
/// neighbouring tasks get unrelated streams.
fn task_seed(index: u64) -> u64 {
    SplitMix64::new(SEED ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03)).next_u64()
}

fn main() -> anyhow::Result<()> {
    let ray = rustyray::init()?;
    let start = Instant::now();

    let refs = (0..TASKS)
        .map(|i| count_inside::remote(&ray, task_seed(i), SAMPLES_PER_TASK))
        .collect::<rustyray::Result<Vec<_>>>()?;
    let inside: u64 = ray.get_many(&refs)?.into_iter().sum();

    let total = TASKS * SAMPLES_PER_TASK;
    let estimate = 4.0 * inside as f64 / total as f64;
    let error = (estimate - std::f64::consts::PI).abs();
    println!(
        "{TASKS} tasks x {SAMPLES_PER_TASK} samples: {inside} of {total} points inside the circle, \
         pi ~ {estimate:.6} (error {error:.6}) in {:.2?}",
        start.elapsed()
    );
    anyhow::ensure!(error < 0.01, "estimate {estimate} is more than 0.01 away from pi");
    println!("ok");
    Ok(())
}
