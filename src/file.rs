//! How kekd reads and writes its own files, in one place: every read opens
//! a regular file only ([`open_regular`]), and every write is atomic and
//! durable ([`write_file_atomic`], [`write_state_file`], [`write_file_new`]):
//! a fresh `0600` temp file in the same directory, fsynced, renamed over
//! (or, for a new file, linked without clobbering) the target, and the
//! directory fsynced, so a crash leaves the old file or the new one.
//!
//! A leaf: it knows paths and bytes, not what they hold. The keyring's own
//! writes ([`crate::keyring::store`]) add their guards on top.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::secret::RandomError;

/// A file kekd keeps beside the keyring (a lock, the audit log, a state
/// file) is something kekd never makes there (a symlink, a FIFO, a second
/// name of another file): planted by whoever can write the directory.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} is {what}, which kekd never makes there: someone who can write its directory may have planted it \
     to turn this command against another file; nothing was changed: remove it, and check who can write \
     that directory (`kekd admin doctor`)"
)]
pub struct Planted {
    /// The file.
    pub path: PathBuf,
    /// What it is.
    pub what: &'static str,
}

/// A durable write failed. Messages name the file and the fix, never the
/// content.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The file exists and must not be replaced.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists {
        /// The path.
        path: PathBuf,
    },
    /// The OS refused an operation.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The new file is in place, but its directory could not be fsynced: the
    /// change is visible now and may be lost in a power failure.
    #[error(
        "{path} was replaced, but its directory could not be fsynced ({source}): the change is in effect now but \
         may not survive a power failure; run `sync`, then check the file (`kekd admin list`)"
    )]
    NotDurable {
        /// The file written.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file named led elsewhere when the change was written than when
    /// it was read.
    #[error(
        "keyring {path} now leads to {target}, which is not the keyring read under the lock ({why}); nothing \
         was written: check who can change {path} and the directories on its way"
    )]
    Moved {
        /// The file as named.
        path: PathBuf,
        /// Where it leads now.
        target: PathBuf,
        /// What is there instead.
        why: String,
    },
    /// The OS RNG failed while naming the temp file.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The file to replace belongs to an owner this process cannot give the
    /// replacement: writing it anyway would lock that owner (often the
    /// serving kekd) out. Nothing was written.
    #[error(
        "{path} belongs to uid {uid} gid {gid}{name}, and this process (uid {caller}) cannot give its \
         replacement that owner and group, so kekd running as that user could no longer read it; nothing was \
         changed: run the command as root, or as that user ({fix})"
    )]
    WrongOwner {
        /// The file that was to be replaced.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
        /// `" (name)"` when the owner has a name in /etc/passwd, else empty.
        name: String,
        /// The uid this process runs as.
        caller: u32,
        /// The command prefix that runs as the owner.
        fix: String,
    },
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(std::ffi::OsStr::to_owned)
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Atomically and durably replaces `path` with `bytes`, the same way the
/// keyring is written: the new file keeps the owner, group and mode of the
/// one it replaces. For kekd's small state files.
///
/// # Errors
/// [`WriteError::WrongOwner`] (nothing written) when this process cannot
/// give the new file the old one's owner; I/O errors, the previous file
/// then untouched.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_durable(path, bytes, Replace::Always, None, Guard::None)
}

/// [`write_file_atomic`] for a state file kept beside `anchor` (the keyring,
/// or a token's state anchor): when the state file does not exist yet, it is
/// created with the owner and group of `anchor` (or, when `anchor` is no
/// file, of its directory), so a root admin command never leaves a file the
/// serving kekd cannot replace.
///
/// # Errors
/// As [`write_file_atomic`].
pub fn write_state_file(path: &Path, anchor: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_durable(path, bytes, Replace::Always, Some(anchor), Guard::None)
}

