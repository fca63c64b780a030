//! Secrets never leak: a known KEK's bytes, in every encoding a bug could
//! print them in, appear in no log line (trace level, text and JSON), no
//! command output, no gRPC error, no audit or usage record, no `Debug`
//! output and not in `/proc/<pid>/cmdline` or `environ`; and the pages that
//! hold keys in a serving process are excluded from core dumps and locked —
//! or, where the memory-lock limit forbids it, kekd says so once and serves.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
        out.ok();
        let out = admin_async(&["rotate", "--keyring", &k], dir.path()).await;
        out.ok();
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
        probe.ok();
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
        out.ok();
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
    let handle: Box<dyn kekd::backend::KeyHandle> = Box::new(local);
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
        common::skip::skip("needs root, setpriv and prlimit to drop CAP_IPC_LOCK");
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
    out.ok();
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

// ------------------------------------------- key schedules in process memory

/// FIPS-197 S-box, for the test's own AES-256 key expansion.
const SBOX: [u8; 256] = {
    // Built from the field inverse and the affine map, so no table is typed
    // in by hand: sbox(x) = A·x⁻¹ + 0x63.
    let mut sbox = [0u8; 256];
    let mut x = 0usize;
    while x < 256 {
        // x⁻¹ in GF(2⁸) as x²⁵⁴ (0 maps to 0).
        let mut inv = 1u8;
        let mut i = 0;
        while i < 254 {
            inv = gf_mul(inv, x as u8);
            i += 1;
        }
        if x == 0 {
            inv = 0;
        }
        let mut s = inv;
        let mut r = 1;
        while r < 5 {
            s ^= inv.rotate_left(r);
            r += 1;
        }
        sbox[x] = s ^ 0x63;
        x += 1;
    }
    sbox
};

/// Multiplication in GF(2⁸) modulo x⁸ + x⁴ + x³ + x + 1.
const fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1b;
        }
        b >>= 1;
    }
    p
}

/// The 15 AES-256 encryption round keys of `key` (FIPS-197 §5.2), as they
/// lie in memory: round key i is bytes 16i..16i+16 of the expanded key, so
/// round keys 0 and 1 are the KEK itself.
fn aes256_round_keys(key: &[u8; 32]) -> [[u8; 16]; 15] {
    let mut w = [[0u8; 4]; 60];
    for (i, word) in w.iter_mut().take(8).enumerate() {
        word.copy_from_slice(&key[4 * i..4 * i + 4]);
    }
    let mut rcon = 1u8;
    for i in 8..60 {
        let mut t = w[i - 1];
        if i % 8 == 0 {
            t = [
                SBOX[t[1] as usize] ^ rcon,
                SBOX[t[2] as usize],
                SBOX[t[3] as usize],
                SBOX[t[0] as usize],
            ];
            rcon = gf_mul(rcon, 2);
        } else if i % 8 == 4 {
            t = t.map(|b| SBOX[b as usize]);
        }
        w[i] = std::array::from_fn(|j| w[i - 8][j] ^ t[j]);
    }
    std::array::from_fn(|r| std::array::from_fn(|b| w[4 * r + b / 4][b % 4]))
}

