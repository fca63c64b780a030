//! The keyring: KEK versions, their states, the primary, and key ids.
//!
//! A [`Keyring`] is an immutable snapshot. The server holds the current one
//! behind an atomic pointer and swaps in a new snapshot as a whole, so a
//! Status and the Encrypt it triggers always see the same primary and key id.
//! Where the key material lives is the backend's business ([`KeyHandle`]); the
//! durable file format of the local backend is in [`store`].

pub mod access;
pub mod lifecycle;
pub mod lock;
pub mod store;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::envelope::{self, Envelope, EnvelopeError};
use crate::id::{KeyId, KeyVersion, KeyringId, Timestamp};
use crate::kek::{BackendError, ErrorKind, KeyHandle};
use crate::secret::{Plaintext, RandomError, fill_random};

/// Where a KEK version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Decrypts, not yet used to encrypt: rolled out to every node first.
    Pending,
    /// Encrypts (exactly one version) and decrypts.
    Primary,
    /// A former primary: decrypts what it sealed.
    DecryptOnly,
    /// Refuses to decrypt; material kept so it can be restored.
    Retired,
    /// Material erased; the version stays so its id is never reused.
    Destroyed,
}

impl KeyState {
    /// Every state, in lifecycle order.
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Primary,
        Self::DecryptOnly,
        Self::Retired,
        Self::Destroyed,
    ];

    /// The name used in files, output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Primary => "primary",
            Self::DecryptOnly => "decrypt-only",
            Self::Retired => "retired",
            Self::Destroyed => "destroyed",
        }
    }

    /// Whether a version in this state may open ciphertexts.
    pub fn can_decrypt(self) -> bool {
        matches!(self, Self::Pending | Self::Primary | Self::DecryptOnly)
    }

    /// Whether a version in this state still holds key material.
    pub fn has_material(self) -> bool {
        !matches!(self, Self::Destroyed)
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = UnknownKeyState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(UnknownKeyState)
    }
}

/// A state name that is not one of [`KeyState::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state must be one of pending, primary, decrypt-only, retired, destroyed")]
pub struct UnknownKeyState;

/// Public facts about one version: everything but its key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Its number.
    pub version: KeyVersion,
    /// Its state.
    pub state: KeyState,
    /// When it was generated.
    pub created: Timestamp,
    /// When it last became primary.
    pub promoted: Option<Timestamp>,
    /// When it was retired.
    pub retired: Option<Timestamp>,
    /// When its material was destroyed.
    pub destroyed: Option<Timestamp>,
}

impl VersionInfo {
    /// A version created at `created` in state `state`, with no other events.
    pub fn new(version: KeyVersion, state: KeyState, created: Timestamp) -> Self {
        Self {
            version,
            state,
            created,
            promoted: None,
            retired: None,
            destroyed: None,
        }
    }
}

/// Checks the rules every keyring obeys, whatever its backend, and returns
/// the primary version.
///
/// # Errors
/// No version; versions not strictly increasing (duplicate or backwards);
/// not exactly one primary.
pub fn validate(infos: &[VersionInfo]) -> Result<KeyVersion, KeyringError> {
    let mut primary = None;
    let mut previous: Option<KeyVersion> = None;
    for info in infos {
        if previous.is_some_and(|p| info.version <= p) {
            return Err(KeyringError::Invalid(format!(
                "version {} appears after version {}; versions must be listed once each, in increasing order",
                info.version,
                previous.map_or(0, KeyVersion::get)
            )));
        }
        previous = Some(info.version);
        if info.state == KeyState::Primary {
            if let Some(p) = primary {
                return Err(KeyringError::Invalid(format!(
                    "versions {p} and {} are both primary; exactly one may be",
                    info.version
                )));
            }
            primary = Some(info.version);
        }
    }
    primary.ok_or_else(|| {
        KeyringError::Invalid(if infos.is_empty() {
            "keyring holds no version".to_owned()
        } else {
            "no version is primary; exactly one must be (kekd admin promote)".to_owned()
        })
    })
}

/// An immutable snapshot of a keyring, ready to seal and open.
#[derive(Debug)]
pub struct Keyring {
    id: KeyringId,
    primary: KeyVersion,
    primary_key_id: KeyId,
    versions: BTreeMap<KeyVersion, Slot>,
}

#[derive(Debug)]
struct Slot {
    info: VersionInfo,
    key: Option<Box<dyn KeyHandle>>,
}

