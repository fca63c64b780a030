//! What kekd trusts in a token, and how it tells its own objects from planted ones.
//!
//! - Only **private token objects** are ever read: a public object can be
//!   created by anyone who reaches the token, without the PIN.
//! - A key object is used only if its attributes say the token generated it
//!   and will never let it out ([`verify_key`]).
//! - Each version's key carries a **check value**: an empty plaintext sealed
//!   under it (AES-GCM, in the token) when kekd generated it, recorded in the
//!   metadata. Another key, even one with the same `CKA_ID` and label, does
//!   not open it.
//! - The metadata carries a **MAC**: an empty plaintext sealed, with the
//!   metadata bytes and revision as AAD, under a dedicated key generated in
//!   the token at `init` (`CKA_ID` = keyring id ‖ 00000000).
//!
//! The metadata object's value is the keyring text (`kekd-keyring-meta v2`,
//! ending in its `sha256` line) followed by a trailer:
//!
//! ```text
//! check 1 <base64 of IV ‖ tag, 28 bytes>
//! check 2 <…>
//! mac <base64 of IV ‖ tag, 28 bytes>
//! ```

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use cryptoki::context::Function;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::id::{KeyVersion, KeyringId};
use crate::keyring::store::{MAGIC_METADATA, MAGIC_METADATA_V1};

/// GCM IV length.
pub(super) const IV_LEN: usize = 12;
/// GCM tag length.
const TAG_LEN: usize = 16;
const SEAL_LEN: usize = IV_LEN + TAG_LEN;
/// AAD domain of a key check value.
const CHECK_DOMAIN: &[u8] = b"kekd/key-check\0";
/// AAD domain of the metadata MAC.
const MAC_DOMAIN: &[u8] = b"kekd/keyring-meta\0";

/// `template` restricted to private token objects.
pub(super) fn private(mut template: Vec<Attribute>) -> Vec<Attribute> {
    template.extend([Attribute::Token(true), Attribute::Private(true)]);
    template
}

/// An object's label as text ("" when it has none).
pub(super) fn label(s: &Session, handle: ObjectHandle) -> Result<String, CkError> {
    Ok(s.get_attributes(handle, &[AttributeType::Label])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::Label(l) => Some(String::from_utf8_lossy(&l).into_owned()),
            _ => None,
        })
        .unwrap_or_default())
}

/// `CKA_ID` of an object (empty when it has none).
pub(super) fn object_id(s: &Session, handle: ObjectHandle) -> Result<Vec<u8>, CkError> {
    Ok(s.get_attributes(handle, &[AttributeType::Id])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::Id(v) => Some(v),
            _ => None,
        })
        .unwrap_or_default())
}