/// InvMixColumns of a round key: the decryption round keys of the
/// equivalent inverse cipher (FIPS-197 §5.3.5; what AES-NI's `aesimc`
/// makes) are these of encryption round keys 1 to 13.
fn inv_mix_columns(rk: &[u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for c in 0..4 {
        let s = &rk[4 * c..4 * c + 4];
        for r in 0..4 {
            out[4 * c + r] = gf_mul(s[r], 0x0e)
                ^ gf_mul(s[(r + 1) % 4], 0x0b)
                ^ gf_mul(s[(r + 2) % 4], 0x0d)
                ^ gf_mul(s[(r + 3) % 4], 0x09);
        }
    }
    out
}

#[test]
fn the_tests_aes_key_expansion_matches_fips_197() {
    // FIPS-197 Appendix A.3: the AES-256 key expansion example.
    let key: [u8; 32] = [
        0x60, 0x3d, 0xeb, 0x10, 0x15, 0xca, 0x71, 0xbe, 0x2b, 0x73, 0xae, 0xf0, 0x85, 0x7d, 0x77,
        0x81, 0x1f, 0x35, 0x2c, 0x07, 0x3b, 0x61, 0x08, 0xd7, 0x2d, 0x98, 0x10, 0xa3, 0x09, 0x14,
        0xdf, 0xf4,
    ];
    let rk = aes256_round_keys(&key);
    assert_eq!(rk[0], key[..16]);
    assert_eq!(rk[1], key[16..]);
    // w[8..12] = 9ba35411 8e6925af a51a8b5f 2067fcde; w[56..60] = fe4890d1 e6188d0b 046df344 706c631e.
    assert_eq!(
        rk[2],
        [
            0x9b, 0xa3, 0x54, 0x11, 0x8e, 0x69, 0x25, 0xaf, 0xa5, 0x1a, 0x8b, 0x5f, 0x20, 0x67,
            0xfc, 0xde
        ]
    );
    assert_eq!(
        rk[14],
        [
            0xfe, 0x48, 0x90, 0xd1, 0xe6, 0x18, 0x8d, 0x0b, 0x04, 0x6d, 0xf3, 0x44, 0x70, 0x6c,
            0x63, 0x1e
        ]
    );
    // FIPS-197 §5.3.3's example column: InvMixColumns(MixColumns(x)) = x,
    // with MixColumns of db 13 53 45 = 8e 4d a1 bc.
    let mixed = [
        0x8e, 0x4d, 0xa1, 0xbc, 0x8e, 0x4d, 0xa1, 0xbc, 0x8e, 0x4d, 0xa1, 0xbc, 0x8e, 0x4d, 0xa1,
        0xbc,
    ];
    assert_eq!(inv_mix_columns(&mixed)[..4], [0xdb, 0x13, 0x53, 0x45]);
}

/// 16-byte patterns that give away a KEK: every encryption round key (0 and
/// 1 are the raw key; any one of 13 and 14 or an adjacent pair recovers
/// it), every decryption round key in InvMixColumns form, and windows of the
/// key's base64 text.
struct Schedules {
    needles: Vec<([u8; 16], String)>,
    /// 65536-bit filter on a needle's first two bytes.
    filter: Vec<u64>,
}

impl Schedules {
    fn of(keys: &[[u8; 32]]) -> Self {
        let mut needles = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            let rk = aes256_round_keys(key);
            for (i, r) in rk.iter().enumerate() {
                needles.push((*r, format!("KEK #{k} encryption round key {i}")));
            }
            for (i, r) in rk.iter().enumerate().take(14).skip(1) {
                needles.push((
                    inv_mix_columns(r),
                    format!("KEK #{k} decryption round key (InvMixColumns of {i})"),
                ));
            }
            let b64 = STANDARD.encode(key);
            for at in [0, 14, 28] {
                let window: [u8; 16] = b64.as_bytes()[at..at + 16].try_into().unwrap();
                needles.push((window, format!("KEK #{k} base64 text at {at}")));
            }
        }
        let mut filter = vec![0u64; 1024];
        for (n, _) in &needles {
            let i = usize::from(u16::from_le_bytes([n[0], n[1]]));
            filter[i / 64] |= 1 << (i % 64);
        }
        Schedules { needles, filter }
    }

    /// (offset, what) of every needle in `hay`.
    fn find(&self, hay: &[u8]) -> Vec<(usize, &str)> {
        let mut hits = Vec::new();
        for at in 0..hay.len().saturating_sub(15) {
            let i = usize::from(u16::from_le_bytes([hay[at], hay[at + 1]]));
            if self.filter[i / 64] & (1 << (i % 64)) == 0 {
                continue;
            }
            for (n, what) in &self.needles {
                if hay[at..at + 16] == n[..] {
                    hits.push((at, what.as_str()));
                }
            }
        }
        hits
    }
}

/// One readable and writable mapping of a process, from its smaps.
struct Mapping {
    start: u64,
    end: u64,
    name: String,
    flags: Vec<String>,
}

impl Mapping {
    /// Locked and left out of core dumps: where key material may live.
    fn is_key_memory(&self) -> bool {
        self.flags.iter().any(|f| f == "lo") && self.flags.iter().any(|f| f == "dd")
    }
}

fn writable_mappings(pid: u32) -> Vec<Mapping> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut maps: Vec<Mapping> = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(mut m) = current.take() {
                m.flags = flags.split_whitespace().map(str::to_owned).collect();
                maps.push(m);
            }
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(range), Some(perms)) = (words.next(), words.next()) else {
            continue;
        };
        let Some((from, to)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(from, 16), u64::from_str_radix(to, 16))
        else {
            continue;
        };
        // A mapping header: "start-end perms offset dev inode [name]".
        current = perms.starts_with("rw").then(|| Mapping {
            start,
            end,
            name: words.nth(3).unwrap_or("[anon]").to_owned(),
            flags: Vec::new(),
        });
    }
    assert!(!maps.is_empty(), "no writable mapping in /proc/{pid}/smaps");
    maps
}

/// Every hit of `schedules` in `pid`'s writable memory: (in key memory?,
/// description).
fn scan_process(pid: u32, schedules: &Schedules) -> Vec<(bool, String)> {
    use std::os::unix::fs::FileExt;
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut hits = Vec::new();
    const CHUNK: u64 = 4 << 20;
    for m in writable_mappings(pid) {
        let mut at = m.start;
        while at < m.end {
            // Overlap chunks by 15 bytes so no 16-byte window is split.
            let len = CHUNK.min(m.end - at);
            let mut buf = vec![0u8; len as usize];
            mem.read_exact_at(&mut buf, at).unwrap_or_else(|e| {
                panic!(
                    "read {:x}-{:x} {} of /proc/{pid}/mem: {e}",
                    m.start, m.end, m.name
                )
            });
            for (offset, what) in schedules.find(&buf) {
                hits.push((
                    m.is_key_memory(),
                    format!(
                        "{what} at {:x} in {:x}-{:x} {} (VmFlags: {})",
                        at + offset as u64,
                        m.start,
                        m.end,
                        m.name,
                        m.flags.join(" ")
                    ),
                ));
            }
            if at + len >= m.end {
                break;
            }
            at += len - 15;
        }
    }
    hits
}

