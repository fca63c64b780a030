//! The identity types every layer shares: a KEK version number, a
//! keyring's random id, the public key id derived from both, and
//! timestamps. A leaf: it depends only on [`crate::secret`] (for the RNG).

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::secret::{RandomError, fill_random};

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
    type Err = InvalidTimestamp;

    /// `YYYY-MM-DDTHH:MM:SSZ`, as [`Display`](fmt::Display) writes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 20 || !s.ends_with('Z') {
            return Err(InvalidTimestamp);
        }
        humantime::parse_rfc3339(s)
            .map(Self::from)
            .map_err(|_| InvalidTimestamp)
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
            .map_err(|e: InvalidTimestamp| serde::de::Error::custom(e))
    }
}

/// A time is not written `YYYY-MM-DDTHH:MM:SSZ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected a UTC time like 2026-01-31T23:59:59Z")]
pub struct InvalidTimestamp;
