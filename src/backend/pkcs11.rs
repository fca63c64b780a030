//! The PKCS#11 backend: KEKs generated and kept inside an HSM token.
//!
//! # Where things live
//!
//! - Each KEK version is an AES-256 secret-key object generated **in the
//!   token** (`CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not extractable,
//!   encrypt/decrypt only), labelled `<prefix>v<version>`, with `CKA_ID` =
//!   keyring id (16 bytes) ‖ version (big-endian u32).
//! - The keyring's metadata — id, versions, states, times; the same text
//!   format as a local keyring, but with the `kekd-keyring-meta v1` magic and
//!   no key fields — is one private data object in the same token, labelled
//!   `<prefix>keyring` (application `kekd`). Every kekd pointed at the token
//!   reads the same metadata, so a rotation made once is seen by all nodes
//!   without copying files.
//! - Usage counters and the audit log are per node, under `state_dir`.
//!
//! # Sessions
//!
//! A bounded pool: at most `pool_size` sessions, each used by one call at a
//! time (a `Session` is `Send`, not `Sync`), handed out behind an async
//! semaphore so waiting callers do not occupy threads, and the blocking
//! PKCS#11 calls run on tokio's blocking pool. The user logs in once (a
//! second login's `CKR_USER_ALREADY_LOGGED_IN` is fine). A session that saw
//! any error is closed, never returned to the pool, so no half-finished
//! operation can poison later calls; GCM needs no per-call objects.
//!
//! # Outages
//!
//! Errors that mean the token or the login is gone (session handle invalid,
//! device removed, token not present, user not logged in, …) drop every
//! session and mark the connection broken. The next call reconnects — find
//! the slot by label, open, log in, re-find objects — no sooner than a backoff
//! (100 ms doubling to 5 s); calls in between fail at once. An incorrect PIN
//! stops all login attempts until the process restarts, so the token's
//! lockout counter is never run down.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use tracing::{info, warn};

use crate::backend::{Backend, BackendError, KeyHandle, KeyringStore};
use crate::envelope::Nonce;
use crate::keyring::store::{KeyringFile, Material, StoreError};
use crate::keyring::{KeyState, KeyVersion, Keyring, KeyringId};
use crate::secret::{KeyFingerprint, Pin, Plaintext};

/// Label suffix of the metadata object.
const METADATA_LABEL: &str = "keyring";
/// `CKA_APPLICATION` of the metadata object.
const APPLICATION: &str = "kekd";
/// GCM tag length in bits.
const TAG_BITS: u64 = 128;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Validated settings of the PKCS#11 backend.
#[derive(Debug, Clone)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token; the slot is found by it at every (re)connect.
    pub token_label: String,
    /// The user PIN.
    pub pin: Arc<Pin>,
    /// Prefix of the labels of kekd's objects, so several keyrings can share a token.
    pub key_label_prefix: String,
    /// Most sessions open at once.
    pub pool_size: usize,
    /// Directory of this node's usage file, audit log and admin lock.
    pub state_dir: PathBuf,
}

