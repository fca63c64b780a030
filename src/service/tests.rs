use super::*;
use crate::envelope::EnvelopeError;
use crate::id::KeyVersion;
use crate::kek::{BackendError, ErrorKind};
use crate::keyring::KeyState;

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

/// The one error mapping, as a table: every variant, its code and message.
#[test]
fn error_to_status_table() {
    use KeyringError as K;
    use tonic::Code;
    let uid = Uid::from_wire("0b7d1b43-6cbe-4a57-8a1e-5f36bd2a1a53");
    let cases: Vec<(ServiceError, Code, &str)> = vec![
        (
            K::EmptyPlaintext.into(),
            Code::InvalidArgument,
            "plaintext is empty",
        ),
        (
            K::PlaintextTooLong { len: 4097 }.into(),
            Code::InvalidArgument,
            "plaintext is 4097 bytes; at most 991 fit the apiserver's 1024-byte ciphertext limit",
        ),
        (
            K::UnknownKeyId.into(),
            Code::InvalidArgument,
            "key_id was not issued by this keyring",
        ),
        (
            K::KeyIdMismatch {
                key_id: v(2),
                header: v(1),
            }
            .into(),
            Code::InvalidArgument,
            "key_id names version 2 but the ciphertext header names version 1",
        ),
        (
            K::UnknownVersion { version: v(9) }.into(),
            Code::InvalidArgument,
            "key version 9 is not in this keyring",
        ),
        (
            K::Envelope(EnvelopeError::Empty).into(),
            Code::InvalidArgument,
            "malformed ciphertext: ciphertext is empty",
        ),
        (
            K::Decrypt.into(),
            Code::InvalidArgument,
            "ciphertext could not be decrypted",
        ),
        (
            K::Unusable {
                version: v(1),
                state: KeyState::Retired,
            }
            .into(),
            Code::FailedPrecondition,
            "key version 1 is retired and cannot decrypt (restore it with `kekd admin restore`)",
        ),
        (
            ServiceError::UnexpectedAnnotations,
            Code::InvalidArgument,
            "ciphertext came with annotations, but kekd issues none: it was not produced by kekd",
        ),
        (
            ServiceError::Unhealthy,
            Code::Unavailable,
            "kekd is unhealthy: the KEK self-check failed (see kekd's log)",
        ),
        (
            ServiceError::PeerNotAllowed {
                uid: Some(1000),
                gid: None,
            },
            Code::PermissionDenied,
            "caller uid 1000 gid unknown is not allowed by kekd's --allow-uid/--allow-gid",
        ),
    ];
    for (err, code, message) in cases {
        let status = err.to_status(&uid);
        assert_eq!(status.code(), code, "{err}");
        assert_eq!(status.message(), message);
    }
    // A backend error maps by its kind alone: an outage is UNAVAILABLE with
    // the backend's own message, everything else an opaque INTERNAL.
    for kind in ErrorKind::ALL {
        let e = BackendError::new(
            kind,
            std::io::Error::other("key store \"t\" is unavailable: gone"),
        );
        let status = ServiceError::from(K::Backend(e)).to_status(&uid);
        if kind == ErrorKind::Unavailable {
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(status.message(), "key store \"t\" is unavailable: gone");
        } else {
            assert_eq!(status.code(), Code::Internal, "{kind:?}");
        }
    }

    let internal_message =
        "internal error in kekd (request uid 0b7d1b43-6cbe-4a57-8a1e-5f36bd2a1a53); see kekd's log";
    for err in [
        ServiceError::from(K::SelfCheck {
            version: v(1),
            reason: "x".into(),
        }),
        ServiceError::from(K::Invalid("x".into())),
        ServiceError::from(K::Backend(BackendError::seal())),
    ] {
        let status = err.to_status(&uid);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), internal_message);
    }
}

#[test]
fn uid_is_sanitized_for_logs() {
    assert_eq!(Uid::from_wire("abc-123").to_string(), "abc-123");
    assert_eq!(Uid::from_wire("").to_string(), "-");
    assert_eq!(Uid::from_wire("a\nFAKE log line").to_string(), "<invalid>");
    assert_eq!(Uid::from_wire(&"a".repeat(65)).to_string(), "<invalid>");
}

#[test]
fn plaintext_messages_debug_without_bytes() {
    let req = pb::EncryptRequest {
        plaintext: vec![0xAB; 32],
        uid: "u1".into(),
    };
    assert_eq!(
        format!("{req:?}"),
        "EncryptRequest { plaintext: <32 bytes redacted>, uid: \"u1\" }"
    );
    let resp = pb::DecryptResponse {
        plaintext: vec![0xCD; 32],
    };
    assert_eq!(
        format!("{resp:?}"),
        "DecryptResponse { plaintext: <32 bytes redacted> }"
    );
}

#[test]
fn peer_policy() {
    let open = PeerPolicy::default();
    assert!(open.allows(Some((1000, 1000))));
    assert!(open.allows(None));
    let root_only = PeerPolicy {
        uids: vec![0],
        gids: vec![],
    };
    assert!(root_only.allows(Some((0, 5))));
    assert!(!root_only.allows(Some((1000, 0))));
    assert!(
        !root_only.allows(None),
        "no credentials never pass a restriction"
    );
    let group = PeerPolicy {
        uids: vec![],
        gids: vec![42],
    };
    assert!(group.allows(Some((1000, 42))));
    assert!(!group.allows(Some((42, 1000))));
}
