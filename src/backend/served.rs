//! The served-keyring record: which keyring a node served, and the highest
//! version it saw, kept beside the keyring (`<keyring>.served`) or, for a
//! PKCS#11 keyring, beside its state anchor in `state_dir`.
//!
//! A reload is guarded by the successor rule (same keyring, nothing lost);
//! a restart had no memory and trusted any valid keyring. With the record,
//! `kekd serve` refuses a keyring with another id, or one whose highest
//! version is lower than the highest this node served (a rollback to an old
//! copy), until an operator accepts it on purpose with
//! `kekd admin accept-keyring`. A node without a record (a new node, a new
//! keyring) just starts and writes one.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

use crate::backend::{Backend, BackendError};
use crate::id::{KeyVersion, KeyringId};
use crate::keyring::store::{self, StoreError};
use crate::keyring::{Keyring, KeyringError};

/// First line of a record.
const MAGIC: &str = "kekd-served v1";

/// Largest record kekd reads (a record is three short lines).
const MAX_LEN: u64 = 4096;

/// What a node served: the keyring's id and its highest version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The keyring's id.
    pub keyring_id: KeyringId,
    /// The highest version number it held.
    pub highest: KeyVersion,
}

impl Served {
    /// What `keyring` is: its id and highest version.
    pub fn of(keyring: &Keyring) -> Self {
        Self {
            keyring_id: *keyring.id(),
            highest: keyring
                .versions()
                .map(|v| v.version)
                .max()
                .unwrap_or(KeyVersion::FIRST),
        }
    }

    /// What a stored keyring file is.
    pub fn of_file(file: &store::KeyringFile) -> Self {
        Self {
            keyring_id: file.id,
            highest: file
                .versions
                .iter()
                .map(|v| v.info.version)
                .max()
                .unwrap_or(KeyVersion::FIRST),
        }
    }

    fn encode(self) -> String {
        format!(
            "{MAGIC}\nkeyring_id {}\nhighest_version {}\n",
            self.keyring_id,
            self.highest.get()
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let keyring_id = lines.next()?.strip_prefix("keyring_id ")?.parse().ok()?;
        let highest = KeyVersion::new(
            lines
                .next()?
                .strip_prefix("highest_version ")?
                .parse()
                .ok()?,
        )?;
        lines.next().is_none().then_some(Self {
            keyring_id,
            highest,
        })
    }
}

/// The record of the keyring (or state anchor) at `anchor`.
pub fn record_path(anchor: &Path) -> PathBuf {
    crate::file::sibling(anchor, ".served")
}

/// Why a keyring may not be served, or the record not be read.
#[derive(Debug, thiserror::Error)]
pub enum ServedError {
    /// The keyring is not the one this node served, or is older.
    #[error(transparent)]
    Mismatch(Box<Mismatch>),
    /// The record exists but cannot be read or is not a record.
    #[error(
        "{record}: {reason}; it should hold the keyring this node served. Check how it changed; to trust the \
         keyring as it is now, run `kekd admin accept-keyring {target}`"
    )]
    Unreadable {
        /// The record.
        record: PathBuf,
        /// What is wrong.
        reason: String,
        /// The flags naming the keyring to `accept-keyring`.
        target: String,
    },
}

/// A keyring that is not the one this node served, or is older.
#[derive(Debug, thiserror::Error)]
#[error(
    "{record} says this node served keyring {remembered_id} up to version {remembered_highest}, but {found_what} \
     is keyring {found_id} with versions up to {found_highest} ({why}); refusing to serve it. If this is \
     on purpose (a restored older backup, a new keyring), accept it with \
     `kekd admin accept-keyring {target}`, then start kekd again"
)]
pub struct Mismatch {
    /// The record.
    pub record: PathBuf,
    /// What the record remembers.
    pub remembered_id: KeyringId,
    /// The highest version remembered.
    pub remembered_highest: KeyVersion,
    /// The keyring found.
    pub found_what: String,
    /// Its id.
    pub found_id: KeyringId,
    /// Its highest version.
    pub found_highest: KeyVersion,
    /// `another keyring` or `a rollback`.
    pub why: &'static str,
    /// The flags naming the keyring to `accept-keyring`.
    pub target: String,
}

/// Reads the record beside `anchor`; `None` when there is none.
///
/// # Errors
/// [`ServedError::Unreadable`] for a record that exists but cannot be read.
pub fn read(anchor: &Path, target: &str) -> Result<Option<Served>, ServedError> {
    let path = record_path(anchor);
    let unreadable = |reason: String| ServedError::Unreadable {
        record: path.clone(),
        reason,
        target: target.to_owned(),
    };
    let mut text = String::new();
    // kekd writes the record by rename, never as a link: a link, FIFO or
    // directory there was planted, and is refused without blocking.
    match crate::file::open_regular(&path, crate::file::Links::Refuse) {
        Ok((f, _)) => f
            .take(MAX_LEN)
            .read_to_string(&mut text)
            .map_err(|e| unreadable(format!("cannot read it: {e}")))?,
        Err(crate::file::OpenError::NotFound { .. }) => return Ok(None),
        Err(crate::file::OpenError::Io { source, .. }) => {
            return Err(unreadable(format!("cannot open it: {source}")));
        }
        Err(crate::file::OpenError::Symlink { .. }) => {
            return Err(unreadable(
                "it is a symlink, which kekd never makes there (remove it)".to_owned(),
            ));
        }
        Err(crate::file::OpenError::NotRegular { what, .. }) => {
            return Err(unreadable(format!(
                "it is {what}, not a regular file, which kekd never makes there (remove it)"
            )));
        }
    };
    Served::parse(&text)
        .map(Some)
        .ok_or_else(|| unreadable("not a served-keyring record".to_owned()))
}