/// Why the token could not be used. Never carries the PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Pkcs11Error {
    /// The module could not be loaded.
    #[error(
        "cannot load PKCS#11 module {module}: {reason} (check `module`; e.g. /usr/lib/softhsm/libsofthsm2.so)"
    )]
    Module {
        /// The path.
        module: PathBuf,
        /// Why.
        reason: String,
    },
    /// No token has the label.
    #[error(
        "no token labelled {label:?} in PKCS#11 module {module} (tokens present: {present}); check `token_label`"
    )]
    NoToken {
        /// The label wanted.
        label: String,
        /// The module.
        module: PathBuf,
        /// Labels found.
        present: String,
    },
    /// The PIN was refused.
    #[error(
        "the token {label:?} rejected the PIN; kekd will not try again (to protect the token from lockout): \
         fix the PIN in `pin_file` or KEKD_PKCS11_PIN and restart"
    )]
    WrongPin {
        /// The token.
        label: String,
    },
    /// The PIN is locked.
    #[error("the user PIN of token {label:?} is locked; unlock it with the token's SO tools")]
    PinLocked {
        /// The token.
        label: String,
    },
    /// The token is not reachable now.
    #[error("PKCS#11 token {label:?} is unavailable: {reason}")]
    Unavailable {
        /// The token.
        label: String,
        /// Why.
        reason: String,
    },
    /// A version's key object is not in the token.
    #[error("the key object of version {version} ({label}) is missing from the token")]
    KeyMissing {
        /// The version.
        version: KeyVersion,
        /// Its label.
        label: String,
    },
    /// The token has no kekd keyring.
    #[error(
        "token {label:?} holds no kekd keyring with prefix {prefix:?}; create one with `kekd admin init --config …`"
    )]
    NoKeyring {
        /// The token.
        label: String,
        /// The prefix.
        prefix: String,
    },
    /// The token already has a keyring.
    #[error(
        "token {label:?} already holds a kekd keyring with prefix {prefix:?}; refusing to replace it"
    )]
    KeyringExists {
        /// The token.
        label: String,
        /// The prefix.
        prefix: String,
    },
    /// The token lacks a mechanism kekd needs.
    #[error(
        "token {label:?} does not offer {mechanism}, which kekd needs (YubiHSM 2 and TPMs through tpm2-pkcs11 \
         do not implement AES-GCM); use a token that does"
    )]
    MechanismMissing {
        /// The token.
        label: String,
        /// The mechanism.
        mechanism: &'static str,
    },
    /// Someone else changed the metadata between our read and write.
    #[error(
        "the keyring metadata in token {label:?} changed while this command ran (another admin?); run it again"
    )]
    Conflict {
        /// The token.
        label: String,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 {op} failed: {reason}")]
    Call {
        /// The operation.
        op: &'static str,
        /// The library's error.
        reason: String,
    },
}

impl Pkcs11Error {
    /// Configuration problems (exit 78) versus runtime ones.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::Module { .. }
                | Self::NoToken { .. }
                | Self::WrongPin { .. }
                | Self::PinLocked { .. }
                | Self::NoKeyring { .. }
                | Self::KeyringExists { .. }
                | Self::KeyMissing { .. }
                | Self::MechanismMissing { .. }
        )
    }
}

/// Errors that mean the connection to the token (or the login) is gone.
fn is_connection_loss(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::SlotIdInvalid,
            _
        )
    )
}

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
    settings: Pkcs11Settings,
    metrics: OnceLock<Arc<crate::metrics::Metrics>>,
    /// The queue of the `pool_size` threads that make the token calls of
    /// async callers ([`Token::run`]); started on first use.
    workers: OnceLock<std::sync::mpsc::Sender<Job>>,
    state: Mutex<Conn>,
    /// Signalled whenever a session goes back to the pool or is closed.
    freed: std::sync::Condvar,
}

