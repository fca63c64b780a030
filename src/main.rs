//! The `kekd` binary: parse the command line, run, turn errors into exit codes.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    // Each command sets up logging, then hardens the process
    // (`kekd::hardening::harden_process`) before it reads any key or PIN,
    // so a hardening failure is logged. Parsing the command line reads none.
    let cli = match kekd::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A closed stdout or stderr (`| head`) must not turn into a panic.
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => {
                    if kekd::cli::wants_json(std::env::args_os()) {
                        kekd::cli::print_json_line(&kekd::cli::usage_error_json(
                            &e.render().to_string(),
                            kekd::exit::USAGE,
                        ));
                    }
                    ExitCode::from(kekd::exit::USAGE)
                }
            };
        }
    };
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Best effort: the exit code says it all when stderr is gone.
            let _ = writeln!(std::io::stderr(), "kekd: error: {e}");
            ExitCode::from(e.code)
        }
    }
}
