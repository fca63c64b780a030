//! Live reload: notice keyring changes and swap in the new snapshot.
//!
//! Changes are noticed through inotify on the keyring's directory (admin
//! commands replace the file by rename) and, as a fallback, by polling the
//! backend's revision token. A changed keyring is loaded, validated, checked
//! as a successor of the one in use ([`check_successor`]: same keyring, no
//! version lost or altered, primary not moving back) and self-checked; only
//! then is it swapped in, whole. Anything wrong leaves the last good snapshot
//! serving, is logged once and recorded for `kekd admin list`, and the next
//! good version is picked up by itself. A keyring swapped in is recorded as
//! served ([`crate::backend::served`]), so a restart never goes back below it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::backend::served::{Served, note_served};
use crate::backend::{Backend, ErrorKind};
use crate::id::Timestamp;
use crate::keyring::lifecycle::check_successor;
use crate::state::{Event, ServingState, Snapshot};
use crate::usage::ReloadProblem;

/// How long to wait after a file event for more (a `cp` writes in pieces).
const SETTLE: Duration = Duration::from_millis(100);

/// Runs until aborted: reloads whenever the keyring changes. `loaded` is
/// the backend's revision as it was just before the serving keyring was
/// loaded (the task may start later; a change in between must still count).
pub async fn reload_loop(
    state: Arc<ServingState>,
    backend: Arc<dyn Backend>,
    poll: Duration,
    loaded: Option<String>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let _watcher = watch(backend.watch_paths(), tx);
    let mut last = loaded;
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = rx.recv() => tokio::time::sleep(SETTLE).await,
        }
        let revision = backend.revision();
        if revision.is_some() && revision == last {
            continue;
        }
        last = revision;
        try_reload(&state, &backend).await;
    }
}

