//! The socket's life: permissions, what is refused, stale and live sockets,
//! and removal on shutdown.

use crate::common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kekd::backend::local::LocalBackend;
use kekd::config::{ServeConfig, Settings, SocketConfig};
use kekd::server::{BoundSocket, MAX_SOCKET_PATH, Server, ServerError, SocketError};

use common::{TestServer, fs_lock, mode_of, tempdir};

fn socket_config(path: &Path, mode: u32, group: Option<u32>) -> SocketConfig {
    SocketConfig {
        path: path.to_owned(),
        mode,
        group,
    }
}

/// The socket settings `kekd serve` resolves when only paths are given.
fn default_socket_config(path: &Path) -> SocketConfig {
    ServeConfig::resolve(Settings {
        keyring: Some(PathBuf::from("/unused/keyring")),
        socket: Some(path.to_owned()),
        ..Settings::default()
    })
    .expect("valid settings")
    .socket
}

async fn bind(config: &SocketConfig) -> Result<BoundSocket, SocketError> {
    let _guard = fs_lock().await;
    BoundSocket::bind(config)
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[tokio::test]
async fn socket_is_owner_only_by_default() {
    let dir = tempdir().await;
    let path = dir.path().join("kms.sock");
    let config = default_socket_config(&path);
    assert_eq!((config.mode, config.group), (0o600, None));
    let socket = bind(&config).await.unwrap();
    assert!(is_socket(&path));
    assert_eq!(mode_of(&path), 0o600);
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.uid(), rustix::process::getuid().as_raw());
    assert_eq!(meta.gid(), rustix::process::getegid().as_raw());
    drop(socket);
}

/// A group the socket can be handed to that differs from the process's own
/// group when possible (root may use any gid; others a supplementary group),
/// so the test sees the chown happen.
fn other_group() -> u32 {
    let own = rustix::process::getegid().as_raw();
    if rustix::process::geteuid().is_root() {
        return if own == 4242 { 4243 } else { 4242 };
    }
    rustix::process::getgroups()
        .unwrap_or_default()
        .into_iter()
        .map(|g| g.as_raw())
        .find(|&g| g != own)
        .unwrap_or(own)
}

#[tokio::test]
async fn socket_with_a_group_is_0660_and_owned_by_that_group() {
    let dir = tempdir().await;
    let path = dir.path().join("kms.sock");
    let gid = other_group();
    let _socket = bind(&socket_config(&path, 0o660, Some(gid))).await.unwrap();
    assert_eq!(mode_of(&path), 0o660);
    assert_eq!(fs::metadata(&path).unwrap().gid(), gid);
}

#[tokio::test]
async fn server_socket_is_owner_only_and_answers() {
    let server = TestServer::start().await;
    assert_eq!(mode_of(&server.socket), 0o600);
    let status = server.client().await.status().await.unwrap();
    assert_eq!(status.healthz, "ok");
}

/// Binds with the process umask set to `mask` for the duration.
async fn bind_under_umask(config: &SocketConfig, mask: u32) -> Result<BoundSocket, SocketError> {
    let _guard = fs_lock().await;
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
    let result = BoundSocket::bind(config);
    rustix::process::umask(old);
    result
}

#[tokio::test]
async fn missing_parent_directories_are_created_0750() {
    let dir = tempdir().await;
    let path = dir.path().join("run/kekd/kms.sock");
    let _socket = bind_under_umask(&socket_config(&path, 0o600, None), 0o022)
        .await
        .unwrap();
    assert!(is_socket(&path));
    assert_eq!(mode_of(&dir.path().join("run/kekd")), 0o750);
    assert_eq!(mode_of(&dir.path().join("run")), 0o750);
    assert_eq!(mode_of(&path), 0o600);
}

