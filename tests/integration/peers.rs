//! `--allow-uid` / `--allow-gid`: callers the kernel reports (SO_PEERCRED)
//! outside the lists get PERMISSION_DENIED before any crypto runs.

use crate::common;

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
        common::skip::skip("needs root and setpriv (util-linux)");
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

/// Environment variable telling [`refused_flood_child`] to flood this
/// socket (set only when the test below runs this binary as another user).
const FLOOD_SOCKET_ENV: &str = "PEERS_FLOOD_SOCKET";

/// A refused peer flooding kekd — 8 connections × 64 streams, each sending a
/// 60,000-byte message — is refused at accept: every call it makes is
/// answered PERMISSION_DENIED, kekd grants it no flow-control window (so not
/// one request byte is sent, let alone read), kekd's memory stays within
/// what its refused connections may cost, and the log carries one line per
/// peer per interval naming the uid, gid and the fix.
#[tokio::test]
async fn a_refused_peer_is_refused_at_accept_and_never_buffers_a_byte() {
    if my_uid() != 0 || Command::new("setpriv").arg("--version").output().is_err() {
        common::skip::skip("needs root and setpriv (util-linux)");
        return;
    }
    use kekd::server::connection::{CONNECTION_COST, FLOW_CONTROL_WINDOW, MAX_REFUSED_CONNECTIONS};
    let dir = common::tempdir().await;
    Command::new("chmod")
        .arg("0755")
        .arg(dir.path())
        .status()
        .unwrap();
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let socket = dir.path().join("kms.sock");
    let mut process = common::spawn_serve(
        &keyring,
        &socket,
        dir.path(),
        &[
            "--socket-mode",
            "0660",
            "--socket-group",
            "65534",
            "--allow-uid",
            "0",
        ],
    )
    .await;
    let mut client = process.ready().await;
    let pid = tokio::net::UnixStream::connect(&socket)
        .await
        .unwrap()
        .peer_cred()
        .unwrap()
        .pid()
        .unwrap();
    let before = memory(pid);
    let out = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || {
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    &common::test_path(module_path!(), "refused_flood_child"),
                    "--nocapture",
                ])
                .env(FLOOD_SOCKET_ENV, &socket)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix("FLOOD "))
        .unwrap_or_else(|| panic!("no report from the flood: {out:?}"));
    let report: serde_json::Value = serde_json::from_str(report).unwrap();
    // One stream at a time per refused connection: the rest are refused
    // with REFUSED_STREAM, as HTTP/2 says.
    let denied = report["denied"].as_u64().unwrap();
    assert!(denied >= 8, "{report}");
    assert_eq!(
        denied + report["refused_streams"].as_u64().unwrap(),
        8 * 64,
        "{report}"
    );
    assert_eq!(report["other"], 0, "{report}");
    assert_eq!(report["max_window"], 0, "kekd granted a window: {report}");
    assert_eq!(
        report["message"],
        "caller uid 65534 gid 65534 is not allowed by kekd's --allow-uid/--allow-gid"
    );

    let after = memory(pid);
    let refused_cost_kib =
        MAX_REFUSED_CONNECTIONS as u64 * (CONNECTION_COST + u64::from(FLOW_CONTROL_WINDOW)) / 1024;
    eprintln!(
        "refused flood: VmRSS {} → {} KiB, VmHWM {} KiB",
        before.0, after.0, after.1
    );
    assert!(
        after.1 <= before.0 + refused_cost_kib + 16 * 1024,
        "kekd's peak memory {} KiB grew past {} KiB + {refused_cost_kib} KiB + 16 MiB slack",
        after.1,
        before.0
    );
    let stderr = process.stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("refused a connection from uid 65534 gid 65534"))
        .collect();
    assert!(
        (1..=2).contains(&lines.len()),
        "expected one rate-limited line per interval, got {}:\n{stderr}",
        lines.len()
    );
    assert!(
        lines[0].contains("add --allow-uid 65534 or --allow-gid 65534"),
        "{}",
        lines[0]
    );
    assert!(
        !stderr.contains("request refused"),
        "a per-request line:\n{stderr}"
    );
    // The allowed client was never disturbed.
    assert_eq!(client.status().await.unwrap().healthz, "ok");
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The flood of the test above, run as the refused user; a no-op otherwise.
#[tokio::test]
async fn refused_flood_child() {
    use tonic::codegen::{Bytes, http};
    let Some(socket) = std::env::var_os(FLOOD_SOCKET_ENV) else {
        return;
    };
    let mut message = vec![0u8, 0, 0, 0xea, 0x60]; // declares 60,000 bytes
    message.resize(5 + 60_000, 0x42);
    let message = Bytes::from(message);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let io = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        for _ in 0..64 {
            let send = send.clone();
            let message = message.clone();
            calls.spawn(async move {
                let request = http::Request::builder()
                    .method("POST")
                    .uri("http://localhost/v2.KeyManagementService/Encrypt")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())
                    .unwrap();
                let mut send = send.ready().await.unwrap();
                let (response, mut stream) = send.send_request(request, false).unwrap();
                stream.reserve_capacity(message.len());
                let _ = stream.send_data(message, true);
                let response = match response.await {
                    Ok(response) => response,
                    // Sent before the client saw SETTINGS_MAX_CONCURRENT_STREAMS = 1.
                    Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                        return (Some("refused_stream".to_owned()), None, stream.capacity());
                    }
                    Err(e) => panic!("{e}"),
                };
                let window = stream.capacity();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_owned())
                };
                (header("grpc-status"), header("grpc-message"), window)
            });
        }
    }
    let (mut denied, mut refused_streams, mut other, mut max_window, mut message) =
        (0, 0, 0, 0, String::new());
    while let Some(r) = calls.join_next().await {
        let (code, msg, window) = r.unwrap();
        max_window = max_window.max(window);
        if code.as_deref() == Some("refused_stream") {
            refused_streams += 1;
        } else if code.as_deref() == Some("7") {
            denied += 1;
            message = msg.unwrap_or_default().replace("%20", " ");
        } else {
            other += 1;
        }
    }
    println!(
        "FLOOD {}",
        serde_json::json!({"denied": denied, "refused_streams": refused_streams, "other": other, "max_window": max_window, "message": message})
    );
}

