//! The command line: `kekd serve` and `kekd admin …`.
//!
//! Each subcommand group has its own file with its `Args` and a `run()`.
//! Errors leave here as [`CliError`], carrying the process exit code:
//! 0 ok, 1 runtime failure, 64 usage, 78 configuration or keyring problem.

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
    /// Exit code for a configuration or keyring problem (EX_CONFIG).
    pub const CONFIG: u8 = 78;
    /// Exit code for a runtime failure.
    pub const RUNTIME: u8 = 1;

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
        Self::new(Self::CONFIG, e)
    }

    /// Exit code when another admin command holds the keyring lock (EX_TEMPFAIL).
    pub const LOCKED: u8 = 75;

    /// A runtime failure.
    pub fn runtime(e: impl std::fmt::Display) -> Self {
        Self::new(Self::RUNTIME, e)
    }
}
