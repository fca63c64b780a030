//! The local backend: KEKs read from a keyring file, AES-256-GCM in process.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key};

use crate::backend::{Backend, BackendError, KeyHandle, KeyringStore};
use crate::envelope::Nonce;
use crate::keyring::{Keyring, KeyringError, Timestamp, store};
use crate::secret::{Kek, KeyFingerprint, Plaintext};

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
        let file = store::read(&self.path)?;
        keyring_from_file(file).map_err(|e| BackendError::Keyring {
            source_name: self.describe(),
            error: Box::new(e),
        })
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
        Ok(store::KeyringFile::generate(now).map_err(store::StoreError::from)?)
    }

    fn read(&self) -> Result<store::KeyringFile, BackendError> {
        Ok(store::read(&self.path)?)
    }

    fn create(&self, file: &store::KeyringFile) -> Result<(), BackendError> {
        Ok(store::create(&self.path, file)?)
    }

    fn replace(
        &self,
        _old: &store::KeyringFile,
        new: &store::KeyringFile,
    ) -> Result<(), BackendError> {
        Ok(store::replace(&self.path, new)?)
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
                v.kek.map(|k| KeyHandle::Local(Box::new(LocalKey::new(&k)))),
            )
        })
        .collect();
    Keyring::new(file.id, versions)
}

/// A version's KEK for AES-256-GCM.
///
/// The raw key stays in its locked, non-dumpable page ([`Kek`]); the expanded
/// cipher state exists only for the length of one seal or open and is zeroed
/// when dropped (aes-gcm's `zeroize` feature). Expanding an AES-256 key costs
/// far less than the gRPC call around it (`benches/envelope.rs`), and it keeps
/// the round keys — as good as the key itself — out of long-lived heap memory.
pub struct LocalKey {
    kek: Kek,
    fingerprint: KeyFingerprint,
}

impl LocalKey {
    /// Holds a copy of `kek` in locked memory; the caller keeps (and zeroes)
    /// its own.
    pub fn new(kek: &Kek) -> Self {
        Self {
            kek: Kek::from_bytes(*kek.expose_secret()),
            fingerprint: kek.fingerprint(),
        }
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(<&Key<Aes256Gcm>>::from(self.kek.expose_secret()))
    }

    pub(crate) fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint
    }

    pub(crate) fn seal(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        plaintext: &Plaintext,
    ) -> Result<Vec<u8>, BackendError> {
        self.cipher()
            .encrypt(
                nonce.into(),
                Payload {
                    msg: plaintext.expose_secret(),
                    aad,
                },
            )
            .map_err(|_| BackendError::Seal)
    }

    pub(crate) fn open(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, BackendError> {
        self.cipher()
            .decrypt(nonce.into(), Payload { msg: sealed, aad })
            .map(Plaintext::new)
            .map_err(|_| BackendError::Decrypt)
    }
}
