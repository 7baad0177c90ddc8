struct Calc;

impl Calc {
    #[rustyray::remote]
    fn double(&self, x: i64) -> i64 {
        x * 2
    }
}

fn main() {}
