//! What kube-apiserver checks on a KMS v2 plugin's answers, written from
//! `docs/kms-v2.md` §3 "Answers the apiserver accepts" and deliberately
//! sharing no code with kekd: if kekd's own checks drift from the
//! apiserver's, these catch it.
//!
//! Each function returns `Err` with the rule that was broken.

use std::collections::HashMap;

/// key_id (Status and Encrypt): 1..=1024 bytes.
pub const MAX_KEY_ID_BYTES: usize = 1024;
/// Encrypt.ciphertext: 1..=1024 bytes.
pub const MAX_CIPHERTEXT_BYTES: usize = 1024;
/// Σ len(key) + len(value) over all annotations.
pub const MAX_ANNOTATIONS_BYTES: usize = 32 * 1024;
/// An RFC 1123 subdomain.
pub const MAX_DNS_NAME: usize = 253;
/// One RFC 1123 label.
pub const MAX_DNS_LABEL: usize = 63;

/// A Status answer the apiserver (1.29+) accepts.
pub fn check_status(version: &str, healthz: &str, key_id: &str) -> Result<(), String> {
    if version != "v2" && version != "v2beta1" {
        return Err(format!(
            "Status.version {version:?} is neither \"v2\" nor \"v2beta1\""
        ));
    }
    if healthz != "ok" {
        return Err(format!("Status.healthz {healthz:?} is not exactly \"ok\""));
    }
    check_key_id("Status", key_id)
}

/// An Encrypt answer the apiserver accepts after a Status that reported
/// `status_key_id`.
pub fn check_encrypt(
    status_key_id: &str,
    key_id: &str,
    ciphertext: &[u8],
    annotations: &HashMap<String, Vec<u8>>,
) -> Result<(), String> {
    check_key_id("Encrypt", key_id)?;
    if key_id != status_key_id {
        return Err(format!(
            "Encrypt.key_id {key_id:?} differs from Status.key_id {status_key_id:?}"
        ));
    }
    if ciphertext.is_empty() || ciphertext.len() > MAX_CIPHERTEXT_BYTES {
        return Err(format!(
            "Encrypt.ciphertext is {} bytes, outside 1..={MAX_CIPHERTEXT_BYTES}",
            ciphertext.len()
        ));
    }
    check_annotations(annotations)
}

/// A Decrypt answer: exactly the bytes given to Encrypt.
pub fn check_decrypt(encrypted: &[u8], decrypted: &[u8]) -> Result<(), String> {
    if encrypted != decrypted {
        return Err(format!(
            "Decrypt returned {} bytes that differ from the {} bytes given to Encrypt",
            decrypted.len(),
            encrypted.len()
        ));
    }
    Ok(())
}

/// Every key a valid name, and the total size within bounds.
pub fn check_annotations(annotations: &HashMap<String, Vec<u8>>) -> Result<(), String> {
    let mut total = 0usize;
    for (key, value) in annotations {
        check_annotation_key(key)?;
        total += key.len() + value.len();
    }
    if total > MAX_ANNOTATIONS_BYTES {
        return Err(format!(
            "annotations total {total} bytes, more than {MAX_ANNOTATIONS_BYTES}"
        ));
    }
    Ok(())
}

/// A fully qualified, lowercase RFC 1123 DNS name: at least two labels, at
/// most 253 characters, labels of 1..=63 of `[a-z0-9-]` that neither start
/// nor end with `-`; one trailing `.` allowed.
pub fn check_annotation_key(key: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("annotation key {key:?} {why}"));
    let name = match key.as_bytes() {
        [rest @ .., b'.'] => rest,
        all => all,
    };
    if name.is_empty() {
        return bad("is empty");
    }
    if name.len() > MAX_DNS_NAME {
        return bad("is longer than 253 characters");
    }
    // A byte-at-a-time scan: label start, inside a label, label end.
    let mut labels = 1;
    let mut label_len = 0;
    let mut previous = b'.';
    for &c in name {
        match c {
            b'.' => {
                if label_len == 0 {
                    return bad("has an empty label");
                }
                if previous == b'-' {
                    return bad("has a label ending in '-'");
                }
                labels += 1;
                label_len = 0;
            }
            b'a'..=b'z' | b'0'..=b'9' | b'-' => {
                if c == b'-' && label_len == 0 {
                    return bad("has a label starting with '-'");
                }
                label_len += 1;
                if label_len > MAX_DNS_LABEL {
                    return bad("has a label longer than 63 characters");
                }
            }
            _ => return bad("has a character outside [a-z0-9.-]"),
        }
        previous = c;
    }
    if label_len == 0 {
        return bad("has an empty label");
    }
    if previous == b'-' {
        return bad("has a label ending in '-'");
    }
    if labels < 2 {
        return bad("has fewer than two labels");
    }
    Ok(())
}