struct Conn {
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
    fn with_session<T>(
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
    async fn run<T: Send + 'static>(
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

    fn label_of(&self, version: KeyVersion) -> String {
        format!("{}v{version}", self.settings.key_label_prefix)
    }

    fn metadata_prefix(&self) -> String {
        format!("{}{METADATA_LABEL}@", self.settings.key_label_prefix)
    }

    /// Every metadata object of this keyring, as (revision, handle), oldest first.
    ///
    /// Metadata is never modified in place (tokens such as SoftHSM refuse to
    /// change a data object's value): each write creates revision n+1, then
    /// deletes the older ones. A crash in between leaves both; readers take
    /// the newest and the next write removes the rest.
    fn metadata_objects(&self, s: &Session) -> Result<Vec<(u64, ObjectHandle)>, CkError> {
        let prefix = self.metadata_prefix();
        let mut out = Vec::new();
        for handle in s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(APPLICATION.as_bytes().to_vec()),
        ])? {
            let label = s
                .get_attributes(handle, &[AttributeType::Label])?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Label(l) => Some(l),
                    _ => None,
                })
                .unwrap_or_default();
            let revision = std::str::from_utf8(&label)
                .ok()
                .and_then(|l| l.strip_prefix(&prefix))
                .and_then(|r| r.parse::<u64>().ok());
            if let Some(r) = revision {
                out.push((r, handle));
            }
        }
        out.sort_unstable_by_key(|&(revision, _)| revision);
        Ok(out)
    }

    /// The newest metadata revision and its bytes, if there is any.
    fn read_metadata(&self, s: &Session) -> Result<Option<(u64, Vec<u8>)>, CkError> {
        let objects = self.metadata_objects(s)?;
        let Some(&(revision, handle)) = objects.last() else {
            return Ok(None);
        };
        let value = s
            .get_attributes(handle, &[AttributeType::Value])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Some((revision, value)))
    }

    /// The keyring metadata stored in the token.
    ///
    /// # Errors
    /// No keyring, an unreadable one, or token errors.
    pub fn load_metadata(&self) -> Result<KeyringFile, BackendError> {
        let read = self.with_session("read the keyring metadata", |s, _| self.read_metadata(s))?;
        let (_, bytes) = read.ok_or_else(|| Pkcs11Error::NoKeyring {
            label: self.settings.token_label.clone(),
            prefix: self.settings.key_label_prefix.clone(),
        })?;
        let file = KeyringFile::parse(&bytes).map_err(|error| {
            BackendError::Store(StoreError::Parse {
                path: PathBuf::from(self.describe()),
                error,
            })
        })?;
        if file.material != Material::Token {
            return Err(BackendError::Store(StoreError::Parse {
                path: PathBuf::from(self.describe()),
                error: crate::keyring::store::ParseError {
                    line: Some(1),
                    field: None,
                    reason: "is a local keyring, not token metadata".to_owned(),
                },
            }));
        }
        Ok(file)
    }

    fn describe(&self) -> String {
        format!(
            "pkcs11 token {:?} (prefix {:?})",
            self.settings.token_label, self.settings.key_label_prefix
        )
    }

    fn key_template(&self, id: &KeyringId, version: KeyVersion) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(key_object_id(id, version)),
        ]
    }

    fn find_key(
        &self,
        s: &Session,
        id: &KeyringId,
        version: KeyVersion,
    ) -> Result<Vec<ObjectHandle>, CkError> {
        s.find_objects(&self.key_template(id, version))
    }

    /// Writes new metadata: generates the token keys of versions that are new
    /// in `new`, checks nobody changed the metadata since `old` was read,
    /// writes it, then destroys the objects of destroyed versions.
    ///
    /// # Errors
    /// Token errors; [`Pkcs11Error::Conflict`]; [`Pkcs11Error::KeyringExists`]
    /// when `old` is `None` but a keyring exists.
    pub fn write_metadata(
        &self,
        old: Option<&KeyringFile>,
        new: &KeyringFile,
    ) -> Result<(), BackendError> {
        let encoded = new.encode();
        let old_encoded = old.map(KeyringFile::encode);
        self.with_session("write the keyring metadata", |s, _| {
            // 1. Compare first (nothing touched on a refusal), then write a new revision and drop the older ones.
            let objects = self.metadata_objects(s)?;
            let current = self.read_metadata(s)?;
            let revision = match (&current, &old_encoded) {
                (None, None) => 1,
                (Some((rev, bytes)), Some(expected)) if bytes.as_slice() == expected.as_bytes() => {
                    rev + 1
                }
                (Some(_), None) => {
                    return Ok(Err(Pkcs11Error::KeyringExists {
                        label: self.settings.token_label.clone(),
                        prefix: self.settings.key_label_prefix.clone(),
                    }));
                }
                _ => {
                    return Ok(Err(Pkcs11Error::Conflict {
                        label: self.settings.token_label.clone(),
                    }));
                }
            };
            // 1. Keys for versions that have none yet.
            for v in &new.versions {
                if !v.info.state.has_material() {
                    continue;
                }
                let existing = self.find_key(s, &new.id, v.info.version)?;
                let is_new = old.is_none_or(|o| {
                    !o.versions
                        .iter()
                        .any(|ov| ov.info.version == v.info.version)
                });
                if is_new {
                    // Left by a rotate that died before writing metadata:
                    // never used, so safe to replace.
                    for h in existing {
                        s.destroy_object(h)?;
                    }
                    self.generate_key(s, &new.id, v.info.version)?;
                }
            }
            s.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(APPLICATION.as_bytes().to_vec()),
                Attribute::Label(format!("{}{revision}", self.metadata_prefix()).into_bytes()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Modifiable(false),
                Attribute::Value(encoded.as_bytes().to_vec()),
            ])?;
            for (_, handle) in objects {
                s.destroy_object(handle)?;
            }
            // 3. Erase the material of destroyed versions.
            for v in new
                .versions
                .iter()
                .filter(|v| v.info.state == KeyState::Destroyed)
            {
                for h in self.find_key(s, &new.id, v.info.version)? {
                    s.destroy_object(h)?;
                }
            }
            Ok(Ok(()))
        })??;
        Ok(())
    }

    fn generate_key(
        &self,
        s: &Session,
        id: &KeyringId,
        version: KeyVersion,
    ) -> Result<ObjectHandle, CkError> {
        let mut template = self.key_template(id, version);
        template.extend([
            Attribute::Label(self.label_of(version).into_bytes()),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
        ]);
        // Only AES-GCM, so the key cannot be used as a raw block cipher
        // (ECB), in another mode, or to wrap other keys, whoever holds the
        // PIN. A token that does not know the attribute gets the key without
        // it (its other attributes still forbid wrapping and extraction).
        let mut restricted = template.clone();
        restricted.push(Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]));
        match s.generate_key(&Mechanism::AesKeyGen, &restricted) {
            Err(CkError::Pkcs11(
                RvError::AttributeTypeInvalid | RvError::TemplateInconsistent,
                _,
            )) => {
                warn!(
                    "this token does not support CKA_ALLOWED_MECHANISMS; the new key is \
                     restricted to encrypt/decrypt by its other attributes only"
                );
                s.generate_key(&Mechanism::AesKeyGen, &template)
            }
            result => result,
        }
    }
}

