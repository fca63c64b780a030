//! The envelope parser and the open path of a real keyring.
//!
//! Input: one selector byte (which key id is sent, `envelope_key_id`), then
//! the ciphertext. Checks:
//! - `Envelope::parse` is total and canonical: whatever parses re-encodes to
//!   the same bytes, within the format's length limits;
//! - `Keyring::decrypt` through the fixture keyring (fixed test KEKs, local
//!   backend, one version of every state) only ever succeeds for an envelope
//!   kekd sealed, byte for byte, with its own key id, and returns exactly the
//!   plaintext sealed: a mutated valid envelope never opens;
//! - every refusal is a client error (the gRPC code the service would send
//!   is INVALID_ARGUMENT or FAILED_PRECONDITION), never an internal one.
#![no_main]

use kekd::envelope::{self, Envelope, EnvelopeError};
use kekd::keyring::KeyringError;
use kekd::service::{ServiceError, Uid};
use kekd_fuzz::{Fixture, envelope_key_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, ciphertext)) = data.split_first() else {
        return;
    };
    let fx = Fixture::get();

    match Envelope::parse(ciphertext) {
        Ok(e) => {
            assert_eq!(
                Envelope::encode(e.version, e.nonce, e.sealed),
                ciphertext,
                "parse then encode must give back the input"
            );
            assert!(
                (envelope::OVERHEAD + 1..=envelope::MAX_CIPHERTEXT_LEN).contains(&ciphertext.len())
            );
            assert_eq!(ciphertext[0], envelope::FORMAT_V1);
        }
        Err(e) => {
            let expected = match ciphertext {
                [] => EnvelopeError::Empty,
                c if c.len() > envelope::MAX_CIPHERTEXT_LEN => {
                    EnvelopeError::TooLong { len: c.len() }
                }
                [f, ..] if *f != envelope::FORMAT_V1 => EnvelopeError::UnknownFormat { format: *f },
                c if c.len() <= envelope::OVERHEAD => EnvelopeError::Truncated { len: c.len() },
                _ => EnvelopeError::ZeroVersion,
            };
            assert_eq!(e, expected);
        }
    }

    let key_id = envelope_key_id(selector, ciphertext);
    let result = fx.runtime.block_on(fx.keyring.decrypt(&key_id, ciphertext));
    match result {
        Ok((version, plaintext)) => {
            let Some(known) = fx.lookup(ciphertext) else {
                panic!("a ciphertext kekd never produced opened under {key_id}");
            };
            assert_eq!(
                known.key_id, key_id,
                "opened under another key id than it was sealed with"
            );
            assert!(
                known.state.can_decrypt(),
                "a {} version decrypted",
                known.state
            );
            assert_eq!(plaintext.expose_secret(), known.plaintext.as_slice());
            assert_eq!(kekd_fuzz::key_id(version.get()), key_id);
        }
        Err(e) => {
            if let Some(known) = fx.lookup(ciphertext)
                && known.key_id == key_id
                && known.state.can_decrypt()
            {
                panic!("an envelope kekd sealed did not open: {e}");
            }
            assert!(
                matches!(
                    e,
                    KeyringError::UnknownKeyId
                        | KeyringError::KeyIdMismatch { .. }
                        | KeyringError::UnknownVersion { .. }
                        | KeyringError::Unusable { .. }
                        | KeyringError::Envelope(_)
                        | KeyringError::Decrypt
                ),
                "unexpected error kind: {e:?}"
            );
            let status = ServiceError::Keyring(e).to_status(&Uid::none());
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ),
                "{status:?}"
            );
        }
    }
});