impl Keyring {
    /// Builds a snapshot from versions in increasing order, each with its key
    /// handle (`None` exactly for destroyed versions).
    ///
    /// # Errors
    /// When [`validate`] fails or material is missing or present against its state.
    pub fn new(
        id: KeyringId,
        versions: Vec<(VersionInfo, Option<Box<dyn KeyHandle>>)>,
    ) -> Result<Self, KeyringError> {
        let infos: Vec<VersionInfo> = versions.iter().map(|(i, _)| i.clone()).collect();
        let primary = validate(&infos)?;
        let mut map = BTreeMap::new();
        for (info, key) in versions {
            if info.state.has_material() != key.is_some() {
                return Err(KeyringError::Invalid(format!(
                    "version {} is {} but its key material is {}",
                    info.version,
                    info.state,
                    if key.is_some() { "present" } else { "missing" }
                )));
            }
            map.insert(info.version, Slot { info, key });
        }
        Ok(Self {
            id,
            primary,
            primary_key_id: KeyId::new(&id, primary),
            versions: map,
        })
    }

    /// The keyring's id.
    pub fn id(&self) -> &KeyringId {
        &self.id
    }

    /// The version Encrypt uses.
    pub fn primary(&self) -> KeyVersion {
        self.primary
    }

    /// The key id Status and Encrypt report for this snapshot.
    pub fn primary_key_id(&self) -> &KeyId {
        &self.primary_key_id
    }

    /// Every version, in increasing order.
    pub fn versions(&self) -> impl Iterator<Item = &VersionInfo> {
        self.versions.values().map(|s| &s.info)
    }

    /// Seals `plaintext` under the primary version with a fresh random nonce.
    ///
    /// # Errors
    /// Empty or too long plaintext; the RNG or the backend failing.
    pub async fn encrypt(&self, plaintext: &Plaintext) -> Result<(KeyId, Vec<u8>), KeyringError> {
        check_plaintext_len(plaintext.len())?;
        let key = self.key(self.primary)?;
        let mut nonce = [0u8; envelope::NONCE_LEN];
        fill_random(&mut nonce)?;
        let aad = envelope::aad(&self.id, self.primary);
        let (nonce, sealed) = key.seal(&nonce, &aad, plaintext).await?;
        Ok((
            self.primary_key_id.clone(),
            Envelope::encode(self.primary, &nonce, &sealed),
        ))
    }

    /// Opens a ciphertext that Encrypt returned together with `key_id`.
    ///
    /// The key is chosen by `key_id` alone and must agree with the header;
    /// keys are never tried one after another.
    ///
    /// # Errors
    /// Foreign or malformed key id, key id and header disagreeing, unknown,
    /// retired or destroyed version, malformed envelope, or failed
    /// authentication ([`KeyringError::Decrypt`], deliberately opaque).
    pub async fn decrypt(
        &self,
        key_id: &str,
        ciphertext: &[u8],
    ) -> Result<(KeyVersion, Plaintext), KeyringError> {
        let (keyring, version) = KeyId::parse(key_id).map_err(|_| KeyringError::UnknownKeyId)?;
        if keyring != self.id {
            return Err(KeyringError::UnknownKeyId);
        }
        let envelope = Envelope::parse(ciphertext)?;
        if envelope.version != version {
            return Err(KeyringError::KeyIdMismatch {
                key_id: version,
                header: envelope.version,
            });
        }
        let key = self.key(version)?;
        let aad = envelope::aad(&self.id, version);
        let plaintext = key
            .open(envelope.nonce, &aad, envelope.sealed)
            .await
            .map_err(KeyringError::from_open)?;
        Ok((version, plaintext))
    }

    /// Seals and opens a canary under every decrypt-capable version, so a
    /// damaged key is found now rather than when the apiserver next needs it.
    ///
    /// # Errors
    /// The first version whose round trip fails.
    pub async fn self_check(&self) -> Result<(), KeyringError> {
        const CANARY: &[u8; 32] = b"kekd self-check canary, 32 bytes";
        for slot in self.versions.values() {
            let (Some(key), true) = (&slot.key, slot.info.state.can_decrypt()) else {
                continue;
            };
            let version = slot.info.version;
            let fail = |e: BackendError| KeyringError::SelfCheck {
                version,
                reason: e.to_string(),
            };
            let mut nonce = [0u8; envelope::NONCE_LEN];
            fill_random(&mut nonce)?;
            let aad = envelope::aad(&self.id, version);
            let (nonce, sealed) = key
                .seal(&nonce, &aad, &Plaintext::new(CANARY.to_vec()))
                .await
                .map_err(fail)?;
            let opened = key.open(&nonce, &aad, &sealed).await.map_err(fail)?;
            if opened.expose_secret() != CANARY {
                return Err(KeyringError::SelfCheck {
                    version,
                    reason: "the canary came back different".to_owned(),
                });
            }
        }
        // Tests count these lines to know how many checks ran.
        tracing::debug!(keyring = %self.id, "keyring self-check passed");
        Ok(())
    }

    /// Public view of each version with its material fingerprint, for
    /// [`lifecycle::check_successor`].
    pub fn views(&self) -> Vec<lifecycle::VersionView> {
        self.versions
            .values()
            .map(|s| lifecycle::VersionView {
                info: s.info.clone(),
                fingerprint: s.key.as_ref().map(|k| k.fingerprint()),
            })
            .collect()
    }

