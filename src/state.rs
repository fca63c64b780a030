//! What the server is serving right now: the keyring snapshot, its health,
//! per-version usage and the outcome of the last reload.
//!
//! The snapshot sits behind an atomic pointer. Each call loads it once and
//! uses it throughout, so a Status and the Encrypt it triggers see one
//! primary and one key id; a reload swaps the whole snapshot, never part.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::keyring::{KeyState, Keyring};

use crate::id::{KeyVersion, Timestamp};
use crate::metrics::Metrics;
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
    metrics: Arc<Metrics>,
    reload_error: Mutex<Option<ReloadProblem>>,
    self_check_error: Mutex<Option<String>>,
    /// Where key events are appended (the audit log), if anywhere.
    events: Option<PathBuf>,
    /// Versions whose first Decrypt since demotion was already reported.
    reported_demoted: Mutex<HashSet<KeyVersion>>,
}

/// A server-side key event, appended to the audit log as one JSON line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new keyring snapshot is served.
    SnapshotSwitched {
        /// Key id served before.
        from: String,
        /// Key id served now.
        to: String,
    },
    /// A changed keyring was refused; the last good one keeps serving.
    KeyringRejected {
        /// Why (file, line, rule — never content).
        reason: String,
    },
    /// A former primary (decrypt-only) served a Decrypt, for the first time
    /// since this process started: stored data still needs it, so it is not
    /// ready to be retired.
    DemotedVersionUsed {
        /// The version.
        version: KeyVersion,
        /// Its state.
        state: KeyState,
    },
    /// The self-check started failing (e.g. the HSM was lost).
    HealthLost {
        /// Why.
        reason: String,
    },
    /// The self-check passes again.
    HealthRecovered,
}

impl ServingState {
    /// State serving `snapshot`, counting usage in `usage` and `metrics`,
    /// appending key events to `events` (the audit log) when given.
    pub fn new(
        snapshot: Snapshot,
        usage: UsageTracker,
        metrics: Arc<Metrics>,
        events: Option<PathBuf>,
    ) -> Self {
        metrics.self_check(snapshot.is_healthy());
        let state = Self {
            current: ArcSwap::from_pointee(snapshot),
            usage,
            metrics,
            reload_error: Mutex::new(None),
            self_check_error: Mutex::new(None),
            events,
            reported_demoted: Mutex::new(HashSet::new()),
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

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Appends a key event to the audit log (best effort: a failure is
    /// logged, never fails a call).
    pub fn event(&self, event: Event) {
        let Some(path) = &self.events else { return };
        let snap = self.current();
        let keyring_id = snap.keyring.id().to_string();
        let mut line = serde_json::json!({
            "time": Timestamp::now(),
            "source": "server",
            "pid": std::process::id(),
            "keyring_id": keyring_id,
        });
        let fields = match &event {
            Event::SnapshotSwitched { from, to } => {
                serde_json::json!({"event": "snapshot_switched", "from_key_id": from, "to_key_id": to})
            }
            Event::KeyringRejected { reason } => {
                serde_json::json!({"event": "keyring_rejected", "reason": reason})
            }
            Event::DemotedVersionUsed { version, state } => serde_json::json!({
                "event": "demoted_version_used",
                "version": version.get(),
                "key_id": crate::id::KeyId::new(snap.keyring.id(), *version).as_str(),
                "state": state.as_str(),
            }),
            Event::HealthLost { reason } => {
                serde_json::json!({"event": "health_lost", "reason": reason})
            }
            Event::HealthRecovered => serde_json::json!({"event": "health_recovered"}),
        };
        if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
            obj.extend(extra);
        }
        if let Err(e) = crate::audit::append_line(path, &line) {
            tracing::warn!(error = %e, audit = %path.display(), "could not append a key event to the audit log");
        }
    }

    /// Reports the first Decrypt by a version that is no longer primary
    /// (once per version and process).
    pub fn note_decrypt(&self, snapshot: &Snapshot, version: KeyVersion) {
        if version == snapshot.keyring.primary() {
            return;
        }
        let Some(state) = snapshot
            .keyring
            .versions()
            .find(|v| v.version == version)
            .map(|v| v.state)
        else {
            return;
        };
        if state != KeyState::DecryptOnly {
            return;
        }
        let first = self
            .reported_demoted
            .lock()
            .map(|mut seen| seen.insert(version))
            .unwrap_or(false);
        if first {
            self.event(Event::DemotedVersionUsed { version, state });
        }
    }

    /// Why the latest self-check failed, while it fails.
    pub fn last_self_check_error(&self) -> Option<String> {
        self.self_check_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records the latest self-check outcome on the current snapshot, the
    /// metrics and the readiness reason; returns the previous health.
    pub fn record_self_check(&self, snapshot: &Snapshot, result: Result<(), String>) -> bool {
        let healthy = result.is_ok();
        *self
            .self_check_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = result.err();
        self.metrics.self_check(healthy);
        snapshot.set_healthy(healthy)
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
            self.metrics.reload_refused(problem.is_some());
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
