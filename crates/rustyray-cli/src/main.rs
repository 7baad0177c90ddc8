//! The `rustyray` command: parses flags and hands over to the library.

fn main() -> std::process::ExitCode {
    rustyray_cli::main()
}
