#[rustyray::remote]
struct NotAFunction {
    x: i64,
}

fn main() {}
