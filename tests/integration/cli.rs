//! The `kekd` binary: `admin init`, `admin probe`, and `serve` with its
//! configuration sources, refusals, signals and `--dev`.

use crate::common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::process::Signal;
use tempfile::TempDir;

use common::{
    Finished, Process, kekd, keks_in, mode_of, run, seed, tempdir, tempdir_blocking, uid, wire,
};

const EX_CONFIG: i32 = 78;

/// A keyring made by `kekd admin init`, and the key_id it printed.
struct Initialized {
    dir: TempDir,
    keyring: PathBuf,
    key_id: String,
}

impl Initialized {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("kms.sock")
    }

    /// `kekd serve --keyring K --socket S` plus `extra`.
    fn serve(&self, extra: &[&str]) -> Process {
        let mut cmd = kekd();
        cmd.arg("serve")
            .arg("--keyring")
            .arg(&self.keyring)
            .arg("--socket")
            .arg(self.socket())
            .args(extra);
        Process::spawn(cmd, &self.socket(), self.dir.path())
    }
}

fn init_in(dir: TempDir) -> Initialized {
    let keyring = dir.path().join("keyring");
    let mut cmd = kekd();
    cmd.args(["admin", "init", "--keyring"]).arg(&keyring);
    let out = run(cmd, dir.path());
    out.ok();
    let key_id = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("key_id"))
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|| panic!("init printed no key_id line: {out:#?}"));
    Initialized {
        dir,
        keyring,
        key_id,
    }
}

fn init() -> Initialized {
    init_in(tempdir_blocking())
}

async fn init_async() -> Initialized {
    init_in(tempdir().await)
}

/// `kekd serve` with `args`, run to its exit.
fn serve_exit(args: &[&str], logs: &Path) -> Finished {
    let mut cmd = kekd();
    cmd.arg("serve").args(args);
    run(cmd, logs)
}

/// The single `kekd: error: …` line, which must be on stderr.
#[track_caller]
fn error_line(out: &Finished) -> &str {
    out.stderr
        .lines()
        .find_map(|l| l.strip_prefix("kekd: error: "))
        .unwrap_or_else(|| panic!("no `kekd: error:` line: {out:#?}"))
}

#[track_caller]
fn assert_no_secrets(out: &Finished, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !out.stdout.contains(secret.as_str()) && !out.stderr.contains(secret.as_str()),
            "key material printed: {out:#?}"
        );
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

// ---------------------------------------------------------------- admin init

#[test]
fn init_creates_a_0600_keyring_and_prints_its_key_id() {
    let setup = init();
    assert!(setup.keyring.is_file());
    assert_eq!(mode_of(&setup.keyring), 0o600);
    let text = fs::read_to_string(&setup.keyring).unwrap();
    let keyring_id = text
        .lines()
        .find_map(|l| l.strip_prefix("keyring "))
        .expect("keyring id line");
    assert!(is_hex(keyring_id, 32), "{keyring_id:?}");
    assert_eq!(setup.key_id, format!("kekd/{keyring_id}/v1"));
    assert!(setup.key_id.len() <= 1024);
    // The key_id is public: no key material in it.
    for kek in keks_in(&setup.keyring) {
        assert!(!setup.key_id.contains(&kek));
    }
}

#[test]
fn init_never_prints_the_kek() {
    let dir = tempdir_blocking();
    let keyring = dir.path().join("keyring");
    let mut cmd = kekd();
    cmd.args(["admin", "init", "--keyring"]).arg(&keyring);
    let out = run(cmd, dir.path());
    out.ok();
    assert_no_secrets(&out, &keks_in(&keyring));
}

