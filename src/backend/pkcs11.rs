//! The PKCS#11 backend: KEKs generated and kept inside an HSM token.
//!
//! # Where things live
//!
//! - Each KEK version is an AES-256 secret-key object generated **in the
//!   token** (`CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not extractable,
//!   encrypt/decrypt only), labelled `<prefix>v<version>`, with `CKA_ID` =
//!   keyring id (16 bytes) ‖ version (big-endian u32), restricted to
//!   `CKM_AES_GCM`.
//! - The keyring's metadata — id, versions, states, times; the same text
//!   format as a local keyring, but with the `kekd-keyring-meta v2` magic and
//!   no key fields, followed by each version's key check value and a MAC —
//!   is one private data object in the same token, labelled
//!   `<prefix>keyring@<revision>` (application `kekd`). The MAC is made in
//!   the token under a key of its own (`<prefix>metadata-key`, `CKA_ID` =
//!   keyring id ‖ 00000000). Every kekd pointed at the token reads the same
//!   metadata, so a rotation made once is seen by all nodes without copying
//!   files.
//! - kekd reads **private** objects only, and uses a key object only if its
//!   attributes show the token generated it and never lets it out, and it
//!   opens the check value recorded when kekd generated it
//!   ([`objects`] says why and how).
//! - Metadata an older kekd wrote (`kekd-keyring-meta v1`: no check values,
//!   no MAC) is refused until `kekd admin upgrade-token` adopts it
//!   (`pkcs11/upgrade.rs` says what it checks and what a crash leaves).
//! - Usage counters and the audit log are per node, under `state_dir`.
//!
//! # Files
//!
//! This file is the backend (load, revision, the keyring store) and its
//! constants; `token.rs` the connection, session pool and call threads;
//! `metadata.rs` reading, authenticating and writing the metadata and
//! finding or generating key objects; `objects.rs` the checks on every
//! object kekd trusts and the metadata's framing and MAC; `key.rs` one
//! version's key object (seal, open); `error.rs` the errors and their kinds;
//! `settings.rs` the settings and the PIN; `upgrade.rs` adopting older
//! metadata.
//!
//! # Sessions
//!
//! A bounded pool: at most `pool_size` sessions, each used by one call at a
//! time (a `Session` is `Send`, not `Sync`), handed out behind an async
//! semaphore so waiting callers do not occupy threads, and the blocking
//! PKCS#11 calls run on tokio's blocking pool. The user logs in once (a
//! second login's `CKR_USER_ALREADY_LOGGED_IN` is fine). A session that saw
//! any error is closed, never returned to the pool, so no half-finished
//! operation can poison later calls; GCM needs no per-call objects.
//!
//! # Outages
//!
//! Errors that mean the token or the login is gone (session handle invalid,
//! device removed, token not present, user not logged in, …) drop every
//! session and mark the connection broken. The next call reconnects — find
//! the slot by label, open, log in, re-find objects — no sooner than a backoff
//! (100 ms doubling to 5 s); calls in between fail at once. An incorrect PIN
//! stops all login attempts until the process restarts, so the token's
//! lockout counter is never run down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{Backend, BackendError, KeyringStore};
use crate::kek::KeyHandle;
use crate::keyring::Keyring;
use crate::keyring::store::{KeyringFile, StoreError};

mod error;
mod key;
mod metadata;
mod objects;
mod settings;
mod token;
mod upgrade;

pub use error::Pkcs11Error;
pub use key::Pkcs11Key;
pub use settings::{
    DEFAULT_KEY_LABEL_PREFIX, DEFAULT_POOL_SIZE, DEFAULT_STATE_DIR, Pkcs11Settings,
};
pub use token::Token;
pub use upgrade::{AdoptedVersion, MetadataKey, Upgrade, UpgradeOutcome};

use error::{LOAD_ATTEMPTS, vanished};
use key::KeyObject;
use metadata::key_object_id;

/// Label suffix of the metadata object.
const METADATA_LABEL: &str = "keyring";
/// Label suffix of the metadata-authentication key.
const METADATA_KEY_LABEL: &str = "metadata-key";
/// `CKA_APPLICATION` of the metadata object.
const APPLICATION: &str = "kekd";
/// GCM tag length in bits.
const TAG_BITS: u64 = 128;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most public look-alike objects logged (and remembered) one by one.
const MAX_PUBLIC_REPORTED: usize = 256;

/// Serves the keyring stored in a token.
#[derive(Debug, Clone)]
pub struct Pkcs11Backend {
    token: Arc<Token>,
}

impl Pkcs11Backend {
    /// Connects to the token (exit 78 on module, token or PIN problems).
    ///
    /// # Errors
    /// See [`Token::connect`].
    pub fn connect(settings: Pkcs11Settings) -> Result<Self, Pkcs11Error> {
        Ok(Self {
            token: Token::connect(settings)?,
        })
    }

