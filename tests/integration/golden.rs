//! Golden ciphertexts: what this and every earlier release wrote must keep
//! decrypting in every later release, and every `fail_*` vector must be refused.
//!
//! `tests/data/golden/keyring` is a fixed keyring (version 1 decrypt-only,
//! version 2 primary) and `vectors` lists `ok KEY_ID CIPHERTEXT PLAINTEXT` and
//! `fail_<why> KEY_ID CIPHERTEXT` lines in hex. Never regenerate the `ok`
//! lines of an earlier release; `KEKD_BLESS=1 cargo test --test integration golden::`
//! writes the files only if they do not exist yet.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use kekd::backend::local::keyring_from_file;
use kekd::id::{KeyVersion, Timestamp};
use kekd::keyring::store::{KeyringFile, Material, StoredVersion};
use kekd::keyring::{KeyState, VersionInfo};
use kekd::secret::{Kek, Plaintext};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/golden");

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn golden_file(v1_state: KeyState, v2: Option<KeyState>) -> KeyringFile {
    let at = Timestamp::from_unix(1_764_321_574);
    let mut versions = vec![StoredVersion {
        info: VersionInfo::new(KeyVersion::new(1).unwrap(), v1_state, at),
        kek: Some(Kek::from_bytes([0x11; 32])),
    }];
    if let Some(state) = v2 {
        versions.push(StoredVersion {
            info: VersionInfo::new(KeyVersion::new(2).unwrap(), state, at),
            kek: Some(Kek::from_bytes([0x22; 32])),
        });
    }
    KeyringFile {
        material: Material::Inline,
        id: "0123456789abcdef0123456789abcdef".parse().unwrap(),
        versions,
    }
}

#[tokio::test]
async fn golden_vectors_decrypt_and_fail_vectors_are_refused() {
    let dir = Path::new(DIR);
    if std::env::var_os("KEKD_BLESS").is_some() && !dir.join("vectors").exists() {
        bless(dir).await;
    }
    let text = fs::read_to_string(dir.join("keyring")).expect("tests/data/golden/keyring");
    let keyring = keyring_from_file(KeyringFile::parse(text.as_bytes()).unwrap()).unwrap();
    let vectors = fs::read_to_string(dir.join("vectors")).expect("tests/data/golden/vectors");
    let (mut ok, mut fail) = (0, 0);
    for line in vectors
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split(' ').collect();
        match f[0] {
            "ok" => {
                let (_, pt) = keyring
                    .decrypt(f[1], &unhex(f[2]))
                    .await
                    .unwrap_or_else(|e| panic!("{line}: {e}"));
                assert_eq!(pt.expose_secret(), unhex(f[3]), "{line}");
                ok += 1;
            }
            name if name.starts_with("fail_") => {
                assert!(
                    keyring.decrypt(f[1], &unhex(f[2])).await.is_err(),
                    "{name} decrypted"
                );
                fail += 1;
            }
            other => panic!("unknown vector kind {other}"),
        }
    }
    assert!(
        ok >= 4 && fail >= 5,
        "too few vectors: {ok} ok, {fail} fail"
    );
}

/// Writes the keyring and vectors once; the output is then committed.
async fn bless(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let mut out = String::from(
        "# kekd golden vectors (format 0x01): ok KEY_ID CIPHERTEXT PLAINTEXT | fail_<why> KEY_ID CIPHERTEXT\n",
    );
    let seeds: [Vec<u8>; 2] = [(0u8..32).collect(), vec![0xA5; 991]];
    let mut first = None;
    for file in [
        golden_file(KeyState::Primary, None),
        golden_file(KeyState::DecryptOnly, Some(KeyState::Primary)),
    ] {
        let keyring = keyring_from_file(file).unwrap();
        for seed in &seeds {
            let (key_id, ct) = keyring
                .encrypt(&Plaintext::new(seed.clone()))
                .await
                .unwrap();
            writeln!(out, "ok {key_id} {} {}", hex(&ct), hex(seed)).unwrap();
            first.get_or_insert((key_id.to_string(), ct));
        }
    }
    let (key_id, ct) = first.unwrap();
    let flip = |i: usize| {
        let mut c = ct.clone();
        c[i] ^= 1;
        c
    };
    let v2_id = key_id.replace("/v1", "/v2");
    let foreign = key_id.replace(
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
    );
    for (name, k, c) in [
        ("fail_tag", key_id.as_str(), flip(ct.len() - 1)),
        ("fail_nonce", key_id.as_str(), flip(5)),
        ("fail_body", key_id.as_str(), flip(17)),
        ("fail_format", key_id.as_str(), flip(0)),
        ("fail_header_version", key_id.as_str(), flip(4)),
        ("fail_key_id_version", v2_id.as_str(), ct.clone()),
        ("fail_foreign_keyring", foreign.as_str(), ct.clone()),
        (
            "fail_truncated",
            key_id.as_str(),
            ct[..ct.len() - 1].to_vec(),
        ),
        (
            "fail_extended",
            key_id.as_str(),
            [ct.clone(), vec![0]].concat(),
        ),
    ] {
        writeln!(out, "{name} {k} {}", hex(&c)).unwrap();
    }
    let keyring = golden_file(KeyState::DecryptOnly, Some(KeyState::Primary));
    fs::write(dir.join("keyring"), keyring.encode().as_bytes()).unwrap();
    fs::write(dir.join("vectors"), out).unwrap();
}
