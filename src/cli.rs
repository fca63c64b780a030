//! The command line: `kekd serve` and `kekd admin …`.
//!
//! Each subcommand group has its own file with its `Args` and a `run()`.
//! Errors leave here as [`CliError`], carrying the process exit code
//! ([`crate::exit`] lists them). A usage error of a command line that
//! asks for `--output json` is also reported as one JSON document on stdout.

pub mod admin;
pub mod serve;

use clap::{Parser, Subcommand, ValueEnum};

/// kekd — a Kubernetes KMS v2 plugin.
#[derive(Debug, Parser)]
#[command(name = "kekd", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level subcommands.
// Parsed once per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the KMS v2 API on a Unix socket.
    #[command(after_help = "Examples:\n\
        \x20 kekd serve --keyring /etc/kekd/keyring --socket /var/run/kekd/kms.sock\n\
        \x20 kekd serve --config /etc/kekd/kekd.toml\n\
        \x20 kekd serve --dev")]
    Serve(Box<serve::ServeArgs>),
    /// Manage keyrings and check a running plugin.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

impl Cli {
    /// Runs the chosen subcommand.
    ///
    /// # Errors
    /// A [`CliError`] with its exit code.
    pub fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Serve(args) => serve::run(*args),
            Command::Admin(cmd) => admin::run(cmd),
        }
    }
}

/// How a command reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// A failed command: what to print and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// The process exit code.
    pub code: u8,
    /// The message, naming what failed and how to fix it.
    pub message: String,
    /// The command already printed its own report of the failure on stdout.
    pub reported: bool,
}

impl CliError {
    /// A failure with exit code `code`.
    pub fn new(code: u8, e: impl std::fmt::Display) -> Self {
        Self {
            code,
            message: e.to_string(),
            reported: false,
        }
    }

    /// A configuration or keyring problem.
    pub fn config(e: impl std::fmt::Display) -> Self {
        Self::new(crate::exit::CONFIG, e)
    }

    /// A backend error: its exit code by kind, its message, and the
    /// backend's fix (if it knows one) on a second line.
    pub fn backend(e: &crate::kek::BackendError) -> Self {
        let message = match e.fix() {
            Some(fix) => format!("{e}\n{fix}"),
            None => e.to_string(),
        };
        Self::new(crate::exit::of_kind(e.kind()), message)
    }

    /// A runtime failure.
    pub fn runtime(e: impl std::fmt::Display) -> Self {
        Self::new(crate::exit::RUNTIME, e)
    }
}

/// Whether a command line asks for `--output json` (`--output json` or
/// `--output=json`, before any `--`), looked at when clap refused it.
pub fn wants_json<I, S>(args: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut previous_was_output = false;
    for arg in args {
        let arg = arg.as_ref();
        if arg == "--" {
            return false;
        }
        if (previous_was_output && arg == "json") || arg == "--output=json" {
            return true;
        }
        previous_was_output = arg == "--output";
    }
    false
}

/// The JSON document of a usage error: clap's message (first line, without
/// its `error: ` prefix) as `error`, its whole text (with the usage line
/// and hint) as `detail`, and the exit code — the shape every admin
/// command's failure has.
pub fn usage_error_json(rendered: &str, exit_code: u8) -> serde_json::Value {
    let first = rendered.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    serde_json::json!({
        "error": message,
        "exit_code": exit_code,
        "detail": rendered.trim_end(),
    })
}

/// Prints one JSON document on stdout; a closed stdout is ignored (the exit
/// code still tells).
pub fn print_json_line(doc: &serde_json::Value) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{doc}").and_then(|()| out.flush());
}
