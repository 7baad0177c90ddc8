//! The `rustyray` command: parses flags and hands over to the library.

/// `#[rustyray::main]` makes this binary its own worker process: started by
/// a node daemon (`microbenchmark --mode processes`), it serves tasks and
/// exits before any flag is parsed.
#[rustyray::main]
fn main() -> std::process::ExitCode {
    rustyray_cli::main()
}