#[test]
fn init_refuses_an_existing_keyring_and_leaves_it_unchanged() {
    let setup = init();
    let before = fs::read(&setup.keyring).unwrap();
    for output in ["text", "json"] {
        let mut cmd = kekd();
        cmd.args(["admin", "init", "--output", output, "--keyring"])
            .arg(&setup.keyring);
        let out = run(cmd, setup.dir.path());
        // A refusal, as README's exit codes say: 1, not 78.
        out.exited(1);
        assert_eq!(
            error_line(&out),
            format!(
                "keyring {} already exists; refusing to overwrite it (every Secret it encrypted would be lost)",
                p(&setup.keyring)
            )
        );
        assert_eq!(fs::read(&setup.keyring).unwrap(), before, "keyring changed");
        assert_eq!(mode_of(&setup.keyring), 0o600);
        assert_no_secrets(&out, &keks_in(&setup.keyring));
    }
    // No temporary file (which would hold key material) is left beside it.
    let leftovers: Vec<String> = fs::read_dir(setup.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn init_json_output_is_parseable() {
    let dir = tempdir_blocking();
    let keyring = dir.path().join("sub/keyring");
    let mut cmd = kekd();
    cmd.args(["admin", "init", "--output", "json", "--keyring"])
        .arg(&keyring);
    let out = run(cmd, dir.path());
    out.ok();
    let doc: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {out:#?}"));
    let keyring_id = doc["keyring_id"].as_str().expect("keyring_id");
    assert!(is_hex(keyring_id, 32), "{keyring_id:?}");
    assert_eq!(doc["key_id"], format!("kekd/{keyring_id}/v1"));
    assert_eq!(doc["keyring"], p(&keyring));
    assert_eq!(doc["primary_version"], 1);
    assert_eq!(mode_of(&keyring), 0o600);
    assert_eq!(
        mode_of(&dir.path().join("sub")),
        0o700,
        "missing directory created 0700"
    );
    assert_no_secrets(&out, &keks_in(&keyring));
}

// ------------------------------------------------------- serve: refusals (78)

#[test]
fn serve_refuses_a_missing_keyring() {
    let dir = tempdir_blocking();
    let keyring = dir.path().join("no-such-keyring");
    let socket = dir.path().join("kms.sock");
    let out = serve_exit(
        &["--keyring", &p(&keyring), "--socket", &p(&socket)],
        dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_line(&out),
        format!(
            "keyring {k} does not exist (create one with `kekd admin init --keyring {k}`)",
            k = p(&keyring)
        )
    );
    assert!(!socket.exists(), "no socket for a bad keyring");
}

#[test]
fn serve_refuses_a_keyring_others_can_read() {
    let setup = init();
    let keks = keks_in(&setup.keyring);
    for mode in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&setup.keyring, fs::Permissions::from_mode(mode)).unwrap();
        let out = serve_exit(
            &[
                "--keyring",
                &p(&setup.keyring),
                "--socket",
                &p(&setup.socket()),
            ],
            setup.dir.path(),
        );
        assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
        assert_eq!(
            error_line(&out),
            format!(
                "keyring {k} has permissions {mode:04o}, which let other users read the keys; run `chmod 600 {k}`",
                k = p(&setup.keyring)
            )
        );
        assert_no_secrets(&out, &keks);
        assert!(!setup.socket().exists());
    }
}

#[test]
fn serve_refuses_garbage_keyrings() {
    let dir = tempdir_blocking();
    let socket = dir.path().join("kms.sock");
    let keyring = dir.path().join("keyring");
    const NOT_KEKD: &str = "line 1 is not `kekd-keyring v1`: not a kekd keyring";
    let cases: [(&[u8], &str); 9] = [
        (b"", NOT_KEKD),
        (b"hello\nworld\n", NOT_KEKD),
        (b"{\"keyring\": \"json\"}\nsha256 00\n", NOT_KEKD),
        (b"\xff\xfe\x00garbage\n", "line 1 is not UTF-8 text"),
        (
            b"kekd-keyring v2\nkeyring 00\n",
            "line 1 is a keyring format this kekd does not read (expected `kekd-keyring v1`)",
        ),
        (
            b"kekd-keyring v1\n",
            "line 1 must be the `sha256 <digest>` line that ends every keyring (file truncated?)",
        ),
        (
            b"kekd-keyring v1\nkeyring 00\n",
            "line 2 must be the `sha256 <digest>` line that ends every keyring (file truncated?)",
        ),
        (
            b"kekd-keyring v1\nkeyring 00",
            "line 2 does not end in a newline (truncated?)",
        ),
        (
            b"kekd-keyring v1\nsha256 00\n",
            "line 2: field `sha256` checksum does not match the file's content (edited by hand or damaged in a copy)",
        ),
    ];
    for (content, reason) in cases {
        fs::write(&keyring, content).unwrap();
        fs::set_permissions(&keyring, fs::Permissions::from_mode(0o600)).unwrap();
        let out = serve_exit(
            &["--keyring", &p(&keyring), "--socket", &p(&socket)],
            dir.path(),
        );
        assert_eq!(out.code(), EX_CONFIG, "{content:?}: {out:#?}");
        assert_eq!(
            error_line(&out),
            format!("keyring {}: {reason}", p(&keyring)),
            "{content:?}"
        );
        assert!(!socket.exists());
    }

    // A directory where the keyring should be.
    let out = serve_exit(
        &["--keyring", &p(dir.path()), "--socket", &p(&socket)],
        dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_line(&out),
        format!("keyring {} is not a regular file", p(dir.path()))
    );
}

#[test]
fn serve_refuses_a_keyring_with_one_byte_changed() {
    let setup = init();
    let original = fs::read_to_string(&setup.keyring).unwrap();
    let kek = keks_in(&setup.keyring).remove(0);
    // Change one base64 character of the KEK: still 32 valid-looking bytes,
    // so only the checksum can tell.
    let at = original.find(&kek).unwrap() + 5;
    let mut bytes = original.clone().into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    let changed = String::from_utf8(bytes).unwrap();
    let changed_kek = changed[at - 5..at - 5 + kek.len()].to_owned();
    fs::write(&setup.keyring, &changed).unwrap();
    assert_eq!(mode_of(&setup.keyring), 0o600);

    let out = serve_exit(
        &[
            "--keyring",
            &p(&setup.keyring),
            "--socket",
            &p(&setup.socket()),
        ],
        setup.dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_line(&out),
        format!(
            "keyring {}: line 4: field `sha256` checksum does not match the file's content (edited by hand or damaged in a copy)",
            p(&setup.keyring)
        )
    );
    // The next line says how to get the keyring back.
    let k = p(&setup.keyring);
    assert!(
        out.stderr.contains(&format!(
            "\nhint: if {k} is damaged, move it aside (`mv {k} {k}.damaged`) and bring the keyring back: \
             `kekd admin restore-backup --from BACKUP --keyring {k}`, or `kekd admin import --from COPY --keyring {k}` \
             with the keyring of another node\n"
        )),
        "{out:#?}"
    );
    assert_no_secrets(&out, &[kek, changed_kek]);
    assert!(!setup.socket().exists());
}

#[test]
fn serve_without_a_keyring_names_the_flag() {
    let dir = tempdir_blocking();
    let out = serve_exit(&["--socket", &p(&dir.path().join("kms.sock"))], dir.path());
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_line(&out),
        "no keyring given: set --keyring PATH, KEKD_KEYRING or `keyring = \"PATH\"` in --config (or try --dev)"
    );
    let out = serve_exit(&[], dir.path());
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(error_line(&out).contains("--keyring"), "{out:#?}");
}