/// Loads the backend's keyring and swaps it in if it is a valid successor.
/// Returns whether the snapshot changed.
pub async fn try_reload(state: &Arc<ServingState>, backend: &Arc<dyn Backend>) -> bool {
    let loader = Arc::clone(backend);
    // A local keyring's raw keys pass through this thread's stack while
    // the file is parsed and each cipher built: zeroed before it returns.
    let loaded = tokio::task::spawn_blocking(move || {
        crate::secret::with_scrubbed_stack::<{ crate::secret::SCRUB_AFTER_SETUP }, _>(|| {
            loader.load()
        })
    })
    .await;
    let keyring = match loaded {
        Ok(Ok(k)) => k,
        // The key store is unreachable: an outage, not a bad keyring. The
        // self-check and the calls report it; keep the snapshot and say
        // nothing here, or every poll would log a "refused" keyring.
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::StoreMissing) => {
            debug!(error = %e, "keyring not re-read: the key store is unavailable");
            state
                .metrics()
                .reload("unavailable", Timestamp::now().unix());
            return false;
        }
        // A key store that comes back half-way (SoftHSM rescanning) may
        // briefly show no keyring; while the self-check fails, that is the
        // outage too.
        Ok(Err(e)) if e.kind() == ErrorKind::NoKeyring && !state.current().is_healthy() => {
            debug!(error = %e, "keyring not re-read during a key store outage");
            state
                .metrics()
                .reload("unavailable", Timestamp::now().unix());
            return false;
        }
        // Served from this key store a moment ago, gone now: the store
        // vanished (an outage that has not failed the self-check yet) or
        // someone deleted the keyring. Keep serving, and never suggest
        // `admin init` here: a new keyring would orphan every ciphertext.
        Ok(Err(e)) if e.kind() == ErrorKind::NoKeyring => {
            // The backend's own message may advise `admin init` (right for
            // a node that never had a keyring): not said here.
            debug!(error = %e, "the keyring served a moment ago is gone");
            return refuse(
                state,
                format!(
                    "{}: the keyring is no longer there (the key store is out, or the keyring was moved or \
                     deleted); still serving the last good keyring: bring it back (restore the file or the \
                     token's objects), and do not run `kekd admin init`, which would orphan every ciphertext",
                    backend.describe(),
                ),
            )
            .await;
        }
        Ok(Err(e)) => return refuse(state, e.to_string()).await,
        Err(e) => return refuse(state, format!("keyring load task failed: {e}")).await,
    };
    let current = state.current();
    if let Err(e) = check_successor(
        current.keyring.id(),
        &current.keyring.views(),
        keyring.id(),
        &keyring.views(),
    ) {
        return refuse(state, format!("{}: {e}", backend.describe())).await;
    }
    if let Err(e) = keyring.self_check().await {
        return refuse(state, format!("{}: {e}", backend.describe())).await;
    }
    if keyring.versions().eq(current.keyring.versions()) {
        // Same keyring (a touch, or a token poll): keep the snapshot, but a
        // problem reported earlier is gone.
        if state.set_reload_error(None) {
            publish(state).await;
            info!(
                "keyring problem resolved: the keyring is valid again and unchanged from the one served"
            );
        }
        state.metrics().reload("unchanged", Timestamp::now().unix());
        return false;
    }
    let (old_id, new_id) = (
        current.keyring.primary_key_id().clone(),
        keyring.primary_key_id().clone(),
    );
    let served = Served::of(&keyring);
    let had_problem = state.reload_error().is_some();
    // The audit event records a switch of the primary, written just before
    // the swap (which cannot fail), so a caller that sees the new key_id in
    // Status finds it in the log; a change that keeps the primary (a
    // pending version added, one retired) is no switch.
    let switched = old_id != new_id;
    if switched {
        state.event(Event::SnapshotSwitched {
            from: old_id.to_string(),
            to: new_id.to_string(),
        });
    }
    state.swap(Snapshot::new(keyring, Timestamp::now(), true));
    // `kekd admin list` and `probe --keyring` read what is served (and any
    // refusal) from the usage file: publish the change now, not at the
    // next periodic flush.
    publish(state).await;
    // A restart must not go back below what is served now.
    if let Some(anchor) = backend.state_anchor() {
        let _ = tokio::task::spawn_blocking(move || note_served(&anchor, served)).await;
    }
    state.metrics().reload("applied", Timestamp::now().unix());
    if had_problem {
        info!("keyring problem resolved: the changed keyring is valid and now served");
    }
    if switched {
        info!(key_id = %new_id, previous_key_id = %old_id, "keyring reloaded: new primary");
    } else {
        info!(key_id = %new_id, "keyring reloaded");
    }
    true
}

/// Writes the usage file (what is served, any refusal) at once; a failure
/// is left to the periodic flush, which retries and logs it.
async fn publish(state: &Arc<ServingState>) {
    let state = Arc::clone(state);
    let _ = tokio::task::spawn_blocking(move || state.usage().flush(Timestamp::now())).await;
}

async fn refuse(state: &Arc<ServingState>, message: String) -> bool {
    state.metrics().reload("refused", Timestamp::now().unix());
    if state.set_reload_error(Some(ReloadProblem {
        at: Timestamp::now(),
        message: message.clone(),
    })) {
        publish(state).await;
        error!(error = %message, "keyring change refused; still serving the last good keyring");
        state.event(Event::KeyringRejected { reason: message });
    }
    false
}

/// Watches the directories of `paths`; each event for one of the files sends
/// a (coalesced) wake-up. `None` when inotify is unavailable: polling covers it.
fn watch(paths: Vec<PathBuf>, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    if paths.is_empty() {
        return None;
    }
    let names: Vec<_> = paths
        .iter()
        .filter_map(|p| p.file_name().map(ToOwned::to_owned))
        .collect();
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)))
        {
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the keyring for changes; polling only");
            return None;
        }
    };
    for path in &paths {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            warn!(error = %e, dir = %dir.display(), "cannot watch the keyring's directory; polling only");
        }
    }
    Some(watcher)
}
