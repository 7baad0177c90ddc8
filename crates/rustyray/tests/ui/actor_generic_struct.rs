#[rustyray::actor]
struct Foo<T> {
    value: T,
}

fn main() {}
