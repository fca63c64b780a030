//! The keyring with local keys: key ids, lifecycle rules, and sealing
//! and opening through real AES-256-GCM keys.

use proptest::prelude::*;

use super::keyring_from_file;
use crate::envelope::{self, Envelope, EnvelopeError};
use crate::id::{InvalidKeyId, KeyId, KeyVersion, KeyringId, Timestamp};
use crate::keyring::store::{KeyringFile, Material, StoredVersion};
use crate::keyring::*;
use crate::secret::Kek;
use crate::secret::Plaintext;

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix(secs)
}

const ID: &str = "5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40";

/// Versions 1 (decrypt-only), 2 (primary), 3 (retired), 4 (destroyed).
fn four_versions() -> Keyring {
    let mk = |n, state, byte| StoredVersion {
        info: VersionInfo::new(v(n), state, t(1_700_000_000)),
        kek: (state != KeyState::Destroyed).then(|| Kek::from_bytes([byte; 32])),
    };
    keyring_from_file(KeyringFile {
        material: Material::Inline,
        id: ID.parse().unwrap(),
        versions: vec![
            mk(1, KeyState::DecryptOnly, 1),
            mk(2, KeyState::Primary, 2),
            mk(3, KeyState::Retired, 3),
            mk(4, KeyState::Destroyed, 4),
        ],
    })
    .unwrap()
}

