//! One KEK version as the keyring uses it, whatever holds it: the
//! [`KeyHandle`] trait every backend's key implements, and the
//! backend-neutral [`BackendError`] with its [`ErrorKind`].
//!
//! The service, the reload loop, the health checks and the exit codes act
//! on the kind alone; the message is the backend's own. A backend maps
//! each of its errors to exactly one kind (an exhaustive `match`, so a new
//! error cannot slip into a default), and may add a `fix` line that only it
//! knows how to write.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::envelope::Nonce;
use crate::secret::{KeyFingerprint, Plaintext};

/// The future a [`KeyHandle`] returns.
pub type KeyFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// One KEK version, ready to seal and open: material in this process, an
/// object in an HSM, a key in a key manager.
pub trait KeyHandle: Send + Sync + 'static {
    /// AES-256-GCM (or the key store's own authenticated cipher) seal with
    /// `nonce`; returns the nonce actually used (an HSM may substitute its
    /// own) and the ciphertext followed by the tag.
    ///
    /// # Errors
    /// When the key store cannot perform the operation.
    fn seal<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        plaintext: &'a Plaintext,
    ) -> KeyFuture<'a, (Nonce, Vec<u8>)>;

    /// Opens a ciphertext followed by its tag.
    ///
    /// # Errors
    /// [`ErrorKind::Decrypt`] on any authentication failure, without detail.
    fn open<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        sealed: &'a [u8],
    ) -> KeyFuture<'a, Plaintext>;

    /// Identifies the key material, so a reload can refuse a keyring in
    /// which a version's material silently changed (its key id would then
    /// name two keys).
    fn fingerprint(&self) -> KeyFingerprint;

    /// What holds the key, for `Debug` (never material): `local`, `pkcs11`.
    fn kind(&self) -> &'static str;
}

impl fmt::Debug for dyn KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `KeyHandle::Local(<redacted>)`, `KeyHandle::Pkcs11(<redacted>)`.
        let kind = self.kind();
        let mut first = kind.chars();
        let initial = first.next().map(|c| c.to_ascii_uppercase());
        write!(f, "KeyHandle::")?;
        if let Some(c) = initial {
            write!(f, "{c}")?;
        }
        write!(f, "{}(<redacted>)", first.as_str())
    }
}

/// What went wrong, as everything outside a backend sees it.
///
/// Exhaustive on purpose: adding a kind makes every place that acts on
/// kinds (the gRPC mapping, the reload loop, the exit codes) fail to
/// compile until it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The key store cannot be reached now (an HSM or key manager outage);
    /// retrying later may succeed. Calls answer UNAVAILABLE; a reload keeps
    /// the last good keyring without complaint.
    Unavailable,
    /// The key store the settings name is not there (no token with that
    /// label): at start a configuration problem, while serving an outage.
    StoreMissing,
    /// The key store holds no kekd keyring (never initialised, or its
    /// objects or file are gone).
    NoKeyring,
    /// A keyring is already there and the step would replace it.
    KeyringExists,
    /// Another admin command holds the keyring's lock.
    Locked,
    /// The key store refused kekd's credentials (a wrong or locked PIN, a
    /// revoked token).
    AuthenticationFailed,
    /// The settings are wrong, or the key store lacks what kekd needs (a
    /// module that does not load, a missing mechanism, a policy refusing a
    /// key's attributes, metadata that needs an upgrade first).
    Misconfigured,
    /// The keyring's content is damaged, forged or breaks a rule; kekd
    /// refuses to use it.
    Damaged,
    /// Reading or writing failed (I/O, the OS RNG), or the key store
    /// changed under a command (run it again).
    Io,
    /// The change is in effect but may not survive a power failure.
    NotDurable,
    /// A ciphertext did not authenticate.
    Decrypt,
    /// The backend failed in a way it does not expect (a cipher or HSM
    /// call failure).
    Internal,
}

impl ErrorKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [Self; 12] = [
        Self::Unavailable,
        Self::StoreMissing,
        Self::NoKeyring,
        Self::KeyringExists,
        Self::Locked,
        Self::AuthenticationFailed,
        Self::Misconfigured,
        Self::Damaged,
        Self::Io,
        Self::NotDurable,
        Self::Decrypt,
        Self::Internal,
    ];
}

/// A backend failure: its kind, the backend's own message, and an optional
/// second line saying how to fix it.
pub struct BackendError {
    kind: ErrorKind,
    error: Box<dyn std::error::Error + Send + Sync + 'static>,
    fix: Option<String>,
}

impl BackendError {
    /// `error` (the backend's own, its message shown as is) of `kind`.
    pub fn new(
        kind: ErrorKind,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            kind,
            error: error.into(),
            fix: None,
        }
    }

    /// A ciphertext did not authenticate: deliberately opaque.
    pub fn decrypt() -> Self {
        Self::new(ErrorKind::Decrypt, Opaque::Decrypt)
    }

    /// Sealing failed inside the cipher.
    pub fn seal() -> Self {
        Self::new(ErrorKind::Internal, Opaque::Seal)
    }

    /// Adds the line that says how to fix it.
    #[must_use]
    pub fn with_fix(mut self, fix: String) -> Self {
        self.fix = Some(fix);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// How to fix it, when the backend knows more than its message says.
    pub fn fix(&self) -> Option<&str> {
        self.fix.as_deref()
    }

    /// The backend's own error, when the caller is that backend.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendError")
            .field("kind", &self.kind)
            .field("error", &self.error)
            .field("fix", &self.fix)
            .finish()
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// The two cipher failures, with no detail to leak.
#[derive(Debug, thiserror::Error)]
enum Opaque {
    #[error("ciphertext could not be decrypted")]
    Decrypt,
    #[error("sealing failed")]
    Seal,
}
