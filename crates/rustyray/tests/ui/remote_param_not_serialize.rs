// A parameter type must be `rustyray::Data` (Serialize + DeserializeOwned +
// Send + Sync + 'static); `Opaque` has no serde derives.
struct Opaque {
    x: i64,
}

#[rustyray::remote]
fn read(o: Opaque) -> i64 {
    o.x
}

fn main() {}
