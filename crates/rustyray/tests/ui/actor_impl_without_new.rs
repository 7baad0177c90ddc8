#[rustyray::actor]
struct Counter {
    n: i64,
}

#[rustyray::actor]
impl Counter {
    fn get(&self) -> i64 {
        self.n
    }
}

fn main() {
    // The struct and its methods stay defined, so this use adds no
    // second error.
    let _ = Counter { n: 0 }.get();
}
