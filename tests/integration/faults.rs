//! Filesystem faults, crashes and corrupt files, against real
//! `kekd` processes while a real `kekd serve` keeps serving:
//!
//! - **Disk full**: the keyring on a tiny tmpfs filled to the last block;
//!   `rotate`, `backup`, `import` and `restore-backup` fail with the exact
//!   ENOSPC message, leave the keyring and its audit log byte-identical and
//!   no temp file behind, and kekd keeps decrypting. The same through
//!   `strace -e inject=write:error=ENOSPC` on each write of the path.
//! - **I/O errors** on every syscall of the durable write (`openat` of the
//!   temp file, `write`, `fsync`, `rename`, `linkat`, `unlink`, the
//!   directory's `fsync`, the audit log), found from a trace, injected with
//!   `strace -e inject=SYSCALL:error=EIO:when=N`: each gives its precise
//!   error, and the keyring is the old one or the new one.
//! - **A kill at every syscall** of `rotate --promote` and of `init`
//!   (`strace -e inject=NAME:signal=KILL:when=K` for every (name, K) of a
//!   trace, so every position is hit once): the keyring loads and is exactly
//!   the old or the new state, a re-run completes (the kernel drops a dead
//!   process's `flock`), temp files go with the next command, and the
//!   server never serves a key id older than one it served.
//! - **Corrupt keyring and backup files**: truncated at every length, a bit
//!   flipped at every position, wrong magic and version, bad checksum,
//!   duplicate versions, CRLF, empty, a directory, loose permissions,
//!   symlinks (dangling, looping): `serve` and every admin command refuse
//!   with the exit code and the message the parser defines, and the file
//!   stays byte-identical — no key is ever generated in its place.
//!
//! Needs `strace` and root (for `mount -t tmpfs`). Without them the suites
//! print SKIPPED, unless `KEKD_REQUIRE_ALL=1`, which makes them fail.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use kekd::client::{Client, EncryptReply};
use kekd::keyring::KeyState;
use kekd::keyring::store::{self, KeyringFile};

use common::{
    EX_CONFIG, Finished, Process, Rng, error_message, eventually, kekd, keks_in, run_guarded, seed,
    spawn_serve, tempdir_blocking, uid, version_of,
};

const PASS: &str = "tr0ub4dor & three staples";
const ENOSPC: &str = "No space left on device (os error 28)";
const EIO: &str = "Input/output error (os error 5)";
const WAIT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------- tools

/// `true` when `ok`; otherwise SKIPPED (or a failure under
/// `KEKD_REQUIRE_ALL=1`) naming what to install.
fn available(what: &str, ok: bool, fix: &str) -> bool {
    if ok {
        return true;
    }
    common::skip::skip(&format!("{what} is not available: {fix}"));
    false
}

