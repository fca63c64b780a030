//! Helpers shared by the integration tests: keyrings in tempdirs, the real
//! server in process on a real socket, the `kekd` binary as a child process,
//! an apiserver-rules checker ([`apiserver`]) and an independent wire client
//! ([`wire`]).
//!
//! The soak (`tests/soak.rs`) includes this module too, for a few helpers.
#![allow(unreachable_pub)]

pub mod apiserver;
mod outcome;
pub mod skip;
pub mod wire;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::{Mutex, MutexGuard, oneshot};
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use kekd::backend::local::LocalBackend;
use kekd::client::Client;
use kekd::config::{ServeConfig, Settings};
use kekd::id::Timestamp;
use kekd::keyring::store::{self, KeyringFile};
use kekd::server::{Server, ServerError};

/// Per-call timeout of test clients: generous, so a slow CI host does not
/// turn into a failure, while a hang still ends the test.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child process gets to answer Status or to exit.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(15);
/// Polling interval while waiting on a child process.
const POLL: Duration = Duration::from_millis(20);

/// `BoundSocket::bind` changes the process-wide umask around its bind. A
/// directory created by another test thread in that window would lose its
/// permission bits, and two binds interleaving could leave the umask changed
/// for good. Every in-process bind and every tempdir creation in a test
/// binary therefore holds this lock.
static FS_LOCK: Mutex<()> = Mutex::const_new(());

/// Holds [`FS_LOCK`] (async tests).
pub async fn fs_lock() -> MutexGuard<'static, ()> {
    FS_LOCK.lock().await
}

/// Holds [`FS_LOCK`] (plain `#[test]`s, outside any runtime).
pub fn fs_lock_blocking() -> MutexGuard<'static, ()> {
    FS_LOCK.blocking_lock()
}

/// A fresh directory with a short path, so socket paths inside it stay far
/// below the 107-byte limit.
pub async fn tempdir() -> TempDir {
    let _guard = fs_lock().await;
    make_tempdir()
}

/// [`tempdir`] outside a runtime.
pub fn tempdir_blocking() -> TempDir {
    let _guard = fs_lock_blocking();
    make_tempdir()
}

fn make_tempdir() -> TempDir {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    tempfile::Builder::new()
        .prefix("kekd-")
        .tempdir_in(base)
        .expect("create a tempdir")
}

/// Creates a new keyring at `path` through the library; returns its key_id
/// as the apiserver will see it for version 1.
pub fn create_keyring(path: &Path) -> String {
    let file = KeyringFile::generate(Timestamp::now()).expect("generate a keyring");
    store::create(path, &file).expect("write the keyring");
    format!("kekd/{}/v1", file.id)
}

/// The base64 KEKs (`kek=` fields) in a keyring file: strings that must
/// never appear in any output.
pub fn keks_in(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).expect("read the keyring");
    let keks: Vec<String> = text
        .split([' ', '\n'])
        .filter_map(|w| w.strip_prefix("kek="))
        .map(str::to_owned)
        .collect();
    assert!(
        !keks.is_empty(),
        "keyring {} holds no kek= field",
        path.display()
    );
    keks
}

/// Permission bits of `path` (not following a symlink).
pub fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A UUIDv4-shaped uid, as the apiserver sends with every Encrypt/Decrypt.
pub fn uid(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// 32 random bytes: what the apiserver asks to wrap.
pub fn seed() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    getrandom(&mut s);
    s
}

/// Fills `buf` from the kernel's RNG (no extra dev-dependency needed).
pub fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}

