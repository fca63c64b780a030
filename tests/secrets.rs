//! Secrets never leak: a known KEK's bytes, in every encoding a bug could
//! print them in, appear in no log line (trace level, text and JSON), no
//! command output, no gRPC error, no audit or usage record, no `Debug`
//! output and not in `/proc/<pid>/cmdline` or `environ`; and the pages that
//! hold keys in a serving process are excluded from core dumps and locked —
//! or, where the memory-lock limit forbids it, kekd says so once and serves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use common::{Finished, Process, admin_async, keks_in, seed, tempdir, uid};
use kekd::keyring::store;

/// Every form a 32-byte key could take in text a bug might produce.
struct Needles {
    text: Vec<String>,
    raw: Vec<[u8; 32]>,
}

impl Needles {
    fn of_keyring(path: &Path) -> Self {
        let mut needles = Needles {
            text: Vec::new(),
            raw: Vec::new(),
        };
        for encoded in keks_in(path) {
            let raw: [u8; 32] = STANDARD
                .decode(&encoded)
                .or_else(|_| URL_SAFE_NO_PAD.decode(&encoded))
                .expect("kek= is base64")
                .try_into()
                .expect("a 32-byte KEK");
            needles.add(raw);
        }
        needles
    }

    fn add(&mut self, raw: [u8; 32]) {
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.text.push(hex.to_uppercase());
        self.text.push(hex);
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            self.text.push(engine.encode(raw));
        }
        // Rust's `{:?}` of the array or of a slice of it: "[12, 250, 7, …".
        let debug = format!("{:?}", &raw[..8]);
        self.text.push(debug.trim_end_matches(']').to_owned());
        // Two-digit hex with separators ("0c:fa:07" / "0c fa 07").
        let first: Vec<String> = raw[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.text.push(first.join(":"));
        self.text.push(first.join(" "));
        self.raw.push(raw);
    }

    /// Whether any form of any key is in `haystack` (the checker's own
    /// positive control).
    fn found_in(&self, haystack: &[u8]) -> bool {
        let text = String::from_utf8_lossy(haystack);
        self.text.iter().any(|n| text.contains(n.as_str()))
            || self
                .raw
                .iter()
                .any(|raw| haystack.windows(16).any(|w| w == &raw[8..24]))
    }

    #[track_caller]
    fn assert_absent(&self, what: &str, haystack: &[u8]) {
        let text = String::from_utf8_lossy(haystack);
        for needle in &self.text {
            assert!(
                !text.contains(needle.as_str()),
                "key material ({needle}) in {what}:\n{text}"
            );
        }
        for raw in &self.raw {
            // Any 16-byte window of the raw key is enough to call it a leak.
            for window in raw.windows(16) {
                assert!(
                    !haystack.windows(16).any(|w| w == window),
                    "raw key bytes in {what}"
                );
            }
        }
    }
}

fn kekd_serve(keyring: &Path, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = common::kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(keyring)
        .arg("--socket")
        .arg(socket)
        .args(["--reload-interval", "200ms"])
        .args(extra);
    cmd
}

fn pid_of(process: &Process) -> u32 {
    // The socket's owner is this child: read it back from the process list
    // rather than reaching into the helper.
    let socket = process.socket.display().to_string();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve") && args.iter().any(|a| a == &socket) {
            return pid;
        }
    }
    panic!("no kekd serve process for {socket}");
}

/// (KiB of kekd's key mappings — marked `dd` (MADV_DONTDUMP) and `dc`
/// (MADV_DONTFORK); the kernel's own `[vvar]` is `dd` only — and how many
/// KiB of them are locked). Neighbouring key pages with the same flags are
/// merged into one smaps entry, so this counts sizes, not entries.
fn key_memory_kib(pid: u32) -> (usize, usize) {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut locked) = (0, 0);
    let (mut size, mut lock) = (0, 0);
    let kib = |rest: &str| -> usize {
        rest.trim()
            .trim_end_matches(" kB")
            .parse()
            .unwrap_or_else(|_| panic!("smaps field {rest:?}"))
    };
    for line in smaps.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            size = kib(rest);
        } else if let Some(rest) = line.strip_prefix("Locked:") {
            lock = kib(rest);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            let flags: Vec<&str> = flags.split_whitespace().collect();
            if flags.contains(&"dd") && flags.contains(&"dc") {
                total += size;
                locked += lock;
            }
        }
    }
    (total, locked)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn require_all() -> bool {
    std::env::var_os("KEKD_REQUIRE_ALL").is_some_and(|v| v == "1")
}