/// Writes the record beside `anchor` (atomic, durable, owned like `anchor`).
///
/// # Errors
/// When the write fails.
pub fn write(anchor: &Path, served: Served) -> Result<(), StoreError> {
    crate::file::write_state_file(&record_path(anchor), anchor, served.encode().as_bytes())
        .map_err(StoreError::from)
}

/// Whether `found` may be served where `remembered` was: the same keyring,
/// holding at least the versions remembered.
///
/// # Errors
/// [`ServedError::Mismatch`] naming both.
pub fn check(
    anchor: &Path,
    remembered: Option<Served>,
    found: Served,
    found_what: &str,
    target: &str,
) -> Result<(), ServedError> {
    let Some(remembered) = remembered else {
        return Ok(());
    };
    let why = if remembered.keyring_id != found.keyring_id {
        "another keyring"
    } else if found.highest < remembered.highest {
        "an older copy: versions are missing"
    } else {
        return Ok(());
    };
    Err(ServedError::Mismatch(Box::new(Mismatch {
        record: record_path(anchor),
        remembered_id: remembered.keyring_id,
        remembered_highest: remembered.highest,
        found_what: found_what.to_owned(),
        found_id: found.keyring_id,
        found_highest: found.highest,
        why,
        target: target.to_owned(),
    })))
}

/// Records that the keyring `now` is served, if it holds a version higher than the
/// record (or there is none). A failed write is logged, not fatal: the
/// record is a second line of defence and must not stop a serving node.
pub fn note_served(anchor: &Path, now: Served) {
    match read(anchor, "") {
        Ok(Some(old)) if old.keyring_id == now.keyring_id && old.highest >= now.highest => {}
        // A record that does not match is never overwritten here: only
        // `accept-keyring` (or a start that checked it) replaces it.
        Ok(Some(old)) if old.keyring_id != now.keyring_id => {}
        Err(_) => {}
        _ => {
            if let Err(e) = write(anchor, now) {
                warn!(
                    error = %e,
                    record = %record_path(anchor).display(),
                    "cannot record the served keyring; a restart will not notice a rolled-back keyring"
                );
            }
        }
    }
}

/// A backend whose first load (kekd's start) is checked against the
/// served-keyring record and then recorded; later loads are reloads, which
/// the successor rule guards (and [`note_served`] records once applied).
#[derive(Debug)]
pub struct Guarded {
    inner: Arc<dyn Backend>,
    target: String,
    started: AtomicBool,
}

impl Guarded {
    /// Wraps `inner`; `target` is how `kekd admin accept-keyring` names this
    /// keyring (e.g. `--keyring /etc/kekd/keyring`).
    pub fn new(inner: Arc<dyn Backend>, target: String) -> Self {
        Self {
            inner,
            target,
            started: AtomicBool::new(false),
        }
    }
}

impl Backend for Guarded {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn attach_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        self.inner.attach_metrics(metrics);
    }

    fn load(&self) -> Result<Keyring, BackendError> {
        let keyring = self.inner.load()?;
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(keyring);
        }
        let Some(anchor) = self.inner.state_anchor() else {
            return Ok(keyring);
        };
        let refuse = |e: ServedError| {
            // Until a start passes this check, every load is a start.
            self.started.store(false, Ordering::Release);
            KeyringError::Invalid(e.to_string()).loading(self.inner.describe())
        };
        let remembered = read(&anchor, &self.target).map_err(refuse)?;
        check(
            &anchor,
            remembered,
            Served::of(&keyring),
            "the keyring",
            &self.target,
        )
        .map_err(refuse)?;
        note_served(&anchor, Served::of(&keyring));
        Ok(keyring)
    }

    fn revision(&self) -> Option<String> {
        self.inner.revision()
    }

    fn watch_paths(&self) -> Vec<PathBuf> {
        self.inner.watch_paths()
    }

    fn state_anchor(&self) -> Option<PathBuf> {
        self.inner.state_anchor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_garbage_is_not_one() {
        let served = Served {
            keyring_id: "00112233445566778899aabbccddeeff".parse().unwrap(),
            highest: KeyVersion::new(7).unwrap(),
        };
        assert_eq!(
            served.encode(),
            "kekd-served v1\nkeyring_id 00112233445566778899aabbccddeeff\nhighest_version 7\n"
        );
        assert_eq!(Served::parse(&served.encode()), Some(served));
        for bad in [
            "",
            "kekd-served v2\nkeyring_id 00112233445566778899aabbccddeeff\nhighest_version 7\n",
            "kekd-served v1\nkeyring_id 00\nhighest_version 7\n",
            "kekd-served v1\nkeyring_id 00112233445566778899aabbccddeeff\nhighest_version 0\n",
            "kekd-served v1\nkeyring_id 00112233445566778899aabbccddeeff\nhighest_version 7\nmore\n",
        ] {
            assert_eq!(Served::parse(bad), None, "{bad:?}");
        }
    }
}