/// `CKA_ID` of a version's key object: keyring id ‖ version (BE u32).
fn key_object_id(id: &KeyringId, version: KeyVersion) -> Vec<u8> {
    let mut v = id.as_bytes().to_vec();
    v.extend_from_slice(&version.get().to_be_bytes());
    v
}

/// Serves the keyring stored in a token.
#[derive(Debug, Clone)]
pub struct Pkcs11Backend {
    token: Arc<Token>,
}

impl Pkcs11Backend {
    /// Connects to the token (exit 78 on module, token or PIN problems).
    ///
    /// # Errors
    /// See [`Token::connect`].
    pub fn connect(settings: Pkcs11Settings) -> Result<Self, Pkcs11Error> {
        Ok(Self {
            token: Token::connect(settings)?,
        })
    }

    /// The connection to the token.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }
}

impl Backend for Pkcs11Backend {
    fn describe(&self) -> String {
        self.token.describe()
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn attach_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.token.metrics.set(metrics);
    }

    fn load(&self) -> Result<Keyring, BackendError> {
        let file = self.token.load_metadata()?;
        let id = file.id;
        let mut versions = Vec::with_capacity(file.versions.len());
        for v in file.versions {
            let version = v.info.version;
            let key = if v.info.state.has_material() {
                // Resolve the object now: a key deleted behind kekd's back
                // makes this keyring invalid rather than fail per call.
                let found = self.token.with_session("find a key object", |s, g| {
                    Ok((self.token.find_key(s, &id, version)?, g))
                })?;
                let (handles, generation) = found;
                let &[handle] = handles.as_slice() else {
                    return Err(Pkcs11Error::KeyMissing {
                        version,
                        label: self.token.label_of(version),
                    }
                    .into());
                };
                Some(KeyHandle::Pkcs11(Pkcs11Key {
                    token: Arc::clone(&self.token),
                    object: Arc::new(KeyObject {
                        object_id: key_object_id(&id, version),
                        cached: Mutex::new((generation, handle)),
                    }),
                }))
            } else {
                None
            };
            versions.push((v.info, key));
        }
        Keyring::new(id, versions).map_err(|e| BackendError::Keyring {
            source_name: self.describe(),
            error: Box::new(e),
        })
    }

    fn revision(&self) -> Option<String> {
        None
    }

    fn watch_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn state_anchor(&self) -> Option<PathBuf> {
        Some(state_anchor(&self.token.settings))
    }
}