/// strace is installed and may trace children here.
fn have_strace() -> bool {
    available(
        "strace",
        Command::new("strace")
            .args(["-f", "-o", "/dev/null", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "apt-get install -y strace, and allow ptrace",
    )
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Option<Self> {
        fs::create_dir(&dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        available(
            "mounting a tmpfs",
            ok,
            "run the tests as root (CI does), so `mount -t tmpfs` works",
        )
        .then_some(Self { dir })
    }

    /// Fills the file system with `filler` until a write fails with ENOSPC.
    fn fill(&self) -> PathBuf {
        let filler = self.dir.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
        // Single bytes into any partial block left.
        while f.write(&[0]).is_ok_and(|n| n == 1) {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// `strace -f -y -o TRACE -e inject=INJECT kekd admin ARGS…`, with no
/// `KEKD_*` variable inherited (as [`kekd`]).
fn traced(trace: &Path, inject: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-y", "-o"]).arg(trace);
    if let Some(inject) = inject {
        cmd.args(["-e", &format!("inject={inject}")]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_kekd")).arg("admin").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEKD_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd
}

/// The syscalls of a `strace -f` trace, in order, each with its invocation
/// number among calls of the same name (what `inject=NAME:when=K` counts),
/// and the line.
fn syscalls(trace: &str) -> Vec<(String, usize, String)> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        let Some((_pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let Some(open) = rest.find('(') else { continue };
        let name = &rest[..open];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue; // `+++ exited`, `--- SIG… ---`, `<... resumed>`
        }
        let k = seen.entry(name.to_owned()).or_default();
        *k += 1;
        out.push((name.to_owned(), *k, line.to_owned()));
    }
    out
}

fn killed(status: ExitStatus) -> bool {
    status.signal() == Some(9) || status.code() == Some(128 + 9)
}

/// Names of temp files a keyring writer leaves when it dies.
fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // The server's usage file (every few seconds) and its served-keyring
        // record (after a reload) are written the same way, by the server.
        .filter(|n| {
            n.contains(".tmp-") && !n.contains(".usage.json.tmp-") && !n.contains(".served.tmp-")
        })
        .collect()
}

/// Writes a 0600 file.
fn write_private(path: &Path, bytes: &[u8]) {
    let _ = fs::remove_file(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ------------------------------------------------------- a serving node

/// A keyring served by a real `kekd serve`, with ciphertexts sealed at the
/// start that must decrypt after every fault.
struct Node {
    rt: tokio::runtime::Runtime,
    dir: TempDir,
    keyring: PathBuf,
    logs: PathBuf,
    server: Option<Process>,
    client: Option<Client>,
    sealed: Vec<(EncryptReply, Vec<u8>)>,
    /// The highest key version Status has reported.
    served: u32,
}

impl Node {
    /// `kekd admin init` at `keyring` (default: in the node's tempdir), then
    /// serve it and seal three seeds.
    fn start(keyring: Option<PathBuf>) -> Self {
        Self::start_with(keyring, &[])
    }

    /// [`Node::start`], with `extra` flags for `kekd serve`.
    fn start_with(keyring: Option<PathBuf>, extra: &[&str]) -> Self {
        let rt = runtime();
        let dir = tempdir_blocking();
        let logs = dir.path().join("logs");
        fs::create_dir(&logs).unwrap();
        let keyring = keyring.unwrap_or_else(|| dir.path().join("keyring"));
        let out = common::admin(&["init", "--keyring", keyring.to_str().unwrap()], &logs);
        out.ok();
        let socket = dir.path().join("kms.sock");
        let mut server = rt.block_on(spawn_serve(&keyring, &socket, &logs, extra));
        let mut client = rt.block_on(server.ready());
        let sealed = rt.block_on(async {
            let mut v = Vec::new();
            for i in 0..3 {
                let s = seed();
                v.push((client.encrypt(s.clone(), &uid(i)).await.unwrap(), s));
            }
            v
        });
        Self {
            rt,
            dir,
            keyring,
            logs,
            server: Some(server),
            client: Some(client),
            sealed,
            served: 1,
        }
    }

    fn k(&self) -> &str {
        self.keyring.to_str().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.keyring).unwrap()
    }

    /// The admin commands' lines of the audit log (the server adds its
    /// own key events to the same file whenever it reloads).
    fn audit(&self) -> Vec<u8> {
        let text = fs::read_to_string(kekd::file::sibling(&self.keyring, ".audit.jsonl"))
            .unwrap_or_default();
        text.lines()
            .filter(|l| !l.contains(r#""source":"server""#))
            .flat_map(|l| [l.as_bytes(), b"\n"].concat())
            .collect()
    }

    /// `kekd admin ARGS… --keyring K`.
    fn admin(&self, args: &[&str]) -> Finished {
        let mut all = args.to_vec();
        all.extend(["--keyring", self.k()]);
        common::admin(&all, &self.logs)
    }

    /// Status answers healthy with a key id whose version never goes back,
    /// and every ciphertext sealed at the start decrypts. Returns the
    /// version Status reports.
    #[track_caller]
    fn assert_serves(&mut self, what: &str) -> u32 {
        let client = self.client.clone().unwrap();
        let sealed = self.sealed.clone();
        let version = self.rt.block_on(async move {
            let mut c = client;
            let status = c
                .status()
                .await
                .unwrap_or_else(|e| panic!("{what}: Status: {e}"));
            assert_eq!(status.healthz, "ok", "{what}");
            for (i, (r, s)) in sealed.iter().enumerate() {
                let p = c
                    .decrypt(
                        r.ciphertext.clone(),
                        &r.key_id,
                        HashMap::new(),
                        &uid(100 + i),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{what}: ciphertext {i} no longer decrypts: {e}"));
                assert_eq!(&p, s, "{what}: ciphertext {i}");
            }
            version_of(&status.key_id)
        });
        assert!(
            version >= self.served,
            "{what}: Status went back from v{} to v{version}",
            self.served
        );
        self.served = version;
        version
    }

    /// Waits until the server logs a line containing `needle`; returns it.
    fn wait_for_log(&self, needle: &str) -> String {
        let server = self.server.as_ref().unwrap();
        self.rt.block_on(server.wait_for_stderr(needle));
        let log = server.stderr();
        log.lines().find(|l| l.contains(needle)).unwrap().to_owned()
    }

    /// Waits until Status reports `version`.
    fn wait_for_version(&mut self, version: u32) {
        let client = self.client.clone().unwrap();
        self.rt.block_on(eventually(
            &format!("Status reports v{version}"),
            WAIT,
            || {
                let mut c = client.clone();
                async move {
                    let id = c.status().await.map_err(|e| e.to_string())?.key_id;
                    if version_of(&id) == version {
                        Ok(())
                    } else {
                        Err(id)
                    }
                }
            },
        ));
        self.assert_serves(&format!("at v{version}"));
    }

    /// Stops the server: it must exit 0 and never have refused a keyring
    /// (it never saw a half-written one).
    fn stop(&mut self) {
        let server = self.server.take().unwrap();
        server.signal(rustix::process::Signal::TERM);
        let out = self.rt.block_on(server.wait_exit());
        out.ok();
        assert!(
            !out.stderr.contains("keyring change refused"),
            "the server saw a damaged keyring: {}",
            out.stderr
        );
    }
}

/// The keyring's versions as (number, state).
fn states(file: &KeyringFile) -> Vec<(u32, KeyState)> {
    file.versions
        .iter()
        .map(|v| (v.info.version.get(), v.info.state))
        .collect()
}

// ------------------------------------------------------------ disk full

#[test]
fn a_full_disk_fails_every_keyring_write_cleanly_and_kekd_keeps_serving() {
    let scratch = tempdir_blocking();
    let Some(small) = Tmpfs::mount(scratch.path().join("small"), "256k") else {
        return;
    };
    // The usage file is written every 100 ms while it changes, so its
    // failure on the full disk shows at once.
    let mut node = Node::start_with(
        Some(small.dir.join("keyring")),
        &["--usage-flush-interval", "100ms"],
    );
    let k = node.k().to_owned();

    // A successor of this keyring (one more version) as a copy and as a
    // backup, both outside the small file system.
    let copy = node.path("copy");
    write_private(&copy, &node.bytes());
    let copy_s = copy.to_str().unwrap();
    let out = common::admin(&["rotate", "--keyring", copy_s], &node.logs);
    out.ok();
    let pass = node.path("pass");
    write_private(&pass, format!("{PASS}\n").as_bytes());
    let pass_s = pass.to_str().unwrap().to_owned();
    let backup = node.path("copy.backup");
    let out = common::admin(
        &[
            "backup",
            "--keyring",
            copy_s,
            "--out",
            backup.to_str().unwrap(),
            "--passphrase-file",
            &pass_s,
        ],
        &node.logs,
    );
    out.ok();

    let filler = small.fill();
    let listing = || {
        let mut names: Vec<String> = fs::read_dir(&small.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            // The server's own usage writes come and go.
            .filter(|n| !n.starts_with(".keyring.usage.json.tmp-"))
            .collect();
        names.sort();
        names
    };
    let (before, audit, files) = (node.bytes(), node.audit(), listing());
    let in_small = small.dir.join("backup");
    let keyring_full = format!("keyring {k}: cannot write the temporary file: {ENOSPC}");
    let cases: [(Vec<&str>, String); 5] = [
        (vec!["rotate"], keyring_full.clone()),
        (vec!["rotate", "--promote"], keyring_full.clone()),
        (
            vec![
                "backup",
                "--out",
                in_small.to_str().unwrap(),
                "--passphrase-file",
                &pass_s,
            ],
            format!(
                "backup {}: cannot write the temporary file: {ENOSPC}",
                in_small.display()
            ),
        ),
        (vec!["import", "--from", copy_s], keyring_full.clone()),
        (
            vec![
                "restore-backup",
                "--from",
                backup.to_str().unwrap(),
                "--passphrase-file",
                &pass_s,
            ],
            keyring_full.clone(),
        ),
    ];
    for (args, message) in &cases {
        let out = node.admin(args);
        assert_eq!(
            (out.code(), error_message(&out)),
            (1, message.as_str()),
            "{args:?}: {out:#?}"
        );
        assert_eq!(node.bytes(), before, "{args:?} changed the keyring");
        assert_eq!(node.audit(), audit, "{args:?} wrote an audit line");
        assert_eq!(listing(), files, "{args:?} left a file behind");
        for kek in keks_in(&node.keyring) {
            assert!(!out.stderr.contains(&kek) && !out.stdout.contains(&kek));
        }
        node.assert_serves(&format!("{args:?} on a full disk"));
    }
    // A new keyring cannot be created either, and nothing of it is left.
    let other = small.dir.join("other");
    let out = common::admin(&["init", "--keyring", other.to_str().unwrap()], &node.logs);
    assert_eq!(
        (out.code(), error_message(&out)),
        (
            1,
            format!(
                "keyring {}: cannot write the temporary file: {ENOSPC}",
                other.display()
            )
            .as_str()
        ),
        "{out:#?}"
    );
    assert!(!other.exists());
    assert_eq!(temp_files(&small.dir), Vec::<String>::new());
    // kekd's own usage file cannot be written either (each case's calls
    // changed the counters): the flush says so, and kekd keeps serving.
    let failed = node.wait_for_log("could not write usage counters; will retry");
    assert!(failed.contains(ENOSPC), "{failed}");
    node.assert_serves("after a usage flush on a full disk");

    // Space again: the same commands go through.
    fs::remove_file(filler).unwrap();
    let out = node.admin(&["import", "--from", copy_s]);
    out.ok();
    let out = node.admin(&[
        "restore-backup",
        "--from",
        backup.to_str().unwrap(),
        "--passphrase-file",
        &pass_s,
    ]);
    out.ok();
    assert!(out.stdout.contains("nothing to do"), "{out:#?}");
    let out = node.admin(&["rotate", "--promote"]);
    out.ok();
    node.wait_for_version(2);
    assert_eq!(temp_files(&small.dir), Vec::<String>::new());
    // The flush that failed goes through again by itself.
    node.wait_for_log("usage counters written again");
    node.stop();
}

/// Each `write` of `rotate` fails with ENOSPC in turn: the temp file's
/// (nothing changes) and the audit log's (the keyring changed; the error
/// says the log could not be written).
#[test]
fn enospc_injected_into_each_write_of_an_admin_command() {
    if !have_strace() {
        return;
    }
    let mut node = Node::start(None);
    let k = node.k().to_owned();
    let pass = node.path("pass");
    write_private(&pass, format!("{PASS}\n").as_bytes());
    let pass_s = pass.to_str().unwrap().to_owned();
    let trace = node.path("trace");

    // rotate: write #1 is the temp file.
    let (before, audit) = (node.bytes(), node.audit());
    let out = run_guarded(
        traced(
            &trace,
            Some("write:error=ENOSPC:when=1"),
            &["rotate", "--keyring", &k],
        ),
        &node.logs,
    );
    let injected: Vec<String> = fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| l.contains("(INJECTED)"))
        .map(str::to_owned)
        .collect();
    assert_eq!(injected.len(), 1, "{injected:#?}");
    assert!(injected[0].contains(".keyring.tmp-"), "{injected:#?}");
    assert_eq!(
        (out.code(), error_message(&out)),
        (
            1,
            format!("keyring {k}: cannot write the temporary file: {ENOSPC}").as_str()
        )
    );
    assert_eq!(
        (node.bytes(), node.audit()),
        (before.clone(), audit.clone())
    );
    assert_eq!(temp_files(node.dir.path()), Vec::<String>::new());
    node.assert_serves("ENOSPC on the temp file");

    // rotate: write #2 is the audit log, after the rename.
    let out = run_guarded(
        traced(
            &trace,
            Some("write:error=ENOSPC:when=2"),
            &["rotate", "--keyring", &k],
        ),
        &node.logs,
    );
    let trace_text = fs::read_to_string(&trace).unwrap();
    assert!(
        trace_text
            .lines()
            .any(|l| l.contains("(INJECTED)") && l.contains("keyring.audit.jsonl")),
        "{trace_text}"
    );
    assert_eq!(
        (out.code(), error_message(&out)),
        (
            1,
            format!(
                "the keyring was changed, but its audit log {k}.audit.jsonl could not be written: {ENOSPC}"
            )
            .as_str()
        )
    );
    assert!(
        out.stdout.starts_with("rotate: version 2 new → pending"),
        "{out:#?}"
    );
    let after = store::read(&node.keyring).unwrap();
    assert_eq!(
        states(&after),
        [(1, KeyState::Primary), (2, KeyState::Pending)]
    );
    assert_eq!(node.audit(), audit, "nothing was appended");
    node.assert_serves("ENOSPC on the audit log");

    // backup: write #1 is the backup's temp file.
    let out_file = node.path("b");
    let out = run_guarded(
        traced(
            &trace,
            Some("write:error=ENOSPC:when=1"),
            &[
                "backup",
                "--keyring",
                &k,
                "--out",
                out_file.to_str().unwrap(),
                "--passphrase-file",
                &pass_s,
            ],
        ),
        &node.logs,
    );
    assert_eq!(
        (out.code(), error_message(&out)),
        (
            1,
            format!(
                "backup {}: cannot write the temporary file: {ENOSPC}",
                out_file.display()
            )
            .as_str()
        )
    );
    assert!(!out_file.exists());
    assert_eq!(temp_files(node.dir.path()), Vec::<String>::new());

    // import and restore-backup of a successor: write #1 is the keyring's
    // temp file.
    let copy = node.path("copy");
    write_private(&copy, &node.bytes());
    let out = common::admin(
        &["promote", "2", "--keyring", copy.to_str().unwrap()],
        &node.logs,
    );
    out.ok();
    let backup = node.path("copy.backup");
    let out = common::admin(
        &[
            "backup",
            "--keyring",
            copy.to_str().unwrap(),
            "--out",
            backup.to_str().unwrap(),
            "--passphrase-file",
            &pass_s,
        ],
        &node.logs,
    );
    out.ok();
    let before = node.bytes();
    let audit = node.audit();
    for args in [
        vec!["import", "--keyring", &k, "--from", copy.to_str().unwrap()],
        vec![
            "restore-backup",
            "--keyring",
            &k,
            "--from",
            backup.to_str().unwrap(),
            "--passphrase-file",
            &pass_s,
        ],
    ] {
        let out = run_guarded(
            traced(&trace, Some("write:error=ENOSPC:when=1"), &args),
            &node.logs,
        );
        assert_eq!(
            (out.code(), error_message(&out)),
            (
                1,
                format!("keyring {k}: cannot write the temporary file: {ENOSPC}").as_str()
            ),
            "{args:?}"
        );
        assert_eq!(
            (node.bytes(), node.audit()),
            (before.clone(), audit.clone()),
            "{args:?}"
        );
        assert_eq!(
            temp_files(node.dir.path()),
            Vec::<String>::new(),
            "{args:?}"
        );
        node.assert_serves(&format!("ENOSPC during {}", args[0]));
    }
    node.stop();
}

// ------------------------------------------------------------ I/O errors

/// What an EIO at one syscall of the write path must do.
struct Eio {
    /// `strace -e inject=` set (several names where architectures differ).
    syscalls: &'static str,
    /// Which invocation, found from the trace: the first whose line
    /// contains this.
    marker: &'static str,
    /// The exact error, `{k}` standing for the keyring path.
    message: &'static str,
    /// Whether the keyring is the new one afterwards.
    changed: bool,
}

/// Every syscall `rotate` makes on the way from the temp file to the audit
/// log, each failing with EIO in turn.
#[test]
fn eio_at_each_syscall_of_the_durable_write_gives_its_error_and_never_a_broken_keyring() {
    if !have_strace() {
        return;
    }
    let mut node = Node::start(None);
    let k = node.k().to_owned();
    let trace = node.path("trace");
    let cases = [
        Eio {
            syscalls: "openat",
            marker: ".keyring.tmp-",
            message: "keyring {k}: cannot create a temporary file beside it: Input/output error (os error 5)",
            changed: false,
        },
        Eio {
            syscalls: "write",
            marker: ".keyring.tmp-",
            message: "keyring {k}: cannot write the temporary file: Input/output error (os error 5)",
            changed: false,
        },
        Eio {
            syscalls: "fsync,fdatasync",
            marker: ".keyring.tmp-",
            message: "keyring {k}: cannot fsync the temporary file: Input/output error (os error 5)",
            changed: false,
        },
        Eio {
            syscalls: "rename,renameat,renameat2",
            marker: ".keyring.tmp-",
            message: "keyring {k}: cannot rename the temporary file into place: Input/output error (os error 5)",
            changed: false,
        },
        // After the rename the new keyring is in place: the error says so,
        // and the change is audited.
        Eio {
            syscalls: "fsync,fdatasync",
            marker: "<DIR>",
            message: "{k} was replaced, but its directory could not be fsynced (Input/output error (os error 5)): \
                      the change is in effect now but may not survive a power failure; run `sync`, then check the \
                      file (`kekd admin list`)",
            changed: true,
        },
        Eio {
            syscalls: "fsync,fdatasync",
            marker: "keyring.audit.jsonl",
            message: "the keyring was changed, but its audit log {k}.audit.jsonl could not be written: \
                      Input/output error (os error 5)",
            changed: true,
        },
    ];
    let dir_name = node.dir.path().to_str().unwrap().to_owned();
    for case in &cases {
        // Where the marked call is, from a trace of the same command on a
        // scratch copy in the same directory layout.
        let scratch = tempdir_blocking();
        let scratch_ring = scratch.path().join("keyring");
        write_private(&scratch_ring, &node.bytes());
        let out = run_guarded(
            traced(
                &trace,
                None,
                &[
                    "rotate",
                    "--promote",
                    "--keyring",
                    scratch_ring.to_str().unwrap(),
                ],
            ),
            &node.logs,
        );
        out.ok();
        let calls = syscalls(&fs::read_to_string(&trace).unwrap());
        let names: Vec<&str> = case.syscalls.split(',').collect();
        let scratch_dir = format!("<{}>", scratch.path().display());
        let (name, when, line) = calls
            .iter()
            .find(|(n, _, l)| {
                names.contains(&n.as_str())
                    && if case.marker == "<DIR>" {
                        l.contains(&scratch_dir) && !l.contains("keyring")
                    } else {
                        l.contains(case.marker)
                    }
            })
            .unwrap_or_else(|| panic!("no {} call on {} in the trace", case.syscalls, case.marker));
        let what = format!("EIO at {name} #{when} ({line})");

        let (before, audit) = (node.bytes(), node.audit());
        let old = store::read(&node.keyring).unwrap();
        let out = run_guarded(
            traced(
                &trace,
                Some(&format!("{name}:error=EIO:when={when}")),
                &["rotate", "--promote", "--keyring", &k],
            ),
            &node.logs,
        );
        let trace_text = fs::read_to_string(&trace).unwrap();
        let hit: Vec<&str> = trace_text
            .lines()
            .filter(|l| l.contains("(INJECTED)"))
            .collect();
        assert_eq!(hit.len(), 1, "{what}: {hit:#?}");
        if case.marker == "<DIR>" {
            assert!(
                hit[0].contains(&format!("<{dir_name}>")),
                "{what}: {hit:#?}"
            );
        } else {
            assert!(hit[0].contains(case.marker), "{what}: {hit:#?}");
        }
        assert_eq!(
            (out.code(), error_message(&out)),
            (1, case.message.replace("{k}", &k).as_str()),
            "{what}"
        );
        let after = store::read(&node.keyring).unwrap_or_else(|e| panic!("{what}: {e}"));
        if case.changed {
            let primary = old.primary().unwrap().get() + 1;
            assert_eq!(after.primary().unwrap().get(), primary, "{what}");
            assert_eq!(after.versions.len(), old.versions.len() + 1, "{what}");
            let lines = String::from_utf8(node.audit()[audit.len()..].to_vec()).unwrap();
            // Audited either way: after a failed directory fsync because
            // the change is in effect; a failed fsync of the log itself
            // comes after its write.
            assert_eq!(lines.lines().count(), 3, "{what}: {lines}");
            node.wait_for_version(primary);
        } else {
            assert_eq!((node.bytes(), node.audit()), (before, audit), "{what}");
        }
        assert_eq!(temp_files(node.dir.path()), Vec::<String>::new(), "{what}");
        node.assert_serves(&what);
    }
    node.stop();
}

/// `init` and an `import` into a missing keyring link the temp file into
/// place (never replacing anything) and then unlink the temp name.
#[test]
fn eio_on_link_and_unlink_of_a_new_keyring() {
    if !have_strace() {
        return;
    }
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let trace = dir.path().join("trace");
    let ring = dir.path().join("ring");
    let r = ring.to_str().unwrap();

    let out = run_guarded(
        traced(
            &trace,
            Some("linkat,link:error=EIO:when=1"),
            &["init", "--keyring", r],
        ),
        &logs,
    );
    assert_eq!(
        (out.code(), error_message(&out)),
        (
            1,
            format!("keyring {r}: cannot link the temporary file into place: {EIO}").as_str()
        )
    );
    assert!(!ring.exists(), "a keyring appeared");
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());

    // The unlink of the temp name fails after the link: the keyring is in
    // place, so init succeeded; the second name of the same file goes with
    // the next command that takes the lock.
    let out = run_guarded(
        traced(
            &trace,
            Some("unlink,unlinkat:error=EIO:when=1"),
            &["init", "--keyring", r],
        ),
        &logs,
    );
    out.ok();
    let file = store::read(&ring).unwrap();
    assert_eq!(states(&file), [(1, KeyState::Primary)]);
    let temps = temp_files(dir.path());
    assert_eq!(temps.len(), 1, "{temps:?}");
    assert_eq!(
        fs::metadata(dir.path().join(&temps[0])).unwrap().ino(),
        fs::metadata(&ring).unwrap().ino(),
        "the leftover is the keyring's own inode, not another copy"
    );
    let out = common::admin(&["restore", "1", "--keyring", r], &logs);
    out.ok();
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());
}

// ------------------------------------------------- a kill at every syscall

/// `new` is `old` after `rotate --promote`: one new primary version with
/// fresh material, the old primary decrypt-only, nothing else changed.
fn assert_rotated(what: &str, old: &KeyringFile, new: &KeyringFile) {
    assert_eq!(old.id, new.id, "{what}");
    assert_eq!(
        new.versions.len(),
        old.versions.len() + 1,
        "{what}: {:?}",
        states(new)
    );
    let old_primary = old.primary().unwrap();
    for (o, n) in old.views().iter().zip(new.views()) {
        assert_eq!(
            o.fingerprint, n.fingerprint,
            "{what}: material of v{}",
            o.info.version
        );
        let mut expected = o.info.clone();
        if expected.version == old_primary {
            expected.state = KeyState::DecryptOnly;
        }
        assert_eq!(n.info, expected, "{what}");
    }
    let added = new.versions.last().unwrap();
    assert_eq!(
        added.info.version.get(),
        old.versions.last().unwrap().info.version.get() + 1,
        "{what}"
    );
    assert_eq!(added.info.state, KeyState::Primary, "{what}");
    assert_eq!(added.info.promoted, Some(added.info.created), "{what}");
    let fp = added.kek.as_ref().unwrap().fingerprint();
    assert!(
        old.views().iter().all(|v| v.fingerprint != Some(fp)),
        "{what}: reused key"
    );
}

#[test]
fn a_kill_at_every_syscall_of_rotate_leaves_the_old_or_the_new_keyring() {
    if !have_strace() {
        return;
    }
    let started = Instant::now();
    let mut node = Node::start(None);
    let k = node.k().to_owned();
    let trace = node.path("trace");

    // `rotate --promote --expect-primary P`: one step, safe to re-run.
    let args_for = |file: &KeyringFile| {
        let p = file.primary().unwrap().get().to_string();
        vec![
            "rotate".to_owned(),
            "--promote".into(),
            "--expect-primary".into(),
            p,
            "--keyring".into(),
            k.clone(),
        ]
    };
    let first = store::read(&node.keyring).unwrap();
    let args = args_for(&first);
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_guarded(traced(&trace, None, &args_ref), &node.logs);
    out.ok();
    let positions = syscalls(&fs::read_to_string(&trace).unwrap());
    assert!(
        positions.len() > 50,
        "suspiciously short trace: {positions:#?}"
    );
    assert!(
        positions.iter().any(|(n, _, _)| n.starts_with("rename")),
        "{positions:#?}"
    );
    node.wait_for_version(2);

    let (mut old_state, mut new_state, mut not_hit, mut temps_seen) = (0, 0, 0, 0);
    for (name, when, line) in &positions {
        let what = format!("SIGKILL at {name} #{when} ({line})");
        let before_bytes = node.bytes();
        let before = KeyringFile::parse(&before_bytes).unwrap();
        let args = args_for(&before);
        let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = traced(
            Path::new("/dev/null"),
            Some(&format!("{name}:signal=KILL:when={when}")),
            &args_ref,
        );
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let status = cmd.status().unwrap();
        if !killed(status) {
            not_hit += 1;
        }
        let after = store::read(&node.keyring)
            .unwrap_or_else(|e| panic!("{what}: the keyring does not load: {e}"));
        let changed = node.bytes() != before_bytes;
        if changed {
            assert_rotated(&what, &before, &after);
            new_state += 1;
        } else {
            old_state += 1;
        }
        if !temp_files(node.dir.path()).is_empty() {
            temps_seen += 1;
        }

        // Re-run: completes at once. The dead process's lock is gone: with
        // no wait allowed, a lock still held would be exit 75.
        let mut cmd = kekd();
        cmd.arg("admin").args(&args_ref).env("KEKD_LOCK_WAIT", "0s");
        let out = run_guarded(cmd, &node.logs);
        assert_eq!(out.code(), 0, "{what}: re-run: {out:#?}");
        let rerun = store::read(&node.keyring).unwrap();
        if changed {
            assert!(
                out.stdout
                    .starts_with("rotate: nothing to do: already rotated"),
                "{what}: {out:#?}"
            );
            assert_eq!(rerun.infos(), after.infos(), "{what}");
        } else {
            assert_rotated(&format!("{what}, re-run"), &before, &rerun);
        }
        assert_eq!(
            temp_files(node.dir.path()),
            Vec::<String>::new(),
            "{what}: after the re-run"
        );
        node.assert_serves(&what);
    }
    let final_version = store::read(&node.keyring).unwrap().primary().unwrap().get();
    node.wait_for_version(final_version);
    node.stop();
    eprintln!(
        "rotate: {} syscall positions killed in {:?}: {old_state} left the old keyring, {new_state} the new one, \
         {temps_seen} a temp file, {not_hit} positions not reached (the syscall sequence shifted)",
        positions.len(),
        started.elapsed()
    );
    assert!(
        old_state > 0 && new_state > 0,
        "kills never landed on both sides of the rename"
    );
    assert!(
        not_hit * 10 < positions.len(),
        "{not_hit} of {} positions were never reached: the trace does not match the runs",
        positions.len()
    );
}

#[test]
fn a_kill_at_every_syscall_of_init_leaves_no_keyring_or_a_whole_one() {
    if !have_strace() {
        return;
    }
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let trace = dir.path().join("trace");
    let base = dir.path().join("base");
    let out = run_guarded(
        traced(&trace, None, &["init", "--keyring", base.to_str().unwrap()]),
        &logs,
    );
    out.ok();
    let positions = syscalls(&fs::read_to_string(&trace).unwrap());
    assert!(
        positions.iter().any(|(n, _, _)| n.starts_with("link")),
        "{positions:#?}"
    );

    let (mut absent, mut whole) = (0, 0);
    for (i, (name, when, line)) in positions.iter().enumerate() {
        let what = format!("SIGKILL at {name} #{when} ({line})");
        let ring = dir.path().join(format!("ring{i}"));
        let r = ring.to_str().unwrap();
        let mut cmd = traced(
            Path::new("/dev/null"),
            Some(&format!("{name}:signal=KILL:when={when}")),
            &["init", "--keyring", r],
        );
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd.status().unwrap();
        let existed = ring.exists();
        if existed {
            let file = store::read(&ring).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(states(&file), [(1, KeyState::Primary)], "{what}");
            whole += 1;
        } else {
            absent += 1;
        }
        let before = fs::read(&ring).ok();
        let out = common::admin(&["init", "--keyring", r], &logs);
        if existed {
            assert_eq!(
                (out.code(), error_message(&out)),
                (
                    1,
                    format!(
                        "keyring {r} already exists; refusing to overwrite it (every Secret it encrypted would be lost)"
                    )
                    .as_str()
                ),
                "{what}"
            );
            assert_eq!(
                fs::read(&ring).ok(),
                before,
                "{what}: init replaced a keyring"
            );
        } else {
            assert_eq!(out.code(), 0, "{what}: {out:#?}");
        }
        let temps: Vec<String> = temp_files(dir.path())
            .into_iter()
            .filter(|t| t.starts_with(&format!(".ring{i}.")))
            .collect();
        assert_eq!(temps, Vec::<String>::new(), "{what}: init's lock cleans up");
    }
    eprintln!(
        "init: {} positions: {absent} left no keyring, {whole} a whole one",
        positions.len()
    );
    assert!(absent > 0 && whole > 0, "{absent} absent, {whole} whole");
}

// ------------------------------------------------------- corrupt keyrings

/// What the keyring parser says about `bytes`, in its documented order:
/// UTF-8, carriage returns, the magic line, the final newline, the
/// `sha256` line, the checksum. A corruption of a valid keyring always
/// stops at one of these (the checksum covers everything else).
fn expected_reason(bytes: &[u8]) -> String {
    let line_at = |i: usize| 1 + bytes[..i].iter().filter(|&&b| b == b'\n').count();
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return format!("line {} is not UTF-8 text", line_at(e.valid_up_to())),
    };
    if let Some(i) = text.find('\r') {
        return format!(
            "line {} has a carriage return: the file was converted to CRLF line endings",
            line_at(i)
        );
    }
    let first = text.split('\n').next().unwrap();
    if first != store::MAGIC && first != store::MAGIC_METADATA {
        return if first.starts_with("kekd-keyring") {
            "line 1 is a keyring format this kekd does not read (expected `kekd-keyring v1`)"
        } else {
            "line 1 is not `kekd-keyring v1`: not a kekd keyring"
        }
        .to_owned();
    }
    let lines = text.matches('\n').count();
    if !text.ends_with('\n') {
        return format!("line {} does not end in a newline (truncated?)", lines + 1);
    }
    let last = text[..text.len() - 1].rsplit('\n').next().unwrap();
    if !last.starts_with("sha256 ") {
        return format!(
            "line {lines} must be the `sha256 <digest>` line that ends every keyring (file truncated?)"
        );
    }
    format!(
        "line {lines}: field `sha256` checksum does not match the file's content (edited by hand or damaged in a copy)"
    )
}

/// A fresh two-version keyring (v1 decrypt-only, v2 primary) as bytes.
fn good_keyring(dir: &Path, logs: &Path) -> Vec<u8> {
    let path = dir.join("good");
    let p = path.to_str().unwrap();
    for args in [
        &["init", "--keyring", p][..],
        &["rotate", "--promote", "--keyring", p][..],
    ] {
        let out = common::admin(args, logs);
        out.ok();
    }
    fs::read(&path).unwrap()
}

/// `kekd serve` on `keyring` must exit 78 with `keyring K: reason` before
/// creating its socket, and leave the file as it was.
fn assert_serve_refuses(keyring: &Path, socket: &Path, logs: &Path, reason: &str, what: &str) {
    let before = fs::symlink_metadata(keyring)
        .ok()
        .map(|_| fs::read(keyring).ok());
    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(keyring)
        .arg("--socket")
        .arg(socket);
    let out = run_guarded(cmd, logs);
    assert_eq!(
        (out.code(), error_message(&out)),
        (
            EX_CONFIG,
            format!("keyring {}{reason}", keyring.display()).as_str()
        ),
        "{what}"
    );
    assert!(!socket.exists(), "{what}: a socket was created");
    let after = fs::symlink_metadata(keyring)
        .ok()
        .map(|_| fs::read(keyring).ok());
    assert_eq!(after, before, "{what}: the file changed");
}

#[test]
fn serve_refuses_a_keyring_truncated_at_every_length_or_with_any_bit_flipped() {
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let good = good_keyring(dir.path(), &logs);
    let keyring = dir.path().join("keyring");
    let socket = dir.path().join("kms.sock");

    // Through the parser: every truncation and every single-bit flip.
    let mut count = 0;
    for len in 0..good.len() {
        let reason = expected_reason(&good[..len]);
        let got = KeyringFile::parse(&good[..len])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert_eq!(got, reason, "truncated to {len} bytes");
        count += 1;
    }
    for i in 0..good.len() {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[i] ^= 1 << bit;
            let got = KeyringFile::parse(&bad)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert_eq!(got, expected_reason(&bad), "bit {bit} of byte {i} flipped");
            count += 1;
        }
    }

    // Through `kekd serve`: every truncation, and a flipped bit at every
    // byte (bit i mod 8, so each bit position is covered along the file).
    let mut rng = Rng::from_os();
    let seed = rng.state();
    let mut served = 0;
    let mut cases: Vec<(String, Vec<u8>)> = (0..good.len())
        .map(|len| (format!("truncated to {len} bytes"), good[..len].to_vec()))
        .collect();
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 1 << (i % 8);
        cases.push((format!("bit {} of byte {i} flipped", i % 8), bad));
    }
    for (what, bytes) in &cases {
        write_private(&keyring, bytes);
        let reason = format!(": {}", expected_reason(bytes));
        assert_serve_refuses(&keyring, &socket, &logs, &reason, what);
        served += 1;
    }
    // And a sample of the other bits, seeded (printed) for replay.
    for _ in 0..64 {
        let (i, bit) = (rng.below(good.len() as u64) as usize, rng.below(8) as u32);
        let mut bad = good.clone();
        bad[i] ^= 1 << bit;
        write_private(&keyring, &bad);
        let reason = format!(": {}", expected_reason(&bad));
        assert_serve_refuses(
            &keyring,
            &socket,
            &logs,
            &reason,
            &format!("bit {bit} of byte {i} (seed {seed})"),
        );
        served += 1;
    }
    eprintln!("{count} corruptions parsed, {served} refused by `kekd serve`");
}

/// One kind of damage, applied to a good keyring at `path`.
struct Damage {
    name: &'static str,
    /// Sets the damaged file up.
    make: fn(&Path, &[u8]),
    /// `: reason` or ` is …`, after `keyring PATH`.
    reason: fn(&Path, &[u8]) -> String,
    /// Exit code of the admin commands.
    code: i32,
}

/// The body of `good` with its checksum line recomputed after `edit`.
fn resealed(good: &[u8], edit: impl FnOnce(&str) -> String) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let text = std::str::from_utf8(good).unwrap();
    let body_end = text[..text.len() - 1].rfind('\n').unwrap() + 1;
    let body = edit(&text[..body_end]);
    let digest: String = Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{body}sha256 {digest}\n").into_bytes()
}

fn damages() -> Vec<Damage> {
    fn content(p: &Path, bytes: &[u8]) {
        write_private(p, bytes);
    }
    vec![
        Damage {
            name: "empty",
            make: |p, _| content(p, b""),
            reason: |_, _| ": line 1 is not `kekd-keyring v1`: not a kekd keyring".into(),
            code: EX_CONFIG,
        },
        Damage {
            name: "truncated in the middle",
            make: |p, g| content(p, &g[..g.len() / 2]),
            reason: |_, g| format!(": {}", expected_reason(&g[..g.len() / 2])),
            code: EX_CONFIG,
        },
        Damage {
            name: "a flipped bit in a key",
            make: |p, g| {
                let mut b = g.to_vec();
                let at = b.windows(4).position(|w| w == b"kek=").unwrap() + 9;
                b[at] ^= 0x01;
                content(p, &b);
            },
            reason: |_, g| {
                let mut b = g.to_vec();
                let at = b.windows(4).position(|w| w == b"kek=").unwrap() + 9;
                b[at] ^= 0x01;
                format!(": {}", expected_reason(&b))
            },
            code: EX_CONFIG,
        },
        Damage {
            name: "wrong magic",
            make: |p, g| content(p, &[b"KEKD".as_slice(), &g[4..]].concat()),
            reason: |_, _| ": line 1 is not `kekd-keyring v1`: not a kekd keyring".into(),
            code: EX_CONFIG,
        },
        Damage {
            name: "a later format version",
            make: |p, g| {
                content(
                    p,
                    &resealed(g, |b| b.replacen("kekd-keyring v1", "kekd-keyring v2", 1)),
                )
            },
            reason: |_, _| {
                ": line 1 is a keyring format this kekd does not read (expected `kekd-keyring v1`)"
                    .into()
            },
            code: EX_CONFIG,
        },
        Damage {
            name: "a bad checksum",
            make: |p, g| {
                let mut b = g.to_vec();
                let n = b.len();
                b[n - 2] = if b[n - 2] == b'0' { b'1' } else { b'0' };
                content(p, &b);
            },
            reason: |_, _| {
                ": line 5: field `sha256` checksum does not match the file's content (edited by hand or damaged in a copy)"
                    .into()
            },
            code: EX_CONFIG,
        },
        Damage {
            name: "a duplicated version (checksum valid)",
            make: |p, g| {
                content(
                    p,
                    &resealed(g, |b| {
                        let v1 = b.lines().find(|l| l.starts_with("version 1 ")).unwrap();
                        b.replacen(v1, &format!("{v1}\n{v1}"), 1)
                    }),
                );
            },
            reason: |_, _| {
                ": version 1 appears after version 1; versions must be listed once each, in increasing order".into()
            },
            code: EX_CONFIG,
        },
        Damage {
            name: "CRLF line endings",
            make: |p, g| {
                content(
                    p,
                    &String::from_utf8(g.to_vec())
                        .unwrap()
                        .replace('\n', "\r\n")
                        .into_bytes(),
                )
            },
            reason: |_, _| {
                ": line 1 has a carriage return: the file was converted to CRLF line endings".into()
            },
            code: EX_CONFIG,
        },
        Damage {
            name: "a directory",
            make: |p, _| fs::create_dir(p).unwrap(),
            reason: |_, _| " is not a regular file".into(),
            code: EX_CONFIG,
        },
        Damage {
            name: "readable by others",
            make: |p, g| {
                content(p, g);
                fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
            },
            reason: |p, _| {
                format!(
                    " has permissions 0644, which let other users read the keys; run `chmod 600 {}`",
                    p.display()
                )
            },
            code: EX_CONFIG,
        },
        Damage {
            name: "a dangling symlink",
            make: |p, _| std::os::unix::fs::symlink("gone", p).unwrap(),
            reason: |_, _| {
                " is a symlink to gone, which does not exist; point the link at the keyring, or remove the link if \
                 there is no keyring yet"
                    .into()
            },
            code: EX_CONFIG,
        },
    ]
}

/// Every admin command and `serve` on every kind of damage: the exact
/// refusal, and not a byte changed, not a file created.
#[test]
fn every_command_refuses_every_kind_of_damaged_keyring_and_creates_nothing() {
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let good = good_keyring(dir.path(), &logs);
    let good_path = dir.path().join("good");
    let pass = dir.path().join("pass");
    write_private(&pass, format!("{PASS}\n").as_bytes());
    let p = pass.to_str().unwrap();
    let good_backup = dir.path().join("good.backup");
    let out = common::admin(
        &[
            "backup",
            "--keyring",
            good_path.to_str().unwrap(),
            "--out",
            good_backup.to_str().unwrap(),
            "--passphrase-file",
            p,
        ],
        &logs,
    );
    out.ok();
    let out_file = dir.path().join("new.backup");

    for damage in damages() {
        let work = dir.path().join("work");
        let _ = fs::remove_dir_all(&work);
        fs::create_dir(&work).unwrap();
        let keyring = work.join("keyring");
        let k = keyring.to_str().unwrap();
        (damage.make)(&keyring, &good);
        let reason = (damage.reason)(&keyring, &good);
        let refusal = format!("keyring {k}{reason}");
        let snapshot = || {
            let mut names: Vec<(String, Option<Vec<u8>>)> = fs::read_dir(&work)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        fs::read(e.path()).ok(),
                    )
                })
                // import, restore-backup and init take the lock (an empty
                // file beside the keyring) before they read it.
                .filter(|(n, _)| n != "keyring.lock")
                .collect();
            names.sort();
            names
        };
        let before = snapshot();
        let good_from = good_path.to_str().unwrap();
        let backup_from = good_backup.to_str().unwrap();
        let commands: Vec<(Vec<&str>, String)> = vec![
            (vec!["rotate"], refusal.clone()),
            (vec!["rotate", "--promote"], refusal.clone()),
            (vec!["promote", "2"], refusal.clone()),
            (vec!["retire", "1"], refusal.clone()),
            (vec!["restore", "1"], refusal.clone()),
            (
                vec!["destroy", "1", "--yes-destroy-key-material"],
                refusal.clone(),
            ),
            (vec!["list"], refusal.clone()),
            (
                vec![
                    "backup",
                    "--out",
                    out_file.to_str().unwrap(),
                    "--passphrase-file",
                    p,
                ],
                refusal.clone(),
            ),
            (vec!["import", "--from", good_from], refusal.clone()),
            (
                vec![
                    "restore-backup",
                    "--from",
                    backup_from,
                    "--passphrase-file",
                    p,
                ],
                if reason.starts_with(": ") {
                    format!(
                        "{refusal}. restore-backup replaces only a keyring it can compare with the backup: if this one \
                         is beyond repair, move it aside (`mv {k} {k}.damaged`) and run this again"
                    )
                } else {
                    refusal.clone()
                },
            ),
            (
                vec!["init"],
                if damage.name == "a dangling symlink" {
                    refusal.clone()
                } else {
                    format!(
                        "keyring {k} already exists; refusing to overwrite it (every Secret it encrypted would be lost)"
                    )
                },
            ),
        ];
        for (args, message) in &commands {
            let mut all = args.clone();
            all.extend(["--keyring", k]);
            let out = common::admin(&all, &logs);
            let what = format!("{}: {args:?}", damage.name);
            // init over an existing file is a refusal (exit 1), whatever the file holds.
            let code = if args[0] == "init" && damage.name != "a dangling symlink" {
                1
            } else {
                damage.code
            };
            assert_eq!(
                (out.code(), error_message(&out)),
                (code, message.as_str()),
                "{what}: {out:#?}"
            );
            assert_eq!(snapshot(), before, "{what}: changed or created a file");
            assert!(!out_file.exists(), "{what}: wrote a backup");
            assert_eq!(fs::read(&good_path).unwrap(), good, "{what}");
        }
        // serve, and serve --dev over a damaged ./kekd-dev/keyring.
        assert_serve_refuses(
            &keyring,
            &work.join("kms.sock"),
            &logs,
            &reason,
            damage.name,
        );
        let dev = work.join("devcwd");
        fs::create_dir_all(dev.join("kekd-dev")).unwrap();
        let dev_ring = dev.join("kekd-dev/keyring");
        (damage.make)(&dev_ring, &good);
        let dev_before = fs::read(&dev_ring).ok();
        let mut cmd = kekd();
        cmd.args(["serve", "--dev"]).current_dir(&dev);
        let out = run_guarded(cmd, &logs);
        let dev_reason = (damage.reason)(&dev_ring, &good);
        assert_eq!(
            (out.code(), error_message(&out)),
            (
                EX_CONFIG,
                format!("keyring {}{dev_reason}", dev_ring.display()).as_str()
            ),
            "{}: serve --dev",
            damage.name
        );
        assert_eq!(
            fs::read(&dev_ring).ok(),
            dev_before,
            "{}: serve --dev",
            damage.name
        );
        assert!(!dev.join("gone").exists() && !dev.join("kekd-dev/gone").exists());

        // A damaged copy is never imported over a good keyring.
        if fs::metadata(&keyring).is_ok_and(|m| m.is_file()) && damage.name != "readable by others"
        {
            let target = work.join("target");
            write_private(&target, &good);
            let out = common::admin(
                &["import", "--keyring", target.to_str().unwrap(), "--from", k],
                &logs,
            );
            assert_eq!(
                (out.code(), error_message(&out)),
                (EX_CONFIG, refusal.as_str()),
                "{}: import of the damaged copy",
                damage.name
            );
            assert_eq!(fs::read(&target).unwrap(), good);
        }
    }
}

#[test]
fn symlinked_keyrings_are_changed_at_their_target_and_loops_are_refused() {
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let real = dir.path().join("real");
    let out = common::admin(&["init", "--keyring", real.to_str().unwrap()], &logs);
    out.ok();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("real", &link).unwrap();
    let out = common::admin(&["rotate", "--keyring", link.to_str().unwrap()], &logs);
    out.ok();
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced"
    );
    assert_eq!(
        states(&store::read(&real).unwrap()),
        [(1, KeyState::Primary), (2, KeyState::Pending)]
    );
    assert_eq!(temp_files(dir.path()), Vec::<String>::new());

    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::os::unix::fs::symlink("b", &a).unwrap();
    std::os::unix::fs::symlink("a", &b).unwrap();
    let looped = format!(
        "keyring {}: cannot open: Too many levels of symbolic links (os error 40)",
        a.display()
    );
    let out = common::admin(&["rotate", "--keyring", a.to_str().unwrap()], &logs);
    assert_eq!((out.code(), error_message(&out)), (1, looped.as_str()));
    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(&a)
        .arg("--socket")
        .arg(dir.path().join("s.sock"));
    let out = run_guarded(cmd, &logs);
    assert_eq!(
        (out.code(), error_message(&out)),
        (EX_CONFIG, looped.as_str())
    );
    assert!(fs::symlink_metadata(&a).unwrap().file_type().is_symlink());
}