fn check_key_id(call: &str, key_id: &str) -> Result<(), String> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID_BYTES {
        return Err(format!(
            "{call}.key_id is {} bytes, outside 1..={MAX_KEY_ID_BYTES}",
            key_id.len()
        ));
    }
    Ok(())
}

// The checker must itself be right, or every test built on it proves nothing.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_keys_follow_the_spec_examples() {
        for good in [
            "a.com",
            "version.encryption.remote.io",
            "a.com.",
            "x-1.y2.z",
            "0.9",
            &format!("{}.com", "a".repeat(63)),
            // 253 characters exactly: 3 labels of 63, one of 61, 3 dots.
            &format!("{a}.{a}.{a}.{b}", a = "a".repeat(63), b = "b".repeat(61)),
        ] {
            assert_eq!(check_annotation_key(good), Ok(()), "{good:?}");
        }
        assert_eq!(
            format!("{a}.{a}.{a}.{b}", a = "a".repeat(63), b = "b".repeat(61)).len(),
            253
        );
        for bad in [
            "com",
            "Dev.k8s.io",
            "kms.example.io/x",
            "",
            ".",
            "a..com",
            "-a.com",
            "a-.com",
            "a.com-",
            "a_b.com",
            "a.com..",
            ".a.com",
            "a com.io",
            "ä.com",
            &format!("{}.com", "a".repeat(64)),
            &format!("{a}.{a}.{a}.{b}", a = "a".repeat(63), b = "b".repeat(62)),
        ] {
            assert!(check_annotation_key(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn annotation_total_size_is_capped_at_32_kib() {
        let key = "a.com".to_owned();
        let fits = HashMap::from([(key.clone(), vec![0u8; MAX_ANNOTATIONS_BYTES - key.len()])]);
        assert_eq!(check_annotations(&fits), Ok(()));
        let over = HashMap::from([(
            key.clone(),
            vec![0u8; MAX_ANNOTATIONS_BYTES - key.len() + 1],
        )]);
        assert!(check_annotations(&over).is_err());
        let bad_key = HashMap::from([("Dev.k8s.io".to_owned(), vec![])]);
        assert!(check_annotations(&bad_key).is_err());
    }

    #[test]
    fn status_rules() {
        assert_eq!(check_status("v2", "ok", "k"), Ok(()));
        assert_eq!(check_status("v2beta1", "ok", "k"), Ok(()));
        assert_eq!(check_status("v2", "ok", &"k".repeat(1024)), Ok(()));
        for (version, healthz, key_id) in [
            ("v1", "ok", "k"),
            ("v2alpha1", "ok", "k"),
            ("", "ok", "k"),
            ("v2", "OK", "k"),
            ("v2", "ok ", "k"),
            ("v2", "", "k"),
            ("v2", "ok", ""),
        ] {
            assert!(
                check_status(version, healthz, key_id).is_err(),
                "{version:?} {healthz:?} {key_id:?} was accepted"
            );
        }
        assert!(check_status("v2", "ok", &"k".repeat(1025)).is_err());
    }

    #[test]
    fn encrypt_rules() {
        let none = HashMap::new();
        assert_eq!(check_encrypt("k", "k", &[1], &none), Ok(()));
        assert_eq!(check_encrypt("k", "k", &[1; 1024], &none), Ok(()));
        assert!(check_encrypt("k", "j", &[1], &none).is_err());
        assert!(check_encrypt("", "", &[1], &none).is_err());
        assert!(check_encrypt("k", "k", &[], &none).is_err());
        assert!(check_encrypt("k", "k", &[1; 1025], &none).is_err());
        let bad = HashMap::from([("com".to_owned(), vec![1])]);
        assert!(check_encrypt("k", "k", &[1], &bad).is_err());
    }

    #[test]
    fn decrypt_rules() {
        assert_eq!(check_decrypt(b"seed", b"seed"), Ok(()));
        assert!(check_decrypt(b"seed", b"seeD").is_err());
        assert!(check_decrypt(b"seed", b"").is_err());
    }
}