/// Under a hardened umask (077, as on CIS-configured hosts) the directory
/// kekd creates must still let the socket's group through, or
/// `--socket-group` silently stops working.
#[tokio::test]
async fn missing_parent_directories_are_0750_whatever_the_umask() {
    let dir = tempdir().await;
    let gid = other_group();
    for (n, mask) in [0o077, 0o027, 0o000].into_iter().enumerate() {
        let parent = dir.path().join(format!("run{n}"));
        let path = parent.join("kms.sock");
        let _socket = bind_under_umask(&socket_config(&path, 0o660, Some(gid)), mask)
            .await
            .unwrap();
        let modes = (
            format!("{:04o}", mode_of(&path)),
            format!("{:04o}", mode_of(&parent)),
        );
        assert_eq!(
            modes,
            ("0660".to_owned(), "0750".to_owned()),
            "(socket, directory) under umask {mask:03o}"
        );
    }
}

#[tokio::test]
async fn bind_restores_the_process_umask() {
    let dir = tempdir().await;
    let _guard = fs_lock().await;
    let before = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    rustix::process::umask(before);
    let a = BoundSocket::bind(&socket_config(&dir.path().join("a.sock"), 0o600, None)).unwrap();
    let gid = rustix::process::getgid().as_raw();
    let b =
        BoundSocket::bind(&socket_config(&dir.path().join("b.sock"), 0o660, Some(gid))).unwrap();
    let after = rustix::process::umask(before);
    assert_eq!(after, before, "umask changed by bind");
    drop((a, b));
}

#[tokio::test]
async fn a_symlink_is_refused_and_left_alone() {
    let dir = tempdir().await;
    let target = dir.path().join("target");
    fs::write(&target, b"not yours").unwrap();
    for (name, points_to) in [
        ("to-file.sock", target.clone()),
        ("dangling.sock", dir.path().join("nowhere")),
    ] {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(&points_to, &link).unwrap();
        let err = bind(&socket_config(&link, 0o600, None)).await.unwrap_err();
        assert!(
            matches!(&err, SocketError::Symlink { path } if *path == link),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "socket path {} is a symlink; refusing to follow or remove it",
                link.display()
            )
        );
        assert_eq!(
            fs::read_link(&link).unwrap(),
            points_to,
            "symlink untouched"
        );
    }
    assert_eq!(fs::read(&target).unwrap(), b"not yours");
    assert!(
        !dir.path().join("nowhere").exists(),
        "nothing created through the link"
    );
}

#[tokio::test]
async fn a_regular_file_is_refused_and_left_alone() {
    let dir = tempdir().await;
    let path = dir.path().join("kms.sock");
    fs::write(&path, b"precious").unwrap();
    let err = bind(&socket_config(&path, 0o600, None)).await.unwrap_err();
    assert!(
        matches!(&err, SocketError::NotASocket { path: p } if *p == path),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "socket path {} exists and is not a socket; refusing to remove it (choose another --socket)",
            path.display()
        )
    );
    assert_eq!(fs::read(&path).unwrap(), b"precious");

    // A directory in the way is not removed either.
    let sub = dir.path().join("sub.sock");
    fs::create_dir(&sub).unwrap();
    let err = bind(&socket_config(&sub, 0o600, None)).await.unwrap_err();
    assert!(matches!(&err, SocketError::NotASocket { .. }), "{err:?}");
    assert!(sub.is_dir());
}

#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let dir = tempdir().await;
    let path = dir.path().join("kms.sock");
    {
        let _guard = fs_lock().await;
        drop(UnixListener::bind(&path).unwrap());
    }
    assert!(is_socket(&path), "a closed listener leaves its file");
    let refused = UnixStream::connect(&path).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let _socket = bind(&socket_config(&path, 0o600, None)).await.unwrap();
    assert!(is_socket(&path));
    assert_eq!(mode_of(&path), 0o600);
    UnixStream::connect(&path).expect("the new socket accepts connections");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_by_a_serving_server() {
    let dir = tempdir().await;
    let socket = dir.path().join("kms.sock");
    {
        let _guard = fs_lock().await;
        drop(UnixListener::bind(&socket).unwrap());
    }
    let server = TestServer::start_with(|s| s.socket = Some(socket.clone())).await;
    let status = server.client().await.status().await.unwrap();
    assert_eq!(status.healthz, "ok");
    server.stop().await.unwrap();
    assert!(!socket.exists());
}

