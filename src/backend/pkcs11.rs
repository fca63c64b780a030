//! The PKCS#11 backend: KEKs generated and kept inside an HSM token.
//!
//! # Where things live
//!
//! - Each KEK version is an AES-256 secret-key object generated **in the
//!   token** (`CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not extractable,
//!   encrypt/decrypt only), labelled `<prefix>v<version>`, with `CKA_ID` =
//!   keyring id (16 bytes) ‖ version (big-endian u32), restricted to
//!   `CKM_AES_GCM`.
//! - The keyring's metadata — id, versions, states, times; the same text
//!   format as a local keyring, but with the `kekd-keyring-meta v2` magic and
//!   no key fields, followed by each version's key check value and a MAC —
//!   is one private data object in the same token, labelled
//!   `<prefix>keyring@<revision>` (application `kekd`). The MAC is made in
//!   the token under a key of its own (`<prefix>metadata-key`, `CKA_ID` =
//!   keyring id ‖ 00000000). Every kekd pointed at the token reads the same
//!   metadata, so a rotation made once is seen by all nodes without copying
//!   files.
//! - kekd reads **private** objects only, and uses a key object only if its
//!   attributes show the token generated it and never lets it out, and it
//!   opens the check value recorded when kekd generated it
//!   ([`objects`] says why and how).
//! - Metadata an older kekd wrote (`kekd-keyring-meta v1`: no check values,
//!   no MAC) is refused until `kekd admin upgrade-token` adopts it
//!   (`pkcs11/upgrade.rs` says what it checks and what a crash leaves).
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

use std::collections::{BTreeMap, HashMap, HashSet};
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

use crate::backend::{Backend, BackendError, ErrorKind, KeyringStore};
use crate::envelope::Nonce;
use crate::id::{KeyVersion, KeyringId};
use crate::kek::{KeyFuture, KeyHandle};
use crate::keyring::store::{KeyringFile, Material, StoreError};
use crate::keyring::{KeyState, Keyring};
use crate::secret::{KeyFingerprint, Plaintext};

mod objects;
mod settings;
pub use settings::{
    DEFAULT_KEY_LABEL_PREFIX, DEFAULT_POOL_SIZE, DEFAULT_STATE_DIR, Pkcs11Settings,
};
mod upgrade;

use objects::{FrameError, Seal};
pub use upgrade::{AdoptedVersion, MetadataKey, Upgrade, UpgradeOutcome};

