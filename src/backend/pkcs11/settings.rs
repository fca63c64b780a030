//! The PKCS#11 backend's settings: defaults, validation, and the PIN,
//! read from a file only this user can read (or `KEKD_PKCS11_PIN`), never
//! from argv.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{BackendSettings, SettingsError};
use crate::file::{Links, OpenError, open_regular};
use crate::secret::Pin;

/// Default prefix of kekd's object labels in a PKCS#11 token.
pub const DEFAULT_KEY_LABEL_PREFIX: &str = "kekd-";
/// Default size of the PKCS#11 session pool.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Default directory of per-node state for the PKCS#11 backend.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kekd";

/// Validated settings of the PKCS#11 backend.
#[derive(Debug, Clone)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token; the slot is found by it at every (re)connect.
    pub token_label: String,
    /// The user PIN.
    pub pin: Arc<Pin>,
    /// Prefix of the labels of kekd's objects, so several keyrings can share a token.
    pub key_label_prefix: String,
    /// Most sessions open at once.
    pub pool_size: usize,
    /// Directory of this node's usage file, audit log and admin lock.
    pub state_dir: PathBuf,
}

impl Pkcs11Settings {
    /// Validates the `[backend]` settings of `kind = "pkcs11"`. The PIN is
    /// read here, from `pin_file` or `KEKD_PKCS11_PIN`.
    ///
    /// # Errors
    /// The first missing or invalid setting, with the fix.
    pub fn resolve(b: BackendSettings) -> Result<Self, SettingsError> {
        let module = b.module.ok_or(SettingsError::Missing {
            what: "PKCS#11 module",
            how: "`module = \"/path/to/module.so\"` in [backend], --pkcs11-module or KEKD_PKCS11_MODULE",
        })?;
        let token_label = b.token_label.ok_or(SettingsError::Missing {
            what: "PKCS#11 token label",
            how: "`token_label = \"LABEL\"` in [backend], --pkcs11-token-label or KEKD_PKCS11_TOKEN_LABEL",
        })?;
        let pin = read_pin(b.pin_file.as_deref())?;
        let pool_size = b.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
        if !(1..=256).contains(&pool_size) {
            return Err(SettingsError::Invalid {
                what: "pool_size",
                reason: format!("{pool_size} is outside 1..=256"),
            });
        }
        let key_label_prefix = b
            .key_label_prefix
            .unwrap_or_else(|| DEFAULT_KEY_LABEL_PREFIX.to_owned());
        if key_label_prefix.len() > 64 {
            return Err(SettingsError::Invalid {
                what: "key_label_prefix",
                reason: "is longer than 64 bytes".to_owned(),
            });
        }
        Ok(Self {
            module,
            token_label,
            pin: Arc::new(pin),
            key_label_prefix,
            pool_size,
            state_dir: b
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        })
    }
}

/// Largest PIN file kekd reads (PKCS#11 PINs are short; a larger file is a
/// wrong path, not a PIN).
const MAX_PIN_FILE: usize = 1024;

/// Reads the PIN from `file` (which must not be readable by others) or,
/// without one, from `KEKD_PKCS11_PIN`. Never from argv.
fn read_pin(file: Option<&Path>) -> Result<Pin, SettingsError> {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = file else {
        return match std::env::var("KEKD_PKCS11_PIN") {
            Ok(pin) if !pin.is_empty() => Ok(Pin::new(pin)),
            _ => Err(SettingsError::Missing {
                what: "PKCS#11 PIN",
                how: "`pin_file = \"PATH\"` in [backend], --pkcs11-pin-file PATH or the KEKD_PKCS11_PIN environment variable",
            }),
        };
    };
    let bad = |reason: String| SettingsError::Invalid {
        what: "pin_file",
        reason,
    };
    // One open, then every check on what was opened: a FIFO swapped in
    // after a check would block the read forever.
    let (file, meta) = open_regular(path, Links::Follow).map_err(|e| match e {
        OpenError::NotRegular { what, .. } => bad(format!(
            "{} is {what}, not a regular file; point pin_file at a file holding only the PIN",
            path.display()
        )),
        e => bad(e.to_string()),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "{0} has permissions {mode:04o}, which let other users read the PIN; run `chmod 600 {0}`",
            path.display()
        )));
    }
    // Read at most MAX_PIN_FILE + 1 bytes into a buffer that never grows
    // (a reallocation would leave a copy of the PIN behind, unzeroed).
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(MAX_PIN_FILE + 1));
    {
        use std::io::Read;
        file.take(MAX_PIN_FILE as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    }
    if bytes.len() > MAX_PIN_FILE {
        return Err(bad(format!(
            "{} is larger than {MAX_PIN_FILE} bytes; a PIN file holds only the PIN (and a newline)",
            path.display()
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| bad(format!("{} is not UTF-8 text", path.display())))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(bad(format!("{} is empty", path.display())));
    }
    Ok(Pin::new(pin.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn pin_files_are_read_strictly_and_never_without_bound() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            path
        };
        let ok = write("ok", b"123456\n");
        assert_eq!(read_pin(Some(&ok)).unwrap().expose_secret(), "123456");
        let err = |path: &Path| read_pin(Some(path)).unwrap_err().to_string();

        let exact = write("exact", &[b'7'; MAX_PIN_FILE]);
        assert_eq!(
            read_pin(Some(&exact)).unwrap().expose_secret().len(),
            MAX_PIN_FILE
        );
        let big = write("big", &[b'7'; MAX_PIN_FILE + 1]);
        assert_eq!(
            err(&big),
            format!(
                "invalid pin_file: {} is larger than 1024 bytes; a PIN file holds only the PIN (and a newline)",
                big.display()
            )
        );
        // A device would never end: refused before reading.
        assert_eq!(
            err(Path::new("/dev/zero")),
            "invalid pin_file: /dev/zero is a character device, not a regular file; point pin_file at a file \
             holding only the PIN"
        );
        let binary = write("binary", &[0xff, 0xfe, b'\n']);
        assert_eq!(
            err(&binary),
            format!("invalid pin_file: {} is not UTF-8 text", binary.display())
        );
        let empty = write("empty", b"\n");
        assert_eq!(
            err(&empty),
            format!("invalid pin_file: {} is empty", empty.display())
        );
    }
}
