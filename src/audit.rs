//! The admin audit log: one JSON line per keyring change, beside the keyring
//! in `<keyring>.audit.jsonl`, appended and fsynced before the command
//! reports success. It never holds key material. Schema: `docs/audit.md`.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::keyring::ops::Transition;
use crate::keyring::store;
use crate::keyring::{KeyId, KeyringId, Timestamp};

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// When the change was written.
    pub time: Timestamp,
    /// Who ran the command (login name when known).
    pub user: String,
    /// Their numeric uid.
    pub uid: u32,
    /// The admin command (`rotate`, `promote`, …).
    pub command: &'static str,
    /// The keyring (its file, or the token and label prefix).
    pub keyring: String,
    /// Its id.
    pub keyring_id: String,
    /// The version that changed.
    pub version: u32,
    /// Its public key id.
    pub key_id: String,
    /// State before (`null` for a new version).
    pub from: Option<&'static str>,
    /// State after.
    pub to: &'static str,
    /// `--force` or similar overrides used, if any.
    pub overrides: Vec<&'static str>,
}

impl AuditRecord {
    /// A record of `transition` made by `command` now, by the calling user.
    pub fn new(
        command: &'static str,
        keyring: &str,
        id: &KeyringId,
        transition: &Transition,
        overrides: Vec<&'static str>,
        now: Timestamp,
    ) -> Self {
        let uid = rustix::process::getuid().as_raw();
        Self {
            time: now,
            user: user_name(uid),
            uid,
            command,
            keyring: keyring.to_owned(),
            keyring_id: id.to_string(),
            version: transition.version.get(),
            key_id: KeyId::new(id, transition.version).to_string(),
            from: transition.from.map(|s| s.as_str()),
            to: transition.to.as_str(),
            overrides,
        }
    }
}

/// The audit log of the keyring at `keyring`.
pub fn audit_path(keyring: &Path) -> PathBuf {
    store::sibling(keyring, ".audit.jsonl")
}

/// Appends `records` to the keyring's audit log and fsyncs it.
///
/// # Errors
/// When the log cannot be opened, written or synced.
pub fn append(keyring: &Path, records: &[AuditRecord]) -> io::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut buf = Vec::new();
    for r in records {
        serde_json::to_writer(&mut buf, r).map_err(io::Error::other)?;
        buf.push(b'\n');
    }
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(audit_path(keyring))?;
    f.write_all(&buf)?;
    f.sync_all()
}

/// Appends one JSON value as a line to the audit log at `path` and fsyncs it.
///
/// # Errors
/// When the log cannot be opened, written or synced.
pub fn append_line(path: &Path, value: &serde_json::Value) -> io::Result<()> {
    let mut buf = serde_json::to_vec(value).map_err(io::Error::other)?;
    buf.push(b'\n');
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&buf)?;
    f.sync_all()
}

/// The login name for `uid`: `$SUDO_USER` when run through sudo, else the
/// name in /etc/passwd, else the number.
fn user_name(uid: u32) -> String {
    if let Ok(sudo) = std::env::var("SUDO_USER")
        && !sudo.is_empty()
    {
        return format!("{sudo} (via sudo)");
    }
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_owned())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}
