//! The `kekd` binary: parse the command line, run, turn errors into exit codes.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = kekd::cli::Cli::parse();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kekd: error: {e}");
            ExitCode::from(e.code)
        }
    }
}
