//! Where KEKs live. The service and the keyring never name a concrete backend:
//! they load snapshots through [`Backend`] and seal/open through [`KeyHandle`].
//!
//! - [`local`]: KEKs in a keyring file on the node, AES-256-GCM in process.
//! - [`pkcs11`]: KEKs generated and kept in an HSM token, AES-GCM inside the
//!   token on a bounded session pool off the async workers; the keyring
//!   metadata lives in the token too, so every node sharing it agrees.

pub mod local;
pub mod pkcs11;

use std::fmt;

use crate::envelope::Nonce;
use crate::keyring::store::KeyringFile;
use crate::keyring::{Keyring, Timestamp};
use crate::secret::{KeyFingerprint, Plaintext};

/// A source of keyring snapshots.
pub trait Backend: fmt::Debug + Send + Sync + 'static {
    /// Names the source for logs and errors (a path, a token label); no secrets.
    fn describe(&self) -> String;

    /// `local` or `pkcs11`, for metrics.
    fn kind(&self) -> &'static str;

    /// Hands the backend the metrics registry (for HSM latency and pool
    /// gauges). The default ignores it.
    fn attach_metrics(&self, _metrics: std::sync::Arc<crate::metrics::Metrics>) {}

    /// Reads the keyring as it is now and returns a snapshot ready to serve.
    /// Blocking: call it from a blocking context.
    ///
    /// # Errors
    /// When the keyring cannot be read, parsed or validated.
    fn load(&self) -> Result<Keyring, BackendError>;

    /// A cheap token that changes whenever the keyring may have changed, so
    /// the reload loop loads only then. `None` means "load every poll".
    fn revision(&self) -> Option<String>;

    /// Files whose change should trigger a reload at once (watched through
    /// inotify, with polling as the fallback).
    fn watch_paths(&self) -> Vec<std::path::PathBuf>;

    /// The file the usage counters are kept beside, if any.
    fn state_anchor(&self) -> Option<std::path::PathBuf>;
}

/// Where the admin commands read and write a keyring: the file for the
/// local backend, the token's metadata object (and key objects) for PKCS#11.
/// Callers hold the keyring's admin lock around read → change → replace.
pub trait KeyringStore: fmt::Debug {
    /// Names the keyring for messages and the audit log.
    fn name(&self) -> String;

    /// The path beside which the lock, usage file and audit log live.
    fn anchor(&self) -> std::path::PathBuf;

    /// A new keyring (version 1 primary) of this store's kind; nothing written.
    ///
    /// # Errors
    /// When the RNG fails.
    fn generate(&self, now: Timestamp) -> Result<KeyringFile, BackendError>;

    /// Reads the keyring.
    ///
    /// # Errors
    /// Missing, unreadable or invalid.
    fn read(&self) -> Result<KeyringFile, BackendError>;

    /// Stores a new keyring; never replaces an existing one.
    ///
    /// # Errors
    /// When one exists, or the write fails (leaving nothing behind).
    fn create(&self, file: &KeyringFile) -> Result<(), BackendError>;

    /// Replaces `old` (as read under the lock) with `new`, atomically.
    ///
    /// # Errors
    /// When the write fails; `old` is then still in place.
    fn replace(&self, old: &KeyringFile, new: &KeyringFile) -> Result<(), BackendError>;
}

/// One KEK version, ready to seal and open.
pub enum KeyHandle {
    /// Material in this process.
    Local(Box<local::LocalKey>),
    /// An object in a PKCS#11 token.
    Pkcs11(pkcs11::Pkcs11Key),
}

impl KeyHandle {
    /// AES-256-GCM seal with `nonce`; returns the nonce actually used (an
    /// HSM may substitute its own) and the ciphertext followed by the tag.
    ///
    /// # Errors
    /// When the backend cannot perform the operation.
    pub async fn seal(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        plaintext: &Plaintext,
    ) -> Result<(Nonce, Vec<u8>), BackendError> {
        match self {
            Self::Local(key) => key
                .seal(nonce, aad, plaintext)
                .map(|sealed| (*nonce, sealed)),
            Self::Pkcs11(key) => key.seal(nonce, aad, plaintext).await,
        }
    }

    /// AES-256-GCM open of ciphertext followed by its tag.
    ///
    /// # Errors
    /// [`BackendError::Decrypt`] on any authentication failure, without detail.
    pub async fn open(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, BackendError> {
        match self {
            Self::Local(key) => key.open(nonce, aad, sealed),
            Self::Pkcs11(key) => key.open(nonce, aad, sealed).await,
        }
    }
}

impl KeyHandle {
    /// Identifies the key material, so a reload can refuse a keyring in which
    /// a version's material silently changed (its key id would then name two keys).
    pub fn fingerprint(&self) -> KeyFingerprint {
        match self {
            Self::Local(key) => key.fingerprint(),
            Self::Pkcs11(key) => key.fingerprint(),
        }
    }
}

impl fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(_) => f.write_str("KeyHandle::Local(<redacted>)"),
            Self::Pkcs11(_) => f.write_str("KeyHandle::Pkcs11"),
        }
    }
}

/// A backend failure. Messages name files, lines and versions, never bytes.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Authentication failed; deliberately opaque.
    #[error("ciphertext could not be decrypted")]
    Decrypt,
    /// Sealing failed inside the cipher.
    #[error("sealing failed")]
    Seal,
    /// The keyring file could not be read or is invalid.
    #[error(transparent)]
    Store(#[from] crate::keyring::store::StoreError),
    /// The PKCS#11 token failed or refused.
    #[error(transparent)]
    Pkcs11(#[from] pkcs11::Pkcs11Error),
    /// The keyring's content breaks a rule.
    #[error("keyring {source_name}: {error}")]
    Keyring {
        /// What was loaded ([`Backend::describe`]).
        source_name: String,
        /// The rule broken.
        error: Box<crate::keyring::KeyringError>,
    },
}
