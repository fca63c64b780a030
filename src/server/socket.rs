//! The socket file: its directory created and checked, a stale socket
//! removed only when nothing listens on it, bound under a umask, and
//! removed at exit only if it is still the one this process created.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::config::SocketConfig;

use super::ServerError;

/// Longest socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The listening socket file this process created.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    pub(super) path: PathBuf,
    /// (device, inode) of the socket file, so we remove only our own.
    identity: (u64, u64),
}

impl BoundSocket {
    /// Creates the socket at `config.path`.
    ///
    /// The parent directory is created `0750` if missing. An existing path is
    /// removed only if it is a socket nobody accepts on. The mode is applied
    /// through the umask at bind; with a group, the socket is created owner-only,
    /// handed to the group, and only then widened to the mode, so it is never
    /// reachable by anyone the configuration did not name.
    ///
    /// # Errors
    /// See [`SocketError`].
    pub fn bind(config: &SocketConfig) -> Result<Self, SocketError> {
        let path = &config.path;
        let io = |op: &'static str| {
            move |source: io::Error| SocketError::Io {
                path: path.clone(),
                op,
                source,
            }
        };
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SocketError::PathTooLong {
                path: path.clone(),
                len: path.as_os_str().len(),
            });
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if parent.exists() {
                check_directory(parent)?;
            } else {
                create_dirs(parent).map_err(io("create its directory"))?;
            }
        }
        clear_stale(path)?;

        let bind_mode = if config.group.is_some() {
            0o600
        } else {
            config.mode
        };
        let listener = {
            // The umask is process-wide: one bind at a time sets and restores it.
            static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _guard = UMASK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(!bind_mode & 0o777));
            let bound = std::os::unix::net::UnixListener::bind(path);
            rustix::process::umask(old);
            bound.map_err(io("bind"))?
        };
        let mut socket = Self {
            listener: None,
            path: path.clone(),
            identity: (0, 0),
        };
        let meta = std::fs::symlink_metadata(path).map_err(io("stat"))?;
        socket.identity = (meta.dev(), meta.ino());
        socket.listener = Some(listener);
        if let Some(gid) = config.group {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| io("change its group")(e.into()))?;
            rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(config.mode))
                .map_err(|e| io("set its mode")(e.into()))?;
        }
        Ok(socket)
    }

    pub(super) fn take_listener(&self) -> Result<UnixListener, ServerError> {
        let std = self
            .listener
            .as_ref()
            .ok_or_else(|| ServerError::Task("socket already served".to_owned()))?
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(|e| ServerError::Transport(e.to_string()))?;
        UnixListener::from_std(std).map_err(|e| ServerError::Transport(e.to_string()))
    }

    /// Removes the socket file if it is still the one this process bound.
    pub fn remove(mut self) {
        self.remove_own();
    }

    fn remove_own(&mut self) {
        if self.listener.take().is_none() {
            return;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(socket = %self.path.display(), error = %e, "could not remove socket");
                }
            }
            _ => {
                warn!(socket = %self.path.display(), "socket was replaced by someone else; leaving it")
            }
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove_own();
    }
}

/// Creates `dir` and its missing ancestors with mode 0750 exactly — set
/// explicitly, since the umask may narrow a mode given at creation and a
/// group member must be able to reach a 0660 socket inside.
fn create_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o750).create(d) {
            Ok(()) => {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))?;
                // A typo in --socket serves somewhere new: say so.
                info!(directory = %d.display(), "created the socket's directory (0750); it did not exist");
            }
            // Created meanwhile by someone else: theirs to own.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Refuses a socket directory someone else could use to replace the socket
/// (as OpenSSH's StrictModes does for key files): it must be owned by kekd's
/// user or root, and not writable by group or others — unless it is sticky
/// (like `/tmp`), where others cannot remove or rename kekd's socket.
fn check_directory(dir: &Path) -> Result<(), SocketError> {
    let meta = std::fs::metadata(dir).map_err(|source| SocketError::Io {
        path: dir.to_owned(),
        op: "stat its directory",
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let unsafe_dir = |reason: String, fix: String| SocketError::UnsafeDirectory {
        path: dir.to_owned(),
        reason,
        fix,
    };
    if !meta.is_dir() {
        return Err(SocketError::Io {
            path: dir.to_owned(),
            op: "use its directory",
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_dir(
            format!(
                "owned by uid {}, not by kekd's user (uid {me}) or root",
                meta.uid()
            ),
            format!("chown {me} {}", dir.display()),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(
            format!("writable by its group or others (mode {mode:04o}) and not sticky"),
            format!("chmod go-w {}", dir.display()),
        ));
    }
    Ok(())
}

/// Makes `path` free for bind, or says why it cannot be.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                path: path.to_owned(),
                op: "stat",
                source,
            });
        }
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(SocketError::Symlink {
            path: path.to_owned(),
        });
    }
    if !kind.is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| SocketError::Io {
                path: path.to_owned(),
                op: "remove the stale socket",
                source,
            })?;
            info!(socket = %path.display(), "removed stale socket left by an earlier run");
            Ok(())
        }
        Err(source) => Err(SocketError::Io {
            path: path.to_owned(),
            op: "probe the existing socket",
            source,
        }),
    }
}

/// The socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A live process accepts on the socket.
    #[error(
        "socket {path} is in use by another process (is kekd already running?); stop it or choose another --socket"
    )]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The path is a symlink.
    #[error("socket path {path} is a symlink; refusing to follow or remove it")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a socket is in the way.
    #[error(
        "socket path {path} exists and is not a socket; refusing to remove it (choose another --socket)"
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket's existing directory lets someone else replace the socket.
    #[error(
        "socket directory {path} is {reason}: whoever can write it could replace kekd's socket; \
         fix it (`{fix}`) or choose another --socket"
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// The command that fixes it.
        fix: String,
    },
    /// Too long for `sun_path`.
    #[error("socket path {path} is {len} bytes; Unix sockets allow at most {MAX_SOCKET_PATH}")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The OS refused an operation.
    #[error("socket {path}: cannot {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}
