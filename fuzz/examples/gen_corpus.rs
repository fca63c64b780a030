//! Writes the seed corpus of every fuzz target under `fuzz/corpus/<target>/`:
//! real, valid inputs (envelopes kekd sealed, keyring files, the shipped
//! configs, a backup, encoded gRPC requests) plus a few near misses.
//!
//! `cargo run --release --example gen_corpus` from `fuzz/`; the output is
//! committed. Everything is deterministic except the backup's salt and nonce.

use std::fs;
use std::path::{Path, PathBuf};

use kekd::backup::{Backup, Passphrase};
use kekd::keyring::store::{KeyringFile, Material, StoredVersion};
use kekd::keyring::{KeyState, KeyVersion, Timestamp, VersionInfo};
use kekd_fuzz::proto::{DecryptRequest, EncryptRequest, StatusRequest};
use kekd_fuzz::{
    FOREIGN_KEYRING_ID, Fixture, KEYRING_ADD_CHECKSUM, KEYRING_AS_IS, Method,
    SELECT_HEADER_VERSION, key_id, keyring_file, keyring_id, test_kek,
};
use prost::Message as _;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let fx = Fixture::get();

    // envelope: selector byte + ciphertext.
    let dir = target_dir(&root, "envelope");
    for (i, k) in fx.known.iter().enumerate() {
        let mut input = vec![SELECT_HEADER_VERSION];
        input.extend_from_slice(&k.ciphertext);
        write(&dir, &format!("known-{i:02}-{}", k.state), &input);
    }
    let valid = &fx.known[3].ciphertext; // version 2 (primary), 32-byte seed
    let mut wrong_id = vec![0u8]; // version 1's key id for a version 2 envelope
    wrong_id.extend_from_slice(valid);
    write(&dir, "key-id-mismatch", &wrong_id);
    let mut foreign = vec![6u8];
    foreign.extend_from_slice(valid);
    write(&dir, "foreign-keyring", &foreign);
    let mut flipped = vec![SELECT_HEADER_VERSION];
    flipped.extend_from_slice(valid);
    *flipped.last_mut().expect("non-empty") ^= 1;
    write(&dir, "flipped-tag-bit", &flipped);
    write(&dir, "empty", &[SELECT_HEADER_VERSION]);
    write(&dir, "format-2", &[SELECT_HEADER_VERSION, 2, 0, 0, 0, 1]);
    let mut zero = vec![SELECT_HEADER_VERSION, 1, 0, 0, 0, 0];
    zero.extend_from_slice(&[0u8; 29]);
    write(&dir, "version-0", &zero);

    // keyring_file: the fixture (every state), a fresh single-version
    // keyring, and token metadata.
    let dir = target_dir(&root, "keyring_file");
    let keyring = |file: &KeyringFile, name: &str| {
        let text = file.encode();
        let mut whole = vec![KEYRING_AS_IS];
        whole.extend_from_slice(text.as_bytes());
        write(&dir, name, &whole);
        // The body alone (the target appends the checksum line).
        let body_len = text.trim_end_matches('\n').rfind('\n').expect("a body") + 1;
        let mut body = vec![KEYRING_ADD_CHECKSUM];
        body.extend_from_slice(&text.as_bytes()[..body_len]);
        write(&dir, &format!("{name}-body"), &body);
    };
    keyring(&keyring_file(), "fixture-every-state");
    let t = Timestamp::from_unix(1_790_000_000);
    let mut info = VersionInfo::new(KeyVersion::FIRST, KeyState::Primary, t);
    info.promoted = Some(t);
    let single = KeyringFile {
        material: Material::Inline,
        id: keyring_id(),
        versions: vec![StoredVersion {
            info: info.clone(),
            kek: Some(test_kek(1)),
        }],
    };
    keyring(&single, "init");
    let meta = KeyringFile {
        material: Material::Token,
        id: FOREIGN_KEYRING_ID.parse().expect("an id"),
        versions: vec![StoredVersion { info, kek: None }],
    };
    keyring(&meta, "token-metadata");

    // config: the shipped example configs and the smallest valid one.
    let dir = target_dir(&root, "config");
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for name in ["kekd.toml", "kekd-pkcs11.toml"] {
        let text = fs::read(deploy.join(name)).expect("read a deploy config");
        write(&dir, &format!("deploy-{name}"), &text);
    }
    write(
        &dir,
        "minimal.toml",
        b"keyring = \"/etc/kekd/keyring\"\nsocket = \"/run/kekd/kms.sock\"\n",
    );

    // backup: the fixture keyring sealed with the production KDF parameters.
    let dir = target_dir(&root, "backup");
    let passphrase =
        Passphrase::new("correct horse battery staple".to_owned()).expect("long enough");
    let backup = Backup::seal(&keyring_file(), &passphrase, t).expect("seal a backup");
    write(&dir, "fixture.kekd-backup", backup.encode().as_bytes());

    // grpc: selector byte + encoded request.
    let dir = target_dir(&root, "grpc");
    let uid = "0b7d1b43-6cbe-4a57-8a1e-5f36bd2a1a53".to_owned();
    let request = |m: Method, body: Vec<u8>| {
        let mut v = vec![m.selector()];
        v.extend(body);
        v
    };
    write(
        &dir,
        "status",
        &request(Method::Status, StatusRequest {}.encode_to_vec()),
    );
    for (name, len) in [
        ("seed", 32),
        ("empty", 0),
        ("largest", 991),
        ("too-long", 992),
    ] {
        let body = EncryptRequest {
            plaintext: (0..len).map(|i| i as u8).collect(),
            uid: uid.clone(),
        };
        write(
            &dir,
            &format!("encrypt-{name}"),
            &request(Method::Encrypt, body.encode_to_vec()),
        );
    }
    for (i, k) in fx.known.iter().enumerate() {
        let body = DecryptRequest {
            ciphertext: k.ciphertext.clone(),
            uid: uid.clone(),
            key_id: k.key_id.clone(),
            annotations: Default::default(),
        };
        write(
            &dir,
            &format!("decrypt-known-{i:02}-{}", k.state),
            &request(Method::Decrypt, body.encode_to_vec()),
        );
    }
    let mut annotated = DecryptRequest {
        ciphertext: valid.clone(),
        uid: uid.clone(),
        key_id: key_id(2),
        annotations: Default::default(),
    };
    annotated
        .annotations
        .insert("version.encryption.remote.io".to_owned(), b"1".to_vec());
    write(
        &dir,
        "decrypt-annotated",
        &request(Method::Decrypt, annotated.encode_to_vec()),
    );
    let foreign = DecryptRequest {
        ciphertext: valid.clone(),
        uid,
        key_id: format!("kekd/{FOREIGN_KEYRING_ID}/v2"),
        annotations: Default::default(),
    };
    write(
        &dir,
        "decrypt-foreign-key-id",
        &request(Method::Decrypt, foreign.encode_to_vec()),
    );
    println!("corpus written under {}", root.display());
}

fn target_dir(root: &Path, target: &str) -> PathBuf {
    let dir = root.join(target);
    fs::create_dir_all(&dir).expect("create a corpus directory");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("write a seed");
}
