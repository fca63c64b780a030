#![allow(clippy::unwrap_used)]

use prost::Message as _;

use super::*;

const KEYRING: &str = "5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40";

fn envelope(version: u32) -> Vec<u8> {
    Envelope::encode(KeyVersion::new(version).unwrap(), &[7; 12], &[9; 48])
}

fn kms_value(provider: &str, object: &EncryptedObject) -> Vec<u8> {
    let mut v = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    v.extend(object.encode_to_vec());
    v
}

fn object(key_id: &str, dek: Vec<u8>) -> EncryptedObject {
    EncryptedObject {
        encrypted_data: vec![1; 40],
        key_id: key_id.to_owned(),
        encrypted_dek_source: dek,
        annotations: Default::default(),
        encrypted_dek_source_type: 1,
    }
}

#[test]
fn kekd_value_names_key_id_and_header_versions() {
    let value = kms_value("kekd", &object(&format!("kekd/{KEYRING}/v3"), envelope(3)));
    let Stored::KmsV2 {
        provider,
        key_id,
        kekd: Some(k),
    } = classify(&value)
    else {
        panic!("not a kekd kms v2 value: {:?}", classify(&value));
    };
    assert_eq!(provider, "kekd");
    assert_eq!(key_id, format!("kekd/{KEYRING}/v3"));
    assert_eq!(k.keyring.to_string(), KEYRING);
    assert_eq!(k.version.get(), 3);
    assert_eq!(k.header, Ok(KeyVersion::new(3).unwrap()));
}

#[test]
fn header_mismatch_and_foreign_ciphertext_are_reported() {
    let value = kms_value("kekd", &object(&format!("kekd/{KEYRING}/v2"), envelope(5)));
    let Stored::KmsV2 { kekd: Some(k), .. } = classify(&value) else {
        panic!()
    };
    assert_eq!(
        (k.version.get(), k.header),
        (2, Ok(KeyVersion::new(5).unwrap()))
    );

    let value = kms_value("kekd", &object(&format!("kekd/{KEYRING}/v2"), vec![2; 65]));
    let Stored::KmsV2 { kekd: Some(k), .. } = classify(&value) else {
        panic!()
    };
    assert_eq!(k.header, Err(EnvelopeError::UnknownFormat { format: 2 }));
}

#[test]
fn other_plugins_key_ids_are_kms_v2_without_kekd_version() {
    let value = kms_value("vault", &object("projects/p/keys/k/1", vec![1; 10]));
    assert_eq!(
        classify(&value),
        Stored::KmsV2 {
            provider: "vault".to_owned(),
            key_id: "projects/p/keys/k/1".to_owned(),
            kekd: None
        }
    );
    assert_eq!(classify(&value).provider_label(), "kms:v2:vault");
}

#[test]
fn other_transformers_count_by_name() {
    for (value, label) in [
        (&b"k8s:enc:aescbc:v1:key1:\x01\x02"[..], "aescbc:v1:key1"),
        (b"k8s:enc:aesgcm:v1:k:xx", "aesgcm:v1:k"),
        (b"k8s:enc:secretbox:v1:sb:xx", "secretbox:v1:sb"),
        (b"k8s:enc:kms:v1:old-plugin:xx", "kms:v1:old-plugin"),
    ] {
        assert_eq!(
            classify(value),
            Stored::OtherProvider {
                label: label.to_owned()
            }
        );
    }
}

#[test]
fn identity_serializations() {
    assert_eq!(
        classify(b"k8s\x00\x0a\x0d\x0a\x02v1"),
        Stored::Identity {
            encoding: "protobuf"
        }
    );
    assert_eq!(
        classify(b" {\"kind\":\"Secret\"}"),
        Stored::Identity { encoding: "json" }
    );
    assert_eq!(
        classify(&[0xd9, 0xd9, 0xf7, 0xa1]),
        Stored::Identity { encoding: "cbor" }
    );
}

#[test]
fn unparseable_values_never_quote_their_bytes() {
    let secret = b"hunter2-the-plaintext";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "the value is empty"),
        (
            secret.to_vec(),
            "neither a k8s:enc: prefix nor a Kubernetes serialization (protobuf, JSON, CBOR)",
        ),
        (
            b"k8s:enc:kms:v2".to_vec(),
            "k8s:enc: prefix without <kind>:<version>:<name>:",
        ),
        (
            b"k8s:enc:kms:v2:bad name:x".to_vec(),
            "k8s:enc: prefix whose kind, version or provider name is not a printable name",
        ),
        (
            [&b"k8s:enc:kms:v2:kekd:"[..], secret].concat(),
            "k8s:enc:kms:v2:kekd: the EncryptedObject does not parse",
        ),
        (
            kms_value(
                "kekd",
                &EncryptedObject {
                    encrypted_data: vec![],
                    ..object("k", vec![1])
                },
            ),
            "k8s:enc:kms:v2:kekd: the EncryptedObject has no encryptedData (field 1)",
        ),
        (
            kms_value("kekd", &object("", vec![1])),
            "k8s:enc:kms:v2:kekd: the EncryptedObject's keyID (field 2) is 0 bytes, not 1..=1024",
        ),
        (
            kms_value("kekd", &object("k", vec![1; 1025])),
            "k8s:enc:kms:v2:kekd: the EncryptedObject's encryptedDEKSource (field 3) is 1025 bytes, not 1..=1024",
        ),
        (
            kms_value(
                "kekd",
                &EncryptedObject {
                    encrypted_dek_source_type: 7,
                    ..object("k", vec![1])
                },
            ),
            "k8s:enc:kms:v2:kekd: the EncryptedObject's encryptedDEKSourceType (field 5) is 7, not 0 or 1",
        ),
    ];
    for (value, want) in cases {
        let Stored::Unparseable { reason } = classify(&value) else {
            panic!("{want}: parsed: {:?}", classify(&value));
        };
        assert!(
            reason.starts_with(want),
            "{reason:?} does not start with {want:?}"
        );
        assert!(!reason.contains("hunter2"), "{reason:?} quotes the value");
    }
}

#[test]
fn resources_from_key_paths() {
    let p = b"/registry/";
    for (key, want) in [
        (&b"/registry/secrets/default/s-1"[..], "secrets"),
        (b"/registry/configmaps/kube-system/x", "configmaps"),
        (b"/registry/namespaces/default", "namespaces"),
        (
            b"/registry/apiextensions.k8s.io/customresourcedefinitions/w.example.com",
            "customresourcedefinitions.apiextensions.k8s.io",
        ),
        (
            b"/registry/example.com/widgets/ns/w1",
            "widgets.example.com",
        ),
        (b"/registry/ranges/serviceips", "ranges"),
        (b"/registry/", "(none)"),
    ] {
        assert_eq!(resource_of(key, p), want, "{}", printable(key));
    }
    assert_eq!(
        resource_of(b"/kekd-e2e-hsm/secrets/a/b", b"/kekd-e2e-hsm"),
        "secrets"
    );
}

#[test]
fn keys_are_printed_escaped() {
    assert_eq!(
        printable(b"/registry/secrets/a\n\xffb"),
        "/registry/secrets/a\\x0a\\xffb"
    );
    assert_eq!(printable(&[b'a'; 600]).chars().count(), 513);
}

proptest::proptest! {
    #[test]
    fn classify_is_total(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
        let _ = classify(&bytes);
        let mut prefixed = b"k8s:enc:kms:v2:kekd:".to_vec();
        prefixed.extend(&bytes);
        let _ = classify(&prefixed);
    }
}
