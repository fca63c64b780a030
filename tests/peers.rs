//! `--allow-uid` / `--allow-gid`: callers the kernel reports (SO_PEERCRED)
//! outside the lists get PERMISSION_DENIED before any crypto runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::TestServer;
use tonic::Code;

fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

#[tokio::test]
async fn a_caller_outside_allow_uid_is_refused_before_any_crypto() {
    let other = my_uid().wrapping_add(4242);
    let server = TestServer::start_with(|s| s.allow_uid = vec![other]).await;
    let mut client = server.client().await;
    let expected = format!(
        "caller uid {} gid {} is not allowed by kekd's --allow-uid/--allow-gid",
        my_uid(),
        rustix::process::getgid().as_raw()
    );
    let err = client.status().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), expected);
    let err = client.encrypt(vec![1; 32], "u").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Even garbage is refused for who sent it, not for what it is.
    let err = client
        .decrypt(vec![0; 3], "nope", Default::default(), "u")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), expected);
}

#[tokio::test]
async fn allowed_uids_and_gids_call_normally() {
    let uid = my_uid();
    let server = TestServer::start_with(|s| s.allow_uid = vec![uid.wrapping_add(1), uid]).await;
    let mut client = server.client().await;
    let status = client.status().await.unwrap();
    let reply = client.encrypt(vec![7; 32], "u").await.unwrap();
    assert_eq!(reply.key_id, status.key_id);
    let gid = rustix::process::getgid().as_raw();
    let server = TestServer::start_with(|s| s.allow_gid = vec![gid]).await;
    let mut client = server.client().await;
    assert_eq!(client.status().await.unwrap().healthz, "ok");
}

/// A real second user: `setpriv` runs `kekd admin probe` as uid/gid 65534
/// on a 0660 socket of that group; it can connect, but only `--allow-gid`
/// lets it call.
#[tokio::test]
async fn another_local_user_is_refused_unless_allowed() {
    if my_uid() != 0 || Command::new("setpriv").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("KEKD_REQUIRE_ALL").is_none(),
            "this test needs root and setpriv (util-linux)"
        );
        eprintln!("*** SKIPPED: needs root and setpriv ***");
        return;
    }
    let probe_as_nobody = |socket: &std::path::Path| {
        // The socket's directory must be reachable by the other user.
        let dir = socket.parent().unwrap();
        Command::new("chmod").arg("0755").arg(dir).status().unwrap();
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_kekd"))
            .args(["admin", "probe", "--output", "json", "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    };
    let settings = |s: &mut kekd::config::Settings| {
        s.socket_mode = Some("0660".to_owned());
        s.socket_group = Some("65534".to_owned());
        s.allow_uid = vec![0];
    };
    let server = TestServer::start_with(settings).await;
    let out = tokio::task::spawn_blocking({
        let socket = server.socket.clone();
        move || probe_as_nobody(&socket)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = &report["checks"][1];
    assert_eq!(status["name"], "status");
    assert_eq!(
        status["detail"],
        "Status failed: caller uid 65534 gid 65534 is not allowed by kekd's --allow-uid/--allow-gid (PermissionDenied)"
    );

    let server = TestServer::start_with(|s| {
        settings(s);
        s.allow_gid = vec![65534];
    })
    .await;
    let out = tokio::task::spawn_blocking({
        let socket = server.socket.clone();
        move || probe_as_nobody(&socket)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
