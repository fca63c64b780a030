//! The keyring file parser (`src/keyring/store.rs`).
//!
//! Input: one mode byte, then the file. With an odd mode byte the rest is
//! taken as the body and a correct `sha256` line is appended, so mutations
//! reach the line parser instead of all stopping at the checksum; with an
//! even one it is the whole file as is (checksum line included).
//!
//! Checks: parsing never panics; an error names a line (or the whole
//! keyring) and a reason; a file that parses re-serializes to text that
//! parses to the same keyring (id, material kind, every version's facts and
//! key), and that text is a fixed point of parse → encode; a parsed local
//! keyring always builds a serving snapshot.
#![no_main]

use kekd::backend::local::keyring_from_file;
use kekd::keyring::store::{KeyringFile, Material};
use kekd_fuzz::{KEYRING_ADD_CHECKSUM, with_checksum};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let fixed;
    let data = if mode & 1 == KEYRING_ADD_CHECKSUM {
        fixed = with_checksum(rest);
        fixed.as_slice()
    } else {
        rest
    };
    let file = match KeyringFile::parse(data) {
        Ok(file) => file,
        Err(e) => {
            assert!(!e.reason.is_empty());
            assert!(e.line.is_none_or(|l| l >= 1));
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let encoded = file.encode();
    let again = match KeyringFile::parse(encoded.as_bytes()) {
        Ok(again) => again,
        Err(e) => panic!("kekd cannot read back the keyring it wrote: {e}"),
    };
    assert_eq!(again.material, file.material);
    assert_eq!(again.id, file.id);
    assert_eq!(again.infos(), file.infos());
    for (a, b) in again.versions.iter().zip(&file.versions) {
        assert_eq!(
            a.kek.as_ref().map(|k| *k.expose_secret()),
            b.kek.as_ref().map(|k| *k.expose_secret()),
            "version {} came back with other key material",
            a.info.version
        );
    }
    assert_eq!(*again.encode(), *encoded, "encode is not a fixed point");
    if file.material == Material::Inline {
        let n = file.versions.len();
        let keyring = keyring_from_file(file).expect("a parsed keyring builds a snapshot");
        assert_eq!(keyring.versions().count(), n);
    }
});