/// Label suffix of the metadata object.
const METADATA_LABEL: &str = "keyring";
/// Label suffix of the metadata-authentication key.
const METADATA_KEY_LABEL: &str = "metadata-key";
/// `CKA_APPLICATION` of the metadata object.
const APPLICATION: &str = "kekd";
/// GCM tag length in bits.
const TAG_BITS: u64 = 128;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most public look-alike objects logged (and remembered) one by one.
const MAX_PUBLIC_REPORTED: usize = 256;

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
    /// A key object kekd will not use.
    #[error(
        "key object {label} of {what} {reason}: refusing it; kekd uses only keys it generated in the token \
         (private, sensitive, never extractable, CKA_LOCAL, AES-GCM only). If kekd did not make this object, delete it \
         (`pkcs11-tool --login --delete-object --type secrkey --id {id}`) and restore the original from the \
         token's backup"
    )]
    KeyRefused {
        /// `version N` or `the metadata key`.
        what: String,
        /// The object's label.
        label: String,
        /// Its `CKA_ID`, hex.
        id: String,
        /// The attribute at fault.
        reason: &'static str,
    },
    /// Two private objects claim the same place.
    #[error(
        "the token holds two private objects for {what}: {first} and {second}; kekd will not guess which one is \
         its own — delete the one kekd did not create (`pkcs11-tool --login --list-objects` shows both)"
    )]
    Duplicate {
        /// What both claim to be.
        what: String,
        /// One, by label and handle.
        first: String,
        /// The other.
        second: String,
    },
    /// The metadata object fails authentication.
    #[error(
        "keyring metadata object {label} fails authentication ({reason}): it was edited or planted, not written by \
         kekd; refusing it. If no kekd wrote it, delete it (`pkcs11-tool --login --delete-object --type data \
         --label {label}`): kekd then reads the revision before it"
    )]
    MetadataForged {
        /// The object's label.
        label: String,
        /// What failed.
        reason: String,
    },
    /// A version's key object is not the key kekd generated for it.
    #[error(
        "the key object {label} of version {version} is not the key kekd generated for it (its key check value \
         does not open): refusing it; delete the impostor and restore the original key object from the token's \
         backup"
    )]
    CheckFailed {
        /// The version.
        version: KeyVersion,
        /// The object's label.
        label: String,
    },
    /// Metadata written by a kekd without authentication.
    #[error(
        "the keyring metadata in token {label:?} (prefix {prefix:?}) was written by an older kekd, without a MAC \
         or key check values, and is no longer served (a planted or edited object could not be told from kekd's \
         own); as the PIN holder, run `kekd admin upgrade-token --config …` once (it checks every key object and \
         authenticates the metadata; docs/hsm.md), or keep the kekd version that wrote it serving this token"
    )]
    LegacyMetadata {
        /// The token.
        label: String,
        /// The prefix.
        prefix: String,
    },
    /// `upgrade-token` found a key object this kekd would not serve.
    #[error(
        "cannot upgrade token {token:?}: the key object {label} of {what} (CKA_ID {id}) {reason}; this kekd uses \
         only keys the token generated and keeps to itself (private, sensitive, never extractable, CKA_LOCAL, \
         AES-GCM only), so it will not adopt it, and nothing was written. Keep the older kekd serving this \
         token; or, with the older kekd, rotate to a new version and promote it, rewrite the stored data, \
         retire and destroy {what}, then run `kekd admin upgrade-token --config …` again (a token that cannot \
         restrict keys to CKM_AES_GCM cannot be served by this kekd at all)"
    )]
    NotAdoptable {
        /// The token.
        token: String,
        /// `version N`.
        what: String,
        /// The object's label.
        label: String,
        /// Its `CKA_ID`, hex.
        id: String,
        /// The attribute at fault.
        reason: &'static str,
    },
    /// The token cannot restrict keys to AES-GCM.
    #[error(
        "token {label:?} cannot make a key restricted to CKM_AES_GCM (CKA_ALLOWED_MECHANISMS): {reason}; kekd \
         requires it, so nothing was created — use a token (or firmware) that supports CKA_ALLOWED_MECHANISMS"
    )]
    RestrictionUnsupported {
        /// The token.
        label: String,
        /// What the token did.
        reason: String,
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
    /// What went wrong, for everything outside this backend: one kind per
    /// error, chosen here and nowhere else.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Module { .. }
            | Self::KeyRefused { .. }
            | Self::MechanismMissing { .. }
            | Self::LegacyMetadata { .. }
            | Self::NotAdoptable { .. }
            | Self::RestrictionUnsupported { .. } => ErrorKind::Misconfigured,
            Self::NoToken { .. } => ErrorKind::StoreMissing,
            Self::WrongPin { .. } | Self::PinLocked { .. } => ErrorKind::AuthenticationFailed,
            Self::Unavailable { .. } => ErrorKind::Unavailable,
            Self::KeyMissing { .. }
            | Self::Duplicate { .. }
            | Self::MetadataForged { .. }
            | Self::CheckFailed { .. } => ErrorKind::Damaged,
            Self::NoKeyring { .. } => ErrorKind::NoKeyring,
            Self::KeyringExists { .. } => ErrorKind::KeyringExists,
            Self::Conflict { .. } => ErrorKind::Io,
            Self::Call { .. } => ErrorKind::Internal,
        }
    }
}

impl From<Pkcs11Error> for BackendError {
    fn from(e: Pkcs11Error) -> Self {
        Self::new(e.kind(), e)
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

/// An object deleted (by another process) since the search that found it.
/// How often one load reads the token again when a handle vanished mid-read.
const LOAD_ATTEMPTS: u32 = 4;

fn vanished(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)
    )
}

