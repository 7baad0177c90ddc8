#[rustyray::remote]
fn shout(s: &str) -> String {
    s.to_uppercase()
}

fn main() {
    // The function stays defined, so this use adds no second error.
    let _ = shout("hi");
}
