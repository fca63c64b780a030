use std::fs;

use proptest::prelude::*;

use super::*;
use crate::keyring::lifecycle::Outcome;
use crate::secret::Kek;

const PASS: &str = "correct horse battery staple";
/// The cheapest parameters a backup may be read with: enough to exercise
/// every path without spending 64 MiB per test. Production writes
/// [`KdfParams::WRITE`] (see `round_trip_with_the_parameters_kekd_writes`).
const CHEAP: KdfParams = KdfParams {
    memory_kib: 19 * 1024,
    passes: 2,
    lanes: 1,
};
const T0: u64 = 1_800_000_000;

fn passphrase(s: &str) -> Passphrase {
    Passphrase::new(s.to_owned()).unwrap()
}

fn at(offset: u64) -> Timestamp {
    Timestamp::from_unix(T0 + offset)
}

/// Version 1 decrypt-only, 2 primary, 3 pending.
fn keyring() -> KeyringFile {
    let mut k = KeyringFile::generate(at(0)).unwrap();
    k.rotate(at(10), true, None).unwrap();
    k.rotate(at(20), false, None).unwrap();
    k
}

fn copy(k: &KeyringFile) -> KeyringFile {
    KeyringFile::parse(k.encode().as_bytes()).unwrap()
}

fn sealed(k: &KeyringFile) -> Backup {
    Backup::seal_with(k, &passphrase(PASS), at(100), CHEAP).unwrap()
}

/// `text` with line `n` (1-based) replaced by `f(line)`.
fn edit_line(text: &str, n: usize, f: impl FnOnce(&str) -> String) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    lines[n - 1] = f(&lines[n - 1]);
    lines.join("\n")
}

fn format_err(text: &str) -> FormatError {
    Backup::parse(text.as_bytes()).expect_err("must be refused")
}

/// Strings of `b` an error message must never contain.
fn content_of(b: &Backup) -> Vec<String> {
    let text = b.encode();
    let sealed = text
        .lines()
        .nth(6)
        .unwrap()
        .strip_prefix("sealed ")
        .unwrap();
    vec![
        BASE64.encode(b.header.salt),
        BASE64.encode(b.header.nonce),
        sealed[..16].to_owned(),
        sealed[sealed.len() - 16..].to_owned(),
    ]
}

#[test]
fn round_trip_with_the_parameters_kekd_writes() {
    let k = keyring();
    let b = Backup::seal(&k, &passphrase(PASS), at(100)).unwrap();
    assert_eq!(b.header().kdf, KdfParams::WRITE);
    assert_eq!(
        KdfParams::WRITE,
        KdfParams {
            memory_kib: 65536,
            passes: 3,
            lanes: 1
        }
    );
    let text = b.encode();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[0], "kekd-backup v1");
    assert_eq!(lines[1], format!("keyring {}", k.id));
    assert_eq!(lines[2], "created 2027-01-15T08:01:40Z");
    assert_eq!(lines[3], "versions 1:decrypt-only 2:primary 3:pending");
    assert!(lines[4].starts_with("kdf argon2id v=19 m=65536 t=3 p=1 salt="));
    assert!(lines[5].starts_with("cipher aes-256-gcm nonce="));
    assert!(lines[6].starts_with("sealed "));
    assert!(text.ends_with('\n'));

    let parsed = Backup::parse(text.as_bytes()).unwrap();
    assert_eq!(parsed, b);
    let opened = parsed.open(&passphrase(PASS)).unwrap();
    assert_eq!(*opened.encode(), *k.encode());

    // Nothing secret is in the file.
    for v in &k.versions {
        let kek = BASE64.encode(v.kek.as_ref().unwrap().expose_secret());
        assert!(!text.contains(&kek));
    }
    assert!(!text.contains(PASS));
}

#[test]
fn every_backup_has_a_fresh_salt_and_nonce() {
    let k = keyring();
    let (a, b) = (sealed(&k), sealed(&k));
    assert_ne!(a.header.salt, b.header.salt);
    assert_ne!(a.header.nonce, b.header.nonce);
    assert_ne!(a.sealed, b.sealed);
}

