//! `kekd admin upgrade-token`: adopts a keyring an older kekd wrote
//! (`kekd-keyring-meta v1`: no key check values, no MAC) as version-2
//! metadata.
//!
//! The older kekd generated every key in the token, private, sensitive and
//! never extractable; what it could not leave behind is proof of that. The
//! upgrade therefore adopts what the token holds **now**, after checking each
//! key object against the rules the backend enforces on every load
//! ([`objects::verify_key`]): attributes a key planted without the PIN
//! cannot have (private objects need the PIN) and an imported key cannot
//! have (`CKA_LOCAL`, `CKA_ALWAYS_SENSITIVE`, `CKA_NEVER_EXTRACTABLE`). A key
//! a PIN holder generated earlier with kekd's template passes; nothing can
//! tell it apart, which is why the operator runs this while the PIN holders
//! are trusted (docs/hsm.md).
//!
//! # Order, and what a crash leaves
//!
//! 1. Read the newest metadata revision n (private objects only; two
//!    objects of revision n are refused naming both). Version 2 already:
//!    verify it and stop (a no-op). Otherwise check every key object; a
//!    refusal writes nothing.
//! 2. Find or generate the metadata key. A crash from here to step 4
//!    leaves the v1 metadata, which is still the newest, plus an unused
//!    metadata key: the next run checks that key like the others and adopts
//!    it instead of making a second one (two would be refused as
//!    duplicates).
//! 3. Make each version's check value (a seal in the token; writes nothing).
//! 4. Compare: revision n must still be the newest and unchanged, else
//!    nothing of this run is left behind ("changed while this command ran").
//! 5. Create revision n+1 — the commit point — and read it back verified;
//!    if it does not verify, remove it and the key this run generated.
//! 6. Delete the older revisions and the key objects of destroyed versions,
//!    as every metadata write does. A crash before this leaves v2 as the
//!    newest revision: served, and a re-run says there is nothing to do.

use std::collections::BTreeMap;

use cryptoki::error::Error as CkError;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::metadata::{RawMetadata, hex, key_object_id};
use super::objects::{self, FrameError, Seal};
use super::{Pkcs11Error, Token};
use crate::backend::BackendError;
use crate::id::{KeyVersion, KeyringId};
use crate::keyring::VersionInfo;
use crate::keyring::store::StoreError;

/// What `upgrade-token` found, would do, or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The metadata is version 2 already and authenticates: nothing to do.
    AlreadyCurrent,
    /// `--dry-run`: every check passed; this is what a run would adopt.
    WouldAdopt,
    /// Version-2 metadata was written.
    Adopted,
}

/// Where the metadata key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataKey {
    /// Version-2 metadata already has its key.
    Existing,
    /// Generated in the token by this run (or, for a dry run: would be).
    Generated,
    /// Left in the token by an earlier run that stopped before writing;
    /// its attributes checked like the version keys', and adopted.
    Leftover,
}

/// One version as adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedVersion {
    /// The version's public facts, as the metadata records them.
    pub info: VersionInfo,
    /// The label of its key object; `None` for a destroyed version.
    pub key_object: Option<String>,
}

/// The report of `upgrade-token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// What happened.
    pub outcome: UpgradeOutcome,
    /// The keyring's id.
    pub keyring_id: KeyringId,
    /// The metadata revision read (`from_revision`) and the one now newest
    /// (equal unless `outcome` is [`UpgradeOutcome::Adopted`]).
    pub from_revision: u64,
    /// See `from_revision`.
    pub revision: u64,
    /// Every version, in order.
    pub versions: Vec<AdoptedVersion>,
    /// The metadata key and its label.
    pub metadata_key: MetadataKey,
    /// Its label.
    pub metadata_key_label: String,
    /// Destroyed versions whose key object was still in the token and is
    /// now erased (a destroy that stopped half-way).
    pub erased: Vec<KeyVersion>,
}

impl Token {
    /// Upgrades the keyring metadata an older kekd wrote to version 2 (see
    /// the module docs); with `dry_run` it checks everything and writes
    /// nothing. The caller holds the admin lock.
    ///
    /// # Errors
    /// No keyring; a key object this kekd would not serve
    /// ([`Pkcs11Error::NotAdoptable`], or missing, or duplicated); metadata
    /// that is neither version 1 nor authentic version 2; a concurrent
    /// change ([`Pkcs11Error::Conflict`]); token failures.
    pub fn upgrade(&self, dry_run: bool) -> Result<Upgrade, BackendError> {
        self.with_session("upgrade the keyring metadata", |s, _| {
            self.upgrade_in(s, dry_run)
        })?
    }