/// Environment variable telling [`refused_reset_child`] to attack this
/// socket (set only when the test below runs this binary as another user).
const RESET_SOCKET_ENV: &str = "PEERS_RESET_SOCKET";

/// A refused peer on every refused-connection slot sends the "rapid reset"
/// pattern (CVE-2023-44487: HEADERS then RST_STREAM, thousands of times),
/// PINGs and SETTINGS, and never reads what kekd answers: kekd's memory
/// stays within its refused connections' share, it keeps running, and the
/// allowed client is served throughout.
#[tokio::test]
async fn a_refused_peers_rapid_resets_and_floods_stay_within_its_share() {
    if my_uid() != 0 || Command::new("setpriv").arg("--version").output().is_err() {
        common::skip::skip("needs root and setpriv (util-linux)");
        return;
    }
    use kekd::server::connection::{CONNECTION_COST, FLOW_CONTROL_WINDOW, MAX_REFUSED_CONNECTIONS};
    let dir = common::tempdir().await;
    Command::new("chmod")
        .arg("0755")
        .arg(dir.path())
        .status()
        .unwrap();
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let socket = dir.path().join("kms.sock");
    let mut process = common::spawn_serve(
        &keyring,
        &socket,
        dir.path(),
        &[
            "--socket-mode",
            "0660",
            "--socket-group",
            "65534",
            "--allow-uid",
            "0",
        ],
    )
    .await;
    let mut client = process.ready().await;
    let pid = tokio::net::UnixStream::connect(&socket)
        .await
        .unwrap()
        .peer_cred()
        .unwrap()
        .pid()
        .unwrap();
    let before = memory(pid);
    let out = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || {
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    &common::test_path(module_path!(), "refused_reset_child"),
                    "--nocapture",
                ])
                .env(RESET_SOCKET_ENV, &socket)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("RESET sent"), "{out:?}");
    // Served meanwhile and after.
    assert_eq!(client.status().await.unwrap().healthz, "ok");
    let after = memory(pid);
    let refused_cost_kib =
        MAX_REFUSED_CONNECTIONS as u64 * (CONNECTION_COST + u64::from(FLOW_CONTROL_WINDOW)) / 1024;
    eprintln!(
        "refused rapid reset: VmRSS {} → {} KiB, VmHWM {} KiB; {}",
        before.0,
        after.0,
        after.1,
        stdout.trim()
    );
    assert!(
        after.1 <= before.0 + refused_cost_kib + 16 * 1024,
        "kekd's peak memory {} KiB grew past {} KiB + {refused_cost_kib} KiB + 16 MiB slack",
        after.1,
        before.0
    );
    assert!(process.try_exit().is_none(), "kekd exited");
}

/// The attack of the test above, run as the refused user; a no-op otherwise.
#[tokio::test]
async fn refused_reset_child() {
    use tokio::io::AsyncWriteExt;
    let Some(socket) = std::env::var_os(RESET_SOCKET_ENV) else {
        return;
    };
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let literal = |n: &str, v: &str| {
        let mut b = vec![0x00, u8::try_from(n.len()).unwrap()];
        b.extend_from_slice(n.as_bytes());
        b.push(u8::try_from(v.len()).unwrap());
        b.extend_from_slice(v.as_bytes());
        b
    };
    let block: Vec<u8> = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/v2.KeyManagementService/Encrypt"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    .iter()
    .flat_map(|(n, v)| literal(n, v))
    .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..kekd::server::connection::MAX_REFUSED_CONNECTIONS {
        let socket = socket.clone();
        let block = block.clone();
        tasks.spawn(async move {
            let Ok(mut io) = tokio::net::UnixStream::connect(&socket).await else {
                return 0u64;
            };
            let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            bytes.extend(frame(0x4, 0, 0, &[]));
            let mut sent = 0u64;
            for round in 0..200u32 {
                let mut chunk = Vec::new();
                for i in 0..50u32 {
                    let id = 2 * (round * 50 + i) + 1;
                    chunk.extend(frame(0x1, 0x4 | 0x1, id, &block));
                    chunk.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
                    chunk.extend(frame(0x6, 0, 0, &[0; 8]));
                    chunk.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0, 0]));
                }
                bytes.extend(chunk);
                // Never read: kekd's answers pile up on its side, if it lets them.
                if tokio::time::timeout(std::time::Duration::from_secs(2), io.write_all(&bytes))
                    .await
                    .is_err()
                {
                    break;
                }
                sent += bytes.len() as u64;
                bytes.clear();
            }
            drop(io);
            sent
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    println!("RESET sent {total} bytes");
}
