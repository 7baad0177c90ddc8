#[rustyray::actor]
struct Counter {
    n: i64,
}

#[rustyray::actor]
impl Counter {
    fn new(n: i64) -> i64 {
        n
    }

    fn get(&self) -> i64 {
        self.n
    }
}

fn main() {}
