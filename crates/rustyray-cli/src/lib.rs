//! The `rustyray` command-line tool — Ray's `ray` CLI.
//!
//! Verbs: `microbenchmark` (Ray's `ray microbenchmark`, row for row). The
//! cluster verbs (`start`, `stop`, `status`, `list`, `timeline`) join it as
//! the cluster is built.
//!
//! ```text
//! rustyray microbenchmark                       # every row, human output
//! rustyray microbenchmark --filter "actor" --json
//! rustyray microbenchmark --mode both            # tasks on threads, then in processes
//! ```
//!
//! The binary is also its own worker process: `main` carries
//! `#[rustyray::main]`, so `--mode processes` starts this executable again
//! as the node's workers.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod microbenchmark;
pub mod roundtrip;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(name = "rustyray", version, about = "RustyRay: Ray Core for Rust")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs Ray's microbenchmark suite (`ray microbenchmark`) on RustyRay.
    Microbenchmark(microbenchmark::Args),
    /// The far side of the microbenchmark's process round-trip reference.
    #[command(hide = true)]
    RoundtripPeer(roundtrip::PeerArgs),
}

/// Runs the tool with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rustyray: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Microbenchmark(args) => microbenchmark::run(&args),
        Command::RoundtripPeer(args) => roundtrip::serve_peer(&args),
    }
}
