// Every `&self` / `&mut self` method not marked #[rustyray(local)] becomes
// remote, so its parameters follow the remote rules.
#[rustyray::actor]
struct Greeter {
    greeting: String,
}

#[rustyray::actor]
impl Greeter {
    fn new(greeting: String) -> Self {
        Greeter { greeting }
    }

    fn greet(&self, name: &str) -> String {
        format!("{} {name}", self.greeting)
    }
}

fn main() {}