// ------------------------------------------------------------- admin probe

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_against_a_live_server_succeeds() {
    let setup = init_async().await;
    let mut server = setup.serve(&[]);
    server.ready().await;

    let mut cmd = kekd();
    cmd.args(["admin", "probe", "--socket"]).arg(setup.socket());
    let out = run_async(cmd, setup.dir.path()).await;
    out.ok();
    for check in ["connect", "status", "encrypt", "decrypt"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim_start().starts_with("ok") && l.contains(check)),
            "no passing {check} check: {out:#?}"
        );
    }
    assert!(!out.stdout.contains("FAIL"), "{out:#?}");

    let mut cmd = kekd();
    cmd.args(["admin", "probe", "--output", "json", "--socket"])
        .arg(setup.socket());
    let out = run_async(cmd, setup.dir.path()).await;
    out.ok();
    let doc: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(doc["ok"], true, "{doc:#}");
    assert_eq!(doc["status"]["version"], "v2");
    assert_eq!(doc["status"]["healthz"], "ok");
    assert_eq!(doc["status"]["key_id"], setup.key_id.as_str());
    let checks = doc["checks"].as_array().expect("checks");
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["connect", "status", "encrypt", "decrypt"]);
    assert!(checks.iter().all(|c| c["ok"] == true), "{doc:#}");
    assert_no_secrets(&out, &keks_in(&setup.keyring));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_against_no_socket_fails_and_says_kekd_is_not_running() {
    let dir = tempdir().await;
    let missing = dir.path().join("missing.sock");
    let mut cmd = kekd();
    cmd.args(["admin", "probe", "--timeout", "2s", "--socket"])
        .arg(&missing);
    let out = run_async(cmd, dir.path()).await;
    out.exited(1);
    assert!(
        out.stdout.contains(
            "no socket there: is kekd running, and is this the path it serves (--socket)?"
        ),
        "{out:#?}"
    );
    assert_eq!(
        error_line(&out),
        format!("probe of {} failed: connect", p(&missing))
    );

    let mut cmd = kekd();
    cmd.args([
        "admin",
        "probe",
        "--timeout",
        "2s",
        "--output",
        "json",
        "--socket",
    ])
    .arg(&missing);
    let out = run_async(cmd, dir.path()).await;
    out.exited(1);
    let doc: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["checks"][0]["name"], "connect");
    assert_eq!(doc["checks"][0]["ok"], false);

    // A socket file nobody accepts on: a stale socket of a dead kekd.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut cmd = kekd();
    cmd.args(["admin", "probe", "--timeout", "2s", "--socket"])
        .arg(&stale);
    let out = run_async(cmd, dir.path()).await;
    out.exited(1);
    assert!(
        out.stdout.contains(
            "a socket file exists but nothing accepts on it: kekd is not running (a stale socket)"
        ),
        "{out:#?}"
    );

    // A regular file where the socket should be: the wrong path, not a
    // stale socket.
    let file = dir.path().join("not-a-socket");
    fs::write(&file, b"").unwrap();
    let mut cmd = kekd();
    cmd.args(["admin", "probe", "--timeout", "2s", "--socket"])
        .arg(&file);
    let out = run_async(cmd, dir.path()).await;
    out.exited(1);
    assert!(!out.stdout.contains("stale"), "{out:#?}");
    assert!(
        out.stdout.contains(&format!(
            "; {} is a regular file, not a socket: --socket names the wrong path (kekd serves on the path of \
             its --socket setting)",
            file.display()
        )),
        "{out:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_takes_its_keyring_from_kekd_keyring() {
    let setup = init_in(tempdir().await);
    let mut server = Process::spawn(
        {
            let mut cmd = kekd();
            cmd.args(["serve", "--keyring"])
                .arg(&setup.keyring)
                .arg("--socket")
                .arg(setup.socket());
            cmd
        },
        &setup.socket(),
        setup.dir.path(),
    );
    server.ready().await;
    let mut cmd = kekd();
    cmd.args(["admin", "probe", "--output", "json", "--socket"])
        .arg(setup.socket())
        .env("KEKD_KEYRING", &setup.keyring);
    let out = run_async(cmd, setup.dir.path()).await;
    out.ok();
    let doc: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let keyring = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "keyring")
        .unwrap_or_else(|| panic!("no keyring check: {doc:#}"));
    assert_eq!(keyring["ok"], true, "{doc:#}");
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);
}