struct Node {
    dir: tempfile::TempDir,
    keyring: PathBuf,
    socket: PathBuf,
}

impl Node {
    async fn new() -> Self {
        let dir = tempdir().await;
        let keyring = dir.path().join("keyring");
        let socket = dir.path().join("run/kekd.sock");
        let k = keyring.display().to_string();
        let out = admin_async(&["init", "--keyring", &k], dir.path()).await;
        assert_eq!(out.code(), 0, "{out:#?}");
        let out = admin_async(&["rotate", "--keyring", &k], dir.path()).await;
        assert_eq!(out.code(), 0, "{out:#?}");
        Node {
            dir,
            keyring,
            socket,
        }
    }

    fn k(&self) -> String {
        self.keyring.display().to_string()
    }
}

#[tokio::test]
async fn a_known_kek_appears_in_no_log_output_error_record_or_proc_file() {
    let node = Node::new().await;
    let needles = Needles::of_keyring(&node.keyring);
    assert_eq!(needles.raw.len(), 2);
    // The checker finds keys where they are: the file, a hex dump, a Debug
    // of the array, raw bytes in the middle of other bytes.
    assert!(needles.found_in(&fs::read(&node.keyring).unwrap()));
    let raw = needles.raw[1];
    let hex: String = raw.iter().map(|b| format!("{b:02X}")).collect();
    assert!(needles.found_in(format!("key={hex}").as_bytes()));
    assert!(needles.found_in(format!("{raw:?}").as_bytes()));
    assert!(needles.found_in(&[b"prefix".as_slice(), &raw, b"suffix"].concat()));
    let mut outputs: Vec<(String, Finished)> = Vec::new();

    for format in ["text", "json"] {
        let socket = node.dir.path().join(format!("run-{format}/kekd.sock"));
        let cmd = kekd_serve(
            &node.keyring,
            &socket,
            &["--log-level", "trace", "--log-format", format],
        );
        let mut serve = {
            let _guard = common::fs_lock().await;
            Process::spawn(cmd, &socket, node.dir.path())
        };
        let mut client = serve.ready().await;
        let pid = pid_of(&serve);

        // Good calls, and every kind of refused one.
        let plaintext = seed();
        let sealed = client.encrypt(plaintext.clone(), &uid(1)).await.unwrap();
        let opened = client
            .decrypt(
                sealed.ciphertext.clone(),
                &sealed.key_id,
                Default::default(),
                &uid(2),
            )
            .await
            .unwrap();
        assert_eq!(opened, plaintext);
        let mut tampered = sealed.ciphertext.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let mut errors = Vec::new();
        for (ciphertext, key_id) in [
            (tampered, sealed.key_id.clone()),
            (sealed.ciphertext.clone(), "kekd/0000/v1".to_owned()),
            (vec![0; 40], sealed.key_id.clone()),
            (Vec::new(), String::new()),
        ] {
            let err = client
                .decrypt(ciphertext, &key_id, Default::default(), &uid(3))
                .await
                .unwrap_err();
            errors.push(format!("{:?} {}", err.code(), err.message()));
        }
        errors.push(format!(
            "{:?}",
            client.encrypt(vec![0; 4096], &uid(4)).await.unwrap_err()
        ));
        needles.assert_absent("gRPC errors", errors.join("\n").as_bytes());

        // `admin probe` round-trips through the live server.
        let sock = socket.display().to_string();
        let k = node.k();
        let probe = admin_async(
            &[
                "probe",
                "--socket",
                &sock,
                "--keyring",
                &k,
                "--output",
                format,
            ],
            node.dir.path(),
        )
        .await;
        assert_eq!(probe.code(), 0, "{probe:#?}");
        outputs.push((format!("probe --output {format}"), probe));

        // What the process shows about itself.
        needles.assert_absent(
            "cmdline",
            &fs::read(format!("/proc/{pid}/cmdline")).unwrap(),
        );
        match fs::read(format!("/proc/{pid}/environ")) {
            Ok(env) => needles.assert_absent("environ", &env),
            // kekd is not dumpable: only root may read its environ.
            Err(e) => assert!(!is_root(), "root cannot read environ: {e}"),
        }
        if is_root() {
            // Two versions were loaded into locked, non-dumpable pages.
            let (kib, locked) = key_memory_kib(pid);
            assert!(
                kib >= 8,
                "{kib} KiB of MADV_DONTDUMP key pages, want a page per KEK"
            );
            assert_eq!(locked, kib, "every key page is locked when root");
        }

        serve.signal(rustix::process::Signal::TERM);
        let out = serve.wait_exit().await;
        assert_eq!(out.code(), 0, "{out:#?}");
        assert!(
            out.stderr.contains("TRACE") || out.stderr.contains("\"level\":\"TRACE\""),
            "trace logging was not on:\n{}",
            out.stderr
        );
        outputs.push((format!("serve --log-format {format}"), out));
    }

    // Every admin command that reads the keys, in both output forms.
    let k = node.k();
    let passphrase = node.dir.path().join("passphrase");
    fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    rustix::fs::chmod(&passphrase, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let backup = node.dir.path().join("backup");
    let pass = passphrase.display().to_string();
    let b = backup.display().to_string();
    let admin_runs: Vec<Vec<&str>> = vec![
        vec!["list", "--keyring", &k],
        vec!["list", "--keyring", &k, "--output", "json"],
        vec!["doctor", "--keyring", &k],
        vec!["rotate", "--keyring", &k, "--output", "json"],
        vec!["promote", "3", "--keyring", &k],
        vec![
            "retire",
            "1",
            "--force",
            "--keyring",
            &k,
            "--output",
            "json",
        ],
        vec![
            "backup",
            "--keyring",
            &k,
            "--out",
            &b,
            "--passphrase-file",
            &pass,
        ],
        vec!["restore", "1", "--keyring", &k],
    ];
    let logs = node.dir.path().to_owned();
    for args in admin_runs {
        let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let logs = logs.clone();
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            let mut cmd = common::kekd();
            cmd.env("KEKD_LOG_LEVEL", "trace").arg("admin").args(&args);
            common::run_guarded(cmd, &logs)
        })
        .await
        .unwrap();
        // doctor may report warnings (exit 1) on a test box; it must not crash.
        assert!(matches!(out.code(), 0 | 1), "{args:?}: {out:#?}");
        outputs.push((args.join(" "), out));
    }
    // A corrupt keyring: the refusal names the problem, never the bytes.
    let broken = node.dir.path().join("broken");
    let text = fs::read_to_string(&node.keyring).unwrap();
    // One character of a KEK changed (the checksum no longer matches), and a
    // line where a KEK is not valid base64: parsers must not echo the line.
    let kek = &keks_in(&node.keyring)[0];
    let swapped = if kek.starts_with('A') { "B" } else { "A" };
    fs::write(
        &broken,
        text.replacen(kek.as_str(), &format!("{swapped}{}", &kek[1..]), 1),
    )
    .unwrap();
    rustix::fs::chmod(&broken, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let out = admin_async(&["list", "--keyring", broken.to_str().unwrap()], &logs).await;
    assert_ne!(out.code(), 0, "{out:#?}");
    outputs.push(("list of a corrupt keyring".to_owned(), out));
    let bad_base64 = node.dir.path().join("bad-base64");
    fs::write(
        &bad_base64,
        text.replacen(kek.as_str(), &format!("{kek}!"), 1),
    )
    .unwrap();
    rustix::fs::chmod(&bad_base64, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let out = admin_async(&["list", "--keyring", bad_base64.to_str().unwrap()], &logs).await;
    assert_ne!(out.code(), 0, "{out:#?}");
    outputs.push(("list of a keyring with a bad KEK encoding".to_owned(), out));

    for (what, out) in &outputs {
        needles.assert_absent(&format!("stdout of {what}"), out.stdout.as_bytes());
        needles.assert_absent(&format!("stderr of {what}"), out.stderr.as_bytes());
    }
    // The records kekd keeps next to the keyring.
    let mut records = 0;
    for entry in fs::read_dir(node.dir.path()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("keyring.") && entry.path().is_file() {
            needles.assert_absent(&name, &fs::read(entry.path()).unwrap());
            records += 1;
        }
    }
    assert!(records >= 2, "expected the audit log and usage file");
    // The backup holds the keys, sealed: never in the clear.
    needles.assert_absent("the backup file", &fs::read(&backup).unwrap());
}

#[test]
fn debug_output_of_every_key_holding_type_is_redacted() {
    let dir = common::tempdir_blocking();
    let path = dir.path().join("keyring");
    common::create_keyring(&path);
    let needles = Needles::of_keyring(&path);

    let file = store::read(&path).unwrap();
    needles.assert_absent("KeyringFile {:?}", format!("{file:?}").as_bytes());
    needles.assert_absent("KeyringFile {:#?}", format!("{file:#?}").as_bytes());
    let keyring = kekd::backend::local::keyring_from_file(file).unwrap();
    needles.assert_absent("Keyring {:#?}", format!("{keyring:#?}").as_bytes());
    let kek = kekd::secret::Kek::from_bytes(needles.raw[0]);
    assert_eq!(format!("{kek:?}"), "Kek(<redacted>)");
    let local = kekd::backend::local::LocalKey::new(&kek);
    let handle = kekd::backend::KeyHandle::Local(Box::new(local));
    assert_eq!(format!("{handle:?}"), "KeyHandle::Local(<redacted>)");
    let pin = kekd::secret::Pin::new("123456-secret-pin".to_owned());
    assert_eq!(format!("{pin:?}"), "Pin(<redacted>)");
    assert_eq!(pin.expose_secret(), "123456-secret-pin");
}

/// Where the memory-lock limit forbids `mlock` (no CAP_IPC_LOCK, memlock 0),
/// kekd warns once, keeps the pages out of core dumps, and serves.
#[tokio::test]
async fn without_memory_lock_rights_kekd_warns_once_and_serves() {
    let have_tools = Command::new("setpriv").arg("--version").output().is_ok()
        && Command::new("prlimit").arg("--version").output().is_ok();
    if !is_root() || !have_tools {
        assert!(
            !require_all(),
            "this test needs root, setpriv and prlimit (KEKD_REQUIRE_ALL=1)"
        );
        eprintln!("SKIP: needs root, setpriv and prlimit to drop CAP_IPC_LOCK");
        return;
    }
    let node = Node::new().await;
    let serve = kekd_serve(&node.keyring, &node.socket, &[]);
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--memlock=0:0",
        "--",
        "setpriv",
        "--bounding-set=-ipc_lock",
        "--inh-caps=-ipc_lock",
        "--",
    ])
    .arg(serve.get_program())
    .args(serve.get_args())
    .env_remove("RUST_LOG");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEKD_") {
            cmd.env_remove(name);
        }
    }
    let mut process = {
        let _guard = common::fs_lock().await;
        Process::spawn(cmd, &node.socket, node.dir.path())
    };
    let mut client = process.ready().await;
    let plaintext = seed();
    let sealed = client.encrypt(plaintext.clone(), &uid(1)).await.unwrap();
    let opened = client
        .decrypt(
            sealed.ciphertext,
            &sealed.key_id,
            Default::default(),
            &uid(2),
        )
        .await
        .unwrap();
    assert_eq!(opened, plaintext);

    let pid = pid_of(&process);
    let (kib, locked) = key_memory_kib(pid);
    assert!(
        kib >= 8,
        "{kib} KiB of MADV_DONTDUMP key pages, want a page per KEK"
    );
    assert_eq!(locked, 0, "nothing can be locked under memlock 0");

    process.signal(rustix::process::Signal::TERM);
    let out = process.wait_exit().await;
    assert_eq!(out.code(), 0, "{out:#?}");
    let warnings = out
        .stderr
        .matches("cannot lock key memory into RAM, so keys could be written to swap")
        .count();
    assert_eq!(warnings, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("memlock_limit=0 bytes"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("LimitMEMLOCK="), "{}", out.stderr);
}
