//! Real third-party clients against a real `kekd serve`: `grpcurl` through
//! server reflection, python `grpcio` without the authority option (kekd's
//! warning names the fix), and `kekd admin doctor` on the endpoint host
//! trap. A missing tool skips its test, or fails it under
//! `KEKD_REQUIRE_ALL=1` (CI installs both: .ci/run).

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{Process, create_keyring, json_of, spawn_serve, tempdir};

/// `found`, or a skip through [`common::skip`] (a failure under
/// `KEKD_REQUIRE_ALL=1`) naming how to get the tool.
fn tool(found: Option<PathBuf>, install: &str) -> Option<PathBuf> {
    if found.is_none() {
        common::skip::skip(install);
    }
    found
}

/// `$KEKD_GRPCURL`, `grpcurl` on PATH, or `go install`'s `~/go/bin/grpcurl`.
fn grpcurl() -> Option<PathBuf> {
    let found = common::grpcurl_path();
    tool(
        found,
        "needs grpcurl: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4",
    )
}

/// `$KEKD_PYTHON`, or `python3` when it can `import grpc`.
fn python_with_grpcio() -> Option<PathBuf> {
    let found = std::env::var_os("KEKD_PYTHON")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("python3")))
        .filter(|py| {
            Command::new(py)
                .args(["-c", "import grpc"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    tool(
        found,
        "needs python3 with grpcio: python3 -m venv V && V/bin/pip install grpcio, then KEKD_PYTHON=V/bin/python",
    )
}

/// Runs `cmd` to completion outside the runtime; stdout and stderr together.
async fn output(mut cmd: Command) -> (Output, String) {
    let out = tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output())
        .await
        .unwrap_or_else(|e| panic!("the client's task: {e}"))
        .unwrap_or_else(|e| panic!("run the client: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// A served keyring in a fresh directory: (dir, socket, key_id, kekd).
async fn serve(extra: &[&str]) -> (tempfile::TempDir, PathBuf, String, Process) {
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    let key_id = create_keyring(&keyring);
    let socket = dir.path().join("kms.sock");
    let mut kekd = spawn_serve(&keyring, &socket, dir.path(), extra).await;
    if extra.contains(&"--allow-uid") {
        // Status would be refused too: wait for the socket instead.
        kekd.wait_for_stderr("listening").await;
    } else {
        kekd.ready().await;
    }
    (dir, socket, key_id, kekd)
}

/// The README's "Poke it with grpcurl": list, describe and Status by server
/// reflection, with no .proto; and why the socket path must be absolute.
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_describes_and_calls_status_by_reflection() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let (dir, socket, key_id, _kekd) = serve(&[]).await;
    let run = |args: &[&str]| {
        let mut cmd = Command::new(&grpcurl);
        cmd.args(["-plaintext", "-unix"]).arg(&socket).args(args);
        output(cmd)
    };

    let (out, text) = run(&["list"]).await;
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text,
        "grpc.reflection.v1.ServerReflection\nv2.KeyManagementService\n"
    );

    let (out, text) = run(&["describe", "v2.KeyManagementService"]).await;
    assert!(out.status.success(), "{text}");
    for rpc in [
        "rpc Decrypt ( .v2.DecryptRequest ) returns ( .v2.DecryptResponse );",
        "rpc Encrypt ( .v2.EncryptRequest ) returns ( .v2.EncryptResponse );",
        "rpc Status ( .v2.StatusRequest ) returns ( .v2.StatusResponse );",
    ] {
        assert!(text.contains(rpc), "{text}");
    }

    let (out, text) = run(&["v2.KeyManagementService/Status"]).await;
    assert!(out.status.success(), "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).expect("Status as JSON");
    assert_eq!(
        status,
        serde_json::json!({"version": "v2", "healthz": "ok", "keyId": key_id})
    );

    // A relative path: grpcurl dials `unix://kms.sock`, whose `kms.sock` is
    // the URL's host, not a path — the endpoint host trap again.
    let mut cmd = Command::new(&grpcurl);
    cmd.current_dir(dir.path()).args([
        "-plaintext",
        "-connect-timeout",
        "1",
        "-unix",
        "kms.sock",
        "list",
    ]);
    let (out, text) = output(cmd).await;
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Failed to dial target host \"unix://kms.sock\""),
        "{text}"
    );
}

/// Reflection adds no way around the peer policy: a refused peer gets
/// PERMISSION_DENIED and no service name.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_peer_gets_nothing_by_reflection() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    // Only uid 65534 may call; this test's uid (root in CI) may not.
    assert_ne!(rustix::process::geteuid().as_raw(), 65534);
    let (_dir, socket, _key_id, _kekd) = serve(&["--allow-uid", "65534"]).await;
    for args in [&["list"][..], &["describe", "v2.KeyManagementService"]] {
        let mut cmd = Command::new(&grpcurl);
        cmd.args(["-plaintext", "-unix"]).arg(&socket).args(args);
        let (out, text) = output(cmd).await;
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("code = PermissionDenied"), "{text}");
        assert!(!text.contains("KeyManagementService\n"), "{text}");
        assert!(!text.contains("rpc Status"), "{text}");
    }
}

