// A return type must be `rustyray::Data` too; the `Ok` type of a `Result`
// is what is stored.
struct Opaque;

#[rustyray::remote]
fn make() -> Result<Opaque, String> {
    Ok(Opaque)
}

fn main() {}