/// Durably writes `bytes` as a new file at `path` (mode 0600), the same way
/// a new keyring is written: never replacing anything already there, even
/// something created meanwhile. For kekd's backups.
///
/// # Errors
/// [`WriteError::AlreadyExists`] when `path` exists; I/O errors otherwise,
/// in which case nothing is left at `path`.
pub fn write_file_new(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_durable(path, bytes, Replace::Never, None, Guard::None)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replace {
    /// Never replace anything (a new keyring, a backup).
    Never,
    /// Replace what is there, atomically.
    Always,
}

/// Who a written file must belong to, and its permission bits.
#[derive(Clone, Copy)]
pub(crate) struct Ownership {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    mode: u32,
}

impl Ownership {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            uid: meta.uid(),
            gid: meta.gid(),
            // Never more open than owner-only: a replacement keeps the
            // owner's bits (0400, 0600), not a mistake in group or other.
            mode: if meta.is_file() {
                meta.mode() & 0o700
            } else {
                0o600
            },
        })
    }

    /// The ownership of `like`, or of its directory when it is no file
    /// (a token's state anchor is only a name prefix in `state_dir`).
    pub(crate) fn like(like: &Path) -> Option<Self> {
        let from = match fs::metadata(like) {
            Ok(m) if m.is_file() => Self::of(like),
            _ => Self::of(like.parent().filter(|d| !d.as_os_str().is_empty())?),
        }?;
        Some(Self {
            mode: 0o600,
            ..from
        })
    }

    fn refusal(self, path: &Path) -> WriteError {
        let name = user_name(self.uid).map_or_else(String::new, |n| format!(" ({n})"));
        WriteError::WrongOwner {
            path: path.to_owned(),
            uid: self.uid,
            gid: self.gid,
            name,
            caller: rustix::process::geteuid().as_raw(),
            fix: format!(
                "`sudo -u '#{uid}' -g '#{gid}' kekd admin …` or \
                 `setpriv --reuid={uid} --regid={gid} --clear-groups kekd admin …`",
                uid = self.uid,
                gid = self.gid
            ),
        }
    }
}

/// The login name of `uid` in /etc/passwd, for messages only.
fn user_name(uid: u32) -> Option<String> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

/// Whether [`open_regular`] follows a symlink at the path itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow it: a path an operator names (the keyring, a PIN, config or
    /// backup file), which Kubernetes mounts through links.
    Follow,
    /// Refuse it: a file kekd keeps beside the keyring or in its
    /// `state_dir` (`.served`, `.usage.json`), where it never makes a link.
    Refuse,
}

/// A file kekd reads could not be opened as one.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing at the path (or a symlink to nothing).
    #[error("{path} does not exist")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// A symlink where kekd never makes one.
    #[error(
        "{path} is a symlink, which kekd never makes there; nothing was read through it: remove it (whoever \
         can write its directory may have planted it)"
    )]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a regular file: a FIFO would block the read
    /// forever, a device never ends, a directory cannot be read.
    #[error(
        "{path} is {what}, not a regular file; nothing was read from it: put the file itself there (a pipe's \
         output must be saved to a file first)"
    )]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// `a FIFO`, `a directory`, `a character device`, …
        what: &'static str,
    },
    /// The OS refused the open.
    #[error("cannot open {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Opens `path` for reading as a regular file, with its metadata: the one
/// way kekd opens a file it did not just create itself.
///
/// The open never blocks (`O_NONBLOCK`, cleared once the file is known to
/// be regular: a FIFO would otherwise wait forever for a writer), never
/// takes a controlling terminal (`O_NOCTTY`), is not inherited
/// (`O_CLOEXEC`, as every std open), follows a final symlink only with
/// [`Links::Follow`], and anything the opened descriptor shows is not a
/// regular file is refused before a byte is read.
///
/// # Errors
/// [`OpenError`], naming the path and the fix.
pub fn open_regular(path: &Path, links: Links) -> Result<(File, fs::Metadata), OpenError> {
    use rustix::fs::OFlags;
    let mut flags = OFlags::NONBLOCK | OFlags::NOCTTY;
    if links == Links::Refuse {
        flags |= OFlags::NOFOLLOW;
    }
    let io = |source: io::Error| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        // The flag bits are small positive constants; the cast cannot wrap.
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(
            |e| match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
                _ if e.kind() == io::ErrorKind::NotFound => OpenError::NotFound {
                    path: path.to_owned(),
                },
                Some(rustix::io::Errno::LOOP) if links == Links::Refuse => OpenError::Symlink {
                    path: path.to_owned(),
                },
                // open(2) of a Unix socket.
                Some(rustix::io::Errno::NXIO) => OpenError::NotRegular {
                    path: path.to_owned(),
                    what: "a socket",
                },
                _ => io(e),
            },
        )?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_owned(),
            what: kind_of(meta.file_type()),
        });
    }
    let status = rustix::fs::fcntl_getfl(&file).map_err(|e| io(e.into()))?;
    rustix::fs::fcntl_setfl(&file, status - OFlags::NONBLOCK).map_err(|e| io(e.into()))?;
    Ok((file, meta))
}