/// The value of an attribute read for a report only: `None` when the object
/// vanished or the token would not say; only a lost connection is an error.
fn readable<T>(read: Result<T, CkError>) -> Result<Option<T>, CkError> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_connection_loss(&e) => Err(e),
        Err(_) => Ok(None),
    }
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
    /// Public objects already reported (by kind, label and `CKA_ID`, not by
    /// handle), so each is logged once; at most `MAX_PUBLIC_REPORTED`, plus
    /// `""` once the rest are summed up in one line.
    warned: Mutex<HashSet<String>>,
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

    fn metadata_key_label(&self) -> String {
        format!("{}{METADATA_KEY_LABEL}", self.settings.key_label_prefix)
    }

    /// Every private metadata object of this keyring, as (revision, handle),
    /// oldest first. Public objects are never read (anyone can create them).
    ///
    /// Metadata is never modified in place (tokens such as SoftHSM refuse to
    /// change a data object's value): each write creates revision n+1, then
    /// deletes the older ones. A crash in between leaves both; readers take
    /// the newest and the next write removes the rest.
    fn metadata_objects(&self, s: &Session) -> Result<Vec<(u64, ObjectHandle)>, CkError> {
        let prefix = self.metadata_prefix();
        let mut out = Vec::new();
        for handle in s.find_objects(&objects::private(vec![
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(APPLICATION.as_bytes().to_vec()),
        ]))? {
            // Deleted since the search (another node's write dropping the
            // revisions older than its own): not a revision any more.
            let label = match objects::label(s, handle) {
                Ok(label) => label,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(e),
            };
            if let Some(r) = revision_of(&label, &prefix) {
                out.push((r, handle));
            }
        }
        out.sort_unstable_by_key(|&(revision, _)| revision);
        Ok(out)
    }

    /// The newest metadata revision, unverified.
    fn read_metadata(
        &self,
        s: &Session,
    ) -> Result<Result<Option<RawMetadata>, Pkcs11Error>, CkError> {
        let objects = self.metadata_objects(s)?;
        let Some(&(revision, handle)) = objects.last() else {
            return Ok(Ok(None));
        };
        let label = format!("{}{revision}", self.metadata_prefix());
        if let [.., (r1, h1), (r2, h2)] = objects.as_slice()
            && r1 == r2
        {
            return Ok(Err(Pkcs11Error::Duplicate {
                what: format!("keyring metadata revision {revision}"),
                first: format!("{label} (handle {h1})"),
                second: format!("{label} (handle {h2})"),
            }));
        }
        let value = s
            .get_attributes(handle, &[AttributeType::Value])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Ok(Some(RawMetadata {
            revision,
            label,
            value,
        })))
    }

    /// The newest metadata, its MAC verified under the keyring's metadata
    /// key and its key check values complete. Key objects are not looked at
    /// (`kekd admin list` must still work when one is gone).
    fn read_verified(
        &self,
        s: &Session,
    ) -> Result<Result<Option<Verified>, BackendError>, CkError> {
        let raw = match self.read_metadata(s)? {
            Ok(Some(raw)) => raw,
            Ok(None) => return Ok(Ok(None)),
            Err(e) => return Ok(Err(e.into())),
        };
        let forged = |reason: String| -> BackendError {
            Pkcs11Error::MetadataForged {
                label: raw.label.clone(),
                reason,
            }
            .into()
        };
        // The next write is revision + 1: a revision kekd could never
        // follow is not one it wrote.
        if raw.revision == u64::MAX {
            return Ok(Err(forged(
                "its revision number is the largest possible, which kekd never writes".to_owned(),
            )));
        }
        let framed = match objects::split(&raw.value) {
            Ok(f) => f,
            Err(FrameError::Legacy) => {
                return Ok(Err(Pkcs11Error::LegacyMetadata {
                    label: self.settings.token_label.clone(),
                    prefix: self.settings.key_label_prefix.clone(),
                }
                .into()));
            }
            Err(FrameError::Malformed(why)) => return Ok(Err(forged(format!("its value {why}")))),
        };
        let file = match self.parse_body(framed.body) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let key = match self.find_key_object(s, &file.id, None)? {
            Ok(Some(key)) => key,
            Ok(None) => {
                return Ok(Err(forged(format!(
                    "the token holds no private metadata key ({}) for keyring {}",
                    self.metadata_key_label(),
                    file.id
                ))));
            }
            Err(e) => return Ok(Err(e.into())),
        };
        if !framed
            .mac
            .opens(s, key, &objects::mac_aad(raw.revision, framed.signed))?
        {
            return Ok(Err(forged("its MAC does not verify".to_owned())));
        }
        // Authenticated, so only a kekd bug could break these; still checked.
        for v in &file.versions {
            if v.info.state.has_material() != framed.checks.contains_key(&v.info.version) {
                return Ok(Err(forged(format!(
                    "version {} and its key check value do not match",
                    v.info.version
                ))));
            }
        }
        if framed.checks.len()
            != file
                .versions
                .iter()
                .filter(|v| v.info.state.has_material())
                .count()
        {
            return Ok(Err(forged(
                "it has a key check value of no version".to_owned(),
            )));
        }
        Ok(Ok(Some(Verified {
            revision: raw.revision,
            body: framed.body.to_vec(),
            checks: framed.checks,
            file,
        })))
    }

    fn parse_body(&self, body: &[u8]) -> Result<KeyringFile, BackendError> {
        let file = KeyringFile::parse(body).map_err(|error| {
            // Token metadata, not a file: no advice to move a file aside.
            BackendError::new(
                ErrorKind::Damaged,
                StoreError::Parse {
                    path: PathBuf::from(self.describe()),
                    error,
                },
            )
        })?;
        if file.material != Material::Token {
            return Err(BackendError::new(
                ErrorKind::Damaged,
                StoreError::Parse {
                    path: PathBuf::from(self.describe()),
                    error: crate::keyring::store::ParseError {
                        line: Some(1),
                        field: None,
                        reason: "is a local keyring, not token metadata".to_owned(),
                    },
                },
            ));
        }
        Ok(file)
    }

    /// The keyring metadata stored in the token, authenticated.
    ///
    /// # Errors
    /// No keyring, an unreadable, unauthenticated or legacy one, or token errors.
    pub fn load_metadata(&self) -> Result<KeyringFile, BackendError> {
        let read =
            self.with_session("read the keyring metadata", |s, _| self.read_verified(s))??;
        read.map(|v| v.file).ok_or_else(|| {
            Pkcs11Error::NoKeyring {
                label: self.settings.token_label.clone(),
                prefix: self.settings.key_label_prefix.clone(),
            }
            .into()
        })
    }

    /// Logs, once each, the public objects that look like kekd's: kekd never
    /// makes one, so someone without the PIN did.
    ///
    /// Only a report: anyone who reaches the token can create and delete
    /// public objects at will, so an object that is gone (or unreadable) by
    /// the time its label is read is skipped, never a failed load; and at
    /// most [`MAX_PUBLIC_REPORTED`] distinct objects are remembered and
    /// logged, then one line says that more were not.
    fn report_public(&self, s: &Session, id: Option<&KeyringId>) -> Result<(), CkError> {
        // (what identifies the object across handles, the log text)
        let mut seen = Vec::new();
        for handle in s.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(APPLICATION.as_bytes().to_vec()),
            Attribute::Private(false),
        ])? {
            let Some(label) = readable(objects::label(s, handle))? else {
                continue;
            };
            if label.starts_with(&self.metadata_prefix()) {
                seen.push((
                    format!("data {label:?}"),
                    format!("data object {label:?} (handle {handle})"),
                ));
            }
        }
        for handle in s.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Private(false),
        ])? {
            let Some(label) = readable(objects::label(s, handle))? else {
                continue;
            };
            let Some(object_id) = readable(objects::object_id(s, handle))? else {
                continue;
            };
            if label.starts_with(&self.settings.key_label_prefix)
                || id.is_some_and(|id| object_id.starts_with(id.as_bytes()))
            {
                seen.push((
                    format!("secrkey {label:?} {}", hex(&object_id)),
                    format!(
                        "secret key {label:?} (CKA_ID {}, handle {handle})",
                        hex(&object_id)
                    ),
                ));
            }
        }
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, object) in seen {
            if warned.contains(&key) {
                continue;
            }
            if warned.len() >= MAX_PUBLIC_REPORTED {
                if warned.insert(String::new()) {
                    warn!(
                        token = %self.settings.token_label,
                        "more public objects that look like kekd's ignored; {MAX_PUBLIC_REPORTED} were \
                         logged, the others are not: kekd reads only private objects — list them with \
                         `pkcs11-tool --list-objects` (without --login) and delete them"
                    );
                }
                break;
            }
            warned.insert(key);
            warn!(
                token = %self.settings.token_label,
                "public {object} ignored: kekd reads only private objects; it was created without the \
                 PIN — delete it"
            );
        }
        Ok(())
    }

    /// The one private secret-key object with this keyring's `CKA_ID` for
    /// `version` (`None`: the metadata key), its attributes checked.
    fn find_key_object(
        &self,
        s: &Session,
        id: &KeyringId,
        version: Option<KeyVersion>,
    ) -> Result<Result<Option<ObjectHandle>, Pkcs11Error>, CkError> {
        let object_id = key_object_id(id, version);
        let what =
            version.map_or_else(|| "the metadata key".to_owned(), |v| format!("version {v}"));
        let found = s.find_objects(&self.key_template(&object_id))?;
        match found.as_slice() {
            [] => Ok(Ok(None)),
            &[handle] => match objects::verify_key(s, handle)? {
                None => Ok(Ok(Some(handle))),
                Some(reason) => Ok(Err(Pkcs11Error::KeyRefused {
                    what,
                    label: objects::label(s, handle)?,
                    id: hex(&object_id),
                    reason,
                })),
            },
            &[a, b, ..] => Ok(Err(Pkcs11Error::Duplicate {
                what: format!("the key object of {what} (CKA_ID {})", hex(&object_id)),
                first: format!("{:?} (handle {a})", objects::label(s, a)?),
                second: format!("{:?} (handle {b})", objects::label(s, b)?),
            })),
        }
    }

    fn describe(&self) -> String {
        format!(
            "pkcs11 token {:?} (prefix {:?})",
            self.settings.token_label, self.settings.key_label_prefix
        )
    }

    /// Finds private secret keys with this `CKA_ID`, whatever their type (so a
    /// look-alike of another type counts as a duplicate, not as absent).
    fn key_template(&self, object_id: &[u8]) -> Vec<Attribute> {
        objects::private(vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(object_id.to_vec()),
        ])
    }

    /// Writes new metadata: generates the token keys of versions that are new
    /// in `new` (and the metadata key, for a new keyring), checks nobody
    /// changed the metadata since `old` was read, writes it with its key
    /// check values and MAC, then destroys the objects of destroyed versions.
    ///
    /// # Errors
    /// Token errors; [`Pkcs11Error::Conflict`]; [`Pkcs11Error::KeyringExists`]
    /// when `old` is `None` but a keyring exists; the refusals of
    /// [`Token::load_metadata`].
    pub fn write_metadata(
        &self,
        old: Option<&KeyringFile>,
        new: &KeyringFile,
    ) -> Result<(), BackendError> {
        let body = new.encode();
        let old_encoded = old.map(KeyringFile::encode);
        // A fresh IV for each seal this write may make: a check value per
        // version and the MAC.
        let mut ivs = Vec::with_capacity(new.versions.len() + 1);
        for _ in 0..=new.versions.len() {
            let mut iv = [0u8; objects::IV_LEN];
            crate::secret::fill_random(&mut iv).map_err(StoreError::from)?;
            ivs.push(iv);
        }
        self.with_session("write the keyring metadata", |s, _| {
            let mut ivs = ivs.into_iter();
            // Invariant: one IV per version plus one were made above.
            let mut next_iv = || ivs.next().unwrap_or_default();
            // 1. Compare first (nothing touched on a refusal).
            let objects = self.metadata_objects(s)?;
            let current = match self.read_verified(s)? {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let revision = match (&current, &old_encoded) {
                (None, None) => 1,
                // `read_verified` refuses revision u64::MAX, so this cannot wrap.
                (Some(c), Some(expected)) if c.body == expected.as_bytes() => {
                    c.revision.saturating_add(1)
                }
                (Some(_), None) => {
                    return Ok(Err(Pkcs11Error::KeyringExists {
                        label: self.settings.token_label.clone(),
                        prefix: self.settings.key_label_prefix.clone(),
                    }
                    .into()));
                }
                _ => {
                    return Ok(Err(Pkcs11Error::Conflict {
                        label: self.settings.token_label.clone(),
                    }
                    .into()));
                }
            };
            // 2. The metadata key: a new keyring gets one.
            let mut created = Vec::new();
            let mac_key = match &current {
                None => match self.generate_key(s, &new.id, None)? {
                    Ok(h) => {
                        created.push(h);
                        h
                    }
                    Err(e) => return Ok(Err(e.into())),
                },
                Some(_) => match self.find_key_object(s, &new.id, None)? {
                    Ok(Some(h)) => h,
                    // read_verified found it a moment ago.
                    Ok(None) => {
                        return Ok(Err(Pkcs11Error::Conflict {
                            label: self.settings.token_label.clone(),
                        }
                        .into()));
                    }
                    Err(e) => return Ok(Err(e.into())),
                },
            };
            // 3. Keys (and check values) for versions that have none yet.
            let mut checks = BTreeMap::new();
            for v in &new.versions {
                if !v.info.state.has_material() {
                    continue;
                }
                let version = v.info.version;
                if let Some(check) = current.as_ref().and_then(|c| c.checks.get(&version)) {
                    checks.insert(version, *check);
                    continue;
                }
                // Left by a rotate that died before writing metadata:
                // never used, so safe to replace.
                for h in
                    s.find_objects(&self.key_template(&key_object_id(&new.id, Some(version))))?
                {
                    s.destroy_object(h)?;
                }
                let handle = match self.generate_key(s, &new.id, Some(version))? {
                    Ok(h) => h,
                    Err(e) => {
                        // Nothing of this write is left behind.
                        for h in created {
                            s.destroy_object(h)?;
                        }
                        return Ok(Err(e.into()));
                    }
                };
                created.push(handle);
                let check =
                    Seal::make(s, handle, next_iv(), &objects::check_aad(&new.id, version))?;
                checks.insert(version, check);
            }
            // 4. The new revision, then drop the older ones.
            self.create_revision(s, revision, &body, &checks, mac_key, next_iv())?;
            self.drop_older(s, objects, new)?;
            Ok(Ok(()))
        })??;
        Ok(())
    }

    /// Creates metadata revision `revision`: `body` followed by its key
    /// check values and a MAC under `mac_key` made with `iv`. This object is
    /// the commit point of every write: once it exists, readers take it.
    fn create_revision(
        &self,
        s: &Session,
        revision: u64,
        body: &str,
        checks: &BTreeMap<KeyVersion, Seal>,
        mac_key: ObjectHandle,
        iv: [u8; objects::IV_LEN],
    ) -> Result<ObjectHandle, CkError> {
        let signed = objects::frame(body, checks);
        let mac = Seal::make(s, mac_key, iv, &objects::mac_aad(revision, &signed))?;
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(APPLICATION.as_bytes().to_vec()),
            Attribute::Label(format!("{}{revision}", self.metadata_prefix()).into_bytes()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Value(objects::seal_frame(signed, &mac)),
        ])
    }

    /// After a new revision is written: deletes the `older` revisions, then
    /// erases the key objects of the versions `new` records as destroyed.
    /// Returns those versions whose key object was still there.
    fn drop_older(
        &self,
        s: &Session,
        older: Vec<(u64, ObjectHandle)>,
        new: &KeyringFile,
    ) -> Result<Vec<KeyVersion>, CkError> {
        for (_, handle) in older {
            s.destroy_object(handle)?;
        }
        // 5. Erase the material of destroyed versions.
        let mut erased = Vec::new();
        for v in new
            .versions
            .iter()
            .filter(|v| v.info.state == KeyState::Destroyed)
        {
            let template = self.key_template(&key_object_id(&new.id, Some(v.info.version)));
            let found = s.find_objects(&template)?;
            if !found.is_empty() {
                erased.push(v.info.version);
            }
            for h in found {
                s.destroy_object(h)?;
            }
        }
        Ok(erased)
    }

    /// Generates a version's key (`None`: the metadata key) in the token:
    /// AES-256, private, sensitive, never extractable, AES-GCM only. A token
    /// that cannot restrict the key to AES-GCM gets no key at all.
    fn generate_key(
        &self,
        s: &Session,
        id: &KeyringId,
        version: Option<KeyVersion>,
    ) -> Result<Result<ObjectHandle, Pkcs11Error>, CkError> {
        let object_id = key_object_id(id, version);
        let label = version.map_or_else(|| self.metadata_key_label(), |v| self.label_of(v));
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(object_id.clone()),
            Attribute::Label(label.clone().into_bytes()),
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
            // Only AES-GCM, so the key cannot be used as a raw block cipher
            // (ECB), in another mode, or to wrap other keys, whoever holds
            // the PIN.
            Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
        ];
        let handle = match s.generate_key(&Mechanism::AesKeyGen, &template) {
            Err(CkError::Pkcs11(
                rv @ (RvError::AttributeTypeInvalid
                | RvError::AttributeValueInvalid
                | RvError::TemplateInconsistent),
                _,
            )) => {
                return Ok(Err(Pkcs11Error::RestrictionUnsupported {
                    label: self.settings.token_label.clone(),
                    reason: format!("C_GenerateKey answered {rv}"),
                }));
            }
            result => result?,
        };
        // A token that ignored part of the template made a key kekd would
        // refuse to load: remove it and say so now.
        if let Some(reason) = objects::verify_key(s, handle)? {
            s.destroy_object(handle)?;
            return Ok(Err(Pkcs11Error::KeyRefused {
                what: version
                    .map_or_else(|| "the metadata key".to_owned(), |v| format!("version {v}")),
                label,
                id: hex(&object_id),
                reason,
            }));
        }
        Ok(Ok(handle))
    }
}

