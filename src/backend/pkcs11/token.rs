//! The connection to one token: the module's context, the slot found by
//! label, the login, the bounded session pool with reconnect and backoff,
//! and the threads that make the token calls of async callers.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use tracing::{info, warn};

use super::error::{Pkcs11Error, is_connection_loss};
use super::{BACKOFF_MAX, BACKOFF_MIN, Pkcs11Settings};

/// One process-wide context per module path: C_Initialize is process-global.
fn context(module: &Path) -> Result<Pkcs11, Pkcs11Error> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let fail = |reason: String| Pkcs11Error::Module {
        module: module.to_owned(),
        reason,
    };
    if !module.exists() {
        return Err(fail("no such file".to_owned()));
    }
    let ctx = Pkcs11::new(module).map_err(|e| fail(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(fail(format!("C_Initialize: {e}"))),
    }
    map.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

/// A token call queued for one of the token's threads.
type Job = Box<dyn FnOnce() + Send>;

/// A connection to one token: context, slot, login state and session pool.
pub struct Token {
    pub(super) settings: Pkcs11Settings,
    pub(super) metrics: OnceLock<Arc<crate::metrics::Metrics>>,
    /// The queue of the `pool_size` threads that make the token calls of
    /// async callers ([`Token::run`]); started on first use.
    workers: OnceLock<std::sync::mpsc::Sender<Job>>,
    state: Mutex<Conn>,
    /// Signalled whenever a session goes back to the pool or is closed.
    freed: std::sync::Condvar,
    /// Public objects already reported (by kind, label and `CKA_ID`, not by
    /// handle), so each is logged once; at most `MAX_PUBLIC_REPORTED`, plus
    /// `""` once the rest are summed up in one line.
    pub(super) warned: Mutex<HashSet<String>>,
}

pub(super) struct Conn {
    slot: Option<Slot>,
    /// Bumped whenever the connection is rebuilt; cached object handles
    /// from an older generation are looked up again.
    generation: u64,
    idle: Vec<Session>,
    /// Sessions open now, idle or in use; never more than `pool_size`.
    open: usize,
    logged_in: bool,
    reinit: bool,
    pin_rejected: Option<Pkcs11Error>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<String>,
    /// A session was opened once: the configuration is right, so a token
    /// that cannot be found or opened from now on is an outage.
    opened_once: bool,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.settings.module)
            .field("token_label", &self.settings.token_label)
            .field("pool_size", &self.settings.pool_size)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Connects to the token: loads the module, finds the token by label and
    /// logs in, so configuration mistakes surface at once.
    ///
    /// # Errors
    /// Module, token or PIN problems.
    pub fn connect(settings: Pkcs11Settings) -> Result<Arc<Self>, Pkcs11Error> {
        let token = Arc::new(Self {
            metrics: OnceLock::new(),
            workers: OnceLock::new(),
            settings,
            freed: std::sync::Condvar::new(),
            warned: Mutex::new(HashSet::new()),
            state: Mutex::new(Conn {
                slot: None,
                generation: 0,
                idle: Vec::new(),
                open: 0,
                logged_in: false,
                reinit: false,
                pin_rejected: None,
                retry_at: None,
                backoff: BACKOFF_MIN,
                opened_once: false,
                last_error: None,
            }),
        });
        token.with_session("connect", |_, _| Ok(()))?;
        Ok(token)
    }

    /// The settings.
    pub fn settings(&self) -> &Pkcs11Settings {
        &self.settings
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on a pooled session (blocking). On any error the session is
    /// closed; on a connection loss every session is dropped and the next
    /// call reconnects after a backoff.
    pub(super) fn with_session<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Session, u64) -> Result<T, CkError>,
    ) -> Result<T, Pkcs11Error> {
        let (session, generation) = self.checkout()?;
        let started = Instant::now();
        let mut result = f(&session, generation);
        if let Some(m) = self.metrics.get() {
            m.hsm_operation(op, started.elapsed());
        }
        if let Err(CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)) =
            &result
        {
            // A handle vanished: one deleted object, or the whole token gone?
            // Without the keyring metadata in sight, treat it as an outage.
            if self
                .metadata_objects(&session)
                .map_or(true, |m| m.is_empty())
            {
                result = Err(CkError::Pkcs11(
                    RvError::TokenNotPresent,
                    Function::FindObjects,
                ));
            }
        }
        {
            let mut conn = self.conn();
            // A failed C_Encrypt/C_Decrypt ends its operation (PKCS#11
            // 2.40 5.8/5.9) and a failed *Init starts none: the session is
            // clean; only a lost connection makes it useless.
            let reusable = result
                .as_ref()
                .map_or_else(|e| !is_connection_loss(e), |_| true);
            if reusable && conn.generation == generation {
                conn.idle.push(session);
            } else {
                // Closed, never reused: it saw an error, or belongs to a
                // connection that has since been rebuilt.
                drop(session);
                conn.open = conn.open.saturating_sub(1);
                if conn.open == 0 && conn.logged_in {
                    // PKCS#11: closing an application's last session logs
                    // it out; private-object handles are gone with it.
                    conn.logged_in = false;
                    conn.generation += 1;
                }
            }
            if let Some(m) = self.metrics.get() {
                m.hsm_sessions(conn.open, conn.open.saturating_sub(conn.idle.len()));
            }
        }
        self.freed.notify_one();
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_connection_loss(&e) {
                    self.mark_broken(generation, &e.to_string());
                    return Err(self.unavailable(e.to_string()));
                }
                Err(Pkcs11Error::Call {
                    op,
                    reason: e.to_string(),
                })
            }
        }
    }

    fn unavailable(&self, reason: String) -> Pkcs11Error {
        Pkcs11Error::Unavailable {
            label: self.settings.token_label.clone(),
            reason,
        }
    }

    fn mark_broken(&self, generation: u64, reason: &str) {
        let mut conn = self.conn();
        if conn.generation != generation {
            return; // someone already reset this connection
        }
        warn!(token = %self.settings.token_label, error = %reason, "lost the PKCS#11 token; reconnecting with backoff");
        conn.open = conn.open.saturating_sub(conn.idle.len());
        conn.idle.clear();
        conn.slot = None;
        conn.logged_in = false;
        conn.generation += 1;
        conn.retry_at = Some(Instant::now() + conn.backoff);
        conn.reinit = true;
        conn.last_error = Some(reason.to_owned());
    }

    fn checkout(&self) -> Result<(Session, u64), Pkcs11Error> {
        /// Longest wait for a free session (the apiserver's default timeout).
        const WAIT: Duration = Duration::from_secs(3);
        let deadline = Instant::now() + WAIT;
        let mut conn = self.conn();
        loop {
            if let Some(e) = &conn.pin_rejected {
                return Err(e.clone());
            }
            if let Some(s) = conn.idle.pop() {
                return Ok((s, conn.generation));
            }
            if conn.open < self.settings.pool_size {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.unavailable(format!(
                    "all {} sessions stayed busy for {WAIT:?} (raise pool_size?)",
                    self.settings.pool_size
                )));
            }
            conn = self
                .freed
                .wait_timeout(conn, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if let Some(at) = conn.retry_at
            && Instant::now() < at
        {
            let reason = conn
                .last_error
                .clone()
                .unwrap_or_else(|| "reconnecting".to_owned());
            return Err(self.unavailable(format!("{reason} (next reconnect attempt soon)")));
        }
        let result = self.open(&mut conn);
        match &result {
            Ok(_) => {
                conn.open += 1;
                conn.opened_once = true;
                if conn.retry_at.take().is_some() {
                    info!(token = %self.settings.token_label, "PKCS#11 token reconnected");
                }
                conn.backoff = BACKOFF_MIN;
                conn.last_error = None;
            }
            Err(e @ (Pkcs11Error::WrongPin { .. } | Pkcs11Error::PinLocked { .. })) => {
                conn.pin_rejected = Some(e.clone());
            }
            Err(e) => {
                conn.retry_at = Some(Instant::now() + conn.backoff);
                conn.reinit = true;
                conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
                conn.last_error = Some(e.to_string());
                // Once the token has served, "no token labelled …" (or a
                // module that fails to load) means it went away: an outage
                // the caller may retry, not a configuration mistake.
                if conn.opened_once && !matches!(e, Pkcs11Error::Unavailable { .. }) {
                    return Err(self.unavailable(e.to_string()));
                }
            }
        }
        result.map(|s| (s, conn.generation))
    }

    /// Opens a session, finding the slot and logging in as needed.
    fn open(&self, conn: &mut Conn) -> Result<Session, Pkcs11Error> {
        let ctx = context(&self.settings.module)?;
        if conn.reinit && conn.open == 0 {
            // Some modules (SoftHSM) only rescan their tokens at C_Initialize.
            let _ = ctx.clone().finalize();
            match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                Err(e) => return Err(self.unavailable(format!("C_Initialize: {e}"))),
            }
            conn.reinit = false;
            conn.slot = None;
            conn.logged_in = false;
            conn.generation += 1;
        }
        let slot = match conn.slot {
            Some(s) => s,
            None => {
                let s = self.find_slot(&ctx)?;
                self.check_mechanisms(&ctx, s)?;
                conn.slot = Some(s);
                s
            }
        };
        let session = match ctx.open_rw_session(slot) {
            Ok(s) => s,
            Err(e) => {
                conn.slot = None;
                conn.generation += 1;
                return Err(self.unavailable(format!("opening a session: {e}")));
            }
        };
        if !conn.logged_in {
            let pin = cryptoki::types::AuthPin::from(self.settings.pin.expose_secret().to_owned());
            match session.login(UserType::User, Some(&pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                    conn.logged_in = true
                }
                Err(CkError::Pkcs11(
                    RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                    _,
                )) => {
                    return Err(Pkcs11Error::WrongPin {
                        label: self.settings.token_label.clone(),
                    });
                }
                Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                    return Err(Pkcs11Error::PinLocked {
                        label: self.settings.token_label.clone(),
                    });
                }
                Err(e) => {
                    conn.slot = None;
                    conn.generation += 1;
                    return Err(self.unavailable(format!("login: {e}")));
                }
            }
        }
        Ok(session)
    }

    fn check_mechanisms(&self, ctx: &Pkcs11, slot: Slot) -> Result<(), Pkcs11Error> {
        use cryptoki::mechanism::MechanismType;
        for (mechanism, name) in [
            (MechanismType::AES_GCM, "CKM_AES_GCM"),
            (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN"),
        ] {
            match ctx.get_mechanism_info(slot, mechanism) {
                Ok(_) => {}
                Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => {
                    return Err(Pkcs11Error::MechanismMissing {
                        label: self.settings.token_label.clone(),
                        mechanism: name,
                    });
                }
                Err(e) => return Err(self.unavailable(format!("querying {name}: {e}"))),
            }
        }
        Ok(())
    }

    fn find_slot(&self, ctx: &Pkcs11) -> Result<Slot, Pkcs11Error> {
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| self.unavailable(format!("listing slots: {e}")))?;
        let mut present = Vec::new();
        for slot in slots {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            let label = info.label().trim_end().to_owned();
            if label == self.settings.token_label {
                return Ok(slot);
            }
            present.push(format!("{label:?}"));
        }
        Err(Pkcs11Error::NoToken {
            label: self.settings.token_label.clone(),
            module: self.settings.module.clone(),
            present: if present.is_empty() {
                "none".to_owned()
            } else {
                present.join(", ")
            },
        })
    }

    /// Runs a blocking token call off the async workers, on one of the
    /// token's `pool_size` threads.
    ///
    /// Dedicated threads rather than a semaphore permit plus
    /// `spawn_blocking` per call: under load a thread that finishes a call
    /// takes the next queued one at once, so a call costs one wake-up (its
    /// result to the async task) instead of three (permit, blocking thread,
    /// result), which profiling showed to be most of the backend's CPU
    /// (docs/benchmarks.md). With as many threads as sessions, a call never
    /// waits for a session held by another.
    pub(super) async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        op: &'static str,
        f: impl FnOnce(&Session, u64) -> Result<T, CkError> + Send + 'static,
    ) -> Result<T, Pkcs11Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = Arc::clone(self);
        let job: Job = Box::new(move || {
            // The caller may have given up (its future dropped): the call
            // is made anyway, like a spawned blocking task, and its result
            // dropped.
            let _ = tx.send(token.with_session(op, f));
        });
        let call_failed = |reason: String| Pkcs11Error::Call { op, reason };
        self.workers()
            .map_err(|e| call_failed(format!("cannot start the token's threads: {e}")))?
            .send(job)
            .map_err(|_| call_failed("the token's threads have stopped".to_owned()))?;
        rx.await
            .map_err(|_| call_failed("the token's thread ended during the call".to_owned()))?
    }

    /// The queue of the token's call threads, starting them on first use.
    /// They end when the token is dropped (the queue's sender with it).
    fn workers(&self) -> std::io::Result<&std::sync::mpsc::Sender<Job>> {
        if let Some(tx) = self.workers.get() {
            return Ok(tx);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..self.settings.pool_size.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("kekd-pkcs11-{i}"))
                .spawn(move || {
                    loop {
                        // One thread waits in `recv` holding the lock, the
                        // others wait for the lock; the lock is released
                        // before the job runs.
                        let job = rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .recv();
                        match job {
                            // A panicking call fails only itself (its caller
                            // sees the result channel closed): the thread
                            // stays, so the pool keeps its size.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return, // the token is gone
                        }
                    }
                })?;
        }
        // Two callers racing here both start threads; the loser's sender is
        // dropped at once and its threads end.
        Ok(self.workers.get_or_init(|| tx))
    }
}