/// The first attribute of a key object that kekd does not accept, as the
/// words that end "key object … <reason>". `None`: the key is one the token
/// generated, keeps secret, and lets be used for AES-GCM only.
pub(super) fn verify_key(
    s: &Session,
    handle: ObjectHandle,
) -> Result<Option<&'static str>, CkError> {
    let attributes = s.get_attributes(
        handle,
        &[
            AttributeType::Class,
            AttributeType::KeyType,
            AttributeType::ValueLen,
            AttributeType::Token,
            AttributeType::Private,
            AttributeType::Sensitive,
            AttributeType::AlwaysSensitive,
            AttributeType::Extractable,
            AttributeType::NeverExtractable,
            AttributeType::Local,
            AttributeType::Wrap,
            AttributeType::Unwrap,
            AttributeType::AllowedMechanisms,
        ],
    )?;
    let flag = |wanted: AttributeType| {
        attributes.iter().find_map(|a| match (a, wanted) {
            (Attribute::Token(b), AttributeType::Token)
            | (Attribute::Private(b), AttributeType::Private)
            | (Attribute::Sensitive(b), AttributeType::Sensitive)
            | (Attribute::AlwaysSensitive(b), AttributeType::AlwaysSensitive)
            | (Attribute::Extractable(b), AttributeType::Extractable)
            | (Attribute::NeverExtractable(b), AttributeType::NeverExtractable)
            | (Attribute::Local(b), AttributeType::Local)
            | (Attribute::Wrap(b), AttributeType::Wrap)
            | (Attribute::Unwrap(b), AttributeType::Unwrap) => Some(*b),
            _ => None,
        })
    };
    let is_aes_secret = attributes
        .iter()
        .any(|a| matches!(a, Attribute::Class(c) if *c == ObjectClass::SECRET_KEY))
        && attributes
            .iter()
            .any(|a| matches!(a, Attribute::KeyType(t) if *t == KeyType::AES));
    if !is_aes_secret {
        return Ok(Some("is not an AES secret key"));
    }
    let len_ok = attributes.iter().any(|a| match a {
        Attribute::ValueLen(l) => u64::from(*l) == 32,
        _ => false,
    });
    if !len_ok {
        return Ok(Some(
            "is not 32 bytes long (CKA_VALUE_LEN): kekd uses AES-256 only",
        ));
    }
    // (attribute, the value kekd requires, what it means when it differs)
    let rules: [(AttributeType, bool, &'static str); 9] = [
        (
            AttributeType::Token,
            true,
            "is not a token object (CKA_TOKEN)",
        ),
        (
            AttributeType::Private,
            true,
            "is not private (CKA_PRIVATE): anyone could have created it without the PIN",
        ),
        (
            AttributeType::Sensitive,
            true,
            "is not CKA_SENSITIVE: its bytes can be read",
        ),
        (
            AttributeType::AlwaysSensitive,
            true,
            "was not always sensitive (CKA_ALWAYS_SENSITIVE): its bytes were readable once",
        ),
        (
            AttributeType::Extractable,
            false,
            "is extractable (CKA_EXTRACTABLE)",
        ),
        (
            AttributeType::NeverExtractable,
            true,
            "was extractable once (CKA_NEVER_EXTRACTABLE is false)",
        ),
        (
            AttributeType::Local,
            true,
            "is not CKA_LOCAL (not generated in the token: its bytes came from outside)",
        ),
        (AttributeType::Wrap, false, "may wrap other keys (CKA_WRAP)"),
        (
            AttributeType::Unwrap,
            false,
            "may unwrap keys into the token (CKA_UNWRAP)",
        ),
    ];
    for (attribute, wanted, reason) in rules {
        // A token that does not report an attribute cannot vouch for it.
        if flag(attribute) != Some(wanted) {
            return Ok(Some(reason));
        }
    }
    let gcm_only = attributes.iter().any(|a| match a {
        Attribute::AllowedMechanisms(m) => m.as_slice() == [MechanismType::AES_GCM],
        _ => false,
    });
    if !gcm_only {
        return Ok(Some(
            "is not restricted to CKM_AES_GCM (CKA_ALLOWED_MECHANISMS): it could be used in other modes",
        ));
    }
    Ok(None)
}

/// IV ‖ GCM tag of an empty plaintext sealed in the token: a key check
/// value or a metadata MAC. Public: it reveals nothing of the key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Seal([u8; SEAL_LEN]);

impl Seal {
    /// Seals nothing under `key` with `aad`, from a fresh random `iv`.
    pub(super) fn make(
        s: &Session,
        key: ObjectHandle,
        mut iv: [u8; IV_LEN],
        aad: &[u8],
    ) -> Result<Self, CkError> {
        let tag = {
            let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
            s.encrypt(&Mechanism::AesGcm(params), key, &[])?
        };
        // A tag of any other length is a token bug; refuse rather than store it.
        let tag: [u8; TAG_LEN] = tag.as_slice().try_into().map_err(|_| {
            CkError::Pkcs11(cryptoki::error::RvError::GeneralError, Function::Encrypt)
        })?;
        let mut out = [0u8; SEAL_LEN];
        out[..IV_LEN].copy_from_slice(&iv); // the IV really used (some HSMs pick it)
        out[IV_LEN..].copy_from_slice(&tag);
        Ok(Self(out))
    }

    /// Whether this seal opens under `key` with `aad`.
    pub(super) fn opens(
        &self,
        s: &Session,
        key: ObjectHandle,
        aad: &[u8],
    ) -> Result<bool, CkError> {
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&self.0[..IV_LEN]);
        let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())?;
        match s.decrypt(&Mechanism::AesGcm(params), key, &self.0[IV_LEN..]) {
            Ok(plaintext) => Ok(plaintext.is_empty()),
            // The token refused the tag: the operation is over, the session clean.
            Err(e @ CkError::Pkcs11(_, Function::Decrypt))
                if !super::error::is_connection_loss(&e) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The bytes, for fingerprints.
    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn encode(&self) -> String {
        BASE64.encode(self.0)
    }

    fn decode(text: &str) -> Option<Self> {
        let bytes = BASE64.decode(text).ok()?;
        Some(Self(bytes.as_slice().try_into().ok()?))
    }
}