#[tokio::test]
async fn a_live_socket_is_refused_and_its_listener_keeps_working() {
    let dir = tempdir().await;
    let path = dir.path().join("kms.sock");
    let listener = {
        let _guard = fs_lock().await;
        UnixListener::bind(&path).unwrap()
    };
    let ino = fs::symlink_metadata(&path).unwrap().ino();
    let err = bind(&socket_config(&path, 0o600, None)).await.unwrap_err();
    assert!(
        matches!(&err, SocketError::InUse { path: p } if *p == path),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "socket {} is in use by another process (is kekd already running?); stop it or choose another --socket",
            path.display()
        )
    );
    assert_eq!(
        fs::symlink_metadata(&path).unwrap().ino(),
        ino,
        "socket file untouched"
    );

    // The other listener still accepts: the probe connection kekd made may
    // come first (and is closed); ours follows with a greeting.
    let client_path = path.clone();
    let client = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&client_path).unwrap();
        s.write_all(b"hello").unwrap();
    });
    let greeting = loop {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).unwrap();
        if !buf.is_empty() {
            break buf;
        }
    };
    client.join().unwrap();
    assert_eq!(greeting, b"hello");
}

#[tokio::test]
async fn a_live_kekd_socket_refuses_a_second_server() {
    let first = TestServer::start().await;
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let config = ServeConfig::resolve(Settings {
        keyring: Some(keyring.clone()),
        socket: Some(first.socket.clone()),
        ..Settings::default()
    })
    .unwrap();
    let err = {
        let _guard = fs_lock().await;
        Server::start(config, Arc::new(LocalBackend::new(&keyring)))
            .await
            .unwrap_err()
    };
    assert!(
        matches!(&err, ServerError::Socket(SocketError::InUse { .. })),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 78);
    // The first server is unharmed.
    let status = first.client().await.status().await.unwrap();
    assert_eq!(status.key_id, first.key_id);
}

#[tokio::test]
async fn the_socket_file_is_removed_on_shutdown() {
    let server = TestServer::start().await;
    let socket = server.socket.clone();
    assert!(is_socket(&socket));
    let mut client = server.client().await;
    client.status().await.unwrap();
    server.stop().await.unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");
    assert!(
        client.status().await.is_err(),
        "nothing answers after shutdown"
    );
}

#[tokio::test]
async fn dropping_a_bound_socket_removes_only_its_own_file() {
    let dir = tempdir().await;
    let path = dir.path().join("kms.sock");
    let socket = bind(&socket_config(&path, 0o600, None)).await.unwrap();
    drop(socket);
    assert!(!path.exists(), "own socket removed");

    // Someone replaces the file while we run: theirs must survive us.
    let socket = bind(&socket_config(&path, 0o600, None)).await.unwrap();
    fs::remove_file(&path).unwrap();
    let theirs = {
        let _guard = fs_lock().await;
        UnixListener::bind(&path).unwrap()
    };
    socket.remove();
    assert!(is_socket(&path), "another process's socket was removed");
    drop(theirs);
}

#[tokio::test]
async fn a_bad_keyring_leaves_no_socket_behind() {
    let dir = tempdir().await;
    let socket = dir.path().join("kms.sock");
    let keyring = dir.path().join("missing-keyring");
    let config = ServeConfig::resolve(Settings {
        keyring: Some(keyring.clone()),
        socket: Some(socket.clone()),
        ..Settings::default()
    })
    .unwrap();
    let err = {
        let _guard = fs_lock().await;
        Server::start(config, Arc::new(LocalBackend::new(&keyring)))
            .await
            .unwrap_err()
    };
    assert!(matches!(err, ServerError::Keyring(_)), "{err:?}");
    assert_eq!(err.exit_code(), 78);
    assert!(!socket.exists(), "no socket bound for a bad keyring");
}

