//! The keyring's admin lock: one changing admin command at a time, an
//! `flock` on `<keyring>.lock` beside the keyring (or the token's state
//! anchor), never followed through a planted link. Taking it also removes
//! the temp files writers that died left behind.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::file::{Ownership, no_follow, sibling};
use crate::keyring::store::StoreError;

/// An exclusive lock on a keyring, held by one admin command at a time.
///
/// It is an `flock` on `<keyring>.lock` beside the keyring (never on the
/// keyring itself, which is replaced by rename). Released on drop, and by
/// the kernel if the process dies.
#[derive(Debug)]
pub struct KeyringLock {
    _file: File,
}

/// The lock file of the keyring at `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    sibling(path, ".lock")
}

/// Takes the keyring's lock, waiting up to `wait` for another admin command
/// to finish, then removes temp files left by writers that died (under the
/// lock, no other writer can be running; they may hold key material).
///
/// # Errors
/// [`StoreError::Locked`] when the wait expires; I/O errors.
pub fn acquire(path: &Path, wait: std::time::Duration) -> Result<KeyringLock, StoreError> {
    use rustix::fs::{FlockOperation, flock};
    let lock = lock_path(path);
    let io = |op| {
        let path = lock.clone();
        move |source: io::Error| StoreError::Io { path, op, source }
    };
    // The directory may belong to the serving user while root runs this:
    // never follow a link planted as the lock (root would create or open
    // its target, then hand it to the keyring's owner), and hand over only
    // a regular file with no other name.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(&lock)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound {
                path: path.to_owned(),
            },
            _ if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                StoreError::Planted(crate::file::Planted {
                    path: lock.clone(),
                    what: "a symlink",
                })
            }
            _ => io("open the lock file")(e),
        })?;
    let meta = file.metadata().map_err(io("stat the lock file"))?;
    if !meta.is_file() {
        return Err(StoreError::Planted(crate::file::Planted {
            path: lock,
            what: "not a regular file",
        }));
    }
    if std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
        return Err(StoreError::Planted(crate::file::Planted {
            path: lock,
            what: "a hard link to another file",
        }));
    }
    give_owner_of(&file, path);
    let deadline = std::time::Instant::now() + wait;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StoreError::Locked {
                    path: path.to_owned(),
                });
            }
            Err(e) => return Err(io("lock")(e.into())),
        }
    }
    remove_stale_temps(path);
    // A symlinked keyring is written beside its target (see `replace`).
    if let Ok(target) = fs::canonicalize(path)
        && target != path
    {
        remove_stale_temps(&target);
    }
    Ok(KeyringLock { _file: file })
}

fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Best effort: a lock file this process just created gets the keyring's
/// owner, so the serving user's own admin commands can still open it.
fn give_owner_of(file: &File, keyring: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(meta), Some(owner)) = (file.metadata(), Ownership::like(keyring))
        && (meta.uid(), meta.gid()) != (owner.uid, owner.gid)
        && meta.uid() == rustix::process::geteuid().as_raw()
    {
        let _ = std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid));
    }
}
