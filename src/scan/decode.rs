//! What one value kube-apiserver stored in etcd is, told from its bytes.
//!
//! The apiserver writes a resource either through a transformer, as
//! `k8s:enc:<kind>:<version>:<name>:` followed by that transformer's bytes,
//! or as the object itself (`identity`): protobuf (`k8s\0` magic), JSON, or
//! CBOR (self-described tag `0xd9d9f7`). A KMS v2 value is
//! `k8s:enc:kms:v2:<name>:` followed by the `EncryptedObject` protobuf
//! (`docs/kms-v2.md` §8 "What the apiserver stores in etcd"); when its key
//! id has kekd's form, the key version is read both from the key id and from
//! our envelope header in `encryptedDEKSource`.
//!
//! Nothing here keeps or reports a value's bytes: a value that is none of
//! the above is described by a fixed reason, and its key is what a report
//! names.

use crate::envelope::{Envelope, EnvelopeError};
use crate::id::{KeyId, KeyVersion, KeyringId};

/// The apiserver's limit on a key id and on `encryptedDEKSource`.
const MAX_KMS_FIELD_LEN: usize = 1024;
/// Longest provider name or transformer kind we accept in a prefix.
const MAX_NAME_LEN: usize = 253;

/// The `EncryptedObject` of a KMS v2 value (`docs/kms-v2.md` §8), as the
/// apiserver writes it. Fields not declared here are skipped by the decoder.
#[derive(Clone, PartialEq, prost::Message)]
struct EncryptedObject {
    /// Field 1: the object, sealed under a key derived from the seed.
    #[prost(bytes = "vec", tag = "1")]
    encrypted_data: Vec<u8>,
    /// Field 2: the key id Encrypt returned.
    #[prost(string, tag = "2")]
    key_id: String,
    /// Field 3: the plugin's ciphertext of the seed (our envelope).
    #[prost(bytes = "vec", tag = "3")]
    encrypted_dek_source: Vec<u8>,
    /// Field 4: the plugin's annotations (stored in plaintext).
    #[prost(map = "string, bytes", tag = "4")]
    annotations: std::collections::HashMap<String, Vec<u8>>,
    /// Field 5: 0 = AES_GCM_KEY, 1 = HKDF_SHA256_XNONCE_AES_GCM_SEED.
    #[prost(int32, tag = "5")]
    encrypted_dek_source_type: i32,
}

/// The kind of one stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// `k8s:enc:kms:v2:<provider>:` and a well-formed `EncryptedObject`.
    KmsV2 {
        /// The provider name from the prefix.
        provider: String,
        /// The key id (field 2): public, as the apiserver logs it.
        key_id: String,
        /// The key version, when the key id has kekd's form.
        kekd: Option<KekdKey>,
    },
    /// Another transformer: `aescbc:v1:<key name>`, `secretbox:v1:…`,
    /// `kms:v1:<name>`, …: `<kind>:<version>:<name>` from the prefix.
    OtherProvider {
        /// `<kind>:<version>:<name>`.
        label: String,
    },
    /// Stored in plaintext: the object's own serialization.
    Identity {
        /// `protobuf`, `json` or `cbor`.
        encoding: &'static str,
    },
    /// None of the above; `reason` never quotes the value.
    Unparseable {
        /// Why, in words fixed by this module (plus lengths and field numbers).
        reason: String,
    },
}

/// A kekd key id found in an `EncryptedObject`, and what our envelope
/// header in `encryptedDEKSource` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekdKey {
    /// The keyring the key id names.
    pub keyring: KeyringId,
    /// The version the key id names.
    pub version: KeyVersion,
    /// The version our envelope header names, or why it does not parse.
    pub header: Result<KeyVersion, EnvelopeError>,
}

impl Stored {
    /// The provider this value counts under in a report: `kms:v2:<name>`,
    /// the other transformer's label, `identity`, or `unparseable`.
    pub fn provider_label(&self) -> String {
        match self {
            Self::KmsV2 { provider, .. } => format!("kms:v2:{provider}"),
            Self::OtherProvider { label } => label.clone(),
            Self::Identity { .. } => "identity".to_owned(),
            Self::Unparseable { .. } => "unparseable".to_owned(),
        }
    }
}

/// Classifies one stored value. Total: every byte string gets a verdict.
pub fn classify(value: &[u8]) -> Stored {
    if let Some(rest) = value.strip_prefix(b"k8s:enc:") {
        return classify_encrypted(rest);
    }
    if value.starts_with(b"k8s\x00") {
        return Stored::Identity {
            encoding: "protobuf",
        };
    }
    if value.starts_with(&[0xd9, 0xd9, 0xf7]) {
        return Stored::Identity { encoding: "cbor" };
    }
    match value.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Stored::Identity { encoding: "json" },
        None if value.is_empty() => unparseable("the value is empty"),
        _ => unparseable(
            "neither a k8s:enc: prefix nor a Kubernetes serialization (protobuf, JSON, CBOR)",
        ),
    }
}

