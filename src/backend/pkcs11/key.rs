//! One version's key object, as the keyring uses it: seal and open in the
//! token, on its call threads, with the object's handle cached per
//! connection generation.

use std::sync::{Arc, Mutex};

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use tracing::warn;

use crate::backend::BackendError;
use crate::envelope::Nonce;
use crate::kek::{KeyFuture, KeyHandle};
use crate::secret::{KeyFingerprint, Plaintext};

use super::error::is_connection_loss;
use super::metadata::hex;
use super::objects::{self, Seal};
use super::{TAG_BITS, Token};

/// One version's key object in the token.
pub struct Pkcs11Key {
    pub(super) token: Arc<Token>,
    pub(super) object: Arc<KeyObject>,
}

/// How to find a key object, with its handle cached per connection generation.
pub(super) struct KeyObject {
    pub(super) object_id: Vec<u8>,
    /// The check value recorded when kekd generated the key.
    pub(super) check: Seal,
    pub(super) check_aad: Vec<u8>,
    pub(super) cached: Mutex<(u64, ObjectHandle)>,
}

impl KeyObject {
    fn handle(&self, s: &Session, generation: u64) -> Result<ObjectHandle, CkError> {
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.0 == generation {
            return Ok(cached.1);
        }
        // Found again after a reconnect: it must still be the one private
        // key kekd generated, or the call fails (the next reload says why).
        let gone = CkError::Pkcs11(RvError::KeyHandleInvalid, Function::FindObjects);
        let found = s.find_objects(&objects::private(vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(self.object_id.clone()),
        ]))?;
        let &[handle] = found.as_slice() else {
            return Err(gone);
        };
        if objects::verify_key(s, handle)?.is_some()
            || !self.check.opens(s, handle, &self.check_aad)?
        {
            warn!(
                object_id = %hex(&self.object_id),
                "the key object found after a reconnect is not the key kekd loaded; not using it"
            );
            return Err(gone);
        }
        *cached = (generation, handle);
        Ok(handle)
    }
}

impl Pkcs11Key {
    async fn seal_on_token(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        plaintext: &Plaintext,
    ) -> Result<(Nonce, Vec<u8>), BackendError> {
        let (mut iv, aad) = (*nonce, aad.to_vec());
        let data = zeroize::Zeroizing::new(plaintext.expose_secret().to_vec());
        let object = Arc::clone(&self.object);
        self.token
            .run("encrypt", move |s, g| {
                let handle = object.handle(s, g)?;
                let sealed = {
                    let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                    s.encrypt(&Mechanism::AesGcm(params), handle, &data)?
                };
                // Some HSMs (FIPS modes) generate the IV themselves and write
                // it back into the parameters: the envelope must carry
                // whatever IV was really used.
                Ok((iv, sealed))
            })
            .await
            .map_err(BackendError::from)
    }

    async fn open_on_token(
        &self,
        nonce: &Nonce,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Plaintext, BackendError> {
        let (mut iv, aad, data) = (*nonce, aad.to_vec(), sealed.to_vec());
        let object = Arc::clone(&self.object);
        match self
            .token
            .run("decrypt", move |s, g| {
                let handle = object.handle(s, g)?;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                match s.decrypt(&Mechanism::AesGcm(params), handle, &data) {
                    Ok(pt) => Ok(Some(pt)),
                    // C_Decrypt itself refused the data (a bad tag: SoftHSM
                    // says GENERAL_ERROR, others ENCRYPTED_DATA_INVALID). The
                    // operation is over and the session clean: an answer,
                    // not a failure of the token.
                    Err(e @ CkError::Pkcs11(_, Function::Decrypt)) if !is_connection_loss(&e) => {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .await
        {
            Ok(Some(pt)) => Ok(Plaintext::new(pt)),
            Ok(None) => Err(BackendError::decrypt()),
            // A key handle that cannot be used, or any other token failure,
            // is kekd's problem, never "bad ciphertext".
            Err(e) => Err(e.into()),
        }
    }

    /// Identifies the key. A token never reveals key bytes, so the
    /// fingerprint binds the object's `CKA_ID` and the key check value kekd
    /// recorded when it generated the key: only that key opens it, so a
    /// reload refuses a version whose key object was replaced.
    fn fingerprint_of(&self) -> KeyFingerprint {
        let mut bytes = self.object.object_id.clone();
        bytes.extend_from_slice(self.object.check.as_bytes());
        KeyFingerprint::of_public(b"kekd/pkcs11-key/v2\0", &bytes)
    }
}

/// Seal and open run inside the token, on its session pool's own threads.
impl KeyHandle for Pkcs11Key {
    fn seal<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        plaintext: &'a Plaintext,
    ) -> KeyFuture<'a, (Nonce, Vec<u8>)> {
        Box::pin(self.seal_on_token(nonce, aad, plaintext))
    }

    fn open<'a>(
        &'a self,
        nonce: &'a Nonce,
        aad: &'a [u8],
        sealed: &'a [u8],
    ) -> KeyFuture<'a, Plaintext> {
        Box::pin(self.open_on_token(nonce, aad, sealed))
    }

    /// Identifies the key. A token never reveals key bytes, so the
    /// fingerprint binds the object's `CKA_ID` and the key check value kekd
    /// recorded when it generated the key: only that key opens it, so a
    /// reload refuses a version whose key object was replaced.
    fn fingerprint(&self) -> KeyFingerprint {
        self.fingerprint_of()
    }

    fn kind(&self) -> &'static str {
        "pkcs11"
    }
}