/// Lines kekd logged for passed self-checks so far.
fn self_checks_passed(serve: &Process) -> usize {
    serve.stderr().matches("keyring self-check passed").count()
}

/// After self-checks, a flood of connections and a reload, no KEK and no
/// round key of its schedule (encryption or InvMixColumns decryption form)
/// is anywhere in the serving process's writable memory except its locked,
/// non-dumpable key pages — where each loaded version's schedule is found,
/// which shows the scan sees what it looks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_kek_or_key_schedule_outside_locked_memory_after_a_workload() {
    if !is_root() {
        common::skip::skip("needs root to read /proc/<pid>/mem of a non-dumpable process");
        return;
    }
    let node = Node::new().await;
    let mut serve = common::spawn_serve(
        &node.keyring,
        &node.socket,
        node.dir.path(),
        &[
            "--self-check-interval",
            "1s",
            "--log-level",
            "info,kekd::keyring=debug",
        ],
    )
    .await;
    let mut client = serve.ready().await;
    let pid = pid_of(&serve);

    // Self-checks: three more than ran at startup, counted in the log.
    let at_start = self_checks_passed(&serve);
    assert!(
        at_start >= 1,
        "startup self-check not logged:\n{}",
        serve.stderr()
    );
    common::eventually(
        "three periodic self-checks",
        Duration::from_secs(30),
        || {
            let n = self_checks_passed(&serve);
            async move {
                (n >= at_start + 3)
                    .then_some(())
                    .ok_or(format!("{n} self-checks"))
            }
        },
    )
    .await;

    // A flood: many connections at once, each sealing and opening (48:
    // within the connection limit of 64, so none is evicted mid-call).
    let flood = (0..48).map(|c| {
        let socket = node.socket.clone();
        tokio::spawn(async move {
            let mut client = common::connect(&socket).await;
            for i in 0..4 {
                let plaintext = seed();
                let sealed = client
                    .encrypt(plaintext.clone(), &uid(c * 4 + i))
                    .await
                    .unwrap();
                let opened = client
                    .decrypt(
                        sealed.ciphertext,
                        &sealed.key_id,
                        Default::default(),
                        &uid(c),
                    )
                    .await
                    .unwrap();
                assert_eq!(opened, plaintext);
            }
        })
    });
    for task in flood.collect::<Vec<_>>() {
        task.await.unwrap();
    }

    // A reload: the pending version 2 promoted, then a version 3 the
    // process never saw made primary; served once Status names it.
    let before = client.status().await.unwrap().key_id;
    assert_eq!(common::version_of(&before), 1, "{before}");
    let k = node.k();
    for _ in 0..2 {
        let out = admin_async(&["rotate", "--promote", "--keyring", &k], node.dir.path()).await;
        out.ok();
    }
    let after = common::eventually("the rotated key served", Duration::from_secs(30), || {
        let socket = node.socket.clone();
        let before = before.clone();
        async move {
            let mut c = common::connect(&socket).await;
            let id = c.status().await.map_err(|e| e.to_string())?.key_id;
            (common::version_of(&id) == 3)
                .then_some(id)
                .ok_or(format!("still {before}"))
        }
    })
    .await;
    let sealed = client.encrypt(seed(), &uid(9999)).await.unwrap();
    assert_eq!(sealed.key_id, after);
    // And one self-check of the new snapshot.
    let n = self_checks_passed(&serve);
    common::eventually(
        "a self-check after the reload",
        Duration::from_secs(30),
        || {
            let now = self_checks_passed(&serve);
            async move { (now > n).then_some(()).ok_or(format!("{now} self-checks")) }
        },
    )
    .await;

    let needles = Needles::of_keyring(&node.keyring);
    assert_eq!(needles.raw.len(), 3, "three versions with material");
    let schedules = Schedules::of(&needles.raw);
    let hits = scan_process(pid, &schedules);
    let (in_key_memory, leaked): (Vec<_>, Vec<_>) = hits.into_iter().partition(|(ok, _)| *ok);
    assert!(
        leaked.is_empty(),
        "{} copies of key material outside locked, non-dumpable memory:\n{}",
        leaked.len(),
        leaked
            .iter()
            .map(|(_, what)| what.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The positive control: every version's schedule is in its key page.
    for k in 0..3 {
        for i in 0..15 {
            let want = format!("KEK #{k} encryption round key {i} ");
            assert!(
                in_key_memory
                    .iter()
                    .any(|(_, what)| what.starts_with(&want)),
                "{want}not found in key memory: {in_key_memory:#?}"
            );
        }
    }

    serve.signal(rustix::process::Signal::TERM);
    let out = serve.wait_exit().await;
    out.ok();
}
