//! Where KEKs live. The service and the keyring never name a concrete backend:
//! they load snapshots through [`Backend`] and seal/open through [`KeyHandle`].
//!
//! This file is also the registry, the one place that lists the backends:
//! [`BackendSettings`] (the `[backend]` table and its flags),
//! [`BackendConfig`] (validated) and [`open`], the one constructor. A new
//! backend adds a folder and one entry in each (docs/design.md §6a).
//!
//! - [`local`]: KEKs in a keyring file on the node, AES-256-GCM in process.
//! - [`pkcs11`]: KEKs generated and kept in an HSM token, AES-GCM inside the
//!   token on a bounded session pool off the async workers; the keyring
//!   metadata lives in the token too, so every node sharing it agrees.

pub mod local;
pub mod pkcs11;
pub mod served;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::id::Timestamp;
pub use crate::kek::{BackendError, ErrorKind, KeyHandle};
use crate::keyring::Keyring;
use crate::keyring::store::KeyringFile;

/// A source of keyring snapshots.
pub trait Backend: fmt::Debug + Send + Sync + 'static {
    /// Names the source for logs and errors (a path, a token label); no secrets.
    fn describe(&self) -> String;

    /// `local` or `pkcs11`, for metrics.
    fn kind(&self) -> &'static str;

    /// Hands the backend the metrics registry (for HSM latency and pool
    /// gauges). The default ignores it.
    fn attach_metrics(&self, _metrics: std::sync::Arc<crate::metrics::Metrics>) {}

    /// Reads the keyring as it is now and returns a snapshot ready to serve.
    /// Blocking: call it from a blocking context.
    ///
    /// # Errors
    /// When the keyring cannot be read, parsed or validated.
    fn load(&self) -> Result<Keyring, BackendError>;

    /// A cheap token that changes whenever the keyring may have changed, so
    /// the reload loop loads only then. `None` means "load every poll".
    fn revision(&self) -> Option<String>;

    /// Files whose change should trigger a reload at once (watched through
    /// inotify, with polling as the fallback).
    fn watch_paths(&self) -> Vec<std::path::PathBuf>;

    /// The file the usage counters are kept beside, if any.
    fn state_anchor(&self) -> Option<std::path::PathBuf>;
}

/// Where the admin commands read and write a keyring: the file for the
/// local backend, the token's metadata object (and key objects) for PKCS#11.
/// Callers hold the keyring's admin lock around read → change → replace.
pub trait KeyringStore: fmt::Debug {
    /// Names the keyring for messages and the audit log.
    fn name(&self) -> String;

    /// The path beside which the lock, usage file and audit log live.
    fn anchor(&self) -> std::path::PathBuf;

    /// A new keyring (version 1 primary) of this store's kind; nothing written.
    ///
    /// # Errors
    /// When the RNG fails.
    fn generate(&self, now: Timestamp) -> Result<KeyringFile, BackendError>;

    /// Reads the keyring.
    ///
    /// # Errors
    /// Missing, unreadable or invalid.
    fn read(&self) -> Result<KeyringFile, BackendError>;

    /// Stores a new keyring; never replaces an existing one.
    ///
    /// # Errors
    /// When one exists, or the write fails (leaving nothing behind).
    fn create(&self, file: &KeyringFile) -> Result<(), BackendError>;

    /// Replaces `old` (as read under the lock) with `new`, atomically.
    ///
    /// # Errors
    /// When the write fails; `old` is then still in place.
    fn replace(&self, old: &KeyringFile, new: &KeyringFile) -> Result<(), BackendError>;
}

/// A backend that both serves snapshots and is changed by the admin
/// commands: what [`open`] returns.
pub trait KeySource: Backend + KeyringStore {}

impl<T: Backend + KeyringStore> KeySource for T {}

/// Where the KEKs live: the `[backend]` table of the config file, or flags.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "Backend (PKCS#11; or the [backend] table of --config)")]
pub struct BackendSettings {
    /// `local` (keyring file) or `pkcs11` (HSM token) [default: local].
    #[arg(long = "backend", env = "KEKD_BACKEND", value_name = "KIND")]
    pub kind: Option<String>,
    /// PKCS#11 module (.so), e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(
        long = "pkcs11-module",
        env = "KEKD_PKCS11_MODULE",
        value_name = "PATH"
    )]
    pub module: Option<PathBuf>,
    /// Label of the token holding the keys (never a slot number).
    #[arg(
        long = "pkcs11-token-label",
        env = "KEKD_PKCS11_TOKEN_LABEL",
        value_name = "LABEL"
    )]
    pub token_label: Option<String>,
    /// File holding the user PIN (mode 0600); or set KEKD_PKCS11_PIN. Never a flag value.
    #[arg(
        long = "pkcs11-pin-file",
        env = "KEKD_PKCS11_PIN_FILE",
        value_name = "PATH"
    )]
    pub pin_file: Option<PathBuf>,
    /// Prefix of kekd's object labels in the token [default: kekd-].
    #[arg(
        long = "pkcs11-key-label-prefix",
        env = "KEKD_PKCS11_KEY_LABEL_PREFIX",
        value_name = "PREFIX"
    )]
    pub key_label_prefix: Option<String>,
    /// Most PKCS#11 sessions open at once [default: 4].
    #[arg(
        long = "pkcs11-pool-size",
        env = "KEKD_PKCS11_POOL_SIZE",
        value_name = "N"
    )]
    pub pool_size: Option<usize>,
    /// Directory for this node's usage counters, audit log and admin lock
    /// with the pkcs11 backend [default: /var/lib/kekd].
    #[arg(long = "state-dir", env = "KEKD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl BackendSettings {
    /// Fills each unset field from `fallback`.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            kind: self.kind.or(fallback.kind),
            module: self.module.or(fallback.module),
            token_label: self.token_label.or(fallback.token_label),
            pin_file: self.pin_file.or(fallback.pin_file),
            key_label_prefix: self.key_label_prefix.or(fallback.key_label_prefix),
            pool_size: self.pool_size.or(fallback.pool_size),
            state_dir: self.state_dir.or(fallback.state_dir),
        }
    }

    /// Whether the chosen backend keeps its keyring in a file (so backups
    /// and imports apply), known before any setting is validated, a PIN
    /// read or a key store reached.
    pub fn keyring_in_a_file(&self) -> bool {
        matches!(self.kind.as_deref(), None | Some("local"))
    }
}

