#[rustyray::actor(max_restarts = 1)]
struct Counter {
    n: i64,
}

fn main() {}
