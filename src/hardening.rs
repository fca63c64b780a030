//! Process hardening applied before any key is loaded: no core dumps and no
//! ptrace attach by other unprivileged processes, so KEKs and seeds in memory
//! cannot end up in a crash dump file.

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
use tracing::warn;

/// Disables core dumps (`RLIMIT_CORE` 0) and marks the process non-dumpable
/// (`PR_SET_DUMPABLE` 0, which also stops same-uid ptrace). Failures are
/// logged, not fatal: a sandbox may forbid them and kekd must still serve.
pub fn harden_process() {
    if let Err(e) = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    ) {
        warn!(error = %e, "cannot set RLIMIT_CORE to 0; a crash could dump key material");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        warn!(error = %e, "cannot clear PR_SET_DUMPABLE; a crash could dump key material");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn core_dumps_are_off_after_hardening() {
        super::harden_process();
        let limit = rustix::process::getrlimit(rustix::process::Resource::Core);
        assert_eq!(limit.current, Some(0));
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