/// [`run`] without blocking a runtime worker.
async fn run_async(cmd: Command, logs: &Path) -> Finished {
    let logs = logs.to_owned();
    tokio::task::spawn_blocking(move || run(cmd, &logs))
        .await
        .expect("run task")
}

// ------------------------------------------------------- signals and drain

/// Calls in flight when SIGTERM arrives all complete; then kekd exits 0 and
/// removes its socket. The calls are held open (headers sent, message not)
/// so they are provably in flight, not merely quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_calls_in_flight_then_exits_0() {
    const N: usize = 200;
    let setup = init_async().await;
    // The held messages arrive only after SIGTERM: on a loaded host that
    // can take longer than the default request-read deadline (10s). One
    // connection may open 64 streams by default; a client waits for a free
    // one beyond that (so would the Status probe below), hence the limit.
    let mut server = setup.serve(&[
        "--shutdown-grace",
        "60s",
        "--request-read-timeout",
        "10m",
        "--max-streams-per-connection",
        "256",
    ]);
    let mut client = server.ready().await;

    let mut stored = Vec::with_capacity(N);
    for n in 0..N {
        let seed = seed();
        let enc = client.encrypt(seed.clone(), &uid(n)).await.unwrap();
        stored.push((seed, enc));
    }

    // One connection, as the apiserver uses; N calls open on it.
    let raw = wire::RawClient::connect(&setup.socket(), common::CALL_TIMEOUT).await;
    let mut held = Vec::with_capacity(N);
    for (n, (seed, enc)) in stored.into_iter().enumerate() {
        let request = wire::DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: uid(n),
            key_id: enc.key_id,
            annotations: HashMap::new(),
        };
        let call = raw
            .held::<_, wire::DecryptResponse>(wire::DECRYPT, request)
            .await;
        held.push((seed, call));
    }
    // Answered only after the server has read every earlier stream's headers.
    let status: wire::StatusResponse = raw
        .clone()
        .unary(wire::STATUS, wire::StatusRequest {})
        .await
        .unwrap();
    assert_eq!(status.key_id, setup.key_id);

    server.signal(Signal::TERM);
    server.wait_for_stderr("shutting down").await;
    assert!(
        server.try_exit().is_none(),
        "kekd exited with {N} calls in flight"
    );

    let mut results = Vec::with_capacity(N);
    let mut calls = tokio::task::JoinSet::new();
    for (n, (seed, call)) in held.into_iter().enumerate() {
        calls.spawn(async move { (n, seed, call.release().await) });
    }
    while let Some(r) = calls.join_next().await {
        results.push(r.expect("call task"));
    }
    for (n, seed, result) in &results {
        match result {
            Ok(reply) => assert_eq!(&reply.plaintext, seed, "call {n} returned another seed"),
            Err(e) => panic!("call {n}, accepted before SIGTERM, failed during the drain: {e:?}"),
        }
    }
    assert_eq!(results.len(), N);

    let out = server.wait_exit().await;
    out.ok();
    assert!(!setup.socket().exists(), "socket removed on exit");
    assert!(!out.stderr.contains("grace period expired"), "{out:#?}");
    assert_no_secrets(&out, &keks_in(&setup.keyring));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_0_and_removes_the_socket() {
    let setup = init_async().await;
    let mut server = setup.serve(&[]);
    let mut client = server.ready().await;
    client.status().await.unwrap();
    server.signal(Signal::INT);
    let out = server.wait_exit().await;
    out.ok();
    assert!(!setup.socket().exists(), "socket removed on exit");
}

