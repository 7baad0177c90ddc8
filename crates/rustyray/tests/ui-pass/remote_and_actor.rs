//! The valid forms compile: a sync and an async remote function with
//! options, and an actor with a fallible constructor and sync and async
//! methods.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Point {
    x: i64,
    y: i64,
}

#[rustyray::remote(num_cpus = 1, max_retries = 2, resource = ("disk", 0.5))]
fn norm1(p: Point) -> i64 {
    p.x.abs() + p.y.abs()
}

#[rustyray::remote]
async fn parse(s: String) -> Result<i64, std::num::ParseIntError> {
    s.parse()
}

#[rustyray::remote]
fn nothing() {}

#[rustyray::actor]
struct Counter {
    n: i64,
}

#[rustyray::actor(max_restarts = 1, max_concurrency = 4)]
impl Counter {
    fn new(start: i64) -> Result<Self, String> {
        if start < 0 {
            return Err(format!("negative start {start}"));
        }
        Ok(Counter { n: start })
    }

    fn incr(&mut self, by: i64) -> i64 {
        self.n += by;
        self.n
    }

    async fn get(&self) -> i64 {
        self.n
    }
}

fn main() {
    let _ = norm1::NAME;
    let _ = parse::entry();
    let _ = nothing::options();
    let _ = Counter::options();
}
