//! Checking how a `kekd` command ended: one place for the exit-code and
//! error-line assertions every CLI test makes, each failing with the whole
//! output of the command (stdout, stderr, status) at the caller's line.

use super::Finished;

impl Finished {
    /// Asserts the command succeeded (exit 0); returns its stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        self.exited(0);
        &self.stdout
    }

    /// Asserts the command exited with `code`.
    #[track_caller]
    pub fn exited(&self, code: i32) -> &Self {
        assert_eq!(self.code(), code, "exit code: {self:#?}");
        self
    }

    /// Asserts the command was refused with exit `code` and exactly one
    /// `kekd: error: …` line on stderr; returns that line's message.
    #[track_caller]
    pub fn refused(&self, code: i32) -> &str {
        self.exited(code);
        super::error_message(self)
    }
}
