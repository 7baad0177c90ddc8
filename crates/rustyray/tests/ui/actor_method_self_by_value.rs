#[rustyray::actor]
struct Counter {
    n: i64,
}

#[rustyray::actor]
impl Counter {
    fn new() -> Self {
        Counter { n: 0 }
    }

    fn into_count(self) -> i64 {
        self.n
    }
}

fn main() {}