    /// The key handle of `version`, whatever its state (tests seal under
    /// versions that no longer encrypt).
    #[cfg(test)]
    pub(crate) fn handle(&self, version: KeyVersion) -> Option<&dyn KeyHandle> {
        self.versions.get(&version)?.key.as_deref()
    }

    fn key(&self, version: KeyVersion) -> Result<&dyn KeyHandle, KeyringError> {
        let slot = self
            .versions
            .get(&version)
            .ok_or(KeyringError::UnknownVersion { version })?;
        match (&slot.key, slot.info.state) {
            (Some(key), state) if state.can_decrypt() => Ok(key.as_ref()),
            (_, state) => Err(KeyringError::Unusable { version, state }),
        }
    }
}

/// Rejects plaintexts the apiserver's ciphertext limit cannot carry.
///
/// # Errors
/// Empty, or longer than [`envelope::MAX_PLAINTEXT_LEN`].
pub fn check_plaintext_len(len: usize) -> Result<(), KeyringError> {
    match len {
        0 => Err(KeyringError::EmptyPlaintext),
        n if n > envelope::MAX_PLAINTEXT_LEN => Err(KeyringError::PlaintextTooLong { len: n }),
        _ => Ok(()),
    }
}

/// What can go wrong sealing, opening or validating. Never carries secrets.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// Encrypt was asked to seal nothing.
    #[error("plaintext is empty")]
    EmptyPlaintext,
    /// The envelope would exceed the apiserver's 1024-byte ciphertext limit.
    #[error(
        "plaintext is {len} bytes; at most {} fit the apiserver's {}-byte ciphertext limit",
        envelope::MAX_PLAINTEXT_LEN,
        envelope::MAX_CIPHERTEXT_LEN
    )]
    PlaintextTooLong {
        /// Its length.
        len: usize,
    },
    /// The key id is not one this keyring issued.
    #[error("key_id was not issued by this keyring")]
    UnknownKeyId,
    /// The key id names one version, the ciphertext header another.
    #[error("key_id names version {key_id} but the ciphertext header names version {header}")]
    KeyIdMismatch {
        /// Version in the key id.
        key_id: KeyVersion,
        /// Version in the header.
        header: KeyVersion,
    },
    /// This keyring has no such version.
    #[error("key version {version} is not in this keyring")]
    UnknownVersion {
        /// The version asked for.
        version: KeyVersion,
    },
    /// The version exists but may not be used.
    #[error("key version {version} is {state} and cannot decrypt {}", unusable_hint(*state))]
    Unusable {
        /// The version asked for.
        version: KeyVersion,
        /// Its state.
        state: KeyState,
    },
    /// The ciphertext is not a well-formed envelope.
    #[error("malformed ciphertext: {0}")]
    Envelope(#[from] EnvelopeError),
    /// Authentication failed. Which part was wrong is deliberately not said.
    #[error("ciphertext could not be decrypted")]
    Decrypt,
    /// A version failed its seal/open round trip.
    #[error("self-check failed for key version {version}: {reason}")]
    SelfCheck {
        /// The version that failed.
        version: KeyVersion,
        /// Why (a backend error; never key material).
        reason: String,
    },
    /// The keyring breaks a structural rule.
    #[error("invalid keyring: {0}")]
    Invalid(String),
    /// The OS RNG failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The backend holding the key failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

fn unusable_hint(state: KeyState) -> &'static str {
    match state {
        KeyState::Destroyed => "(its key material was erased; only a backup taken before can help)",
        _ => "(restore it with `kekd admin restore`)",
    }
}

impl KeyringError {
    /// This error, met while loading the keyring `source_name` names (a
    /// [`crate::backend::Backend::describe`]), as a backend error.
    pub fn loading(self, source_name: String) -> BackendError {
        let kind = match &self {
            Self::Backend(e) => e.kind(),
            Self::Random(_) => ErrorKind::Io,
            Self::EmptyPlaintext
            | Self::PlaintextTooLong { .. }
            | Self::UnknownKeyId
            | Self::KeyIdMismatch { .. }
            | Self::UnknownVersion { .. }
            | Self::Unusable { .. }
            | Self::Envelope(_)
            | Self::Decrypt
            | Self::SelfCheck { .. }
            | Self::Invalid(_) => ErrorKind::Damaged,
        };
        BackendError::new(
            kind,
            Loading {
                source_name,
                error: self,
            },
        )
    }

    fn from_open(e: BackendError) -> Self {
        if e.kind() == ErrorKind::Decrypt {
            Self::Decrypt
        } else {
            Self::Backend(e)
        }
    }
}

/// A keyring that was read but breaks a rule.
#[derive(Debug, thiserror::Error)]
#[error("keyring {source_name}: {error}")]
struct Loading {
    source_name: String,
    error: KeyringError,
}
