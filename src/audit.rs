//! The admin audit log: one JSON line per keyring change, beside the keyring
//! in `<keyring>.audit.jsonl`, appended and fsynced before the command
//! reports success. It never holds key material. Schema: `docs/audit.md`.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::id::{KeyId, KeyringId, Timestamp};
use crate::keyring::lifecycle::Transition;

/// The version of the admin record format (`format` in each line). Lines
/// without it are format 1, whose `user` could come from `$SUDO_USER`.
pub const FORMAT: u32 = 2;

/// Longest claimed user name kept in a record (the environment is the
/// caller's to fill).
const MAX_CLAIM: usize = 256;

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// The record format, [`FORMAT`].
    pub format: u32,
    /// When the change was written.
    pub time: Timestamp,
    /// Who ran the command: the login name of the real uid in /etc/passwd,
    /// else the number. Never taken from the environment.
    pub user: String,
    /// The real uid of the process: the identity the kernel vouches for.
    pub uid: u32,
    /// Who the environment says is behind `uid` (`$SUDO_USER`,
    /// `$SUDO_UID`), when it says so: a claim the caller can set to
    /// anything, recorded as such and never as the identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimed_user: Option<ClaimedUser>,
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
    /// What the change risks, when an override let it skip a guard (a
    /// `retire --force` without a scan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<String>,
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
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        Self {
            format: FORMAT,
            time: now,
            user: user_name(&passwd, uid),
            uid,
            claimed_user: ClaimedUser::from_env(),
            command,
            keyring: keyring.to_owned(),
            keyring_id: id.to_string(),
            version: transition.version.get(),
            key_id: KeyId::new(id, transition.version).to_string(),
            from: transition.from.map(|s| s.as_str()),
            to: transition.to.as_str(),
            overrides,
            risk: None,
        }
    }

    /// This record, stating what the change risks.
    #[must_use]
    pub fn with_risk(self, risk: Option<String>) -> Self {
        Self { risk, ..self }
    }
}

/// The audit log of the keyring at `keyring`.
pub fn audit_path(keyring: &Path) -> PathBuf {
    crate::file::sibling(keyring, ".audit.jsonl")
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
    let mut f = open_log(&audit_path(keyring), Some(keyring))?;
    f.write_all(&buf)?;
    f.sync_all()
}

/// Opens an audit log for appending, creating it (0600) when missing. A log
/// created here gets the owner and group of `owner_of` (the keyring) when
/// this process may give them — root running `kekd admin` for a kekd that
/// serves as another user — so that server can still append its own events.
fn open_log(path: &Path, owner_of: Option<&Path>) -> io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => {
            if let Some(meta) = owner_of.and_then(|p| std::fs::metadata(p).ok()) {
                // Best effort: a caller that cannot chown could not have
                // replaced the keyring either (the write refuses first), so
                // a failure here means the owner already is the caller.
                let _ = std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()));
            }
            Ok(f)
        }
        // Root may run this in a directory the serving user owns: never
        // append through a planted link, to a FIFO, or to a second name of
        // another file.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let f = OpenOptions::new()
                .append(true)
                .custom_flags(crate::file::no_follow())
                .open(path)
                .map_err(
                    |e| match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
                        Some(rustix::io::Errno::LOOP) => planted(path, "a symlink"),
                        // A FIFO nobody reads (or a socket): opening it to
                        // write without blocking fails so.
                        Some(rustix::io::Errno::NXIO) => planted(
                            path,
                            std::fs::symlink_metadata(path).map_or("not a regular file", |m| {
                                crate::file::kind_of(m.file_type())
                            }),
                        ),
                        _ => e,
                    },
                )?;
            let meta = f.metadata()?;
            if !meta.is_file() {
                return Err(planted(path, crate::file::kind_of(meta.file_type())));
            }
            if meta.nlink() != 1 {
                return Err(planted(path, "a hard link to another file"));
            }
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

fn planted(path: &Path, what: &'static str) -> io::Error {
    io::Error::other(crate::file::Planted {
        path: path.to_owned(),
        what,
    })
}

/// Appends one JSON value as a line to the audit log at `path` and fsyncs it.
///
/// # Errors
/// When the log cannot be opened, written or synced.
pub fn append_line(path: &Path, value: &serde_json::Value) -> io::Result<()> {
    let mut buf = serde_json::to_vec(value).map_err(io::Error::other)?;
    buf.push(b'\n');
    let mut f = open_log(path, None)?;
    f.write_all(&buf)?;
    f.sync_all()
}

/// What the environment claims about the user behind the real uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimedUser {
    /// `$SUDO_USER` (at most 256 characters), if set.
    pub name: Option<String>,
    /// `$SUDO_UID`, if set and a number.
    pub uid: Option<u32>,
    /// Where the claim came from: `sudo-env`.
    pub source: &'static str,
}

impl ClaimedUser {
    /// The claim in this process's environment, if any.
    fn from_env() -> Option<Self> {
        Self::from_vars(
            std::env::var_os("SUDO_USER").as_deref(),
            std::env::var_os("SUDO_UID").as_deref(),
        )
    }

    fn from_vars(name: Option<&std::ffi::OsStr>, uid: Option<&std::ffi::OsStr>) -> Option<Self> {
        let name = name
            .map(|n| {
                n.to_string_lossy()
                    .chars()
                    .take(MAX_CLAIM)
                    .collect::<String>()
            })
            .filter(|n| !n.is_empty());
        let uid = uid.and_then(|u| u.to_str()).and_then(|u| u.parse().ok());
        (name.is_some() || uid.is_some()).then_some(Self {
            name,
            uid,
            source: "sudo-env",
        })
    }
}

/// The login name of `uid` in the text of /etc/passwd, else the number.
fn user_name(passwd: &str, uid: u32) -> String {
    let uid_text = uid.to_string();
    passwd
        .lines()
        .find_map(|l| {
            let mut fields = l.split(':');
            let name = fields.next()?;
            let _password = fields.next()?;
            (fields.next()? == uid_text && !name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or(uid_text)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn the_user_is_the_passwd_name_of_the_uid_never_the_environment() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n:x:7:7::/:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_name(passwd, 0), "root");
        assert_eq!(user_name(passwd, 1000), "alice");
        assert_eq!(user_name(passwd, 7), "7", "an empty name is no name");
        assert_eq!(user_name(passwd, 4242), "4242");
        assert_eq!(user_name("", 0), "0");
    }

    #[test]
    fn sudo_variables_are_only_a_claim() {
        assert_eq!(ClaimedUser::from_vars(None, None), None);
        assert_eq!(ClaimedUser::from_vars(Some(OsStr::new("")), None), None);
        assert_eq!(
            ClaimedUser::from_vars(Some(OsStr::new("mallory")), Some(OsStr::new("1001"))),
            Some(ClaimedUser {
                name: Some("mallory".to_owned()),
                uid: Some(1001),
                source: "sudo-env",
            })
        );
        let long = "m".repeat(10_000);
        let claim = ClaimedUser::from_vars(Some(OsStr::new(&long)), Some(OsStr::new("x"))).unwrap();
        assert_eq!(claim.name.map(|n| n.len()), Some(MAX_CLAIM));
        assert_eq!(claim.uid, None, "a non-numeric SUDO_UID is dropped");
    }
}