#[test]
fn parse_and_encode_are_inverse() {
    let b = sealed(&keyring());
    let text = b.encode();
    let parsed = Backup::parse(text.as_bytes()).unwrap();
    assert_eq!(parsed, b);
    assert_eq!(parsed.encode(), text);
}

#[test]
fn a_wrong_passphrase_is_one_opaque_error() {
    let b = sealed(&keyring());
    let e = b
        .open(&passphrase("correct horse battery stapler"))
        .unwrap_err();
    assert!(matches!(e, BackupError::Open), "{e:?}");
    assert_eq!(e.to_string(), "wrong passphrase or damaged backup");
}

#[test]
fn every_header_field_is_authenticated() {
    let b = sealed(&keyring());
    let text = b.encode();
    let other_id = KeyringId::generate().unwrap();
    let other_salt = BASE64.encode([7u8; SALT_LEN]);
    let other_nonce = BASE64.encode([7u8; NONCE_LEN]);
    let salt = BASE64.encode(b.header.salt);
    let nonce = BASE64.encode(b.header.nonce);
    let edits: Vec<(&str, usize, String)> = vec![
        ("keyring", 2, format!("keyring {other_id}")),
        ("created", 3, "created 2027-01-15T08:01:41Z".to_owned()),
        (
            "versions",
            4,
            "versions 1:decrypt-only 2:primary 3:retired".to_owned(),
        ),
        (
            "m",
            5,
            format!("kdf argon2id v=19 m=19457 t=2 p=1 salt={salt}"),
        ),
        (
            "t",
            5,
            format!("kdf argon2id v=19 m=19456 t=3 p=1 salt={salt}"),
        ),
        (
            "p",
            5,
            format!("kdf argon2id v=19 m=19456 t=2 p=2 salt={salt}"),
        ),
        (
            "salt",
            5,
            format!("kdf argon2id v=19 m=19456 t=2 p=1 salt={other_salt}"),
        ),
        (
            "nonce",
            6,
            format!("cipher aes-256-gcm nonce={other_nonce}"),
        ),
    ];
    assert!(text.contains(&format!("m=19456 t=2 p=1 salt={salt}\n")));
    assert!(text.contains(&format!("nonce={nonce}\n")));
    for (what, line, replacement) in edits {
        let tampered = edit_line(&text, line, |_| replacement);
        let parsed = Backup::parse(tampered.as_bytes())
            .unwrap_or_else(|e| panic!("{what}: the edit must still parse: {e}"));
        assert_ne!(parsed.header, b.header, "{what}");
        let e = parsed.open(&passphrase(PASS)).unwrap_err();
        assert!(matches!(e, BackupError::Open), "{what}: {e:?}");
    }
}

#[test]
fn every_part_of_the_sealed_body_is_authenticated() {
    let b = sealed(&keyring());
    let len = b.sealed.len();
    // First byte, middle, last ciphertext byte, first and last tag byte.
    for i in [0, len / 2, len - TAG_LEN - 1, len - TAG_LEN, len - 1] {
        let mut t = b.clone();
        t.sealed[i] ^= 0x01;
        let reparsed = Backup::parse(t.encode().as_bytes()).unwrap();
        let e = reparsed.open(&passphrase(PASS)).unwrap_err();
        assert!(matches!(e, BackupError::Open), "byte {i}: {e:?}");
    }
    let mut shorter = b.clone();
    shorter.sealed.pop();
    let mut longer = b.clone();
    longer.sealed.push(0);
    for t in [shorter, longer] {
        let e = t.open(&passphrase(PASS)).unwrap_err();
        assert!(matches!(e, BackupError::Open), "{e:?}");
    }
}