    fn upgrade_in(
        &self,
        s: &Session,
        dry_run: bool,
    ) -> Result<Result<Upgrade, BackendError>, CkError> {
        // 1. The newest revision.
        let raw = match self.read_metadata(s)? {
            Ok(Some(raw)) => raw,
            Ok(None) => return Ok(Err(self.no_keyring().into())),
            Err(e) => return Ok(Err(e.into())),
        };
        match objects::split(&raw.value) {
            Err(FrameError::Legacy) => {}
            // Version 2: a no-op, but only for metadata that authenticates.
            Ok(_) => {
                return Ok(match self.read_verified(s)? {
                    Ok(Some(v)) => Ok(Upgrade {
                        outcome: UpgradeOutcome::AlreadyCurrent,
                        keyring_id: v.file.id,
                        from_revision: v.revision,
                        revision: v.revision,
                        versions: v
                            .file
                            .versions
                            .iter()
                            .map(|sv| AdoptedVersion {
                                key_object: sv
                                    .info
                                    .state
                                    .has_material()
                                    .then(|| self.label_of(sv.info.version)),
                                info: sv.info.clone(),
                            })
                            .collect(),
                        metadata_key: MetadataKey::Existing,
                        metadata_key_label: self.metadata_key_label(),
                        erased: Vec::new(),
                    }),
                    Ok(None) => Err(self.no_keyring().into()),
                    Err(e) => Err(e),
                });
            }
            Err(FrameError::Malformed(why)) => {
                return Ok(Err(Pkcs11Error::MetadataForged {
                    label: raw.label.clone(),
                    reason: format!("its value {why}"),
                }
                .into()));
            }
        }
        let file = match self.parse_body(&raw.value) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let id = file.id;
        self.report_public(s, Some(&id))?;

        // Every version with material: its one private key object, by the
        // rules every load applies.
        let mut keys = BTreeMap::new();
        let mut versions = Vec::with_capacity(file.versions.len());
        for v in &file.versions {
            let version = v.info.version;
            let mut key_object = None;
            if v.info.state.has_material() {
                let handle = match self.adoptable_key(s, &id, version)? {
                    Ok(h) => h,
                    Err(e) => return Ok(Err(e.into())),
                };
                key_object = Some(objects::label(s, handle)?);
                keys.insert(version, handle);
            }
            versions.push(AdoptedVersion {
                info: v.info.clone(),
                key_object,
            });
        }

        // 2. The metadata key: one left by an interrupted run is checked
        // like any key; otherwise one is generated (not in a dry run).
        let leftover = match self.find_key_object(s, &id, None)? {
            Ok(found) => found,
            Err(e) => return Ok(Err(e.into())),
        };
        let mut report = Upgrade {
            outcome: UpgradeOutcome::WouldAdopt,
            keyring_id: id,
            from_revision: raw.revision,
            revision: raw.revision,
            versions,
            metadata_key: if leftover.is_some() {
                MetadataKey::Leftover
            } else {
                MetadataKey::Generated
            },
            metadata_key_label: self.metadata_key_label(),
            erased: Vec::new(),
        };

        // 3. The check values: proves each key seals with AES-GCM, and
        // writes nothing (also done in a dry run).
        let mut checks = BTreeMap::new();
        for (&version, &handle) in &keys {
            let iv = match fresh_iv() {
                Ok(iv) => iv,
                Err(e) => return Ok(Err(e)),
            };
            checks.insert(
                version,
                Seal::make(s, handle, iv, &objects::check_aad(&id, version))?,
            );
        }
        if dry_run {
            return Ok(Ok(report));
        }
        let mac_iv = match fresh_iv() {
            Ok(iv) => iv,
            Err(e) => return Ok(Err(e)),
        };
        let (mac_key, generated) = match leftover {
            Some(h) => (h, None),
            None => match self.generate_key(s, &id, None)? {
                Ok(h) => (h, Some(h)),
                Err(e) => return Ok(Err(e.into())),
            },
        };
        // Whatever this run made goes again when it cannot finish.
        let undo = |s: &Session| -> Result<(), CkError> {
            if let Some(h) = generated {
                s.destroy_object(h)?;
            }
            Ok(())
        };

        // 4. Compare: the revision read is still the newest, unchanged.
        let older = self.metadata_objects(s)?;
        if !self.still_newest(s, &raw)? {
            undo(s)?;
            return Ok(Err(Pkcs11Error::Conflict {
                label: self.settings.token_label.clone(),
            }
            .into()));
        }

        // 5. Revision n+1 (the commit point), read back authenticated.
        // An unverified (older kekd's) revision: refuse one that cannot be
        // followed rather than wrap.
        let Some(revision) = raw.revision.checked_add(1) else {
            return Ok(Err(Pkcs11Error::MetadataForged {
                label: raw.label.clone(),
                reason: "its revision number is the largest possible, which kekd never writes"
                    .to_owned(),
            }
            .into()));
        };
        let body = file.encode();
        let created = self.create_revision(s, revision, &body, &checks, mac_key, mac_iv)?;
        match self.read_verified(s)? {
            Ok(Some(v)) if v.revision == revision && v.file.id == id => {}
            read => {
                s.destroy_object(created)?;
                undo(s)?;
                return Ok(Err(match read {
                    Err(e) => e,
                    // Someone wrote a revision at the same time.
                    Ok(_) => Pkcs11Error::Conflict {
                        label: self.settings.token_label.clone(),
                    }
                    .into(),
                }));
            }
        }

        // 6. The older revisions and any destroyed version's key object.
        report.erased = self.drop_older(s, older, &file)?;
        report.outcome = UpgradeOutcome::Adopted;
        report.revision = revision;
        Ok(Ok(report))
    }