fn unparseable(reason: impl Into<String>) -> Stored {
    Stored::Unparseable {
        reason: reason.into(),
    }
}

/// `<kind>:<version>:<name>:<payload>` after `k8s:enc:`.
fn classify_encrypted(rest: &[u8]) -> Stored {
    let mut parts = rest.splitn(4, |&b| b == b':');
    let (Some(kind), Some(version), Some(name), Some(payload)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return unparseable("k8s:enc: prefix without <kind>:<version>:<name>:");
    };
    let (Some(kind), Some(version), Some(name)) = (label(kind), label(version), label(name)) else {
        return unparseable(
            "k8s:enc: prefix whose kind, version or provider name is not a printable name",
        );
    };
    if (kind, version) != ("kms", "v2") {
        return Stored::OtherProvider {
            label: format!("{kind}:{version}:{name}"),
        };
    }
    match decode_kms_v2(payload) {
        Ok((key_id, kekd)) => Stored::KmsV2 {
            provider: name.to_owned(),
            key_id,
            kekd,
        },
        Err(reason) => unparseable(format!("k8s:enc:kms:v2:{name}: {reason}")),
    }
}

/// A name in a prefix: 1..=253 printable ASCII characters, no spaces.
fn label(bytes: &[u8]) -> Option<&str> {
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN || !bytes.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Decodes the `EncryptedObject` and checks it the way the apiserver does
/// before it asks a plugin to decrypt.
fn decode_kms_v2(payload: &[u8]) -> Result<(String, Option<KekdKey>), String> {
    let object = <EncryptedObject as prost::Message>::decode(payload)
        .map_err(|e| format!("the EncryptedObject does not parse ({e})"))?;
    if object.encrypted_data.is_empty() {
        return Err("the EncryptedObject has no encryptedData (field 1)".to_owned());
    }
    if object.key_id.is_empty() || object.key_id.len() > MAX_KMS_FIELD_LEN {
        return Err(format!(
            "the EncryptedObject's keyID (field 2) is {} bytes, not 1..={MAX_KMS_FIELD_LEN}",
            object.key_id.len()
        ));
    }
    let dek = &object.encrypted_dek_source;
    if dek.is_empty() || dek.len() > MAX_KMS_FIELD_LEN {
        return Err(format!(
            "the EncryptedObject's encryptedDEKSource (field 3) is {} bytes, not 1..={MAX_KMS_FIELD_LEN}",
            dek.len()
        ));
    }
    if !matches!(object.encrypted_dek_source_type, 0 | 1) {
        return Err(format!(
            "the EncryptedObject's encryptedDEKSourceType (field 5) is {}, not 0 or 1",
            object.encrypted_dek_source_type
        ));
    }
    let kekd = KeyId::parse(&object.key_id)
        .ok()
        .map(|(keyring, version)| KekdKey {
            keyring,
            version,
            header: Envelope::parse(dek).map(|e| e.version),
        });
    Ok((object.key_id, kekd))
}

/// The resource a key belongs to, from its path under `prefix`:
/// `/registry/secrets/ns/name` → `secrets`;
/// `/registry/<group>/<resource>/…` (a first segment with a dot, as kube
/// stores custom resources and some API groups) → `<resource>.<group>`.
pub fn resource_of(key: &[u8], prefix: &[u8]) -> String {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    let rest = rest.strip_prefix(b"/").unwrap_or(rest);
    let mut segments = rest.split(|&b| b == b'/');
    let first = segments.next().unwrap_or_default();
    let resource = match segments.next() {
        Some(second) if first.contains(&b'.') && !second.is_empty() => {
            let mut r = second.to_vec();
            r.push(b'.');
            r.extend_from_slice(first);
            r
        }
        _ => first.to_vec(),
    };
    if resource.is_empty() {
        "(none)".to_owned()
    } else {
        printable(&resource)
    }
}

/// A key as text for reports: UTF-8 kept, control characters and invalid
/// bytes escaped as `\xNN`, invisible formatting characters (bidi
/// overrides, zero-width and line/paragraph separators) as `\u{NNNN}`, at
/// most 512 characters. Nothing it returns can move a terminal's cursor,
/// change its colours or reorder what it shows; already escaped text comes
/// back unchanged.
pub fn printable(key: &[u8]) -> String {
    const MAX: usize = 512;
    let mut out = String::new();
    for chunk in key.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                for b in c.to_string().bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            } else if is_invisible_format(c) {
                out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
        if out.chars().count() > MAX {
            let cut: String = out.chars().take(MAX).collect();
            return cut + "…";
        }
    }
    out
}

/// [`printable`] for text that is already UTF-8 (a key id, a name read from
/// a scan document).
pub fn escape(text: &str) -> String {
    printable(text.as_bytes())
}

/// Characters that change how a terminal lays out text without showing
/// themselves (Unicode `Cf` characters used in "trojan source" tricks, and
/// the line and paragraph separators).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    )
}

#[cfg(test)]
mod tests;