#[test]
fn truncated_at_every_length_is_refused_by_line() {
    let b = sealed(&keyring());
    let text = b.encode();
    let bytes = text.as_bytes();
    let secrets = content_of(&b);
    for len in 0..bytes.len() {
        let e = Backup::parse(&bytes[..len])
            .expect_err("a truncated backup must be refused")
            .to_string();
        assert!(e.starts_with("line "), "{len}: {e}");
        for s in &secrets {
            assert!(!e.contains(s.as_str()), "{len}: error shows content: {e}");
        }
    }
    let header_len = text.len() - text.lines().nth(6).unwrap().len() - 1;
    for (len, expected) in [
        (0, "line 1 is missing: the file is empty"),
        (5, "line 1 is cut short (file truncated?)"),
        (14, "line 1 does not end in a newline (file truncated?)"),
        (
            15,
            "line 2 is missing: expected `keyring <id>` (file truncated?)",
        ),
        (20, "line 2 does not end in a newline (file truncated?)"),
        (
            header_len,
            "line 7 is missing: expected `sealed <base64>` (file truncated?)",
        ),
        (
            bytes.len() - 1,
            "line 7 does not end in a newline (file truncated?)",
        ),
    ] {
        assert_eq!(
            Backup::parse(&bytes[..len]).unwrap_err().to_string(),
            expected,
            "{len}"
        );
    }
}

#[test]
fn kdf_parameters_out_of_range_are_refused_before_any_work() {
    let b = sealed(&keyring());
    let text = b.encode();
    let salt = BASE64.encode(b.header.salt);
    let cases: &[(&str, &str, &str)] = &[
        (
            "m=1048577 t=2 p=1",
            "m",
            "must be a whole number of KiB from 19456 to 1048576",
        ),
        (
            "m=4294967295 t=2 p=1",
            "m",
            "must be a whole number of KiB from 19456 to 1048576",
        ),
        (
            "m=19455 t=2 p=1",
            "m",
            "must be a whole number of KiB from 19456 to 1048576",
        ),
        (
            "m=065536 t=3 p=1",
            "m",
            "must be a whole number of KiB from 19456 to 1048576",
        ),
        (
            "m=+65536 t=3 p=1",
            "m",
            "must be a whole number of KiB from 19456 to 1048576",
        ),
        (
            "m=99999999999 t=3 p=1",
            "m",
            "must be a whole number of KiB from 19456 to 1048576",
        ),
        (
            "m=65536 t=1 p=1",
            "t",
            "must be a whole number of passes from 2 to 8",
        ),
        (
            "m=65536 t=9 p=1",
            "t",
            "must be a whole number of passes from 2 to 8",
        ),
        (
            "m=65536 t=3 p=0",
            "p",
            "must be a whole number of lanes from 1 to 4",
        ),
        (
            "m=65536 t=3 p=5",
            "p",
            "must be a whole number of lanes from 1 to 4",
        ),
        ("t=3 m=65536 p=1", "m", "is missing or out of order"),
        ("m=65536 p=1", "t", "is missing or out of order"),
    ];
    for (params, field, reason) in cases {
        let line = format!("kdf argon2id v=19 {params} salt={salt}");
        let e = format_err(&edit_line(&text, 5, |_| line.clone()));
        assert_eq!(e, FormatError::field(5, field, reason), "{params}: {e}");
    }
    let other: &[(String, FormatError)] = &[
        (
            format!("kdf argon2i v=19 m=65536 t=3 p=1 salt={salt}"),
            FormatError::field(5, "kdf", "must be argon2id, the only KDF kekd reads"),
        ),
        (
            format!("kdf argon2id v=16 m=65536 t=3 p=1 salt={salt}"),
            FormatError::field(5, "v", "must be 19 (argon2 version 1.3)"),
        ),
        (
            "kdf argon2id v=19 m=65536 t=3 p=1".to_owned(),
            FormatError::field(5, "salt", "is missing or out of order"),
        ),
        (
            "kdf argon2id v=19 m=65536 t=3 p=1 salt=AAAA".to_owned(),
            FormatError::field(5, "salt", "must be the base64 encoding of 16 bytes"),
        ),
        (
            format!("kdf argon2id v=19 m=65536 t=3 p=1 salt={salt} x=1"),
            FormatError::line(5, "has a field after `salt`"),
        ),
        (
            "scrypt".to_owned(),
            FormatError::line(5, "must be `kdf argon2id …`"),
        ),
    ];
    for (line, expected) in other {
        assert_eq!(
            &format_err(&edit_line(&text, 5, |_| line.clone())),
            expected
        );
    }
    // The limits themselves are accepted (parsing only: no KDF runs here).
    let line = format!("kdf argon2id v=19 m=1048576 t=8 p=4 salt={salt}");
    let parsed = Backup::parse(edit_line(&text, 5, |_| line).as_bytes()).unwrap();
    assert_eq!(
        parsed.header.kdf,
        KdfParams {
            memory_kib: 1 << 20,
            passes: 8,
            lanes: 4
        }
    );
}

