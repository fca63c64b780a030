//! The keyring: KEK versions, their states, the primary, and key ids.
//!
//! A [`Keyring`] is an immutable snapshot. The server holds the current one
//! behind an atomic pointer and swaps in a new snapshot as a whole, so a
//! Status and the Encrypt it triggers always see the same primary and key id.
//! Where the key material lives is the backend's business ([`KeyHandle`]); the
//! durable file format of the local backend is in [`store`].

pub mod access;
pub mod ops;
pub mod served;
pub mod store;

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::{BackendError, KeyHandle};
use crate::envelope::{self, Envelope, EnvelopeError};
use crate::secret::{Plaintext, RandomError, fill_random};

/// A KEK version number: assigned in increasing order from 1, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVersion(NonZeroU32);

impl KeyVersion {
    /// The first version of every keyring.
    pub const FIRST: Self = Self(NonZeroU32::MIN);

    /// `None` for 0, which is never assigned.
    pub fn new(version: u32) -> Option<Self> {
        NonZeroU32::new(version).map(Self)
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The version after this one, or `None` at `u32::MAX`.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A keyring's random identity (128 bits), part of every key id and AAD.
///
/// Two keyrings created independently never share an id, so their key ids
/// never collide even though both start at version 1.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyringId([u8; KeyringId::LEN]);

impl KeyringId {
    /// Bytes in an id.
    pub const LEN: usize = 16;

    /// A fresh id from the OS RNG.
    ///
    /// # Errors
    /// When the OS RNG fails.
    pub fn generate() -> Result<Self, RandomError> {
        let mut id = [0; Self::LEN];
        fill_random(&mut id)?;
        Ok(Self(id))
    }

    /// The raw id.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }
}

impl fmt::Display for KeyringId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyringId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyringId({self})")
    }
}

impl FromStr for KeyringId {
    type Err = InvalidKeyringId;

    /// Exactly 32 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() != 2 * Self::LEN {
            return Err(InvalidKeyringId);
        }
        let mut id = [0; Self::LEN];
        for (out, pair) in id.iter_mut().zip(b.chunks_exact(2)) {
            *out = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Ok(Self(id))
    }
}

fn hex_digit(c: u8) -> Result<u8, InvalidKeyringId> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(InvalidKeyringId),
    }
}

/// A keyring id is not 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("keyring id must be 32 lowercase hex digits")]
pub struct InvalidKeyringId;

/// The public name of one KEK version, as the apiserver sees it:
/// `kekd/<keyring id>/v<version>`.
///
/// It is derived from public data only, is 1..=1024 bytes (it is 44 to 53),
/// and is unique per key material: versions are never reused within a
/// keyring and keyring ids are random.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// The apiserver rejects key ids longer than this.
    pub const MAX_LEN: usize = 1024;
    const PREFIX: &'static str = "kekd/";

    /// The key id of `version` in keyring `keyring`.
    pub fn new(keyring: &KeyringId, version: KeyVersion) -> Self {
        Self(format!("{}{keyring}/v{version}", Self::PREFIX))
    }

    /// Parses a key id received from the apiserver; strict and canonical.
    ///
    /// # Errors
    /// When `s` is not a key id this format produces.
    pub fn parse(s: &str) -> Result<(KeyringId, KeyVersion), InvalidKeyId> {
        let rest = s.strip_prefix(Self::PREFIX).ok_or(InvalidKeyId)?;
        let (id, version) = rest.split_once("/v").ok_or(InvalidKeyId)?;
        let id = id.parse().map_err(|_| InvalidKeyId)?;
        // Canonical decimal: digits only, no sign, no leading zero.
        if version.is_empty()
            || version.starts_with('0')
            || !version.bytes().all(|c| c.is_ascii_digit())
        {
            return Err(InvalidKeyId);
        }
        let version = version
            .parse()
            .ok()
            .and_then(KeyVersion::new)
            .ok_or(InvalidKeyId)?;
        Ok((id, version))
    }

    /// The id as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key id that kekd did not issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key_id is not of the form kekd/<keyring id>/v<version>")]
pub struct InvalidKeyId;

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
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|k| k.as_str() == s).ok_or(())
    }
}

/// A point in time with one-second resolution, written as RFC 3339 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// Seconds since the Unix epoch.
    pub fn from_unix(secs: u64) -> Self {
        Self(secs)
    }

    /// The current wall-clock time (callers pass it down, so tests need no sleeps).
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// Seconds since the Unix epoch.
    pub fn unix(self) -> u64 {
        self.0
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        // A clock before 1970 is clamped to the epoch rather than failing.
        Self(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = UNIX_EPOCH + Duration::from_secs(self.0);
        humantime::format_rfc3339_seconds(t).fmt(f)
    }
}

impl FromStr for Timestamp {
    type Err = ();

    /// `YYYY-MM-DDTHH:MM:SSZ`, as [`Display`](fmt::Display) writes it.
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 20 || !s.ends_with('Z') {
            return Err(());
        }
        humantime::parse_rfc3339(s).map(Self::from).map_err(|_| ())
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|()| serde::de::Error::custom("expected a UTC time like 2026-01-31T23:59:59Z"))
    }
}

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
    key: Option<KeyHandle>,
}

impl Keyring {
    /// Builds a snapshot from versions in increasing order, each with its key
    /// handle (`None` exactly for destroyed versions).
    ///
    /// # Errors
    /// When [`validate`] fails or material is missing or present against its state.
    pub fn new(
        id: KeyringId,
        versions: Vec<(VersionInfo, Option<KeyHandle>)>,
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
    /// [`ops::check_successor`].
    pub fn views(&self) -> Vec<ops::VersionView> {
        self.versions
            .values()
            .map(|s| ops::VersionView {
                info: s.info.clone(),
                fingerprint: s.key.as_ref().map(KeyHandle::fingerprint),
            })
            .collect()
    }

    fn key(&self, version: KeyVersion) -> Result<&KeyHandle, KeyringError> {
        let slot = self
            .versions
            .get(&version)
            .ok_or(KeyringError::UnknownVersion { version })?;
        match (&slot.key, slot.info.state) {
            (Some(key), state) if state.can_decrypt() => Ok(key),
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
    fn from_open(e: BackendError) -> Self {
        match e {
            BackendError::Decrypt => Self::Decrypt,
            other => Self::Backend(other),
        }
    }
}

#[cfg(test)]
mod tests;
