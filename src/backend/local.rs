//! The local backend: KEKs read from a keyring file, AES-256-GCM in process.

use std::path::{Path, PathBuf};

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256Enc;
use aes_gcm::{AesGcm, Key};

use crate::backend::{Backend, BackendError, KeyringStore};
use crate::envelope::Nonce;
use crate::id::Timestamp;
use crate::kek::{KeyFuture, KeyHandle};
use crate::keyring::store::{self, StoreError};
use crate::keyring::{Keyring, KeyringError};
use crate::secret::{
    Kek, KeyFingerprint, LockedBox, Plaintext, SCRUB_AFTER_CALL, SCRUB_AFTER_SETUP,
    with_scrubbed_stack,
};

/// Serves the keyring file at a path.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    path: PathBuf,
}

impl LocalBackend {
    /// A backend for the keyring file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The keyring file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        format!("local keyring {}", self.path.display())
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn revision(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        // Any replacement (rename: new inode), edit (mtime, size) or
        // permission fix (ctime, mode) changes this.
        Some(match std::fs::metadata(&self.path) {
            Ok(m) => format!(
                "{}:{}:{}:{}.{}:{}.{}:{:o}",
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
                m.mode()
            ),
            Err(e) => format!("error:{:?}", e.kind()),
        })
    }

    fn watch_paths(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn state_anchor(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    fn load(&self) -> Result<Keyring, BackendError> {
        let file = store::read(&self.path).map_err(BackendError::from)?;
        keyring_from_file(file).map_err(|e| e.loading(self.describe()))
    }
}

impl KeyringStore for LocalBackend {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn anchor(&self) -> PathBuf {
        self.path.clone()
    }

    fn generate(&self, now: Timestamp) -> Result<store::KeyringFile, BackendError> {
        store::KeyringFile::generate(now).map_err(|e| BackendError::from(StoreError::from(e)))
    }

    fn read(&self) -> Result<store::KeyringFile, BackendError> {
        store::read(&self.path).map_err(BackendError::from)
    }

    fn create(&self, file: &store::KeyringFile) -> Result<(), BackendError> {
        store::create(&self.path, file).map_err(BackendError::from)
    }

    fn replace(
        &self,
        _old: &store::KeyringFile,
        new: &store::KeyringFile,
    ) -> Result<(), BackendError> {
        store::replace(&self.path, new).map_err(BackendError::from)
    }
}

/// Builds a serving snapshot from a parsed keyring file; the file's raw keys
/// are dropped (and zeroed) once expanded.
///
/// # Errors
/// When the versions break a keyring rule.
pub fn keyring_from_file(file: store::KeyringFile) -> Result<Keyring, KeyringError> {
    if file.material != store::Material::Inline {
        return Err(KeyringError::Invalid(
            "this file is PKCS#11 token metadata, not a local keyring (serve it with `kind = \"pkcs11\"`)".to_owned(),
        ));
    }
    let versions = file
        .versions
        .into_iter()
        .map(|v| {
            (
                v.info,
                v.kek
                    .map(|k| Box::new(LocalKey::new(&k)) as Box<dyn KeyHandle>),
            )
        })
        .collect();
    Keyring::new(file.id, versions)
}

/// AES-256-GCM (96-bit nonces, 128-bit tags) over AES-256 with only the
/// encryption key schedule: GCM never runs the block cipher backwards, so
/// no decryption schedule is ever computed.
type Cipher = AesGcm<Aes256Enc, U12>;

/// A version's KEK for AES-256-GCM.
///
/// The cipher — the expanded key schedule (its first two round keys *are*
/// the KEK) and the GHASH key — is built once, when the keyring is loaded,
/// and moved straight into a locked, non-dumpable page of its own
/// ([`LockedBox`]), where seal and open borrow it; no call builds, copies or
/// moves it, so it never reaches a task's future, the heap or a freed
/// chunk. The stack it was built on is scrubbed before `new` returns. The
/// raw KEK is not kept: the schedule is all seal and open need.
pub struct LocalKey {
    cipher: LockedBox<Cipher>,
    fingerprint: KeyFingerprint,
}

impl LocalKey {
    /// Expands `kek` into a cipher in locked memory; the caller keeps (and
    /// zeroes) its own copy of the key.
    pub fn new(kek: &Kek) -> Self {
        with_scrubbed_stack::<SCRUB_AFTER_SETUP, _>(|| Self {
            cipher: LockedBox::new(Cipher::new(<&Key<Cipher>>::from(kek.expose_secret()))),
            fingerprint: kek.fingerprint(),
        })
    }

    /// Seals under the locked cipher; the stack the cipher ran on (spilled
    /// round keys) is zeroed before this returns.
    fn seal_now(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        plaintext: &Plaintext,
    ) -> Result<Vec<u8>, BackendError> {
        with_scrubbed_stack::<SCRUB_AFTER_CALL, _>(|| {
            self.cipher.encrypt(
                nonce.into(),
                Payload {
                    msg: plaintext.expose_secret(),
                    aad,
                },
            )
        })
        .map_err(|_| BackendError::seal())
    }

    /// Opens under the locked cipher; as [`LocalKey::seal`], the stack is
    /// zeroed before this returns.
    fn open_now(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, BackendError> {
        with_scrubbed_stack::<SCRUB_AFTER_CALL, _>(|| {
            self.cipher
                .decrypt(nonce.into(), Payload { msg: sealed, aad })
        })
        .map(Plaintext::new)
        .map_err(|_| BackendError::decrypt())
    }
}

/// Seal and open run on the calling task: a few microseconds of AES-GCM,
/// nothing to wait for.
impl KeyHandle for LocalKey {
    fn seal<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        plaintext: &'a Plaintext,
    ) -> KeyFuture<'a, (Nonce, Vec<u8>)> {
        let sealed = self.seal_now(nonce, aad, plaintext).map(|s| (*nonce, s));
        Box::pin(std::future::ready(sealed))
    }

    fn open<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        sealed: &'a [u8],
    ) -> KeyFuture<'a, Plaintext> {
        Box::pin(std::future::ready(self.open_now(nonce, aad, sealed)))
    }

    fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests;