/// The newest metadata object, as read.
struct RawMetadata {
    revision: u64,
    label: String,
    value: Vec<u8>,
}

/// The newest metadata, authenticated.
struct Verified {
    revision: u64,
    /// The keyring text, as the MAC covered it.
    body: Vec<u8>,
    checks: BTreeMap<KeyVersion, Seal>,
    file: KeyringFile,
}

/// `CKA_ID` of a version's key object: keyring id ‖ version (BE u32); the
/// metadata key (`None`) has version 0, which no version has.
fn key_object_id(id: &KeyringId, version: Option<KeyVersion>) -> Vec<u8> {
    let mut v = id.as_bytes().to_vec();
    v.extend_from_slice(&version.map_or(0, KeyVersion::get).to_be_bytes());
    v
}

/// Lowercase hex, for `CKA_ID`s in messages.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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
        let token = &self.token;
        let (file, keys, generation) = token.with_session("load the keyring", |s, g| {
            // One pass over the token's objects. A handle that vanishes
            // mid-pass means the token changed under it (another node's
            // write, objects created or deleted without the PIN; SoftHSM
            // also renumbers handles when another process changes the
            // token): read it again, a few times, before calling it an error.
            let read_once = || {
                let read = token.read_verified(s)?;
                let id = match &read {
                    Ok(Some(v)) => Some(v.file.id),
                    _ => None,
                };
                token.report_public(s, id.as_ref())?;
                let verified = match read {
                    Ok(Some(v)) => v,
                    Ok(None) => {
                        return Ok(Err(BackendError::from(Pkcs11Error::NoKeyring {
                            label: token.settings.token_label.clone(),
                            prefix: token.settings.key_label_prefix.clone(),
                        })));
                    }
                    Err(e) => return Ok(Err(e)),
                };
                // Resolve and check every key object now: a key deleted, planted
                // or swapped behind kekd's back makes this keyring invalid
                // rather than fail (or succeed under the wrong key) per call.
                let id = verified.file.id;
                let mut keys = BTreeMap::new();
                for v in &verified.file.versions {
                    let version = v.info.version;
                    let Some(&check) = verified.checks.get(&version) else {
                        continue; // no material (read_verified matched them up)
                    };
                    let handle = match token.find_key_object(s, &id, Some(version))? {
                        Ok(Some(h)) => h,
                        Ok(None) => {
                            return Ok(Err(Pkcs11Error::KeyMissing {
                                version,
                                label: token.label_of(version),
                            }
                            .into()));
                        }
                        Err(e) => return Ok(Err(e.into())),
                    };
                    if !check.opens(s, handle, &objects::check_aad(&id, version))? {
                        return Ok(Err(Pkcs11Error::CheckFailed {
                            version,
                            label: objects::label(s, handle)?,
                        }
                        .into()));
                    }
                    keys.insert(version, (handle, check));
                }
                Ok(Ok((verified.file, keys, g)))
            };
            let mut attempts = 1;
            loop {
                match read_once() {
                    Err(e) if vanished(&e) && attempts < LOAD_ATTEMPTS => attempts += 1,
                    read => break read,
                }
            }
        })??;
        let id = file.id;
        let mut versions = Vec::with_capacity(file.versions.len());
        for v in file.versions {
            let key = keys.get(&v.info.version).map(|&(handle, check)| {
                Box::new(Pkcs11Key {
                    token: Arc::clone(&self.token),
                    object: Arc::new(KeyObject {
                        object_id: key_object_id(&id, Some(v.info.version)),
                        check,
                        check_aad: objects::check_aad(&id, v.info.version),
                        cached: Mutex::new((generation, handle)),
                    }),
                }) as Box<dyn KeyHandle>
            });
            versions.push((v.info, key));
        }
        Keyring::new(id, versions).map_err(|e| e.loading(self.describe()))
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

    fn generate(&self, now: crate::id::Timestamp) -> Result<KeyringFile, BackendError> {
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
    /// The check value recorded when kekd generated the key.
    check: Seal,
    check_aad: Vec<u8>,
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
        // Found again after a reconnect: it must still be the one private
        // key kekd generated, or the call fails (the next reload says why).
        let gone = CkError::Pkcs11(RvError::KeyHandleInvalid, Function::FindObjects);
        let found = s.find_objects(&objects::private(vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(self.object_id.clone()),
        ]))?;
        let &[handle] = found.as_slice() else {
            return Err(gone);
        };
        if objects::verify_key(s, handle)?.is_some()
            || !self.check.opens(s, handle, &self.check_aad)?
        {
            warn!(
                object_id = %hex(&self.object_id),
                "the key object found after a reconnect is not the key kekd loaded; not using it"
            );
            return Err(gone);
        }
        *cached = (generation, handle);
        Ok(handle)
    }
}

