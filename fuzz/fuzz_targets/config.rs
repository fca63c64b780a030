//! The TOML settings parser of `kekd serve` (`src/config.rs`) and the
//! validation that turns settings into a `ServeConfig`.
//!
//! Checks: neither panics on any input; a parse error names the file; a
//! validation error names the setting; a config that validates keeps every
//! limit the design promises (socket mode owner-rw and never other-user
//! bits, request size and concurrency within range, intervals bounded).
//!
//! The PIN file is the one setting that makes validation read another
//! file: it is pointed at a fixed test PIN file (0600) before validation, so
//! the fuzzer cannot steer kekd into reading arbitrary paths of this
//! machine (that is I/O, not parsing).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use kekd::backend::BackendConfig;
use kekd::config::{ConfigError, ServeConfig, Settings};
use libfuzzer_sys::fuzz_target;

fn pin_file() -> &'static Path {
    static PIN: OnceLock<PathBuf> = OnceLock::new();
    PIN.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("kekd-fuzz-pin-{}", std::process::id()));
        std::fs::write(&path, "1234\n").expect("write the test PIN file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the test PIN file");
        path
    })
}

fuzz_target!(|data: &[u8]| {
    // `Settings::from_file` reads the file as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let mut settings = match Settings::from_toml(text, path) {
        Ok(s) => s,
        Err(e) => {
            assert!(matches!(e, ConfigError::File { .. }), "{e:?}");
            assert!(e.to_string().starts_with("config file fuzz.toml: "), "{e}");
            return;
        }
    };
    if settings.backend.pin_file.is_some() {
        settings.backend.pin_file = Some(pin_file().to_owned());
    }
    match ServeConfig::resolve(settings) {
        Ok(c) => {
            assert_eq!(c.socket.mode & 0o600, 0o600);
            assert_eq!(c.socket.mode & !0o770, 0);
            assert!((1024..=4 << 20).contains(&c.max_request_bytes));
            assert!((1..=65536).contains(&c.max_concurrency));
            assert!(c.self_check_interval >= Duration::from_secs(1));
            assert!(
                (Duration::from_millis(100)..=Duration::from_secs(3600))
                    .contains(&c.reload_interval)
            );
            assert!(
                (Duration::from_millis(100)..=Duration::from_secs(60))
                    .contains(&c.usage_flush_interval)
            );
            if let BackendConfig::Pkcs11(p) = &c.backend {
                assert!((1..=256).contains(&p.pool_size));
                assert!(p.key_label_prefix.len() <= 64);
            }
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ConfigError::Missing { .. }
                        | ConfigError::Invalid { .. }
                        | ConfigError::Backend(_)
                ),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.starts_with("no ") || msg.starts_with("invalid "),
                "{msg}"
            );
        }
    }
});