/// A call that never finishes does not keep kekd alive past the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_on_calls_after_the_grace_period() {
    let setup = init_async().await;
    let mut server = setup.serve(&["--shutdown-grace", "1s"]);
    let mut client = server.ready().await;
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    let raw = wire::RawClient::connect(&setup.socket(), common::CALL_TIMEOUT).await;
    let call = raw
        .held::<_, wire::DecryptResponse>(
            wire::DECRYPT,
            wire::DecryptRequest {
                ciphertext: enc.ciphertext,
                uid: uid(0),
                key_id: enc.key_id,
                annotations: HashMap::new(),
            },
        )
        .await;
    let _: wire::StatusResponse = raw
        .clone()
        .unary(wire::STATUS, wire::StatusRequest {})
        .await
        .unwrap();

    server.signal(Signal::TERM);
    let out = server.wait_exit().await;
    out.ok();
    assert!(out.stderr.contains("grace period expired"), "{out:#?}");
    assert!(!setup.socket().exists(), "socket removed on exit");
    assert!(
        call.release().await.is_err(),
        "an abandoned call returns no plaintext"
    );
}

// ------------------------------------------------- configuration sources

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_vars_configure_serve() {
    let setup = init_async().await;
    let mut cmd = kekd();
    cmd.arg("serve")
        .env("KEKD_KEYRING", &setup.keyring)
        .env("KEKD_SOCKET", setup.socket());
    let mut server = Process::spawn(cmd, &setup.socket(), setup.dir.path());
    let mut client = server.ready().await;
    assert_eq!(client.status().await.unwrap().key_id, setup.key_id);
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_beat_env_vars() {
    let setup = init_async().await;
    let env_socket = setup.dir.path().join("env.sock");
    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(&setup.keyring)
        .arg("--socket")
        .arg(setup.socket())
        .env("KEKD_KEYRING", setup.dir.path().join("no-such-keyring"))
        .env("KEKD_SOCKET", &env_socket);
    let mut server = Process::spawn(cmd, &setup.socket(), setup.dir.path());
    let mut client = server.ready().await;
    assert_eq!(client.status().await.unwrap().key_id, setup.key_id);
    assert!(!env_socket.exists(), "the env var's socket was used");
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_configures_serve_and_env_and_flags_beat_it() {
    let setup = init_async().await;
    let file_socket = setup.dir.path().join("file.sock");
    let config = setup.dir.path().join("kekd.toml");
    fs::write(
        &config,
        format!(
            "keyring = \"{}\"\nsocket = \"{}\"\nsocket_mode = \"0600\"\nshutdown_grace = \"5s\"\nlog_format = \"json\"\n",
            p(&setup.keyring),
            p(&file_socket)
        ),
    )
    .unwrap();

    // The file alone (through --config, then through KEKD_CONFIG).
    for via_env in [false, true] {
        let mut cmd = kekd();
        cmd.arg("serve");
        if via_env {
            cmd.env("KEKD_CONFIG", &config);
        } else {
            cmd.arg("--config").arg(&config);
        }
        let mut server = Process::spawn(cmd, &file_socket, setup.dir.path());
        let mut client = server.ready().await;
        assert_eq!(client.status().await.unwrap().key_id, setup.key_id);
        server.signal(Signal::TERM);
        let out = server.wait_exit().await;
        out.ok();
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(
            serde_json::from_str::<serde_json::Value>(first).is_ok(),
            "log_format = \"json\" from the file ignored: {out:#?}"
        );
        assert!(!file_socket.exists());
    }

    // An env var and a flag each beat the file.
    let env_socket = setup.dir.path().join("env.sock");
    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .env("KEKD_SOCKET", &env_socket);
    let mut server = Process::spawn(cmd, &env_socket, setup.dir.path());
    server.ready().await;
    assert!(!file_socket.exists());
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);

    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(setup.socket())
        .env("KEKD_SOCKET", &env_socket);
    let mut server = Process::spawn(cmd, &setup.socket(), setup.dir.path());
    server.ready().await;
    assert!(!file_socket.exists() && !env_socket.exists());
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);
}