fn seed() -> Plaintext {
    Plaintext::new((0u8..32).collect())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn key_id_is_public_stable_and_strict() {
    let id: KeyringId = ID.parse().unwrap();
    let key_id = KeyId::new(&id, v(7));
    assert_eq!(key_id.as_str(), "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v7");
    assert_eq!(KeyId::parse(key_id.as_str()), Ok((id, v(7))));
    let longest = KeyId::new(&id, v(u32::MAX));
    assert!((1..=KeyId::MAX_LEN).contains(&longest.as_str().len()));
    for bad in [
        "",
        "kekd/",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v0",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v07",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v+7",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v4294967296",
        "kekd/5C0E9A1F2B3D4C6E8F7A9B0C1D2E3F40/v1",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f4/v1",
        "xkekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v1",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v1/",
        "kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v1 ",
    ] {
        assert_eq!(KeyId::parse(bad), Err(InvalidKeyId), "{bad:?}");
    }
}

#[test]
fn key_ids_of_different_keyrings_differ() {
    let a = KeyringId::generate().unwrap();
    let b = KeyringId::generate().unwrap();
    assert_ne!(KeyId::new(&a, v(1)), KeyId::new(&b, v(1)));
}

#[test]
fn validate_rules() {
    let info = |n, s| VersionInfo::new(v(n), s, t(0));
    assert_eq!(validate(&[info(1, KeyState::Primary)]).unwrap(), v(1));
    let msg = |infos: &[VersionInfo]| validate(infos).unwrap_err().to_string();
    assert_eq!(msg(&[]), "invalid keyring: keyring holds no version");
    assert_eq!(
        msg(&[info(1, KeyState::DecryptOnly)]),
        "invalid keyring: no version is primary; exactly one must be (kekd admin promote)"
    );
    assert_eq!(
        msg(&[info(1, KeyState::Primary), info(2, KeyState::Primary)]),
        "invalid keyring: versions 1 and 2 are both primary; exactly one may be"
    );
    assert_eq!(
        msg(&[info(2, KeyState::Primary), info(2, KeyState::Pending)]),
        "invalid keyring: version 2 appears after version 2; versions must be listed once each, in increasing order"
    );
    assert_eq!(
        msg(&[info(3, KeyState::Primary), info(1, KeyState::Pending)]),
        "invalid keyring: version 1 appears after version 3; versions must be listed once each, in increasing order"
    );
}

#[test]
fn timestamps_round_trip_strictly() {
    let ts = t(1_764_321_574);
    assert_eq!(ts.to_string(), "2025-11-28T09:19:34Z");
    assert_eq!("2025-11-28T09:19:34Z".parse::<Timestamp>(), Ok(ts));
    for bad in [
        "2025-11-28T09:19:34",
        "2025-11-28 09:19:34Z",
        "2025-11-28T09:19:34.5Z",
        "yesterday",
    ] {
        assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
    }
}

#[test]
fn encrypt_uses_primary_and_decrypt_routes_by_key_id() {
    let kr = four_versions();
    assert_eq!(kr.primary(), v(2));
    let (key_id, ct) = block_on(kr.encrypt(&seed())).unwrap();
    assert_eq!(&key_id, kr.primary_key_id());
    assert_eq!(ct[1..5], [0, 0, 0, 2]);
    let (version, pt) = block_on(kr.decrypt(key_id.as_str(), &ct)).unwrap();
    assert_eq!(version, v(2));
    assert_eq!(pt.expose_secret(), seed().expose_secret());
}

#[test]
fn equal_plaintexts_give_distinct_ciphertexts() {
    let kr = four_versions();
    let (_, a) = block_on(kr.encrypt(&seed())).unwrap();
    let (_, b) = block_on(kr.encrypt(&seed())).unwrap();
    assert_ne!(a, b);
}

#[test]
fn plaintext_size_limits() {
    let kr = four_versions();
    assert!(matches!(
        block_on(kr.encrypt(&Plaintext::new(vec![]))),
        Err(KeyringError::EmptyPlaintext)
    ));
    let (_, ct) = block_on(kr.encrypt(&Plaintext::new(vec![1; 991]))).unwrap();
    assert_eq!(ct.len(), 1024);
    assert!(matches!(
        block_on(kr.encrypt(&Plaintext::new(vec![1; 992]))),
        Err(KeyringError::PlaintextTooLong { len: 992 })
    ));
    assert!(matches!(
        block_on(kr.encrypt(&Plaintext::new(vec![1; 4097]))),
        Err(KeyringError::PlaintextTooLong { len: 4097 })
    ));
}

/// Decrypt with a ciphertext sealed under `version` of `kr` (sealing directly,
/// since only the primary encrypts through the public API).
fn sealed_under(kr: &Keyring, version: KeyVersion) -> Vec<u8> {
    let key = kr.handle(version).unwrap();
    let nonce = [5u8; envelope::NONCE_LEN];
    let aad = envelope::aad(kr.id(), version);
    let (nonce, sealed) = block_on(key.seal(&nonce, &aad, &seed())).unwrap();
    Envelope::encode(version, &nonce, &sealed)
}

#[test]
fn decrypt_only_versions_decrypt_and_retired_or_destroyed_refuse() {
    let kr = four_versions();
    let id = *kr.id();
    let ct1 = sealed_under(&kr, v(1));
    let (_, pt) = block_on(kr.decrypt(KeyId::new(&id, v(1)).as_str(), &ct1)).unwrap();
    assert_eq!(pt.expose_secret(), seed().expose_secret());

    let ct3 = sealed_under(&kr, v(3));
    let err = block_on(kr.decrypt(KeyId::new(&id, v(3)).as_str(), &ct3)).unwrap_err();
    assert!(
        matches!(err, KeyringError::Unusable { version, state: KeyState::Retired } if version == v(3))
    );

    let mut ct4 = ct1.clone();
    ct4[1..5].copy_from_slice(&4u32.to_be_bytes());
    let err = block_on(kr.decrypt(KeyId::new(&id, v(4)).as_str(), &ct4)).unwrap_err();
    assert!(matches!(
        err,
        KeyringError::Unusable {
            state: KeyState::Destroyed,
            ..
        }
    ));

    let mut ct9 = ct1;
    ct9[1..5].copy_from_slice(&9u32.to_be_bytes());
    let err = block_on(kr.decrypt(KeyId::new(&id, v(9)).as_str(), &ct9)).unwrap_err();
    assert!(matches!(err, KeyringError::UnknownVersion { version } if version == v(9)));
}

/// Every field of the envelope and of the key id has a tamper twin that fails.
#[test]
fn tamper_twins_all_fail() {
    let kr = four_versions();
    let (key_id, ct) = block_on(kr.encrypt(&seed())).unwrap();
    let key_id = key_id.as_str();
    let decrypt = |k: &str, c: &[u8]| block_on(kr.decrypt(k, c));
    assert!(decrypt(key_id, &ct).is_ok());

    // Authentication failures are one opaque error, whatever byte moved.
    for (what, index) in [
        ("nonce", 5),
        ("nonce end", 16),
        ("body", 17),
        ("tag", ct.len() - 1),
    ] {
        let mut bad = ct.clone();
        bad[index] ^= 0x01;
        assert!(
            matches!(decrypt(key_id, &bad), Err(KeyringError::Decrypt)),
            "{what}"
        );
    }
    // Structure.
    let mut bad = ct.clone();
    bad[0] = 0x02;
    assert!(matches!(
        decrypt(key_id, &bad),
        Err(KeyringError::Envelope(EnvelopeError::UnknownFormat {
            format: 2
        }))
    ));
    let mut bad = ct.clone();
    bad[4] ^= 0x01; // version 2 -> 3 in the header
    assert!(matches!(
        decrypt(key_id, &bad),
        Err(KeyringError::KeyIdMismatch { .. })
    ));
    let mut extended = ct.clone();
    extended.push(0);
    assert!(matches!(
        decrypt(key_id, &extended),
        Err(KeyringError::Decrypt)
    ));
    assert!(matches!(
        decrypt(key_id, &ct[..ct.len() - 1]),
        Err(KeyringError::Decrypt)
    ));
    assert!(matches!(
        decrypt(key_id, &ct[..20]),
        Err(KeyringError::Envelope(EnvelopeError::Truncated { len: 20 }))
    ));
    // Key id.
    let id = *kr.id();
    assert!(matches!(
        decrypt(KeyId::new(&id, v(1)).as_str(), &ct),
        Err(KeyringError::KeyIdMismatch { .. })
    ));
    let foreign = KeyId::new(&KeyringId::generate().unwrap(), v(2));
    assert!(matches!(
        decrypt(foreign.as_str(), &ct),
        Err(KeyringError::UnknownKeyId)
    ));
    assert!(matches!(decrypt("", &ct), Err(KeyringError::UnknownKeyId)));
}

#[test]
fn ciphertext_moved_between_keyrings_with_same_material_fails() {
    // Same key bytes, different keyring id: the AAD binds the identity.
    let mk = |id: &str| {
        keyring_from_file(KeyringFile {
            material: Material::Inline,
            id: id.parse().unwrap(),
            versions: vec![StoredVersion {
                info: VersionInfo::new(v(1), KeyState::Primary, t(0)),
                kek: Some(Kek::from_bytes([42; 32])),
            }],
        })
        .unwrap()
    };
    let a = mk(ID);
    let b = mk("ffffffffffffffffffffffffffffffff");
    let (_, ct) = block_on(a.encrypt(&seed())).unwrap();
    let b_key_id = b.primary_key_id().clone();
    assert!(matches!(
        block_on(b.decrypt(b_key_id.as_str(), &ct)),
        Err(KeyringError::Decrypt)
    ));
}

#[test]
fn self_check_passes_for_usable_versions() {
    block_on(four_versions().self_check()).unwrap();
}

#[test]
fn material_must_match_state() {
    let err = keyring_from_file(KeyringFile {
        material: Material::Inline,
        id: ID.parse().unwrap(),
        versions: vec![StoredVersion {
            info: VersionInfo::new(v(1), KeyState::Primary, t(0)),
            kek: None,
        }],
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid keyring: version 1 is primary but its key material is missing"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn seal_open_round_trip(bytes in proptest::collection::vec(any::<u8>(), 1..=envelope::MAX_PLAINTEXT_LEN)) {
        let kr = four_versions();
        let (key_id, ct) = block_on(kr.encrypt(&Plaintext::new(bytes.clone()))).unwrap();
        prop_assert_eq!(ct.len(), bytes.len() + envelope::OVERHEAD);
        let (_, pt) = block_on(kr.decrypt(key_id.as_str(), &ct)).unwrap();
        prop_assert_eq!(pt.expose_secret(), &bytes[..]);
    }

    #[test]
    fn any_single_bit_flip_fails(index in 0usize..65, bit in 0u8..8) {
        let kr = four_versions();
        let (key_id, mut ct) = block_on(kr.encrypt(&seed())).unwrap();
        ct[index] ^= 1 << bit;
        prop_assert!(block_on(kr.decrypt(key_id.as_str(), &ct)).is_err());
    }
}