/// Connects a kekd client to `socket`.
pub async fn connect(socket: &Path) -> Client {
    Client::connect(socket, CALL_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
}

/// The real server, in this process, on a socket in its own tempdir.
pub struct TestServer {
    /// Holds the keyring and the socket.
    pub dir: TempDir,
    /// The socket.
    pub socket: PathBuf,
    /// The keyring file.
    pub keyring: PathBuf,
    /// The key_id version 1 of the keyring has (from the file).
    pub key_id: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// A server with default settings over a fresh keyring.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server whose settings `adjust` may change before they are resolved.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempdir().await;
        let keyring = dir.path().join("keyring");
        let key_id = create_keyring(&keyring);
        let socket = dir.path().join("kms.sock");
        let mut settings = Settings {
            keyring: Some(keyring.clone()),
            socket: Some(socket.clone()),
            ..Settings::default()
        };
        adjust(&mut settings);
        let socket = settings.socket.clone().expect("a socket path");
        let config = ServeConfig::resolve(settings).expect("valid settings");
        let server = {
            let _guard = fs_lock().await;
            Server::start(config, Arc::new(LocalBackend::new(&keyring)))
                .await
                .expect("server starts")
        };
        assert_eq!(server.socket_path(), socket);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Self {
            dir,
            socket,
            keyring,
            key_id,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A client on a connection of its own.
    pub async fn client(&self) -> Client {
        connect(&self.socket).await
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(PROCESS_TIMEOUT, task)
            .await
            .expect("server stops within the timeout")
            .expect("server task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The name libtest knows test `name` by, when it is defined in module
/// `module` (pass `module_path!()`): for running that one test again in a
/// child process of this binary with `--exact`.
pub fn test_path(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{name}"),
        None => name.to_owned(),
    }
}

/// The kekd binary under test: this build's, or the one `KEKD_TEST_BIN`
/// names (`.ci/run` points it at the release build for the memory scan of
/// `tests/integration/secrets.rs`, whose result depends on the optimizer).
pub fn kekd_bin() -> PathBuf {
    std::env::var_os("KEKD_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kekd")))
}

/// `kekd` with no `KEKD_*` variable inherited from the environment.
pub fn kekd() -> Command {
    let mut cmd = Command::new(kekd_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEKD_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd
}

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The exit code; panics (with the output) if a signal ended the process.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:#?}"))
    }
}

/// Runs `cmd` to completion (a command that serves by mistake is killed
/// after [`PROCESS_TIMEOUT`] and fails the test).
pub fn run(cmd: Command, logs: &Path) -> Finished {
    let mut process = Process::spawn(cmd, Path::new("/nonexistent"), logs);
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        if let Some(status) = process.try_exit() {
            return process.finished(status);
        }
        assert!(
            Instant::now() < deadline,
            "kekd did not exit within {PROCESS_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
            process.stdout(),
            process.stderr()
        );
        std::thread::sleep(POLL);
    }
}

/// A `kekd` child process whose stdout and stderr go to files.
pub struct Process {
    child: Option<Child>,
    /// Where it serves.
    pub socket: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    /// Spawns `cmd`; output goes to files in `logs`.
    pub fn spawn(mut cmd: Command, socket: &Path, logs: &Path) -> Self {
        let stdout = logs.join(format!("stdout-{}", next_id()));
        let stderr = logs.join(format!("stderr-{}", next_id()));
        let child = cmd
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn kekd");
        Self {
            child: Some(child),
            socket: socket.to_owned(),
            stdout,
            stderr,
        }
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether it has exited (and how), without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("child")
            .try_wait()
            .expect("try_wait")
    }