/// AAD of a version's key check value: domain ‖ keyring id ‖ version (BE u32).
pub(super) fn check_aad(id: &KeyringId, version: KeyVersion) -> Vec<u8> {
    let mut aad = CHECK_DOMAIN.to_vec();
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(&version.get().to_be_bytes());
    aad
}

/// AAD of the metadata MAC: domain ‖ revision (BE u64) ‖ every byte before
/// the `mac` line. The revision is the one in the object's label, so an old
/// revision copied under a newer label does not authenticate.
pub(super) fn mac_aad(revision: u64, signed: &[u8]) -> Vec<u8> {
    let mut aad = MAC_DOMAIN.to_vec();
    aad.extend_from_slice(&revision.to_be_bytes());
    aad.extend_from_slice(signed);
    aad
}

/// A metadata object's value, split into its parts (MAC not yet verified).
pub(super) struct Framed<'a> {
    /// The keyring text, up to and including its `sha256` line.
    pub(super) body: &'a [u8],
    /// Key check values by version.
    pub(super) checks: BTreeMap<KeyVersion, Seal>,
    /// Every byte the MAC covers.
    pub(super) signed: &'a [u8],
    /// The MAC.
    pub(super) mac: Seal,
}

/// Why a metadata object's value cannot be split.
pub(super) enum FrameError {
    /// Written by a kekd before version 2: no check values, no MAC.
    Legacy,
    /// Not kekd's layout.
    Malformed(&'static str),
}

/// Splits a metadata object's value into keyring text, check values and MAC.
pub(super) fn split(value: &[u8]) -> Result<Framed<'_>, FrameError> {
    let first_line = |v: &[u8]| v.split(|&b| b == b'\n').next().unwrap_or_default().to_vec();
    let first = first_line(value);
    if first == MAGIC_METADATA_V1.as_bytes() {
        return Err(FrameError::Legacy);
    }
    if first != MAGIC_METADATA.as_bytes() {
        return Err(FrameError::Malformed(
            "does not start with `kekd-keyring-meta v2`",
        ));
    }
    // The body ends after the first line that starts with "sha256 ".
    let mut at = 0;
    let mut body_end = None;
    while at < value.len() {
        let end = value[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(value.len(), |i| at + i + 1);
        if value[at..end].starts_with(b"sha256 ") {
            body_end = Some(end);
            break;
        }
        at = end;
    }
    let body_end = body_end.ok_or(FrameError::Malformed("has no `sha256` line"))?;
    let (body, trailer) = value.split_at(body_end);
    let trailer = std::str::from_utf8(trailer)
        .map_err(|_| FrameError::Malformed("has a trailer that is not text"))?;
    let trailer = trailer
        .strip_suffix('\n')
        .ok_or(FrameError::Malformed("does not end in a newline"))?;
    let mut lines: Vec<&str> = trailer.split('\n').collect();
    let mac_line = lines.pop().unwrap_or_default();
    let mac = mac_line
        .strip_prefix("mac ")
        .and_then(Seal::decode)
        .ok_or(FrameError::Malformed("does not end in a `mac` line"))?;
    let signed = &value[..value.len() - mac_line.len() - 1];
    let mut checks = BTreeMap::new();
    for line in lines {
        let (version, seal) = line
            .strip_prefix("check ")
            .and_then(|l| l.split_once(' '))
            .ok_or(FrameError::Malformed(
                "has a trailer line that is not `check <version> <value>`",
            ))?;
        let version = version
            .parse::<u32>()
            .ok()
            .filter(|_| !version.starts_with('0'))
            .and_then(KeyVersion::new)
            .ok_or(FrameError::Malformed(
                "has a `check` line with a bad version",
            ))?;
        let seal = Seal::decode(seal)
            .ok_or(FrameError::Malformed("has a `check` line with a bad value"))?;
        if checks.insert(version, seal).is_some() {
            return Err(FrameError::Malformed(
                "has two `check` lines for one version",
            ));
        }
    }
    Ok(Framed {
        body,
        checks,
        signed,
        mac,
    })
}

/// The keyring text followed by its check values, ready for the MAC.
pub(super) fn frame(body: &str, checks: &BTreeMap<KeyVersion, Seal>) -> Vec<u8> {
    let mut out = body.as_bytes().to_vec();
    for (version, seal) in checks {
        out.extend_from_slice(format!("check {version} {}\n", seal.encode()).as_bytes());
    }
    out
}

/// Appends the `mac` line.
pub(super) fn seal_frame(mut signed: Vec<u8>, mac: &Seal) -> Vec<u8> {
    signed.extend_from_slice(format!("mac {}\n", mac.encode()).as_bytes());
    signed
}