#[test]
fn a_config_file_with_an_unknown_key_exits_78_naming_it() {
    let setup = init();
    let config = setup.dir.path().join("kekd.toml");
    fs::write(
        &config,
        format!(
            "keyrng = \"{}\"\nsocket = \"{}\"\n",
            p(&setup.keyring),
            p(&setup.socket())
        ),
    )
    .unwrap();
    let out = serve_exit(&["--config", &p(&config)], setup.dir.path());
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    let line = error_line(&out);
    assert!(
        line.starts_with(&format!("config file {}: ", p(&config))),
        "{out:#?}"
    );
    assert!(out.stderr.contains("unknown field `keyrng`"), "{out:#?}");
    assert!(!setup.socket().exists());

    let out = serve_exit(
        &["--config", &p(&setup.dir.path().join("missing.toml"))],
        setup.dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_line(&out).starts_with(&format!(
            "config file {}: ",
            p(&setup.dir.path().join("missing.toml"))
        )),
        "{out:#?}"
    );
}

// -------------------------------------------------------------------- --dev

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_creates_then_reuses_its_keyring_and_prints_the_config() {
    let dir = tempdir().await;
    let cwd = dir.path().canonicalize().unwrap();
    let dev = cwd.join("kekd-dev");
    let keyring = dev.join("keyring");
    let socket = dev.join("kms.sock");

    let mut key_ids = Vec::new();
    for run in 0..2 {
        let mut cmd = kekd();
        cmd.args(["serve", "--dev"]).current_dir(&cwd);
        let mut server = Process::spawn(cmd, &socket, &cwd);
        let mut client = server.ready().await;
        key_ids.push(client.status().await.unwrap().key_id);
        assert_eq!(mode_of(&keyring), 0o600);
        assert_eq!(mode_of(&socket), 0o600);
        let stdout = server.stdout();
        assert!(
            stdout.contains(&format!("endpoint: unix://{}\n", p(&socket))),
            "run {run}: {stdout}"
        );
        for line in [
            "apiVersion: apiserver.config.k8s.io/v1",
            "kind: EncryptionConfiguration",
            "apiVersion: v2",
        ] {
            assert!(stdout.contains(line), "run {run}: no {line:?} in {stdout}");
        }
        let created = server
            .stderr()
            .contains(&format!("created development keyring {}", p(&keyring)));
        assert_eq!(created, run == 0, "run {run}: {}", server.stderr());
        server.signal(Signal::TERM);
        let out = server.wait_exit().await;
        out.ok();
        assert_no_secrets(&out, &keks_in(&keyring));
        assert!(!socket.exists());
    }
    assert_eq!(
        key_ids[0], key_ids[1],
        "second --dev run reused the keyring"
    );
    let keyring_id = fs::read_to_string(&keyring).unwrap();
    assert!(keyring_id.contains(&key_ids[0]["kekd/".len()..key_ids[0].len() - "/v1".len()]));
}