impl Pkcs11Key {
    async fn seal_on_token(
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

    async fn open_on_token(
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
            Ok(None) => Err(BackendError::decrypt()),
            // A key handle that cannot be used, or any other token failure,
            // is kekd's problem, never "bad ciphertext".
            Err(e) => Err(e.into()),
        }
    }

    /// Identifies the key. A token never reveals key bytes, so the
    /// fingerprint binds the object's `CKA_ID` and the key check value kekd
    /// recorded when it generated the key: only that key opens it, so a
    /// reload refuses a version whose key object was replaced.
    fn fingerprint_of(&self) -> KeyFingerprint {
        let mut bytes = self.object.object_id.clone();
        bytes.extend_from_slice(self.object.check.as_bytes());
        KeyFingerprint::of_public(b"kekd/pkcs11-key/v2\0", &bytes)
    }
}

/// Seal and open run inside the token, on its session pool's own threads.
impl KeyHandle for Pkcs11Key {
    fn seal<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        plaintext: &'a Plaintext,
    ) -> KeyFuture<'a, (Nonce, Vec<u8>)> {
        Box::pin(self.seal_on_token(nonce, aad, plaintext))
    }

    fn open<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        sealed: &'a [u8],
    ) -> KeyFuture<'a, Plaintext> {
        Box::pin(self.open_on_token(nonce, aad, sealed))
    }

    /// Identifies the key. A token never reveals key bytes, so the
    /// fingerprint binds the object's `CKA_ID` and the key check value kekd
    /// recorded when it generated the key: only that key opens it, so a
    /// reload refuses a version whose key object was replaced.
    fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint_of()
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }
}

/// The revision a metadata label names: `<prefix><digits>`, no sign, no
/// leading zero, no other spelling of the same number (so two objects can
/// never claim one revision under different labels).
fn revision_of(label: &str, prefix: &str) -> Option<u64> {
    label
        .strip_prefix(prefix)
        .filter(|r| !r.starts_with('0') && !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|r| r.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::revision_of;

    #[test]
    fn a_revision_label_has_exactly_one_spelling() {
        let p = "kekd-keyring@";
        assert_eq!(revision_of("kekd-keyring@1", p), Some(1));
        assert_eq!(
            revision_of("kekd-keyring@18446744073709551615", p),
            Some(u64::MAX)
        );
        for other in [
            "kekd-keyring@",
            "kekd-keyring@0",
            "kekd-keyring@05",
            "kekd-keyring@+5",
            "kekd-keyring@-5",
            "kekd-keyring@ 5",
            "kekd-keyring@5 ",
            "kekd-keyring@18446744073709551616",
            "other-keyring@5",
        ] {
            assert_eq!(revision_of(other, p), None, "{other}");
        }
    }
}