    /// Polls until the socket answers a healthy Status; returns a client.
    /// Panics with the process's output if it exits or the time runs out.
    pub async fn ready(&mut self) -> Client {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let mut last = String::from("never tried");
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "kekd exited with {status} before answering Status\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            if self.socket.exists() {
                match Client::connect(&self.socket, CALL_TIMEOUT).await {
                    Ok(mut client) => match client.status().await {
                        Ok(s) if s.healthz == "ok" => return client,
                        Ok(s) => last = format!("unhealthy Status {s:?}"),
                        Err(e) => last = format!("Status failed: {e}"),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            assert!(
                Instant::now() < deadline,
                "kekd did not answer Status on {} within {PROCESS_TIMEOUT:?} ({last})\nstderr:\n{}",
                self.socket.display(),
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let child = self.child.as_ref().expect("child");
        rustix::process::kill_process(rustix::process::Pid::from_child(child), signal)
            .expect("signal kekd");
    }

    /// Waits until it exits; panics after [`PROCESS_TIMEOUT`].
    pub async fn wait_exit(mut self) -> Finished {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let status = loop {
            if let Some(status) = self.try_exit() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "kekd did not exit within {PROCESS_TIMEOUT:?}\nstderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        };
        self.finished(status)
    }

    fn finished(&mut self, status: ExitStatus) -> Finished {
        self.child = None;
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// Polls stderr until it contains `needle`; panics after [`PROCESS_TIMEOUT`].
    pub async fn wait_for_stderr(&self, needle: &str) {
        self.wait_for_stderr_count(needle, 1).await;
    }

    /// How many times stderr contains `needle` so far.
    pub fn stderr_count(&self, needle: &str) -> usize {
        self.stderr().matches(needle).count()
    }

    /// Polls stderr until it contains `needle` at least `count` times: an
    /// event kekd logs, counted. Panics after [`PROCESS_TIMEOUT`], which
    /// only guards against a hang.
    pub async fn wait_for_stderr_count(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            let seen = self.stderr_count(needle);
            if seen >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kekd logged {needle:?} {seen} time(s), never {count}\nstderr:\n{}",
                log_excerpt(&self.stderr())
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Only the child this helper started, by its own handle.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn next_id() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ------------------------------------------ rotation, admin and multi-node

/// Exit code of an admin command another admin command kept locked out.
pub const EX_TEMPFAIL: i32 = 75;
/// Exit code of a keyring or configuration problem.
pub const EX_CONFIG: i32 = 78;
/// Exit code of a command-line usage error.
pub const EX_USAGE: i32 = 64;

/// [`run`], but spawned while holding [`FS_LOCK`], so the child never
/// inherits the narrowed umask of an in-process bind running on another
/// thread. Call it outside any runtime (a plain `#[test]` or
/// `spawn_blocking`).
pub fn run_guarded(cmd: Command, logs: &Path) -> Finished {
    let mut process = {
        let _guard = fs_lock_blocking();
        Process::spawn(cmd, Path::new("/nonexistent"), logs)
    };
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        if let Some(status) = process.try_exit() {
            return process.finished(status);
        }
        assert!(
            Instant::now() < deadline,
            "kekd did not exit within {PROCESS_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
            process.stdout(),
            process.stderr()
        );
        std::thread::sleep(POLL);
    }
}

/// `kekd admin ARGS…`, run to completion (outside any runtime).
pub fn admin(args: &[&str], logs: &Path) -> Finished {
    let mut cmd = kekd();
    cmd.arg("admin").args(args);
    run_guarded(cmd, logs)
}

/// [`admin`] from async code, without blocking a runtime worker (an
/// in-process server may need it).
pub async fn admin_async(args: &[&str], logs: &Path) -> Finished {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let logs = logs.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        admin(&args, &logs)
    })
    .await
    .expect("admin task")
}

/// `kekd serve --keyring K --socket S --reload-interval 200ms EXTRA…`.
pub async fn spawn_serve(keyring: &Path, socket: &Path, logs: &Path, extra: &[&str]) -> Process {
    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(keyring)
        .arg("--socket")
        .arg(socket)
        .args(["--reload-interval", "200ms"])
        .args(extra);
    let _guard = fs_lock().await;
    Process::spawn(cmd, socket, logs)
}

/// The message of the one `kekd: error: …` line on stderr.
#[track_caller]
pub fn error_message(out: &Finished) -> &str {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("kekd: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one `kekd: error:` line: {out:#?}");
    lines[0]
}

/// stdout parsed as one JSON document.
#[track_caller]
pub fn json_of(out: &Finished) -> serde_json::Value {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {out:#?}"))
}

/// The version number at the end of a key id `kekd/<id>/vN`.
#[track_caller]
pub fn version_of(key_id: &str) -> u32 {
    key_id
        .rsplit_once("/v")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("not a kekd key id: {key_id:?}"))
}

/// The key version in an envelope's header (bytes 1..5, big-endian).
#[track_caller]
pub fn header_version(ciphertext: &[u8]) -> u32 {
    assert!(ciphertext.len() > 5, "ciphertext too short: {ciphertext:?}");
    u32::from_be_bytes(ciphertext[1..5].try_into().unwrap())
}

/// Polls `check` every 25 ms until it returns `Some`; panics naming `what`
/// (and the last state `check` described) after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A small deterministic PRNG (xorshift64*), seeded from the OS and printed
/// by the tests that use it so a failure can be replayed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from /dev/urandom.
    pub fn from_os() -> Self {
        let mut b = [0u8; 8];
        getrandom(&mut b);
        Self::seeded(u64::from_le_bytes(b))
    }

    /// Seeded with `seed` (0 is mapped to a fixed non-zero seed).
    pub fn seeded(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The seed to replay this generator's current state.
    pub fn state(&self) -> u64 {
        self.0
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

// ------------------------------------------- the API as the apiserver sees it

/// The one message of every Decrypt that authentication refuses: it never
/// says whether the key, the tag or the AAD was wrong.
pub const OPAQUE: &str = "ciphertext could not be decrypted";
/// The message of a Decrypt under a key_id this keyring never issued.
pub const NOT_OURS: &str = "key_id was not issued by this keyring";

/// The annotations kekd issues, and so the ones a Decrypt carries: none.
pub fn no_annotations() -> std::collections::HashMap<String, Vec<u8>> {
    std::collections::HashMap::new()
}

/// Asserts that a call was refused with `code` and exactly `message`.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} {message:?}, got a success: {v:?}"),
        Err(status) => assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "wrong refusal"
        ),
    }
}

/// The 32-hex keyring id inside a key_id `kekd/<id>/v<N>`, checking the
/// whole shape on the way: lowercase hex, a version without sign or
/// leading zero that fits a u32.
#[track_caller]
pub fn keyring_id_of(key_id: &str) -> String {
    let parts: Vec<&str> = key_id.split('/').collect();
    assert!(
        parts.len() == 3
            && parts[0] == "kekd"
            && parts[1].len() == 32
            && parts[1]
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            && parts[2].strip_prefix('v').is_some_and(|v| {
                !v.is_empty()
                    && !v.starts_with('0')
                    && v.bytes().all(|c| c.is_ascii_digit())
                    && v.parse::<u32>().is_ok()
            }),
        "key_id {key_id:?} is not kekd/<32 lowercase hex>/v<N>"
    );
    parts[1].to_owned()
}

/// kekd's log without cryptoki's mechanism-list noise, each message once
/// (timestamps dropped), at most the last 30 lines: for failure messages.
pub fn log_excerpt(log: &str) -> String {
    let mut seen = std::collections::HashSet::new();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("Mechanism type"))
        .filter(|l| seen.insert(l.split_once(' ').map_or(*l, |(_, rest)| rest)))
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Flips every bit of `enc`'s ciphertext, one at a time, and asserts each
/// flip is refused with exactly the message the envelope layer defines:
/// structural errors for the format byte and version, the one opaque
/// message for nonce, body and tag (the contract's
/// `decrypt_refuses_every_single_bit_flip`, run against every backend).
#[allow(dead_code)]
pub async fn assert_every_bit_flip_refused(
    client: &mut kekd::client::Client,
    enc: &kekd::client::EncryptReply,
    seed: &[u8],
) {
    let ct = &enc.ciphertext;
    let tag_start = ct.len() - 16;
    for i in 0..ct.len() {
        for bit in 0..8 {
            let mut tampered = ct.clone();
            tampered[i] ^= 1 << bit;
            let expected = match i {
                0 => format!(
                    "malformed ciphertext: ciphertext has unknown format byte {:#04x} (this kekd reads format 0x01)",
                    tampered[0]
                ),
                1..=4 => match u32::from_be_bytes(tampered[1..5].try_into().unwrap()) {
                    0 => "malformed ciphertext: ciphertext names key version 0, which is never assigned"
                        .to_owned(),
                    v => format!("key_id names version 1 but the ciphertext header names version {v}"),
                },
                // Nonce (5..17), sealed body (17..tag_start), tag (tag_start..).
                _ => OPAQUE.to_owned(),
            };
            let region = match i {
                0 => "format",
                1..=4 => "version",
                5..=16 => "nonce",
                _ if i < tag_start => "body",
                _ => "tag",
            };
            match client
                .decrypt(
                    tampered,
                    &enc.key_id,
                    std::collections::HashMap::new(),
                    &uid(i * 8 + bit),
                )
                .await
            {
                Ok(p) => panic!(
                    "flip of bit {bit} in byte {i} ({region}) decrypted (to the seed: {})",
                    p == seed
                ),
                Err(status) => assert_eq!(
                    (status.code(), status.message()),
                    (tonic::Code::InvalidArgument, expected.as_str()),
                    "flip of bit {bit} in byte {i} ({region})"
                ),
            }
        }
    }
}

/// Where grpcurl is: `$KEKD_GRPCURL`, `grpcurl` on PATH, or `go install`'s
/// `~/go/bin/grpcurl` (`.ci/run` installs it there).
pub fn grpcurl_path() -> Option<PathBuf> {
    std::env::var_os("KEKD_GRPCURL")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join("grpcurl"))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            let p = Path::new(&std::env::var_os("HOME")?).join("go/bin/grpcurl");
            p.is_file().then_some(p)
        })
}