/// Logging is set up before the process is hardened, so a hardening step
/// the sandbox refuses is logged (here `prctl(PR_SET_DUMPABLE)` fails with
/// EPERM, injected by strace): in `serve`'s JSON log, and on an admin
/// command's stderr. Before, hardening ran first and its warnings went
/// nowhere.
#[tokio::test]
async fn a_refused_hardening_step_is_logged() {
    let have_strace = Command::new("strace").arg("-V").output().is_ok();
    if !have_strace {
        common::skip::skip(
            "strace not installed (it injects the EPERM): apt-get install -y strace",
        );
        return;
    }
    let strace = |inner: &Command| {
        let mut cmd = Command::new("strace");
        cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=prctl"])
            .args(["-e", "inject=prctl:error=EPERM", "--"])
            .arg(inner.get_program())
            .args(inner.get_args())
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEKD_") {
                cmd.env_remove(name);
            }
        }
        cmd
    };
    const WARNING: &str = "cannot clear PR_SET_DUMPABLE; a crash could dump key material";
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let socket = dir.path().join("kms.sock");
    let mut serve = kekd();
    serve
        .arg("serve")
        .arg("--keyring")
        .arg(&keyring)
        .arg("--socket")
        .arg(&socket)
        .args(["--log-format", "json"]);
    let mut process = {
        let _guard = common::fs_lock().await;
        Process::spawn(strace(&serve), &socket, dir.path())
    };
    process.ready().await;
    // Serving proves the warning was not fatal. Stop kekd itself (the
    // child is strace, which then exits with kekd's status).
    let pid = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains(socket.to_str().unwrap()) && !c.starts_with("strace")
            })
        })
        .expect("kekd's pid");
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), Signal::TERM)
        .unwrap();
    let out = process.wait_exit().await;
    out.ok();
    let stderr = out.stderr;
    let line = stderr
        .lines()
        .find(|l| l.contains(WARNING))
        .unwrap_or_else(|| panic!("no hardening warning:\n{stderr}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(json["level"], "WARN", "{line}");
    assert_eq!(json["message"], WARNING, "{line}");

    let mut list = kekd();
    list.args(["admin", "list", "--keyring"]).arg(&keyring);
    let out = tokio::task::spawn_blocking({
        let cmd = strace(&list);
        let logs = dir.path().to_owned();
        move || common::run_guarded(cmd, &logs)
    })
    .await
    .unwrap();
    out.ok();
    assert!(out.stderr.contains(WARNING), "{out:#?}");
}

// ------------------------------------------------ help, usage and pipes

/// The `Examples:` lines of `help`, without their indentation.
fn examples(help: &str) -> Vec<String> {
    help.split_once("\nExamples:\n")
        .map(|(_, rest)| {
            rest.lines()
                .map_while(|l| l.strip_prefix("  "))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_subcommand_help_has_examples_that_parse() {
    let logs = tempdir_blocking();
    use clap::CommandFactory as _;
    let mut cli = kekd::cli::Cli::command();
    cli.build();
    let mut commands = vec![vec!["serve".to_owned()]];
    let admin = cli.find_subcommand("admin").unwrap();
    for sub in admin.get_subcommands().filter(|c| c.get_name() != "help") {
        commands.push(vec!["admin".to_owned(), sub.get_name().to_owned()]);
    }
    assert!(commands.len() > 10, "{commands:?}");
    for path in &commands {
        // What an operator sees: the binary's own --help.
        let mut cmd = kekd();
        cmd.args(path).arg("--help");
        let out = run(cmd, logs.path());
        assert_eq!(out.code(), 0, "{path:?}: {out:#?}");
        let lines = examples(&out.stdout);
        assert!(
            !lines.is_empty(),
            "{path:?} --help has no Examples: {}",
            out.stdout
        );
        for line in lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                words[..path.len() + 1],
                *[
                    &["kekd"][..],
                    &path.iter().map(String::as_str).collect::<Vec<_>>()
                ]
                .concat(),
                "{path:?}: {line}"
            );
            if let Err(e) = <kekd::cli::Cli as clap::Parser>::try_parse_from(&words) {
                panic!("{path:?}: the example `{line}` does not parse: {e}");
            }
        }
    }
}

#[test]
fn serve_help_says_what_the_concurrency_limits_do_and_groups_the_backend_flags() {
    let logs = tempdir_blocking();
    let mut cmd = kekd();
    cmd.args(["serve", "--help"]);
    let out = run(cmd, logs.path());
    out.ok();
    let help = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains(
            "Most Encrypt/Decrypt calls running at once, all connections together (more wait; Status never \
             does), capped at 8 per CPU or, when larger, the PKCS#11 pool size; also caps \
             --max-streams-per-connection [default: 1024]"
        ),
        "{help}"
    );
    assert!(!help.contains("across connections"), "{help}");
    // The PKCS#11 flags stand under their own heading, in serve and admin.
    for args in [&["serve", "--help"][..], &["admin", "list", "--help"]] {
        let mut cmd = kekd();
        cmd.args(args);
        let out = run(cmd, logs.path());
        let (before, after) = out
            .stdout
            .split_once("\nBackend (PKCS#11; or the [backend] table of --config):\n")
            .unwrap_or_else(|| panic!("{args:?}: no backend heading: {}", out.stdout));
        assert!(!before.contains("--pkcs11-"), "{args:?}: {}", out.stdout);
        assert!(
            after.contains("--pkcs11-module"),
            "{args:?}: {}",
            out.stdout
        );
    }
}

#[test]
fn a_usage_error_under_output_json_is_a_json_document() {
    let logs = tempdir_blocking();
    for args in [
        &["admin", "list", "--output", "json", "--no-such-flag"][..],
        &["admin", "retire", "x", "--output=json", "--keyring", "/k"],
        &["admin", "rotate", "--output", "json", "--expect-primary"],
    ] {
        let mut cmd = kekd();
        cmd.args(args);
        let out = run(cmd, logs.path());
        assert_eq!(out.code(), common::EX_USAGE, "{args:?}: {out:#?}");
        let doc: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!("{args:?}: stdout is not one JSON document ({e}): {out:#?}")
        });
        assert_eq!(doc["exit_code"], common::EX_USAGE, "{doc:#}");
        let error = doc["error"].as_str().unwrap();
        assert!(!error.is_empty() && !error.starts_with("error:"), "{doc:#}");
        // The plain message still goes to stderr.
        assert!(out.stderr.contains(error), "{out:#?}");
    }
    // Without --output json, stdout stays empty.
    let mut cmd = kekd();
    cmd.args(["admin", "list", "--no-such-flag"]);
    let out = run(cmd, logs.path());
    assert_eq!((out.code(), out.stdout.as_str()), (common::EX_USAGE, ""));
}

