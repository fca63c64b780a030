//! The backup file parser (`src/backup.rs`).
//!
//! `Backup::parse` does no KDF work (it only checks the argon2id parameters
//! against their limits), so no test-only KDF path is needed: opening, the
//! only step that runs argon2id, is not fuzzed (any change to a backup fails
//! AES-GCM authentication, which the unit tests cover).
//!
//! Checks: parsing never panics; an error names a line ≥ 1 and a reason; a
//! backup that parses is canonical (re-encodes to the same bytes), has KDF
//! parameters inside the accepted ranges (never below the floor), versions
//! strictly increasing, and a sealed body longer than a tag.
#![no_main]

use kekd::backup::{Backup, KdfParams};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let backup = match Backup::parse(data) {
        Ok(b) => b,
        Err(e) => {
            assert!(e.line >= 1);
            assert!(!e.reason.is_empty());
            return;
        }
    };
    assert_eq!(
        backup.encode().as_bytes(),
        data,
        "a backup that parses must be canonical"
    );
    let h = backup.header();
    assert!(KdfParams::MEMORY_KIB.contains(&h.kdf.memory_kib));
    assert!(KdfParams::PASSES.contains(&h.kdf.passes));
    assert!(KdfParams::LANES.contains(&h.kdf.lanes));
    assert!(h.versions.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(!h.versions.is_empty());
    let reparsed = Backup::parse(backup.encode().as_bytes()).expect("re-parse");
    assert_eq!(reparsed, backup);
});
