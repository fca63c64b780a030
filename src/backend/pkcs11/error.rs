//! What can go wrong with a token, and the one mapping of it to a
//! backend-neutral [`ErrorKind`].

use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

use crate::backend::{BackendError, ErrorKind};
use crate::id::KeyVersion;

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
pub(super) fn is_connection_loss(e: &CkError) -> bool {
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
pub(super) const LOAD_ATTEMPTS: u32 = 4;

pub(super) fn vanished(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)
    )
}

/// The value of an attribute read for a report only: `None` when the object
/// vanished or the token would not say; only a lost connection is an error.
pub(super) fn readable<T>(read: Result<T, CkError>) -> Result<Option<T>, CkError> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_connection_loss(&e) => Err(e),
        Err(_) => Ok(None),
    }
}