#[test]
fn malformed_lines_are_refused_by_line_and_field() {
    let b = sealed(&keyring());
    let text = b.encode();
    let cases: Vec<(String, String)> = vec![
        (
            edit_line(&text, 2, str::to_uppercase),
            "line 2 must be `keyring <id>`".to_owned(),
        ),
        (
            edit_line(&text, 2, |l| {
                l.to_uppercase().replacen("KEYRING", "keyring", 1)
            }),
            "line 2: field `keyring` must be 32 lowercase hex digits".to_owned(),
        ),
        (
            edit_line(&text, 3, |_| "created yesterday".to_owned()),
            "line 3: field `created` must be a UTC time like 2026-01-31T23:59:59Z".to_owned(),
        ),
        (
            edit_line(&text, 3, |_| "created  2027-01-15T08:01:40Z".to_owned()),
            "line 3: field `created` must be a UTC time like 2026-01-31T23:59:59Z".to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions 2:primary 1:pending".to_owned()),
            "line 4: field `versions` must list each version once, in increasing order".to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions 1:primary 1:primary".to_owned()),
            "line 4: field `versions` must list each version once, in increasing order".to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions ".to_owned()),
            "line 4: field `versions` must list `<version>:<state>` pairs, one space apart"
                .to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions".to_owned()),
            "line 4 must be `versions <version>:<state> …`".to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions 0:primary".to_owned()),
            "line 4: field `versions` must list `<version>:<state>` pairs, one space apart"
                .to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions 01:primary".to_owned()),
            "line 4: field `versions` must list `<version>:<state>` pairs, one space apart"
                .to_owned(),
        ),
        (
            edit_line(&text, 4, |_| "versions 1:active".to_owned()),
            "line 4: field `versions` must list `<version>:<state>` pairs, one space apart"
                .to_owned(),
        ),
        (
            edit_line(&text, 6, |l| l.replace("aes-256-gcm", "aes-128-gcm")),
            "line 6: field `cipher` must be aes-256-gcm, the only cipher kekd reads".to_owned(),
        ),
        (
            edit_line(&text, 6, |_| {
                "cipher aes-256-gcm nonce=AAAAAAAAAAAAAAAAAAAAAAAA".to_owned()
            }),
            "line 6: field `nonce` must be the base64 encoding of 12 bytes".to_owned(),
        ),
        (
            edit_line(&text, 6, |_| "cipher aes-256-gcm".to_owned()),
            "line 6: field `nonce` is missing or out of order".to_owned(),
        ),
        (
            edit_line(&text, 7, |_| "sealed AAAA".to_owned()),
            "line 7: field `sealed` is too short to hold a keyring".to_owned(),
        ),
        (
            edit_line(&text, 7, |l| format!("{l}*")),
            "line 7: field `sealed` is not valid base64 (damaged in a copy?)".to_owned(),
        ),
        (
            edit_line(&text, 7, |l| l.replace("sealed ", "sealed  ")),
            "line 7: field `sealed` is not valid base64 (damaged in a copy?)".to_owned(),
        ),
        (
            edit_line(&text, 7, |l| l.replace("sealed ", "body ")),
            "line 7 must be `sealed <base64>`".to_owned(),
        ),
        (
            format!("{text}\n"),
            "line 8 is unexpected: nothing may follow the `sealed` line".to_owned(),
        ),
        (
            text.replace('\n', "\r\n"),
            "line 1 has a carriage return: the file was converted to CRLF line endings".to_owned(),
        ),
        (
            text.replacen("kekd-backup v1", "kekd-backup v2", 1),
            "line 1 is a backup format this kekd does not read (expected `kekd-backup v1`)"
                .to_owned(),
        ),
        (
            keyring().encode().to_string(),
            "line 1 is `kekd-keyring …`: a keyring file, not a backup".to_owned(),
        ),
        (
            "#!/bin/sh\necho hi\n".to_owned(),
            "line 1 is not `kekd-backup v1`: not a kekd backup".to_owned(),
        ),
    ];
    for (bad, expected) in cases {
        assert_eq!(format_err(&bad).to_string(), expected);
    }
    let mut bytes = text.clone().into_bytes();
    let at = text.find("created").unwrap();
    bytes[at] = 0xff;
    assert_eq!(
        Backup::parse(&bytes).unwrap_err().to_string(),
        "line 3 is not UTF-8 text"
    );
}

