//! The keyring's metadata in the token: reading and authenticating the
//! newest revision, writing the next one, finding and generating key
//! objects, and reporting public look-alikes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use tracing::warn;

use crate::backend::{BackendError, ErrorKind};
use crate::id::{KeyVersion, KeyringId};
use crate::keyring::KeyState;
use crate::keyring::store::{KeyringFile, Material, StoreError};

use super::error::{Pkcs11Error, readable, vanished};
use super::objects::{self, FrameError, Seal};
use super::{APPLICATION, MAX_PUBLIC_REPORTED, METADATA_KEY_LABEL, METADATA_LABEL, Token};

impl Token {
    pub(super) fn label_of(&self, version: KeyVersion) -> String {
        format!("{}v{version}", self.settings.key_label_prefix)
    }

    fn metadata_prefix(&self) -> String {
        format!("{}{METADATA_LABEL}@", self.settings.key_label_prefix)
    }

    pub(super) fn metadata_key_label(&self) -> String {
        format!("{}{METADATA_KEY_LABEL}", self.settings.key_label_prefix)
    }

    /// Every private metadata object of this keyring, as (revision, handle),
    /// oldest first. Public objects are never read (anyone can create them).
    ///
    /// Metadata is never modified in place (tokens such as SoftHSM refuse to
    /// change a data object's value): each write creates revision n+1, then
    /// deletes the older ones. A crash in between leaves both; readers take
    /// the newest and the next write removes the rest.
    pub(super) fn metadata_objects(
        &self,
        s: &Session,
    ) -> Result<Vec<(u64, ObjectHandle)>, CkError> {
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
    pub(super) fn read_metadata(
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
    pub(super) fn read_verified(
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

    pub(super) fn parse_body(&self, body: &[u8]) -> Result<KeyringFile, BackendError> {
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
    pub(super) fn report_public(&self, s: &Session, id: Option<&KeyringId>) -> Result<(), CkError> {
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
    pub(super) fn find_key_object(
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

    pub(super) fn describe(&self) -> String {
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
    pub(super) fn create_revision(
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
    pub(super) fn drop_older(
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
    pub(super) fn generate_key(
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
pub(super) struct RawMetadata {
    pub(super) revision: u64,
    pub(super) label: String,
    pub(super) value: Vec<u8>,
}

/// The newest metadata, authenticated.
pub(super) struct Verified {
    pub(super) revision: u64,
    /// The keyring text, as the MAC covered it.
    body: Vec<u8>,
    pub(super) checks: BTreeMap<KeyVersion, Seal>,
    pub(super) file: KeyringFile,
}

/// `CKA_ID` of a version's key object: keyring id ‖ version (BE u32); the
/// metadata key (`None`) has version 0, which no version has.
pub(super) fn key_object_id(id: &KeyringId, version: Option<KeyVersion>) -> Vec<u8> {
    let mut v = id.as_bytes().to_vec();
    v.extend_from_slice(&version.map_or(0, KeyVersion::get).to_be_bytes());
    v
}

/// Lowercase hex, for `CKA_ID`s in messages.
pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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
