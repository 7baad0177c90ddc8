#[rustyray::remote(foo = 1)]
fn one() -> i64 {
    1
}

fn main() {}
