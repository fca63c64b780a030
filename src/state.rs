//! What the server is serving right now: the keyring snapshot, its health,
//! per-version usage and the outcome of the last reload.
//!
//! The snapshot sits behind an atomic pointer. Each call loads it once and
//! uses it throughout, so a Status and the Encrypt it triggers see one
//! primary and one key id; a reload swaps the whole snapshot, never part.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::keyring::{Keyring, Timestamp};
use crate::usage::{ReloadProblem, Serving, UsageTracker};

/// One keyring snapshot plus the result of its latest self-check.
#[derive(Debug)]
pub struct Snapshot {
    /// The keyring.
    pub keyring: Keyring,
    /// When it was loaded.
    pub loaded: Timestamp,
    healthy: AtomicBool,
}

impl Snapshot {
    /// A snapshot loaded at `loaded` whose self-check result is `healthy`.
    pub fn new(keyring: Keyring, loaded: Timestamp, healthy: bool) -> Self {
        Self {
            keyring,
            loaded,
            healthy: AtomicBool::new(healthy),
        }
    }

    /// Whether the latest self-check passed.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records a self-check result; returns the previous one.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel)
    }
}

/// Shared by the gRPC service and the server's background tasks.
#[derive(Debug)]
pub struct ServingState {
    current: ArcSwap<Snapshot>,
    usage: UsageTracker,
    reload_error: Mutex<Option<ReloadProblem>>,
}

impl ServingState {
    /// State serving `snapshot`, counting usage in `usage`.
    pub fn new(snapshot: Snapshot, usage: UsageTracker) -> Self {
        let state = Self {
            current: ArcSwap::from_pointee(snapshot),
            usage,
            reload_error: Mutex::new(None),
        };
        state.publish_serving();
        state
    }

    /// The snapshot to use for one call.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot as a whole and clears any reload error.
    pub fn swap(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let old = self.current.swap(Arc::new(snapshot));
        self.set_reload_error(None);
        self.publish_serving();
        old
    }

    /// Per-version usage counters.
    pub fn usage(&self) -> &UsageTracker {
        &self.usage
    }

    /// The last refused reload, while no later reload succeeded.
    pub fn reload_error(&self) -> Option<ReloadProblem> {
        self.reload_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records (or clears) a refused reload; returns whether it differs from
    /// the one recorded before (so each distinct problem is logged once).
    pub fn set_reload_error(&self, problem: Option<ReloadProblem>) -> bool {
        let mut guard = self
            .reload_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = guard.as_ref().map(|p| &p.message) != problem.as_ref().map(|p| &p.message);
        if changed {
            self.usage.set_reload_error(problem.clone());
        }
        *guard = problem;
        changed
    }

    fn publish_serving(&self) {
        let snap = self.current();
        self.usage.set_serving(Serving {
            pid: std::process::id(),
            primary: snap.keyring.primary().get(),
            key_id: snap.keyring.primary_key_id().to_string(),
            since: snap.loaded,
        });
    }
}