/// A reflection request is admitted like a KMS call: one declared larger
/// than --max-request-bytes is refused before anything is reserved for it
/// (tonic's default would accept 4 MiB per message, on every stream).
#[tokio::test(flavor = "multi_thread")]
async fn a_reflection_request_is_bounded_like_a_kms_call() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let (_dir, socket, _key_id, _kekd) = serve(&["--max-request-bytes", "4096"]).await;
    let request = |symbol_len: usize| {
        serde_json::json!({ "fileContainingSymbol": "x".repeat(symbol_len) }).to_string()
    };
    let call = |data: String| {
        let mut cmd = Command::new(&grpcurl);
        cmd.args(["-plaintext", "-d", &data, "-unix"])
            .arg(&socket)
            .arg("grpc.reflection.v1.ServerReflection/ServerReflectionInfo");
        output(cmd)
    };
    // Within the limit: an answer (the symbol is unknown).
    let (_, text) = call(request(1000)).await;
    assert!(text.contains("Code: NotFound"), "{text}");
    // Past it: tonic refuses to decode it (the reflection service then
    // ends its stream without an answer); with tonic's default 4 MiB it
    // would have answered NotFound.
    let (_, text) = call(request(5000)).await;
    assert_eq!(text, "", "{text}");
}

/// python grpcio without `grpc.default_authority` sends the socket path as
/// :authority; h2 resets the stream (the client's error below, quoted in
/// the README) and kekd says why, once per connection, at warn.
#[tokio::test(flavor = "multi_thread")]
async fn grpcio_without_the_authority_option_gets_a_warning_that_names_the_fix() {
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let (_dir, socket, _key_id, kekd) = serve(&[]).await;
    let script = r#"
import sys, grpc
sock, authority = sys.argv[1], sys.argv[2]
options = [("grpc.default_authority", authority)] if authority else []
with grpc.insecure_channel("unix:" + sock, options=options) as channel:
    status = channel.unary_unary("/v2.KeyManagementService/Status")
    for _ in range(3):
        try:
            print("ok", len(status(b"", timeout=30)))
        except grpc.RpcError as e:
            print(e.code().name, e.details())
"#;
    let run = |authority: &str| {
        let mut cmd = Command::new(&python);
        cmd.args(["-c", script]).arg(&socket).arg(authority);
        output(cmd)
    };

    // Three calls on one channel (one connection): each reset.
    let (out, text) = run("").await;
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines {
        assert!(line.starts_with("INTERNAL "), "{text}");
        assert!(
            line.contains("Received RST_STREAM with error code 1"),
            "{text}"
        );
    }
    // One warning for the connection, naming the fix.
    let warning = "reset a call as malformed (HTTP/2 PROTOCOL_ERROR; the client sees INTERNAL \"Received \
                   RST_STREAM with error code 1\"): most likely the client sends the socket path as :authority, \
                   which HTTP/2 refuses. Fix the client: python grpcio options=[(\"grpc.default_authority\", \
                   \"localhost\")]";
    kekd.wait_for_stderr(warning).await;

    // With the option, the same client works; then stderr still has the
    // one warning (the working calls came after the reset ones).
    let (out, text) = run("localhost").await;
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{text}"
    );
    let stderr = kekd.stderr();
    assert_eq!(stderr.matches(warning).count(), 1, "{stderr}");
    let line = stderr.lines().find(|l| l.contains(warning)).unwrap();
    assert!(line.contains(" WARN "), "{line}");
    assert!(!line.contains(socket.to_str().unwrap()), "{line}");
}

/// `kekd admin doctor` names the socket the apiserver really dials: with
/// `unix://kekd-dev/kms.sock` that is /kms.sock, not ./kekd-dev/kms.sock
/// (the old check resolved it from the working directory and said ok).
#[test]
fn doctor_names_the_socket_the_apiserver_dials() {
    let dir = common::tempdir_blocking();
    let keyring = dir.path().join("keyring");
    create_keyring(&keyring);
    std::fs::create_dir(dir.path().join("kekd-dev")).unwrap();
    let config = dir.path().join("enc.yaml");
    let write = |endpoint: &str| {
        std::fs::write(
            &config,
            format!(
                "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: \
                 [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: kekd\n          \
                 endpoint: {endpoint}\n      - identity: {{}}\n"
            ),
        )
        .unwrap();
    };
    let doctor = |socket: &str| {
        let mut cmd = common::kekd();
        cmd.current_dir(dir.path()).args([
            "admin",
            "doctor",
            "--keyring",
            keyring.to_str().unwrap(),
            "--socket",
            socket,
            "--encryption-config",
            config.to_str().unwrap(),
            "--timeout",
            "200ms",
            "--output",
            "json",
        ]);
        common::run_guarded(cmd, dir.path())
    };
    let endpoint_finding = |out: &common::Finished| {
        json_of(out)["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["detail"].as_str().unwrap().contains("endpoint"))
            .cloned()
            .unwrap_or_else(|| panic!("{out:#?}"))
    };
    let sock = dir.path().join("kekd-dev/kms.sock");
    // Something listens there, as kekd would: the old check found it from
    // doctor's working directory and said ok.
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();

    write("unix://kekd-dev/kms.sock");
    let out = doctor("kekd-dev/kms.sock");
    out.exited(1);
    let f = endpoint_finding(&out);
    assert_eq!(f["level"], "fail", "{f}");
    assert_eq!(
        f["detail"],
        format!(
            "resources[0] (secrets): endpoint \"unix://kekd-dev/kms.sock\" makes the apiserver dial \"/kms.sock\", \
             not this plugin's socket {sock:?} (\"kekd-dev\" after `unix://` is the URL's host, which the apiserver \
             ignores: the socket's path starts at the next `/`)"
        )
    );
    assert_eq!(
        f["fix"],
        format!("set `endpoint: unix://{}`", sock.display())
    );

    // What doctor suggests is what the apiserver dials.
    write(&format!("unix://{}", sock.display()));
    let out = doctor("kekd-dev/kms.sock");
    let f = endpoint_finding(&out);
    assert_eq!(f["level"], "ok", "{f}");
    write(&format!("unix:{}", sock.display()));
    let f = endpoint_finding(&doctor("kekd-dev/kms.sock"));
    assert_eq!(f["level"], "ok", "{f}");
}