// -------------------------------------------------------- corrupt backups

#[test]
fn restore_refuses_a_backup_truncated_at_every_length_and_sampled_bit_flips() {
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let good = good_keyring(dir.path(), &logs);
    let pass = dir.path().join("pass");
    write_private(&pass, format!("{PASS}\n").as_bytes());
    let p = pass.to_str().unwrap();
    let backup = dir.path().join("good.backup");
    let out = common::admin(
        &[
            "backup",
            "--keyring",
            dir.path().join("good").to_str().unwrap(),
            "--out",
            backup.to_str().unwrap(),
            "--passphrase-file",
            p,
        ],
        &logs,
    );
    out.ok();
    let text = fs::read(&backup).unwrap();
    let damaged = dir.path().join("damaged.backup");
    let d = damaged.to_str().unwrap();
    // Restored into a missing keyring (which restore would create) and over
    // an existing one: neither may appear or change.
    let missing = dir.path().join("missing");
    let existing = dir.path().join("existing");
    write_private(&existing, &good);

    let restore = |target: &Path| {
        common::admin(
            &[
                "restore-backup",
                "--keyring",
                target.to_str().unwrap(),
                "--from",
                d,
                "--passphrase-file",
                p,
            ],
            &logs,
        )
    };
    for len in 0..text.len() {
        write_private(&damaged, &text[..len]);
        let line = 1 + text[..len].iter().filter(|&&b| b == b'\n').count();
        for target in [&missing, &existing] {
            let out = restore(target);
            let what = format!("backup truncated to {len} bytes, into {}", target.display());
            assert_eq!(out.code(), EX_CONFIG, "{what}: {out:#?}");
            let message = error_message(&out);
            let reason = message
                .strip_prefix(&format!("backup {d}: "))
                .unwrap_or_else(|| panic!("{what}: {message}"));
            if len == 0 {
                assert_eq!(reason, "line 1 is missing: the file is empty", "{what}");
            } else {
                assert!(
                    reason.starts_with(&format!("line {line} "))
                        && reason.ends_with("(file truncated?)"),
                    "{what}: {reason}"
                );
            }
        }
        assert!(
            !missing.exists(),
            "truncated to {len}: a keyring was created"
        );
        assert_eq!(fs::read(&existing).unwrap(), good);
    }

    // Flipped bits: in the header a refusal naming the damaged line, or —
    // where the header still parses — the one opaque refusal after the KDF.
    let mut rng = Rng::from_os();
    let seed = rng.state();
    let header_len = text
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(5)
        .unwrap()
        .0
        + 1;
    let mut positions: Vec<usize> = (0..header_len).step_by(7).collect();
    positions
        .extend((0..8).map(|_| header_len + rng.below((text.len() - header_len) as u64) as usize));
    let mut opaque = 0;
    for i in positions {
        let bit = rng.below(8) as u32;
        let mut bad = text.clone();
        bad[i] ^= 1 << bit;
        write_private(&damaged, &bad);
        let line = 1 + text[..i].iter().filter(|&&b| b == b'\n').count();
        let out = restore(&missing);
        let what = format!("bit {bit} of byte {i} (line {line}, seed {seed})");
        assert_eq!(out.code(), EX_CONFIG, "{what}: {out:#?}");
        let message = error_message(&out);
        let reason = message
            .strip_prefix(&format!("backup {d}: "))
            .unwrap_or_else(|| panic!("{what}: {message}"));
        if reason == "wrong passphrase or damaged backup; nothing was written" {
            opaque += 1;
        } else {
            assert!(
                reason.starts_with(&format!("line {line}"))
                    || reason.starts_with(&format!("line {}", line + 1)),
                "{what}: {reason}"
            );
        }
        assert!(!missing.exists(), "{what}: a keyring was created");
    }
    assert!(
        opaque > 0,
        "no flip reached the authenticated part (seed {seed})"
    );
    // Sanity: the undamaged backup restores.
    write_private(&damaged, &text);
    let out = restore(&missing);
    out.ok();
    assert_eq!(fs::read(&missing).unwrap(), good);
}

/// The report is printed after the change is written and audited: a stdout
/// on a full disk is a warning, not a panic that reads as a failure.
#[test]
fn a_full_stdout_after_the_change_is_a_warning_not_a_failure() {
    let dir = tempdir_blocking();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let ring = dir.path().join("keyring");
    let r = ring.to_str().unwrap();
    let out = common::admin(&["init", "--keyring", r], &logs);
    out.ok();
    for args in [&["rotate"][..], &["promote", "2", "--output", "json"][..]] {
        let full = fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = kekd()
            .arg("admin")
            .args(args)
            .args(["--keyring", r])
            .stdout(full)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "kekd: warning: the command completed, but its report could not be printed: {ENOSPC}\n"
            ),
            "{args:?}"
        );
    }
    let file = store::read(&ring).unwrap();
    assert_eq!(
        states(&file),
        [(1, KeyState::DecryptOnly), (2, KeyState::Primary)]
    );
    let audit = fs::read_to_string(kekd::file::sibling(&ring, ".audit.jsonl")).unwrap();
    assert_eq!(
        audit.lines().count(),
        4,
        "init, rotate, and promote's two: {audit}"
    );
}
