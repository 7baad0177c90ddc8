//! Generated items do not collide: class `A` with method `b_c` and class
//! `A_b` with method `c` in one module would both have produced
//! `__rustyray_method_A_b_c` under a plain `{class}_{method}` scheme.
#![allow(non_camel_case_types)]

#[rustyray::actor]
struct A {
    n: i64,
}

#[rustyray::actor]
impl A {
    fn new() -> Self {
        A { n: 1 }
    }

    fn b_c(&self) -> i64 {
        self.n
    }
}

#[rustyray::actor]
struct A_b {
    n: i64,
}

#[rustyray::actor]
impl A_b {
    fn new() -> Self {
        A_b { n: 2 }
    }

    fn c(&self) -> i64 {
        self.n
    }
}

fn main() {
    use rustyray::ActorClass;
    let _ = (A::entry(), A_b::entry());
    let _ = (A::options(), A_b::options());
}
