//! The serving process's background duties besides the socket: writing
//! the usage counters while they change, and the periodic self-check of
//! every decrypt-capable KEK version, with the key-age warning.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::id::{KeyVersion, Timestamp};
use crate::state::Event;
use crate::state::{ServingState, Snapshot};

/// Writes the usage counters every `every` while they change
/// (`usage_flush_interval`).
pub(super) async fn flush_loop(state: Arc<ServingState>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    let mut failing = false;
    loop {
        ticker.tick().await;
        match state.usage().flush(Timestamp::now()) {
            Ok(()) if failing => {
                failing = false;
                info!("usage counters written again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "could not write usage counters; will retry");
            }
            Err(_) => {}
        }
    }
}

/// Re-runs the self-check of the served snapshot; Status reflects the result.
pub(super) async fn self_check_loop(
    state: Arc<ServingState>,
    every: Duration,
    max_key_age: Duration,
) {
    // While unhealthy, check every second so recovery shows at once.
    const RECHECK: Duration = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    let mut warned_due: Option<KeyVersion> = None;
    loop {
        let snapshot = state.current();
        check_key_age(&state, &snapshot, max_key_age, &mut warned_due);
        tokio::time::sleep(if snapshot.is_healthy() {
            every
        } else {
            every.min(RECHECK)
        })
        .await;
        let snapshot = state.current();
        let result = snapshot
            .keyring
            .self_check()
            .await
            .map_err(|e| e.to_string());
        let was = state.record_self_check(&snapshot, result.clone());
        let ok = result.is_ok();
        match result {
            Err(msg) => {
                if was || last_error.as_ref() != Some(&msg) {
                    error!(error = %msg, "self-check failed; Status fails until it passes");
                    if was {
                        state.event(Event::HealthLost {
                            reason: msg.clone(),
                        });
                    }
                }
                last_error = Some(msg);
            }
            Ok(()) if !was => {
                last_error = None;
                info!("self-check passes again; Status is healthy");
                state.event(Event::HealthRecovered);
            }
            Ok(()) => {}
        }
        // Counted once the outcome is reported (log, audit event), so a
        // scrape that sees the count sees what this check did.
        state.metrics().background_self_check(ok);
    }
}

/// Updates the key-age metrics and warns once per primary when it is older
/// than `max_key_age`. Readiness is not affected: an old key still works.
fn check_key_age(
    state: &ServingState,
    snapshot: &Snapshot,
    max_key_age: Duration,
    warned: &mut Option<KeyVersion>,
) {
    let keyring = &snapshot.keyring;
    let primary = keyring.primary();
    let Some(info) = keyring.versions().find(|v| v.version == primary) else {
        return;
    };
    let since = info.promoted.unwrap_or(info.created);
    let age = Duration::from_secs(Timestamp::now().unix().saturating_sub(since.unix()));
    let due = age > max_key_age;
    state.metrics().key_age(age, due);
    if due && *warned != Some(primary) {
        *warned = Some(primary);
        warn!(
            key.version = primary.get(),
            age = %humantime::format_duration(age),
            max_key_age = %humantime::format_duration(max_key_age),
            "the primary key is older than max_key_age: rotation is due (kekd admin rotate)"
        );
    }
}