    /// The connection to the token.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }
}

impl Backend for Pkcs11Backend {
    fn describe(&self) -> String {
        self.token.describe()
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn attach_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.token.metrics.set(metrics);
    }

    fn load(&self) -> Result<Keyring, BackendError> {
        let token = &self.token;
        let (file, keys, generation) = token.with_session("load the keyring", |s, g| {
            // One pass over the token's objects. A handle that vanishes
            // mid-pass means the token changed under it (another node's
            // write, objects created or deleted without the PIN; SoftHSM
            // also renumbers handles when another process changes the
            // token): read it again, a few times, before calling it an error.
            let read_once = || {
                let read = token.read_verified(s)?;
                let id = match &read {
                    Ok(Some(v)) => Some(v.file.id),
                    _ => None,
                };
                token.report_public(s, id.as_ref())?;
                let verified = match read {
                    Ok(Some(v)) => v,
                    Ok(None) => {
                        return Ok(Err(BackendError::from(Pkcs11Error::NoKeyring {
                            label: token.settings.token_label.clone(),
                            prefix: token.settings.key_label_prefix.clone(),
                        })));
                    }
                    Err(e) => return Ok(Err(e)),
                };
                // Resolve and check every key object now: a key deleted, planted
                // or swapped behind kekd's back makes this keyring invalid
                // rather than fail (or succeed under the wrong key) per call.
                let id = verified.file.id;
                let mut keys = BTreeMap::new();
                for v in &verified.file.versions {
                    let version = v.info.version;
                    let Some(&check) = verified.checks.get(&version) else {
                        continue; // no material (read_verified matched them up)
                    };
                    let handle = match token.find_key_object(s, &id, Some(version))? {
                        Ok(Some(h)) => h,
                        Ok(None) => {
                            return Ok(Err(Pkcs11Error::KeyMissing {
                                version,
                                label: token.label_of(version),
                            }
                            .into()));
                        }
                        Err(e) => return Ok(Err(e.into())),
                    };
                    if !check.opens(s, handle, &objects::check_aad(&id, version))? {
                        return Ok(Err(Pkcs11Error::CheckFailed {
                            version,
                            label: objects::label(s, handle)?,
                        }
                        .into()));
                    }
                    keys.insert(version, (handle, check));
                }
                Ok(Ok((verified.file, keys, g)))
            };
            let mut attempts = 1;
            loop {
                match read_once() {
                    Err(e) if vanished(&e) && attempts < LOAD_ATTEMPTS => attempts += 1,
                    read => break read,
                }
            }
        })??;
        let id = file.id;
        let mut versions = Vec::with_capacity(file.versions.len());
        for v in file.versions {
            let key = keys.get(&v.info.version).map(|&(handle, check)| {
                Box::new(Pkcs11Key {
                    token: Arc::clone(&self.token),
                    object: Arc::new(KeyObject {
                        object_id: key_object_id(&id, Some(v.info.version)),
                        check,
                        check_aad: objects::check_aad(&id, v.info.version),
                        cached: Mutex::new((generation, handle)),
                    }),
                }) as Box<dyn KeyHandle>
            });
            versions.push((v.info, key));
        }
        Keyring::new(id, versions).map_err(|e| e.loading(self.describe()))
    }

    fn revision(&self) -> Option<String> {
        None
    }

    fn watch_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn state_anchor(&self) -> Option<PathBuf> {
        Some(state_anchor(&self.token.settings))
    }
}

impl KeyringStore for Pkcs11Backend {
    fn name(&self) -> String {
        self.token.describe()
    }

    fn anchor(&self) -> PathBuf {
        state_anchor(&self.token.settings)
    }

    fn generate(&self, now: crate::id::Timestamp) -> Result<KeyringFile, BackendError> {
        Ok(KeyringFile::generate_metadata(now).map_err(StoreError::from)?)
    }

    fn read(&self) -> Result<KeyringFile, BackendError> {
        self.token.load_metadata()
    }

    fn create(&self, file: &KeyringFile) -> Result<(), BackendError> {
        self.token.write_metadata(None, file)
    }

    fn replace(&self, old: &KeyringFile, new: &KeyringFile) -> Result<(), BackendError> {
        self.token.write_metadata(Some(old), new)
    }
}

/// The per-node file the usage counters, audit log and admin lock of a
/// token keyring sit beside: `<state_dir>/pkcs11-<token label>-<prefix>`.
pub fn state_anchor(s: &Pkcs11Settings) -> PathBuf {
    let clean = |x: &str| {
        x.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    s.state_dir.join(format!(
        "pkcs11-{}-{}",
        clean(&s.token_label),
        clean(&s.key_label_prefix)
    ))
}
