//! MapReduce word count: map tasks and reducer actors.
//!
//! The driver generates a corpus (deterministically, from a fixed
//! vocabulary and a seeded generator), cuts it into chunks and `put`s each
//! chunk in the object store. One map task per chunk counts the chunk's
//! words and splits its counts into one partition per reducer, by a stable
//! hash of the word. Each reducer is an actor owning one partition: it is
//! handed the `ObjectRef` of every map output, takes its own partition out
//! of it and adds it to its running totals. Everything is submitted up
//! front; reducer calls start as soon as the map output they depend on
//! exists.
//!
//! At the end the driver collects the reducers' totals and checks them
//! against a plain sequential count of the same corpus, and that every word
//! was counted by exactly one reducer. It exits with an error on any
//! difference.
//!
//! Run it with `cargo run -p rustyray --example word_count`.

use std::collections::HashMap;
use std::time::Instant;

/// Lines in the generated corpus.
const LINES: usize = 4_000;
/// Lines per map task.
const LINES_PER_CHUNK: usize = 250;
/// Reducer actors, one per partition.
const REDUCERS: usize = 4;
/// Seed of the corpus generator.
const SEED: u64 = 2024;

/// The words the corpus is made of.
const VOCABULARY: &[&str] = &[
    "actor",
    "object",
    "task",
    "worker",
    "driver",
    "node",
    "cluster",
    "future",
    "reference",
    "store",
    "schedule",
    "resource",
    "cpu",
    "gpu",
    "memory",
    "owner",
    "lineage",
    "retry",
    "cancel",
    "wait",
    "get",
    "put",
    "remote",
    "handle",
    "method",
    "state",
    "message",
    "queue",
    "thread",
    "process",
    "daemon",
    "control",
    "service",
    "placement",
    "group",
    "spill",
    "restore",
    "serialize",
    "bytes",
    "value",
    "error",
    "panic",
    "result",
    "option",
    "rust",
    "ray",
    "core",
    "map",
    "reduce",
    "count",
];

/// Counts per word.
pub type Counts = HashMap<String, u64>;

/// SplitMix64, a tiny seeded generator, so the corpus is the same on every
/// run without any dependency.
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

    /// A number in `0..n` (with a negligible bias for small `n`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Generates `lines` lines of 3 to 14 words. Words early in the vocabulary
/// are picked more often (the minimum of two draws), so counts differ
/// widely, as in real text.
fn generate_corpus(lines: usize, seed: u64) -> Vec<String> {
    let mut rng = SplitMix64::new(seed);
    (0..lines)
        .map(|_| {
            let len = 3 + rng.below(12);
            (0..len)
                .map(|_| VOCABULARY[rng.below(VOCABULARY.len()).min(rng.below(VOCABULARY.len()))])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The reducer responsible for `word`: FNV-1a of its bytes, modulo the
/// number of reducers. Stable across runs and processes, unlike the
/// standard library's randomly seeded hasher.
fn partition_of(word: &str, reducers: usize) -> usize {
    let hash = word.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % reducers as u64) as usize
}

/// Map: counts the words of `lines` and returns the counts split into
/// `reducers` partitions (element `r` holds the words of reducer `r`).
#[rustyray::remote]
pub fn map_chunk(lines: Vec<String>, reducers: usize) -> Vec<Counts> {
    let mut partitions = vec![Counts::new(); reducers];
    for word in lines.iter().flat_map(|line| line.split_whitespace()) {
        *partitions[partition_of(word, reducers)]
            .entry(word.to_owned())
            .or_default() += 1;
    }
    partitions
}

/// Reduce: an actor holding the running totals of one partition.
#[rustyray::actor]
#[derive(Debug)]
pub struct Reducer {
    partition: usize,
    totals: Counts,
    absorbed: usize,
}

#[rustyray::actor]
impl Reducer {
    /// A reducer for partition `partition`, with no counts yet.
    pub fn new(partition: usize) -> Self {
        Reducer {
            partition,
            totals: Counts::new(),
            absorbed: 0,
        }
    }

    /// Adds this reducer's partition of one map output to the totals;
    /// returns how many words it added.
    pub fn absorb(&mut self, map_output: Vec<Counts>) -> u64 {
        let mine = map_output.into_iter().nth(self.partition).unwrap_or_default();
        self.absorbed += 1;
        let mut added = 0;
        for (word, n) in mine {
            *self.totals.entry(word).or_default() += n;
            added += n;
        }
        added
    }

    /// The totals so far, with how many map outputs they come from.
    pub fn totals(&self) -> (usize, Counts) {
        (self.absorbed, self.totals.clone())
    }
}

fn main() -> anyhow::Result<()> {
    let corpus = generate_corpus(LINES, SEED);
    let ray = rustyray::init()?;
    let start = Instant::now();

    // One reducer actor per partition.
    let reducers = (0..REDUCERS)
        .map(|r| Reducer::remote(&ray, r))
        .collect::<rustyray::Result<Vec<_>>>()?;

    // Map: one task per chunk, fed from the object store.
    let mut map_outputs = Vec::new();
    for chunk in corpus.chunks(LINES_PER_CHUNK) {
        let chunk_ref = ray.put(chunk.to_vec())?;
        map_outputs.push(map_chunk::remote(&ray, &chunk_ref, REDUCERS)?);
    }

    // Shuffle + reduce: every reducer gets a reference to every map output.
    let mut added = Vec::new();
    for output in &map_outputs {
        for reducer in &reducers {
            added.push(reducer.absorb(output)?);
        }
    }
    let words_absorbed: u64 = ray.get_many(&added)?.into_iter().sum();

    // Collect. A reducer runs its calls in order, so `totals` sees every
    // `absorb` submitted before it.
    let totals = reducers
        .iter()
        .map(|r| r.totals())
        .collect::<rustyray::Result<Vec<_>>>()?;
    let totals = ray.get_many(&totals)?;
    let elapsed = start.elapsed();

    let mut merged = Counts::new();
    for (r, (absorbed, counts)) in totals.into_iter().enumerate() {
        anyhow::ensure!(
            absorbed == map_outputs.len(),
            "reducer {r} absorbed {absorbed} of {} map outputs",
            map_outputs.len()
        );
        println!(
            "reducer {r}: {} distinct words, {} occurrences",
            counts.len(),
            counts.values().sum::<u64>()
        );
        for (word, n) in counts {
            anyhow::ensure!(
                partition_of(&word, REDUCERS) == r,
                "{word:?} was counted by reducer {r}"
            );
            anyhow::ensure!(
                merged.insert(word.clone(), n).is_none(),
                "{word:?} was counted twice"
            );
        }
    }

    // The same count, sequentially, in the driver.
    let mut expected = Counts::new();
    for word in corpus.iter().flat_map(|line| line.split_whitespace()) {
        *expected.entry(word.to_owned()).or_default() += 1;
    }
    let total_words: u64 = expected.values().sum();

    let mut top: Vec<_> = merged.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let top: Vec<String> = top.iter().take(8).map(|(w, n)| format!("{w}={n}")).collect();
    println!(
        "{LINES} lines, {total_words} words, {} distinct; {} map tasks, {REDUCERS} reducers, {elapsed:.2?}",
        merged.len(),
        map_outputs.len()
    );
    println!("most frequent: {}", top.join(" "));

    anyhow::ensure!(
        words_absorbed == total_words,
        "reducers absorbed {words_absorbed} of {total_words} words"
    );
    anyhow::ensure!(
        merged == expected,
        "the MapReduce counts differ from the sequential count"
    );
    println!("ok: MapReduce counts match the sequential count");
    Ok(())
}
