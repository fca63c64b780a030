//! kekd's ciphertext format: what Encrypt returns and Decrypt accepts.
//!
//! ```text
//! offset  size  field
//! 0       1     format byte, 0x01
//! 1       4     key version, big-endian u32, >= 1
//! 5       12    AES-256-GCM nonce, random per seal
//! 17      n+16  AES-256-GCM ciphertext of the n-byte seed, then the 16-byte tag
//! ```
//!
//! The additional authenticated data binds the format and the key identity:
//! `"kekd/envelope\0" || format || keyring id (16 bytes) || key version (BE u32)`.
//! Moving a ciphertext to another keyring, another version or another format
//! therefore fails authentication, even if the same key material were reused.
//!
//! [`Envelope::parse`] is total: every byte string either parses into exactly
//! one envelope or yields a [`EnvelopeError`]; it never panics.

use crate::id::{KeyVersion, KeyringId};

/// The only format byte this release writes and reads.
pub const FORMAT_V1: u8 = 0x01;
/// Bytes of the AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes in front of the sealed payload: format, version, nonce.
pub const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// Bytes an envelope adds to the plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The apiserver rejects an Encrypt ciphertext longer than this.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
/// The longest plaintext whose envelope still fits [`MAX_CIPHERTEXT_LEN`].
pub const MAX_PLAINTEXT_LEN: usize = MAX_CIPHERTEXT_LEN - OVERHEAD;

const AAD_LABEL: &[u8] = b"kekd/envelope\0";
/// Length of the additional authenticated data.
pub const AAD_LEN: usize = AAD_LABEL.len() + 1 + KeyringId::LEN + 4;

/// A GCM nonce.
pub type Nonce = [u8; NONCE_LEN];

/// A parsed envelope borrowing the ciphertext it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The key version named in the header.
    pub version: KeyVersion,
    /// The nonce the payload was sealed with.
    pub nonce: &'a Nonce,
    /// AES-GCM ciphertext followed by its tag (at least `TAG_LEN + 1` bytes).
    pub sealed: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Parses `bytes` as a format-1 envelope.
    ///
    /// # Errors
    /// Every structural defect is an error; authentication happens later.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_CIPHERTEXT_LEN {
            return Err(EnvelopeError::TooLong { len: bytes.len() });
        }
        let (&format, rest) = bytes.split_first().ok_or(EnvelopeError::Empty)?;
        if format != FORMAT_V1 {
            return Err(EnvelopeError::UnknownFormat { format });
        }
        if bytes.len() < OVERHEAD + 1 {
            return Err(EnvelopeError::Truncated { len: bytes.len() });
        }
        let (version, rest) = rest.split_at(4);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let version = u32::from_be_bytes(version.try_into().map_err(|_| EnvelopeError::Empty)?);
        let version = KeyVersion::new(version).ok_or(EnvelopeError::ZeroVersion)?;
        let nonce: &Nonce = nonce.try_into().map_err(|_| EnvelopeError::Empty)?;
        Ok(Self {
            version,
            nonce,
            sealed,
        })
    }

    /// Serializes an envelope from its parts.
    pub fn encode(version: KeyVersion, nonce: &Nonce, sealed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.push(FORMAT_V1);
        out.extend_from_slice(&version.get().to_be_bytes());
        out.extend_from_slice(nonce);
        out.extend_from_slice(sealed);
        out
    }
}

/// The additional authenticated data for a seal under `keyring`/`version`.
pub fn aad(keyring: &KeyringId, version: KeyVersion) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    let (label, rest) = aad.split_at_mut(AAD_LABEL.len());
    label.copy_from_slice(AAD_LABEL);
    let (format, rest) = rest.split_at_mut(1);
    format[0] = FORMAT_V1;
    let (id, ver) = rest.split_at_mut(KeyringId::LEN);
    id.copy_from_slice(keyring.as_bytes());
    ver.copy_from_slice(&version.get().to_be_bytes());
    aad
}

/// Why bytes are not a well-formed envelope. Contents are never echoed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// No bytes at all.
    #[error("ciphertext is empty")]
    Empty,
    /// The first byte is not a format this release knows.
    #[error("ciphertext has unknown format byte {format:#04x} (this kekd reads format 0x01)")]
    UnknownFormat {
        /// The byte found.
        format: u8,
    },
    /// Too short to hold a header, one byte of payload and a tag.
    #[error("ciphertext is truncated ({len} bytes, at least {} needed)", OVERHEAD + 1)]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Longer than any envelope kekd produces.
    #[error("ciphertext is {len} bytes, longer than the {MAX_CIPHERTEXT_LEN}-byte maximum")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Version 0 is never assigned.
    #[error("ciphertext names key version 0, which is never assigned")]
    ZeroVersion,
}

#[cfg(test)]
mod tests;