impl KeyringStore for Pkcs11Backend {
    fn name(&self) -> String {
        self.token.describe()
    }

    fn anchor(&self) -> PathBuf {
        state_anchor(&self.token.settings)
    }

    fn generate(&self, now: crate::keyring::Timestamp) -> Result<KeyringFile, BackendError> {
        Ok(KeyringFile::generate_metadata(now).map_err(StoreError::from)?)
    }

    fn read(&self) -> Result<KeyringFile, BackendError> {
        self.token.load_metadata()
    }

    fn create(&self, file: &KeyringFile) -> Result<(), BackendError> {
        self.token.write_metadata(None, file)
    }

    fn replace(&self, old: &KeyringFile, new: &KeyringFile) -> Result<(), BackendError> {
        self.token.write_metadata(Some(old), new)
    }
}

/// The per-node file the usage counters, audit log and admin lock of a
/// token keyring sit beside: `<state_dir>/pkcs11-<token label>-<prefix>`.
pub fn state_anchor(s: &Pkcs11Settings) -> PathBuf {
    let clean = |x: &str| {
        x.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    s.state_dir.join(format!(
        "pkcs11-{}-{}",
        clean(&s.token_label),
        clean(&s.key_label_prefix)
    ))
}

/// One version's key object in the token.
pub struct Pkcs11Key {
    token: Arc<Token>,
    object: Arc<KeyObject>,
}

/// How to find a key object, with its handle cached per connection generation.
struct KeyObject {
    object_id: Vec<u8>,
    cached: Mutex<(u64, ObjectHandle)>,
}

impl KeyObject {
    fn handle(&self, s: &Session, generation: u64) -> Result<ObjectHandle, CkError> {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.0 == generation {
            return Ok(cached.1);
        }
        let found = s.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(self.object_id.clone()),
        ])?;
        let handle = *found.first().ok_or(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            Function::FindObjects,
        ))?;
        *cached = (generation, handle);
        Ok(handle)
    }
}

impl Pkcs11Key {
    pub(crate) async fn seal(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        plaintext: &Plaintext,
    ) -> Result<(Nonce, Vec<u8>), BackendError> {
        let (mut iv, aad) = (*nonce, aad.to_vec());
        let data = zeroize::Zeroizing::new(plaintext.expose_secret().to_vec());
        let object = Arc::clone(&self.object);
        self.token
            .run("encrypt", move |s, g| {
                let handle = object.handle(s, g)?;
                let sealed = {
                    let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                    s.encrypt(&Mechanism::AesGcm(params), handle, &data)?
                };
                // Some HSMs (FIPS modes) generate the IV themselves and write
                // it back into the parameters: the envelope must carry
                // whatever IV was really used.
                Ok((iv, sealed))
            })
            .await
            .map_err(BackendError::from)
    }

    pub(crate) async fn open(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, BackendError> {
        let (mut iv, aad, data) = (*nonce, aad.to_vec(), sealed.to_vec());
        let object = Arc::clone(&self.object);
        match self
            .token
            .run("decrypt", move |s, g| {
                let handle = object.handle(s, g)?;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                match s.decrypt(&Mechanism::AesGcm(params), handle, &data) {
                    Ok(pt) => Ok(Some(pt)),
                    // C_Decrypt itself refused the data (a bad tag: SoftHSM
                    // says GENERAL_ERROR, others ENCRYPTED_DATA_INVALID). The
                    // operation is over and the session clean: an answer,
                    // not a failure of the token.
                    Err(e @ CkError::Pkcs11(_, Function::Decrypt)) if !is_connection_loss(&e) => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
        {
            Ok(Some(pt)) => Ok(Plaintext::new(pt)),
            Ok(None) => Err(BackendError::Decrypt),
            // A key handle that cannot be used, or any other token failure,
            // is kekd's problem, never "bad ciphertext".
            Err(e) => Err(e.into()),
        }
    }

    /// Identifies the key object. A token never reveals key bytes, so the
    /// fingerprint is of the object's `CKA_ID` (keyring id and version).
    pub(crate) fn fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint::of_public(b"kekd/pkcs11-object-id/v1\0", &self.object.object_id)
    }
}
