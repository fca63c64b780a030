use proptest::prelude::*;

use super::*;

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

#[test]
fn layout_is_as_documented() {
    let nonce = [7u8; NONCE_LEN];
    let sealed = [9u8; 33];
    let bytes = Envelope::encode(v(0x0102_0304), &nonce, &sealed);
    assert_eq!(bytes[0], 0x01);
    assert_eq!(&bytes[1..5], &[1, 2, 3, 4]);
    assert_eq!(&bytes[5..17], &nonce);
    assert_eq!(&bytes[17..], &sealed);
    assert_eq!(HEADER_LEN, 17);
    assert_eq!(OVERHEAD, 33);
    assert_eq!(MAX_PLAINTEXT_LEN, 991);
}

#[test]
fn parse_rejects_every_malformed_shape() {
    let good = Envelope::encode(v(1), &[0; NONCE_LEN], &[0; TAG_LEN + 1]);
    assert!(Envelope::parse(&good).is_ok());
    assert_eq!(Envelope::parse(&[]), Err(EnvelopeError::Empty));
    assert_eq!(
        Envelope::parse(&good[..good.len() - 1]),
        Err(EnvelopeError::Truncated { len: OVERHEAD })
    );
    let mut wrong_format = good.clone();
    wrong_format[0] = 0x02;
    assert_eq!(
        Envelope::parse(&wrong_format),
        Err(EnvelopeError::UnknownFormat { format: 2 })
    );
    let mut zero = good.clone();
    zero[1..5].copy_from_slice(&[0; 4]);
    assert_eq!(Envelope::parse(&zero), Err(EnvelopeError::ZeroVersion));
    let long = vec![FORMAT_V1; MAX_CIPHERTEXT_LEN + 1];
    assert_eq!(
        Envelope::parse(&long),
        Err(EnvelopeError::TooLong {
            len: MAX_CIPHERTEXT_LEN + 1
        })
    );
}

#[test]
fn error_messages_are_precise() {
    assert_eq!(
        EnvelopeError::UnknownFormat { format: 0x7f }.to_string(),
        "ciphertext has unknown format byte 0x7f (this kekd reads format 0x01)"
    );
    assert_eq!(
        EnvelopeError::Truncated { len: 3 }.to_string(),
        "ciphertext is truncated (3 bytes, at least 34 needed)"
    );
}

#[test]
fn aad_binds_format_keyring_and_version() {
    let id: KeyringId = "00112233445566778899aabbccddeeff".parse().unwrap();
    let other: KeyringId = "00112233445566778899aabbccddeef0".parse().unwrap();
    let a = aad(&id, v(1));
    assert_eq!(&a[..14], b"kekd/envelope\0");
    assert_eq!(a[14], FORMAT_V1);
    assert_eq!(&a[15..31], id.as_bytes());
    assert_eq!(&a[31..], &[0, 0, 0, 1]);
    assert_ne!(a, aad(&id, v(2)));
    assert_ne!(a, aad(&other, v(1)));
}

proptest! {
    #[test]
    fn encode_parse_round_trip(
        version in 1u32..,
        nonce in any::<[u8; NONCE_LEN]>(),
        sealed in proptest::collection::vec(any::<u8>(), TAG_LEN + 1..=MAX_CIPHERTEXT_LEN - HEADER_LEN),
    ) {
        let bytes = Envelope::encode(v(version), &nonce, &sealed);
        let e = Envelope::parse(&bytes).unwrap();
        prop_assert_eq!(e.version.get(), version);
        prop_assert_eq!(e.nonce, &nonce);
        prop_assert_eq!(e.sealed, &sealed[..]);
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let _ = Envelope::parse(&bytes);
    }
}
