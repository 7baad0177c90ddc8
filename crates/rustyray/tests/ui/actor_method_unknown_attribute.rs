// `#[rustyray(..)]` on an actor method takes `local` only.
#[rustyray::actor]
struct Greeter {
    greeting: String,
}

#[rustyray::actor]
impl Greeter {
    fn new(greeting: String) -> Self {
        Greeter { greeting }
    }

    fn greet(&self, name: String) -> String {
        self.format(&name)
    }

    #[rustyray(bogus)]
    fn format(&self, name: &str) -> String {
        format!("{} {name}", self.greeting)
    }
}

fn main() {}