#[test]
fn a_header_that_parses_must_also_be_canonical() {
    let text = sealed(&keyring()).encode();
    // The time parser reads a leap second as second 59: accepted as a time,
    // but not what kekd writes (and so not the AAD), refused as such rather
    // than as a failed decryption.
    let e = format_err(&edit_line(&text, 3, |_| {
        "created 2027-01-15T08:01:60Z".to_owned()
    }));
    assert_eq!(
        e,
        FormatError::line(
            3,
            "is not in the canonical form kekd writes (extra spaces, leading zeros or non-canonical base64?)"
        )
    );
}

#[test]
fn a_header_that_does_not_describe_the_keyring_is_refused() {
    let k = keyring();
    let mut header = sealed(&k).header;
    header.versions.pop();
    let b = seal_bytes(header, k.encode().as_bytes(), &passphrase(PASS)).unwrap();
    let e = b.open(&passphrase(PASS)).unwrap_err();
    assert!(matches!(e, BackupError::HeaderMismatch), "{e:?}");

    let header = sealed(&k).header;
    let b = seal_bytes(header, b"kekd-keyring v1\nnot really\n", &passphrase(PASS)).unwrap();
    let e = b.open(&passphrase(PASS)).unwrap_err();
    assert!(matches!(e, BackupError::SealedKeyring(_)), "{e:?}");
    assert!(!e.to_string().contains("not really"), "{e}");
}

#[test]
fn token_metadata_cannot_be_backed_up() {
    let meta = KeyringFile::generate_metadata(at(0)).unwrap();
    let e = Backup::seal(&meta, &passphrase(PASS), at(1)).unwrap_err();
    assert!(matches!(e, BackupError::TokenKeyring), "{e:?}");
    assert!(e.to_string().contains("docs/hsm.md"));
}

