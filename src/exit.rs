//! kekd's exit codes, in one place (the BSD `sysexits.h` values where one
//! fits), and the one mapping from a backend-neutral [`ErrorKind`] to them.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | done, or already done (every admin command is safe to re-run) |
//! | 1    | refused, or failed at run time (an outage, I/O): retry or read the message |
//! | 64   | the command line is wrong (`EX_USAGE`) |
//! | 75   | another admin command holds the keyring's lock: retry (`EX_TEMPFAIL`) |
//! | 78   | the configuration or the keyring needs the operator (`EX_CONFIG`) |

use crate::kek::ErrorKind;

/// Refused, or a runtime failure.
pub const RUNTIME: u8 = 1;
/// The command line is wrong (EX_USAGE).
pub const USAGE: u8 = 64;
/// Another admin command holds the keyring's lock (EX_TEMPFAIL).
pub const LOCKED: u8 = 75;
/// The configuration or the keyring needs the operator (EX_CONFIG).
pub const CONFIG: u8 = 78;

/// The exit code of a command that failed with an error of `kind`.
pub fn of_kind(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Locked => LOCKED,
        ErrorKind::Unavailable
        | ErrorKind::Io
        | ErrorKind::NotDurable
        | ErrorKind::Decrypt
        | ErrorKind::Internal => RUNTIME,
        ErrorKind::StoreMissing
        | ErrorKind::NoKeyring
        | ErrorKind::KeyringExists
        | ErrorKind::AuthenticationFailed
        | ErrorKind::Misconfigured
        | ErrorKind::Damaged => CONFIG,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the operator must fix exits 78; what passes by itself exits 1,
    /// or 75 for the lock, which says "retry". Every kind is listed.
    #[test]
    fn every_kind_has_its_exit_code() {
        use ErrorKind as K;
        let table = [
            (K::Unavailable, RUNTIME),
            (K::StoreMissing, CONFIG),
            (K::NoKeyring, CONFIG),
            (K::KeyringExists, CONFIG),
            (K::Locked, LOCKED),
            (K::AuthenticationFailed, CONFIG),
            (K::Misconfigured, CONFIG),
            (K::Damaged, CONFIG),
            (K::Io, RUNTIME),
            (K::NotDurable, RUNTIME),
            (K::Decrypt, RUNTIME),
            (K::Internal, RUNTIME),
        ];
        assert_eq!(table.len(), ErrorKind::ALL.len());
        for (kind, code) in table {
            assert_eq!(of_kind(kind), code, "{kind:?}");
        }
    }
}