    /// The one private key object of `version`, if this kekd would serve it.
    /// A public object in its place is named (never used): the older kekd
    /// made only private keys.
    fn adoptable_key(
        &self,
        s: &Session,
        id: &KeyringId,
        version: KeyVersion,
    ) -> Result<Result<ObjectHandle, Pkcs11Error>, CkError> {
        let object_id = key_object_id(id, Some(version));
        let refused = |label: String, reason| Pkcs11Error::NotAdoptable {
            token: self.settings.token_label.clone(),
            what: format!("version {version}"),
            label,
            id: hex(&object_id),
            reason,
        };
        match self.find_key_object(s, id, Some(version))? {
            Ok(Some(h)) => Ok(Ok(h)),
            Err(Pkcs11Error::KeyRefused { label, reason, .. }) => Ok(Err(refused(label, reason))),
            Err(e) => Ok(Err(e)),
            Ok(None) => {
                let public = s.find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Id(object_id.clone()),
                    Attribute::Private(false),
                ])?;
                Ok(Err(match public.first() {
                    Some(&h) => refused(
                        objects::label(s, h)?,
                        "is not private (CKA_PRIVATE): anyone could have created it without the PIN",
                    ),
                    None => Pkcs11Error::KeyMissing {
                        version,
                        label: self.label_of(version),
                    },
                }))
            }
        }
    }

    /// Whether `raw` is still the newest metadata revision, with the same value.
    fn still_newest(&self, s: &Session, raw: &RawMetadata) -> Result<bool, CkError> {
        Ok(matches!(
            self.read_metadata(s)?,
            Ok(Some(now)) if now.revision == raw.revision && now.value == raw.value
        ))
    }

    fn no_keyring(&self) -> Pkcs11Error {
        Pkcs11Error::NoKeyring {
            label: self.settings.token_label.clone(),
            prefix: self.settings.key_label_prefix.clone(),
        }
    }
}

/// A fresh random GCM IV.
fn fresh_iv() -> Result<[u8; objects::IV_LEN], BackendError> {
    let mut iv = [0u8; objects::IV_LEN];
    crate::secret::fill_random(&mut iv).map_err(StoreError::from)?;
    Ok(iv)
}

#[cfg(test)]
mod tests {
    use crate::id::Timestamp;
    use crate::keyring::store::{KeyringFile, MAGIC_METADATA, MAGIC_METADATA_V1};

    /// What gets the MAC is the version-1 text re-encoded: the same keyring
    /// under the version-2 magic (`encode` always writes the current one).
    #[test]
    fn v1_text_reencodes_as_v2_with_the_same_versions() {
        let file = KeyringFile::generate_metadata(Timestamp::from_unix(1_700_000_000)).unwrap();
        let v2 = file.encode();
        let v1 = v2.replacen(MAGIC_METADATA, MAGIC_METADATA_V1, 1);
        // The checksum covers the magic line: recompute it for the v1 text.
        let body = &v1[..v1.rfind("sha256 ").unwrap()];
        let digest = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
            body.as_bytes(),
        ));
        let v1 = format!(
            "{body}sha256 {}\n",
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let parsed = KeyringFile::parse(v1.as_bytes()).unwrap();
        assert_eq!(parsed.id, file.id);
        assert_eq!(parsed.infos(), file.infos());
        assert!(v2.starts_with("kekd-keyring-meta v2\n"));
        assert_eq!(parsed.encode().as_str(), v2.as_str());
    }
}