#[test]
fn passphrases_need_twelve_characters() {
    let e = Passphrase::new("a".repeat(11)).unwrap_err();
    assert!(
        matches!(e, BackupError::PassphraseTooShort { chars: 11 }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the passphrase has 11 characters; a backup passphrase needs at least 12"
    );
    assert!(Passphrase::new("a".repeat(12)).is_ok());
    // Characters, not bytes.
    assert!(Passphrase::new("ü".repeat(11)).is_err());
    assert!(Passphrase::new("ü".repeat(12)).is_ok());
    assert!(matches!(
        Passphrase::new("a".repeat(MAX_PASSPHRASE_LEN + 1)),
        Err(BackupError::PassphraseTooLong)
    ));
    assert!(Passphrase::new("a".repeat(MAX_PASSPHRASE_LEN)).is_ok());
}

#[test]
fn debug_shows_no_secret() {
    let p = passphrase(PASS);
    assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
    let b = sealed(&keyring());
    let debug = format!("{b:?}");
    assert!(
        debug.contains(&format!("sealed_len: {}", b.sealed.len())),
        "{debug}"
    );
    assert!(!debug.contains(PASS));
    let sealed_b64 = BASE64.encode(&b.sealed);
    assert!(!debug.contains(&sealed_b64[..16]), "{debug}");
}

// ---------------------------------------------------------------- restore

fn same_bytes(a: &KeyringFile, b: &KeyringFile) -> bool {
    *a.encode() == *b.encode()
}

#[test]
fn restoring_where_nothing_is_creates_every_version() {
    let k = keyring();
    let plan = plan_restore(None, &k).unwrap();
    assert_eq!(
        plan,
        RestorePlan::Create(vec![
            Transition {
                version: KeyVersion::new(1).unwrap(),
                from: None,
                to: KeyState::DecryptOnly
            },
            Transition {
                version: KeyVersion::new(2).unwrap(),
                from: None,
                to: KeyState::Primary
            },
            Transition {
                version: KeyVersion::new(3).unwrap(),
                from: None,
                to: KeyState::Pending
            },
        ])
    );
}

#[test]
fn restoring_the_same_keyring_is_a_no_op() {
    let k = keyring();
    assert!(same_bytes(&k, &copy(&k)));
    assert_eq!(
        plan_restore(Some(&k), &copy(&k)).unwrap(),
        RestorePlan::Unchanged
    );
}

#[test]
fn a_newer_backup_replaces_an_older_keyring() {
    let old = keyring();
    let mut newer = copy(&old);
    let v3 = KeyVersion::new(3).unwrap();
    assert!(matches!(
        newer.promote(v3, at(30)).unwrap(),
        Outcome::Changed(_)
    ));
    newer.rotate(at(40), false, None).unwrap();
    let plan = plan_restore(Some(&old), &newer).unwrap();
    assert_eq!(
        plan,
        RestorePlan::Replace(vec![
            Transition {
                version: KeyVersion::new(2).unwrap(),
                from: Some(KeyState::Primary),
                to: KeyState::DecryptOnly
            },
            Transition {
                version: v3,
                from: Some(KeyState::Pending),
                to: KeyState::Primary
            },
            Transition {
                version: KeyVersion::new(4).unwrap(),
                from: None,
                to: KeyState::Pending
            },
        ])
    );
    // Only times differ: replaced, with no state change to report.
    let mut retouched = copy(&old);
    retouched.versions[0].info.promoted = Some(at(5));
    assert_eq!(
        plan_restore(Some(&old), &retouched).unwrap(),
        RestorePlan::Replace(vec![])
    );
}

#[test]
fn an_older_backup_never_replaces_a_keyring_with_more_versions() {
    let older = keyring();
    let mut current = copy(&older);
    current.rotate(at(30), true, None).unwrap(); // promotes the pending 3
    current.rotate(at(40), true, None).unwrap(); // 4, primary
    current.rotate(at(50), false, None).unwrap(); // 5, pending
    let e = plan_restore(Some(&current), &older).unwrap_err();
    match &e {
        BackupError::WouldLose { missing, changed } => {
            assert_eq!(
                missing,
                &[KeyVersion::new(4).unwrap(), KeyVersion::new(5).unwrap()]
            );
            assert!(changed.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "the keyring holds versions 4, 5 that the backup lacks (the backup is older than the keyring); \
         restoring would lose them"
    );
}

#[test]
fn a_backup_with_other_material_under_a_version_is_refused() {
    let current = keyring();
    let mut other = copy(&current);
    other.versions[0].kek = Some(Kek::generate().unwrap());
    let mut also_missing = copy(&other);
    also_missing.versions.pop();
    let e = plan_restore(Some(&current), &also_missing).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the keyring holds version 3 that the backup lacks (the backup is older than the keyring); \
         restoring would lose it; version 1 has different key material in the backup than in the keyring"
    );
    let e = plan_restore(Some(&current), &other).unwrap_err();
    assert!(
        matches!(&e, BackupError::WouldLose { missing, changed } if missing.is_empty() && changed == &[KeyVersion::FIRST]),
        "{e:?}"
    );
}

#[test]
fn a_backup_of_another_keyring_is_refused() {
    let current = keyring();
    let other = keyring();
    let e = plan_restore(Some(&current), &other).unwrap_err();
    assert!(
        matches!(e, BackupError::OtherKeyring { current: c, backup: b } if c == current.id && b == other.id),
        "{e:?}"
    );
    assert!(e.to_string().contains(&other.id.to_string()));
}

#[test]
fn the_rest_of_the_successor_rule_applies() {
    // A destroyed version does not come back.
    let mut current = keyring();
    let backup = copy(&current);
    let v3 = KeyVersion::new(3).unwrap();
    current
        .retire(
            v3,
            at(30),
            None,
            std::time::Duration::ZERO,
            crate::keyring::lifecycle::RetireBasis::Force,
        )
        .unwrap();
    current.destroy(v3, at(31)).unwrap();
    let e = plan_restore(Some(&current), &backup).unwrap_err();
    assert!(
        matches!(e, BackupError::NotSuccessor(SuccessorError::Resurrected(v)) if v == v3),
        "{e:?}"
    );

    // The primary does not go back.
    let backup = keyring();
    let mut current = copy(&backup);
    current.promote(v3, at(30)).unwrap();
    let e = plan_restore(Some(&current), &backup).unwrap_err();
    assert!(
        matches!(
            e,
            BackupError::NotSuccessor(SuccessorError::PrimaryBackwards { .. })
        ),
        "{e:?}"
    );
}

// ------------------------------------------------------------------ files

#[test]
fn write_never_replaces_without_being_told() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup");
    let b = sealed(&keyring());
    write(&path, &b, Overwrite::Never).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert_eq!(read(&path).unwrap(), b);
    let newer = sealed(&keyring());
    let e = write(&path, &newer, Overwrite::Never).unwrap_err();
    assert!(matches!(e, BackupError::Exists { .. }), "{e:?}");
    assert_eq!(read(&path).unwrap(), b);
    write(&path, &newer, Overwrite::Replace).unwrap();
    assert_eq!(read(&path).unwrap(), newer);
    // No temp file left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn read_refuses_oversized_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing");
    assert!(matches!(read(&missing), Err(BackupError::NotFound { .. })));
    let big = dir.path().join("big");
    fs::write(&big, vec![b'a'; MAX_BACKUP_LEN as usize + 1]).unwrap();
    let e = read(&big).unwrap_err();
    assert!(matches!(e, BackupError::TooLarge { .. }), "{e:?}");
    let bad = dir.path().join("bad");
    fs::write(&bad, "kekd-backup v1\n").unwrap();
    assert_eq!(
        read(&bad).unwrap_err().to_string(),
        format!(
            "backup {}: line 2 is missing: expected `keyring <id>` (file truncated?)",
            bad.display()
        )
    );
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Backup::parse(&bytes);
    }

    #[test]
    fn a_changed_byte_never_parses_into_the_same_backup(at in any::<prop::sample::Index>(), to in any::<u8>()) {
        let b = sealed_once();
        let mut bytes = b.encode().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != to);
        bytes[i] = to;
        if let Ok(parsed) = Backup::parse(&bytes) {
            prop_assert_ne!(parsed, b.clone());
        }
    }
}

/// One sealed backup shared by the proptest cases (sealing costs a KDF run).
fn sealed_once() -> &'static Backup {
    static ONCE: std::sync::OnceLock<Backup> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| sealed(&keyring()))
}