#[tokio::test]
async fn paths_up_to_107_bytes_bind_and_longer_ones_are_refused() {
    let dir = tempdir().await;
    let base = dir.path().as_os_str().len() + 1;
    assert!(base < 90, "tempdir path too long for this test");
    let exact = dir.path().join("s".repeat(MAX_SOCKET_PATH - base));
    assert_eq!(exact.as_os_str().len(), 107);
    let socket = bind(&socket_config(&exact, 0o600, None)).await.unwrap();
    assert!(is_socket(&exact));
    drop(socket);

    let long = dir.path().join("s".repeat(MAX_SOCKET_PATH + 1 - base));
    assert_eq!(long.as_os_str().len(), 108);
    let err = bind(&socket_config(&long, 0o600, None)).await.unwrap_err();
    assert!(
        matches!(&err, SocketError::PathTooLong { path, len: 108 } if *path == long),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "socket path {} is 108 bytes; Unix sockets allow at most 107",
            long.display()
        )
    );
    assert!(!long.exists());
}

/// An existing socket directory that others could write — group- or
/// world-writable and not sticky, or owned by another user — is refused
/// (as OpenSSH's StrictModes does): whoever writes it could replace kekd's
/// socket. A sticky directory (like /tmp) and a 0755 one are fine.
#[tokio::test]
async fn an_unsafe_socket_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir().await;
    for (mode, ok) in [
        (0o777, false),
        (0o770, false),
        (0o1777, true),
        (0o755, true),
    ] {
        let parent = dir.path().join(format!("d{mode:o}"));
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(mode)).unwrap();
        let result = bind(&default_socket_config(&parent.join("kms.sock"))).await;
        match (ok, result) {
            (true, Ok(_)) => {}
            (false, Err(e @ SocketError::UnsafeDirectory { .. })) => assert_eq!(
                e.to_string(),
                format!(
                    "socket directory {0} is writable by its group or others (mode {mode:04o}) and not sticky: \
                     whoever can write it could replace kekd's socket; fix it (`chmod go-w {0}`) or choose another --socket",
                    parent.display()
                )
            ),
            (ok, other) => panic!("mode {mode:04o}: expected ok={ok}, got {other:?}"),
        }
    }
    if rustix::process::geteuid().is_root() {
        let parent = dir.path().join("theirs");
        std::fs::create_dir(&parent).unwrap();
        rustix::fs::chown(&parent, Some(rustix::fs::Uid::from_raw(65534)), None).unwrap();
        let err = bind(&default_socket_config(&parent.join("kms.sock")))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "socket directory {0} is owned by uid 65534, not by kekd's user (uid 0) or root: \
                 whoever can write it could replace kekd's socket; fix it (`chown 0 {0}`) or choose another --socket",
                parent.display()
            )
        );
    }
}

/// `kekd serve` refuses an unsafe socket directory with exit 78, naming the
/// path and the fix; a missing directory it creates is logged at info (a
/// typo in --socket serves somewhere new).
#[tokio::test]
async fn serve_exits_78_on_an_unsafe_directory_and_logs_one_it_creates() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = common::kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(&keyring)
        .arg("--socket")
        .arg(open.join("kms.sock"));
    let out = common::run(cmd, dir.path());
    out.exited(78);
    assert!(
        common::error_message(&out).contains(&format!("fix it (`chmod go-w {}`)", open.display())),
        "{out:#?}"
    );
    assert!(!open.join("kms.sock").exists());

    let created = dir.path().join("typo/run");
    let mut process =
        common::spawn_serve(&keyring, &created.join("kms.sock"), dir.path(), &[]).await;
    process.ready().await;
    process
        .wait_for_stderr(&format!("directory={}", created.display()))
        .await;
    assert!(
        process
            .stderr()
            .contains("created the socket's directory (0750); it did not exist"),
        "{}",
        process.stderr()
    );
    process.signal(rustix::process::Signal::TERM);
    assert_eq!(process.wait_exit().await.code(), 0);
}