/// The validated choice of backend: the one place that lists them.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// A keyring file.
    Local {
        /// Its path.
        keyring: PathBuf,
    },
    /// A PKCS#11 token.
    Pkcs11(pkcs11::Pkcs11Settings),
}

impl BackendConfig {
    /// Validates the backend part of merged settings: `keyring` is the
    /// local backend's file, `b` the `[backend]` table (or its flags).
    ///
    /// # Errors
    /// The first missing or invalid setting, with the fix.
    pub fn resolve(keyring: Option<PathBuf>, b: BackendSettings) -> Result<Self, SettingsError> {
        match b.kind.as_deref().unwrap_or("local") {
            "local" => {
                let keyring = keyring.ok_or(SettingsError::Missing {
                    what: "keyring",
                    how: "--keyring PATH, KEKD_KEYRING or `keyring = \"PATH\"` in --config (or try --dev)",
                })?;
                Ok(Self::Local { keyring })
            }
            "pkcs11" => Ok(Self::Pkcs11(pkcs11::Pkcs11Settings::resolve(b)?)),
            other => Err(SettingsError::Invalid {
                what: "backend kind",
                reason: format!("{other:?} is not `local` or `pkcs11`"),
            }),
        }
    }

    /// `local` or `pkcs11`: the `kind` of the `[backend]` table.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Local { .. } => "local",
            Self::Pkcs11(_) => "pkcs11",
        }
    }

    /// Threads the backend runs blocking key operations on (a token's
    /// session pool); 0 when seal and open run on the calling task.
    pub fn blocking_threads(&self) -> usize {
        match self {
            Self::Local { .. } => 0,
            Self::Pkcs11(s) => s.pool_size,
        }
    }

    /// The keyring file, for the commands that work on one (backups,
    /// import): `None` when the keyring lives in a key store.
    pub fn keyring_file(&self) -> Option<&Path> {
        match self {
            Self::Local { keyring } => Some(keyring),
            Self::Pkcs11(_) => None,
        }
    }

    /// A directory of per-node state (usage, audit, admin lock) that the
    /// backend needs created before it opens, if any.
    pub fn state_dir(&self) -> Option<&Path> {
        match self {
            Self::Local { .. } => None,
            Self::Pkcs11(s) => Some(&s.state_dir),
        }
    }

    /// See [`GuardedPath`].
    pub fn guarded_path(&self) -> GuardedPath<'_> {
        match self {
            Self::Local { keyring } => GuardedPath::File(keyring),
            Self::Pkcs11(s) => GuardedPath::Dir(&s.state_dir),
        }
    }

    /// The environment variable that may carry the backend's secret (a
    /// PIN), when it has one: kekd warns that it stays readable in
    /// `/proc/PID/environ`.
    pub fn secret_env(&self) -> Option<&'static str> {
        match self {
            Self::Local { .. } => None,
            Self::Pkcs11(_) => Some("KEKD_PKCS11_PIN"),
        }
    }
}

/// What only the serving user (and root) may be able to change, checked
/// by `kekd serve` and `kekd admin doctor` before anything is read.
#[derive(Debug, Clone, Copy)]
pub enum GuardedPath<'a> {
    /// The keyring file itself (and every directory on its way).
    File(&'a Path),
    /// The directory of the served record, the admin lock and the audit log.
    Dir(&'a Path),
}

/// Opens the backend `config` names: the one constructor `kekd serve`,
/// every admin command and `kekd admin doctor` use; connects to a key
/// store. Creates nothing: a command that writes state creates the
/// backend's [`BackendConfig::state_dir`] first ([`ensure_state_dir`]),
/// and `kekd serve` checks who may change it before this.
///
/// # Errors
/// When the key store cannot be reached or refuses kekd.
pub fn open(config: &BackendConfig) -> Result<Arc<dyn KeySource>, BackendError> {
    Ok(match config {
        BackendConfig::Local { keyring } => Arc::new(local::LocalBackend::new(keyring.clone())),
        BackendConfig::Pkcs11(settings) => {
            Arc::new(pkcs11::Pkcs11Backend::connect(settings.clone())?)
        }
    })
}

/// Creates a per-node state directory (0700) if missing.
///
/// # Errors
/// When it cannot be created.
pub fn ensure_state_dir(dir: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            BackendError::new(
                ErrorKind::Misconfigured,
                format!(
                    "cannot create state directory {}: {e} (set `state_dir`)",
                    dir.display()
                ),
            )
        })
}

/// A backend setting is missing or wrong.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A required setting was not given.
    #[error("no {what} given: set {how}")]
    Missing {
        /// The setting.
        what: &'static str,
        /// Ways to give it.
        how: &'static str,
    },
    /// A setting has a bad value.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// Why.
        reason: String,
    },
}
