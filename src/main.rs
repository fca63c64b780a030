//! The `kekd` binary: parse the command line, run, turn errors into exit codes.

use std::process::ExitCode;

use clap::Parser as _;
use clap::error::ErrorKind;

/// Exit code for a command-line usage error (EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // Each command sets up logging, then hardens the process
    // (`kekd::hardening::harden_process`) before it reads any key or PIN,
    // so a hardening failure is logged. Parsing the command line reads none.
    let cli = match kekd::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kekd: error: {e}");
            ExitCode::from(e.code)
        }
    }
}
