//! Criterion benches of the runtime's hot paths: submit + get of a trivial
//! task, an actor call, small and large put/get, and reference-count churn.
//! Run with `cargo bench -p rustyray`; CI only compiles them.

// criterion's macros generate an undocumented `benches` function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rustyray::prelude::*;

/// A trivial task.
#[rustyray::remote]
fn noop(x: u64) -> u64 {
    x
}

/// A trivial actor.
#[rustyray::actor]
#[derive(Debug)]
struct Echo;

#[rustyray::actor]
impl Echo {
    fn new() -> Self {
        Echo
    }

    fn echo(&self, x: u64) -> u64 {
        x
    }
}

fn runtime() -> Ray {
    rustyray::init().expect("runtime")
}

fn tasks(c: &mut Criterion) {
    let ray = runtime();
    c.bench_function("task submit + get", |b| {
        b.iter(|| ray.get(&noop::remote(&ray, 1).expect("submit")).expect("get"))
    });
    let mut g = c.benchmark_group("task batch of 1000");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("submit 1000, get all", |b| {
        b.iter(|| {
            let refs: Vec<_> = (0..1000)
                .map(|i| noop::remote(&ray, i).expect("submit"))
                .collect();
            ray.get_many(&refs).expect("get")
        })
    });
    g.finish();
}

fn actors(c: &mut Criterion) {
    let ray = runtime();
    let a = Echo::remote(&ray).expect("actor");
    c.bench_function("actor call + get", |b| {
        b.iter(|| ray.get(&a.echo(1).expect("call")).expect("get"))
    });
}

fn objects(c: &mut Criterion) {
    let ray = runtime();
    c.bench_function("small put", |b| b.iter(|| ray.put(7_u64).expect("put")));
    let small = ray.put(7_u64).expect("put");
    c.bench_function("small get", |b| b.iter(|| ray.get(&small).expect("get")));
    let big = vec![1_u64; 8 << 20];
    let mut g = c.benchmark_group("large (64 MiB)");
    g.throughput(Throughput::Bytes(64 << 20));
    g.sample_size(20);
    g.bench_function("put_copy", |b| b.iter(|| ray.put_copy(&big).expect("put")));
    let stored = ray.put_copy(&big).expect("put");
    g.bench_function("get", |b| b.iter(|| ray.get(&stored).expect("get")));
    g.finish();
}

fn ref_counts(c: &mut Criterion) {
    let ray = runtime();
    let r = ray.put(1_u8).expect("put");
    c.bench_function("ObjectRef clone + drop", |b| b.iter(|| drop(r.clone())));
    c.bench_function("put + drop (count to zero)", |b| {
        b.iter_batched(
            || 5_u64,
            |v| drop(ray.put(v).expect("put")),
            BatchSize::SmallInput,
        )
    });
    let nested: Vec<_> = (0..1000).map(|i| ray.put(i as u64).expect("put")).collect();
    let holder = ray.put(nested).expect("put");
    c.bench_function("get object holding 1000 refs", |b| {
        b.iter(|| ray.get(&holder).expect("get"))
    });
}

criterion_group!(benches, tasks, actors, objects, ref_counts);
criterion_main!(benches);