#[test]
fn a_closed_stdout_and_stderr_do_not_crash_serve() {
    // `kekd serve … 2>&1 | head -1`: the reader is gone before kekd writes.
    let dir = tempdir_blocking();
    for args in [
        // A configuration error: exit 78, message to a closed stderr.
        vec![
            "serve".to_owned(),
            "--socket".to_owned(),
            p(&dir.path().join("s.sock")),
        ],
        // --dev: the keyring line and the EncryptionConfiguration to a
        // closed pipe; with a mode open to others it then stops with 78.
        vec![
            "serve".to_owned(),
            "--dev".to_owned(),
            "--socket-mode".to_owned(),
            "0666".to_owned(),
        ],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let status = kekd()
            .args(&args)
            .current_dir(dir.path())
            .stdout(writer.try_clone().unwrap())
            .stderr(writer)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(78), "{args:?}: {status:?}");
    }
}

// ------------------------------------------------------ skipped tests

/// Skips itself when `KEKD_TEST_FORCE_SKIP=1` (run by the test below);
/// otherwise does nothing.
#[test]
fn skip_helper_demo() {
    if std::env::var_os("KEKD_TEST_FORCE_SKIP").is_some_and(|v| v == "1") {
        common::skip::skip("a demonstration skip: nothing is missing");
    }
}

#[test]
fn a_skipped_test_is_named_in_one_line_at_the_end_of_the_run() {
    let run = |require_all: Option<&str>| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            &common::test_path(module_path!(), "skip_helper_demo"),
            "--exact",
            "--test-threads",
            "1",
        ])
        .env("KEKD_TEST_FORCE_SKIP", "1")
        .env_remove("KEKD_REQUIRE_ALL");
        if let Some(v) = require_all {
            cmd.env("KEKD_REQUIRE_ALL", v);
        }
        // Reads stderr to its end: past the exit of the test binary, until
        // the reporter it started has printed and closed it too.
        cmd.output().unwrap()
    };
    let binary = std::env::current_exe()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .rsplit_once('-')
        .unwrap()
        .0
        .to_owned();
    let line = format!(
        "*** SKIPPED 1 test(s) in {binary}: cli::skip_helper_demo (a demonstration skip: nothing is missing) — set \
         KEKD_REQUIRE_ALL=1 to make a skip a failure ***"
    );
    // Only "1" means required: any other value skips.
    for value in [None, Some("0"), Some("yes")] {
        let out = run(value);
        assert!(out.status.success(), "{value:?}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("test result: ok. 1 passed"), "{stdout}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("*** SKIPPED"))
            .collect();
        assert_eq!(lines, [line.as_str()], "{value:?}: {stderr}");
    }
    let out = run(Some("1"));
    assert!(!out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "a demonstration skip: nothing is missing (KEKD_REQUIRE_ALL=1 forbids skipping)"
        ),
        "{stdout}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("*** SKIPPED"));
}