/// What a file that is not a regular one is, for messages: `a FIFO`, …
pub(crate) fn kind_of(kind: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() {
        "a regular file"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symlink"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// `O_NOFOLLOW | O_NONBLOCK` for `custom_flags`: a symlink is refused
/// (`ELOOP`) instead of followed, and a FIFO neither blocks the open.
pub(crate) fn no_follow() -> i32 {
    use rustix::fs::OFlags;
    // The flag bits are small positive constants; the cast cannot wrap.
    (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32
}

/// What `write_durable` checks of the file it replaces, just before the
/// rename.
pub(crate) enum Guard<'a> {
    /// Nothing (kekd's state files, a new file).
    None,
    /// The file found when the write began is still the one at the path
    /// (the keyring, named directly).
    Same,
    /// The keyring as read through a symlink: written in `dir` (the
    /// target's directory, opened before the read), over the file read
    /// there (`identity`: device and inode) and nothing else.
    Read {
        dir: OwnedFd,
        identity: (u64, u64),
        named: &'a Path,
    },
}

/// Opens the directory `dir` to work in. With [`Links::Refuse`] (`dir`
/// fully resolved), one component at a time, never following a symlink:
/// a directory on the way swapped for a link fails (`ELOOP`, `ENOTDIR`).
pub(crate) fn open_dir(dir: &Path, links: Links) -> io::Result<OwnedFd> {
    use rustix::fs::{CWD, Mode, OFlags};
    let read = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if links == Links::Follow {
        return Ok(rustix::fs::open(dir, read, Mode::empty())?);
    }
    let walk = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::openat(
        CWD,
        if dir.is_absolute() { "/" } else { "." },
        walk,
        Mode::empty(),
    )?;
    for part in dir.components() {
        if let std::path::Component::Normal(name) = part {
            fd = rustix::fs::openat(&fd, name, walk, Mode::empty())?;
        }
    }
    Ok(rustix::fs::openat(&fd, ".", read, Mode::empty())?)
}

/// Device and inode of what is at `name` in `dir` (not following a link).
fn identity_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> Option<(u64, u64)> {
    rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .ok()
        // The field widths differ between architectures.
        .map(
            #[allow(clippy::unnecessary_cast)]
            |st| (st.st_dev as u64, st.st_ino as u64),
        )
}

#[cfg(test)]
thread_local! {
    /// Runs once, in the next `write_durable` of this thread, after the
    /// temp file is written and before the identity check and the rename:
    /// where a racing attacker would act.
    pub(crate) static BEFORE_RENAME: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

/// temp file (`create_new`, 0600) → owner and mode of the file it replaces
/// (or of `like` for a new one) → write → fsync → rename/link → fsync dir,
/// every step in the one directory opened at the start (by its path, or
/// the one `guard` brings), whatever becomes of its path meanwhile.
pub(crate) fn write_durable(
    path: &Path,
    bytes: &[u8],
    replace: Replace,
    like: Option<&Path>,
    guard: Guard<'_>,
) -> Result<(), WriteError> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let io = |op| {
        move |source: io::Error| WriteError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io("name the file")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    let (dir_fd, expect, named) = match guard {
        Guard::Read {
            dir,
            identity,
            named,
        } => (dir, Some(identity), named),
        Guard::None | Guard::Same => {
            let fd = open_dir(&dir, Links::Follow).map_err(io("open its directory"))?;
            let expect = match guard {
                Guard::Same => identity_at(&fd, name),
                _ => None,
            };
            (fd, expect, path)
        }
    };
    let mut suffix = [0u8; 6];
    crate::secret::fill_random(&mut suffix)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let tmp_name = tmp_name.as_os_str();
    let owner = match replace {
        // Only a regular file's owner is kept: a link or FIFO planted as a
        // state file must not hand the new file to whoever planted it.
        Replace::Always => rustix::fs::statat(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .filter(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            })
            .map(|st| {
                (
                    Ownership {
                        uid: st.st_uid,
                        gid: st.st_gid,
                        // Never more open than owner-only: a replacement
                        // keeps the owner's bits (0400, 0600), not a
                        // mistake in group or other.
                        mode: st.st_mode & 0o700,
                    },
                    true,
                )
            })
            .or_else(|| like.and_then(Ownership::like).map(|o| (o, false))),
        Replace::Never => None,
    };

    let result = (|| {
        let mut f = File::from(
            rustix::fs::openat(
                &dir_fd,
                tmp_name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| io("create a temporary file beside it")(e.into()))?,
        );
        // Before a byte is written: a replacement the serving user could
        // not read would take its keyring away at the next reload.
        match owner {
            Some((owner, true)) => {
                std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid)).map_err(
                    |e| match e.raw_os_error() {
                        Some(code) if code == rustix::io::Errno::PERM.raw_os_error() => {
                            owner.refusal(path)
                        }
                        _ => io("give the temporary file the owner of the file it replaces")(e),
                    },
                )?;
                f.set_permissions(fs::Permissions::from_mode(owner.mode))
                    .map_err(io("set the temporary file's mode"))?;
            }
            // A new state file: best effort (a non-root process keeps its own).
            Some((owner, false)) => {
                let _ = std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid));
            }
            None => {}
        }
        f.write_all(bytes).map_err(io("write the temporary file"))?;
        f.sync_all().map_err(io("fsync the temporary file"))?;
        drop(f);
        #[cfg(test)]
        if let Some(hook) = BEFORE_RENAME.with(|h| h.borrow_mut().take()) {
            hook();
        }
        if let Some(expect) = expect {
            let now = identity_at(&dir_fd, name);
            if now != Some(expect) {
                return Err(WriteError::Moved {
                    path: named.to_owned(),
                    target: path.to_owned(),
                    why: "another file was put in its place while the change was written"
                        .to_owned(),
                });
            }
        }
        match replace {
            Replace::Always => rustix::fs::renameat(&dir_fd, tmp_name, &dir_fd, name)
                .map_err(|e| io("rename the temporary file into place")(e.into()))?,
            Replace::Never => {
                // A hard link fails with EEXIST instead of clobbering a file
                // that appeared since the check above.
                rustix::fs::linkat(&dir_fd, tmp_name, &dir_fd, name, AtFlags::empty()).map_err(
                    |e| match e {
                        rustix::io::Errno::EXIST => WriteError::AlreadyExists {
                            path: path.to_owned(),
                        },
                        e => io("link the temporary file into place")(e.into()),
                    },
                )?;
                // The file is in place: failing to drop the temp name is not
                // a failed write. A keyring's leftover temp (a second name
                // of the same file) goes with the next command that takes
                // the lock (`remove_stale_temps`).
                let _ = rustix::fs::unlinkat(&dir_fd, tmp_name, AtFlags::empty());
            }
        }
        // Past this point the new file is visible: a failure says so.
        rustix::fs::fsync(&dir_fd).map_err(|e| WriteError::NotDurable {
            path: path.to_owned(),
            source: e.into(),
        })
    })();
    if result.is_err() {
        // Best effort: the temp file holds key material.
        let _ = rustix::fs::unlinkat(&dir_fd, tmp_name, AtFlags::empty());
    }
    result
}
