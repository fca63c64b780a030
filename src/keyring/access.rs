//! Who can change the keyring, checked like OpenSSH's `StrictModes`.
//!
//! A keyring's permission bits are not enough: a private (0600) keyring
//! owned by another user, or in a directory another user can write, is a
//! keyring that user can replace with keys of their choosing. Before
//! serving, and in `kekd admin doctor`, the path (with symlinks resolved, as
//! Kubernetes mounts Secrets through them) must pass:
//!
//! - every symlink on the way is in a directory that passes the directory
//!   checks below (each link is resolved in turn, as the kernel does, so a
//!   link in the middle of a chain counts as much as the first);
//! - the keyring file is owned by the uid kekd runs as, or by root;
//! - its directory is owned by that uid or root and is not group- or
//!   world-writable (not even with the sticky bit: others could plant
//!   `<keyring>.lock` or `.served` beside it);
//! - every further ancestor is owned by that uid or root and is not group-
//!   or world-writable, except that a root-owned sticky directory (`/tmp`)
//!   is accepted, because there others can neither rename nor remove what
//!   they do not own.
//!
//! The file's own permission bits (no group or other access) are checked by
//! [`crate::keyring::store::read`] whenever the keyring is read.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The keyring is exposed to another user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path} {what}, so another user could replace the keyring with keys of their own; refusing to serve it: run `{fix}`"
)]
pub struct AccessError {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub what: String,
    /// The command that fixes it.
    pub fix: String,
}

/// Checks that only `uid` (the serving uid) and root can change the keyring
/// at `keyring`. A path that does not resolve to a file passes: reading it
/// reports that more precisely.
///
/// # Errors
/// The first problem, with the `chown`/`chmod` command that fixes it.
pub fn check(keyring: &Path, uid: u32) -> Result<(), AccessError> {
    let Ok((file, link_dirs)) = resolve(keyring) else {
        return Ok(());
    };
    let Ok(meta) = fs::metadata(&file) else {
        return Ok(());
    };
    if !meta.is_file() {
        return Ok(());
    }
    check_owner(&file, &meta, uid, "keyring")?;
    // The directory the keyring is named in holds the link (when it is one)
    // and kekd's files beside it (`.lock`, `.served`, the audit log), and
    // every further link on the way lives in a directory too: whoever can
    // write any of them can repoint a link or plant those files.
    let real_dir = file.parent().map(Path::to_owned);
    if let Some(dir) = &real_dir {
        check_dirs(dir, uid, "holds the keyring", "the keyring")?;
    }
    // The first of them is the directory the keyring is named in.
    let mut checked = vec![real_dir];
    for dir in link_dirs {
        if checked.contains(&Some(dir.clone())) {
            continue;
        }
        check_dirs(&dir, uid, "holds the link to the keyring", "the keyring")?;
        checked.push(Some(dir));
    }
    Ok(())
}

/// The most symlinks followed in one resolution, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// Resolves `path` one component at a time, as the kernel does: the final
/// file (no symlink in it), and the real directory of every symlink met on
/// the way (each link's own directory: whoever writes it can repoint the
/// link). A relative link is resolved against the directory holding it.
fn resolve(path: &Path) -> std::io::Result<(PathBuf, Vec<PathBuf>)> {
    use std::path::Component;
    let mut resolved = if path.is_absolute() {
        PathBuf::from("/")
    } else {
        fs::canonicalize(".")?
    };
    // Components still to walk, the next one last.
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let mut link_dirs = Vec::new();
    while let Some(part) = todo.pop() {
        match Path::new(&part).components().next() {
            Some(Component::RootDir) => resolved = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            Some(Component::Normal(name)) => {
                let next = resolved.join(name);
                if !fs::symlink_metadata(&next)?.file_type().is_symlink() {
                    resolved = next;
                    continue;
                }
                if link_dirs.len() == MAX_LINKS {
                    return Err(std::io::Error::from_raw_os_error(
                        rustix::io::Errno::LOOP.raw_os_error(),
                    ));
                }
                let target = fs::read_link(&next)?;
                link_dirs.push(resolved.clone());
                todo.extend(target.components().rev().map(|c| c.as_os_str().to_owned()));
            }
            // `.` and prefixes (none on Unix).
            _ => {}
        }
    }
    Ok((resolved, link_dirs))
}

/// Checks that only `uid` and root can change the directory `dir` (a
/// PKCS#11 `state_dir`, which holds the served record, lock and audit log)
/// and its ancestors, by the rules of [`check`] — the directory of every
/// symlink on the way included: whoever can write one could repoint the
/// link after this check. A missing directory passes.
///
/// # Errors
/// The first problem, with the `chown`/`chmod` command that fixes it.
pub fn check_dir(dir: &Path, uid: u32) -> Result<(), AccessError> {
    let Ok((dir, link_dirs)) = resolve(dir) else {
        return Ok(());
    };
    check_dirs(&dir, uid, "holds kekd's state", "kekd's state")?;
    let mut checked = vec![dir];
    for link_dir in link_dirs {
        if checked.contains(&link_dir) {
            continue;
        }
        check_dirs(
            &link_dir,
            uid,
            "holds the link to kekd's state",
            "kekd's state",
        )?;
        checked.push(link_dir);
    }
    Ok(())
}

/// `dir` (which `holds` something) and its ancestors (on the way to `what`).
fn check_dirs(dir: &Path, uid: u32, holds: &str, what: &str) -> Result<(), AccessError> {
    for (depth, dir) in dir.ancestors().enumerate() {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        check_owner(dir, &meta, uid, "directory")?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 == 0 {
            continue;
        }
        let sticky_root = mode & 0o1000 != 0 && meta.uid() == 0;
        if depth > 0 && sticky_root {
            continue;
        }
        return Err(AccessError {
            path: dir.to_owned(),
            what: format!(
                "is a directory {} can write (mode {mode:04o}){}",
                if mode & 0o002 != 0 {
                    "every user"
                } else {
                    "its group"
                },
                if depth == 0 {
                    format!(" and {holds}")
                } else {
                    format!(" on the way to {what}")
                }
            ),
            fix: format!("chmod go-w {}", dir.display()),
        });
    }
    Ok(())
}

fn check_owner(path: &Path, meta: &fs::Metadata, uid: u32, what: &str) -> Result<(), AccessError> {
    if meta.uid() == uid || meta.uid() == 0 {
        return Ok(());
    }
    Err(AccessError {
        path: path.to_owned(),
        what: format!(
            "({what}) is owned by uid {}, not by uid {uid} that kekd runs as nor by root",
            meta.uid()
        ),
        fix: format!("chown {uid} {}", path.display()),
    })
}
