//! `kekd admin backup` and `kekd admin restore-backup` through the binary:
//! a backup taken, the keyring deleted, restored → every old
//! ciphertext decrypts; a wrong passphrase and a truncated or garbled backup
//! are refused and write nothing; an older backup never replaces a keyring
//! with more versions; `--out` is never clobbered; the passphrase comes from
//! a file, the environment or a terminal, never argv, and never shows in
//! output; `--output json` parses.

use crate::common;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use kekd::backend::local::keyring_from_file;
use kekd::keyring::store;
use kekd::secret::Plaintext;

use common::{
    EX_CONFIG, EX_USAGE, Finished, error_message, json_of, kekd, keks_in, mode_of, run_guarded,
    seed, tempdir_blocking,
};

const PASS: &str = "tr0ub4dor & three staples";
const OTHER_PASS: &str = "correct horse battery staple";

/// A node: a keyring made by `kekd admin init` and a passphrase file.
struct Node {
    dir: TempDir,
    keyring: PathBuf,
    pass_file: PathBuf,
}

impl Node {
    fn init() -> Self {
        let dir = tempdir_blocking();
        let keyring = dir.path().join("etc/keyring");
        let pass_file = dir.path().join("passphrase");
        write_private(&pass_file, &format!("{PASS}\n"));
        let node = Self {
            dir,
            keyring,
            pass_file,
        };
        node.ok(&["init", "--keyring", node.k()]);
        node
    }

    fn k(&self) -> &str {
        self.keyring.to_str().unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kekd admin ARGS…` with `env`; asserts that no passphrase and no
    /// key material shows in what it printed.
    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Finished {
        let mut cmd = kekd();
        cmd.arg("admin").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_guarded(cmd, self.dir.path());
        assert_clean(&out, &self.keyring);
        out
    }

    fn run(&self, args: &[&str]) -> Finished {
        self.run_env(args, &[])
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> Finished {
        let out = self.run(args);
        assert_eq!(out.code(), 0, "{args:?}: {out:#?}");
        out
    }

    /// `backup --keyring K --out OUT --passphrase-file P EXTRA…`.
    fn backup(&self, out: &Path, extra: &[&str]) -> Finished {
        let mut args = vec![
            "backup",
            "--keyring",
            self.k(),
            "--out",
            out.to_str().unwrap(),
            "--passphrase-file",
            self.pass_file.to_str().unwrap(),
        ];
        args.extend(extra);
        self.run(&args)
    }

    /// `restore-backup --keyring K --from FROM --passphrase-file P EXTRA…`.
    fn restore(&self, from: &Path, extra: &[&str]) -> Finished {
        let mut args = vec![
            "restore-backup",
            "--keyring",
            self.k(),
            "--from",
            from.to_str().unwrap(),
            "--passphrase-file",
            self.pass_file.to_str().unwrap(),
        ];
        args.extend(extra);
        self.run(&args)
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.keyring).unwrap()
    }

    fn audit_commands(&self) -> Vec<String> {
        let audit = self.path("etc/keyring.audit.jsonl");
        fs::read_to_string(audit)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} v{} {}", v["command"], v["version"], v["to"])
            })
            .collect()
    }
}

/// Writes a 0600 file.
fn write_private(path: &Path, text: &str) {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap();
}

/// Neither passphrase nor any KEK of `keyring` (when it exists) appears in
/// the output.
#[track_caller]
fn assert_clean(out: &Finished, keyring: &Path) {
    let all = format!("{}{}", out.stdout, out.stderr);
    for secret in [PASS, OTHER_PASS, "short pass"] {
        assert!(!all.contains(secret), "passphrase in output: {out:#?}");
    }
    if keyring.exists() {
        for kek in keks_in(keyring) {
            assert!(!all.contains(&kek), "key material in output: {out:#?}");
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Seals `n` fresh seeds with the keyring at `path` as it is now (the
/// library path kekd serve takes); returns (key_id, ciphertext, seed).
fn encrypt_seeds(path: &Path, n: usize) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let keyring = keyring_from_file(store::read(path).unwrap()).unwrap();
    runtime().block_on(async {
        let mut out = Vec::new();
        for _ in 0..n {
            let s = seed();
            let (key_id, ct) = keyring.encrypt(&Plaintext::new(s.clone())).await.unwrap();
            out.push((key_id.to_string(), ct, s));
        }
        out
    })
}

#[test]
fn backup_delete_restore_every_old_ciphertext_decrypts() {
    let node = Node::init();
    let mut sealed = encrypt_seeds(&node.keyring, 3);
    node.ok(&["rotate", "--promote", "--keyring", node.k()]);
    sealed.extend(encrypt_seeds(&node.keyring, 3));
    node.ok(&["rotate", "--keyring", node.k()]); // 3 pending
    let key_ids: std::collections::BTreeSet<&str> =
        sealed.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(key_ids.len(), 2, "seeds under versions 1 and 2");

    let out_path = node.path("keyring.backup");
    let out = node.backup(&out_path, &[]);
    out.ok();
    assert!(out.stdout.starts_with(&format!(
        "backup: wrote {} (mode 0600) from keyring {}\n",
        out_path.display(),
        node.k()
    )));
    assert!(
        out.stdout
            .contains("versions    1 decrypt-only, 2 primary, 3 pending\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("argon2id (64 MiB, 3 passes, 1 lane)"));
    assert_eq!(out.stderr, "");
    assert_eq!(mode_of(&out_path), 0o600);
    let text = fs::read_to_string(&out_path).unwrap();
    assert!(text.starts_with("kekd-backup v1\n"));
    assert!(text.contains("\nkdf argon2id v=19 m=65536 t=3 p=1 salt="));
    assert!(!text.contains(PASS));
    for kek in keks_in(&node.keyring) {
        assert!(!text.contains(&kek), "the backup holds a KEK in the clear");
    }

    // The keyring is lost.
    let original = node.bytes();
    fs::remove_file(&node.keyring).unwrap();

    let out = node.restore(&out_path, &[]);
    out.ok();
    assert_eq!(
        out.stdout.lines().take(4).collect::<Vec<_>>(),
        [
            format!(
                "restore-backup: created {} from backup {} (keyring {}, taken {})",
                node.k(),
                out_path.display(),
                store::read(&node.keyring).unwrap().id,
                text.lines()
                    .nth(2)
                    .unwrap()
                    .strip_prefix("created ")
                    .unwrap()
            ),
            "  version 1 new → decrypt-only".to_owned(),
            "  version 2 new → primary".to_owned(),
            "  version 3 new → pending".to_owned(),
        ]
    );
    assert_eq!(node.bytes(), original, "restored byte for byte");
    assert_eq!(mode_of(&node.keyring), 0o600);

    let keyring = keyring_from_file(store::read(&node.keyring).unwrap()).unwrap();
    runtime().block_on(async {
        for (key_id, ct, s) in &sealed {
            let (_, pt) = keyring.decrypt(key_id, ct).await.unwrap();
            assert_eq!(pt.expose_secret(), s.as_slice(), "{key_id}");
        }
    });
    assert_eq!(
        node.audit_commands()
            .iter()
            .filter(|l| l.starts_with("\"restore-backup\""))
            .collect::<Vec<_>>(),
        [
            "\"restore-backup\" v1 \"decrypt-only\"",
            "\"restore-backup\" v2 \"primary\"",
            "\"restore-backup\" v3 \"pending\"",
        ]
    );

    // Both commands are safe to re-run.
    let out = node.restore(&out_path, &[]);
    out.ok();
    assert_eq!(
        out.stdout,
        format!(
            "restore-backup: nothing to do: {} already matches backup {}\n",
            node.k(),
            out_path.display()
        )
    );
    let out = node.backup(&out_path, &[]);
    out.ok();
    assert!(
        out.stdout.starts_with(&format!(
            "backup: nothing to do: {} already holds this keyring",
            out_path.display()
        )),
        "{out:#?}"
    );
    assert_eq!(fs::read_to_string(&out_path).unwrap(), text);
    assert_eq!(node.audit_commands().len(), 3 + 2 + 3);
}

#[test]
fn a_wrong_passphrase_is_one_clear_refusal_that_writes_nothing() {
    let node = Node::init();
    let backup = node.path("b");
    assert_eq!(node.backup(&backup, &[]).code(), 0);
    let original = node.bytes();
    fs::remove_file(&node.keyring).unwrap();

    let args = [
        "restore-backup",
        "--keyring",
        node.k(),
        "--from",
        backup.to_str().unwrap(),
    ];
    let out = node.run_env(&args, &[("KEKD_BACKUP_PASSPHRASE", OTHER_PASS)]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "backup {}: wrong passphrase or damaged backup; nothing was written",
            backup.display()
        )
    );
    assert!(!node.keyring.exists());

    // The right one, from the environment this time.
    let out = node.run_env(&args, &[("KEKD_BACKUP_PASSPHRASE", PASS)]);
    out.ok();
    assert_eq!(node.bytes(), original);

    // Over an existing keyring: untouched.
    let out = node.run_env(&args, &[("KEKD_BACKUP_PASSPHRASE", OTHER_PASS)]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(node.bytes(), original);
}

#[test]
fn a_truncated_or_garbled_backup_is_refused_precisely() {
    let node = Node::init();
    let backup = node.path("b");
    assert_eq!(node.backup(&backup, &[]).code(), 0);
    fs::remove_file(&node.keyring).unwrap();
    let text = fs::read_to_string(&backup).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let header_len: usize = lines[..6].iter().map(|l| l.len() + 1).sum();
    let sealed = lines[6].strip_prefix("sealed ").unwrap();
    let salt = lines[4].rsplit_once("salt=").unwrap().1;
    let nonce = lines[5].rsplit_once("nonce=").unwrap().1;

    let damaged = node.path("damaged");
    let cases = [
        (0, "line 1 is missing: the file is empty"),
        (9, "line 1 is cut short (file truncated?)"),
        (
            header_len - 10,
            "line 6 does not end in a newline (file truncated?)",
        ),
        (
            header_len,
            "line 7 is missing: expected `sealed <base64>` (file truncated?)",
        ),
        (
            header_len + 100,
            "line 7 does not end in a newline (file truncated?)",
        ),
        (
            text.len() - 1,
            "line 7 does not end in a newline (file truncated?)",
        ),
    ];
    for (len, reason) in cases {
        let _ = fs::remove_file(&damaged);
        fs::write(&damaged, &text.as_bytes()[..len]).unwrap();
        let out = node.restore(&damaged, &[]);
        assert_eq!(out.code(), EX_CONFIG, "{len}: {out:#?}");
        let message = error_message(&out);
        assert_eq!(message, format!("backup {}: {reason}", damaged.display()));
        for content in [salt, nonce, &sealed[..12], &sealed[sealed.len() - 12..]] {
            assert!(!message.contains(content), "{message}");
        }
        assert!(!node.keyring.exists(), "{len}: a keyring was written");
    }

    // A changed character inside the sealed body: authenticated, so refused
    // as one opaque error.
    let mid = header_len + 7 + sealed.len() / 2;
    let mut garbled = text.clone().into_bytes();
    garbled[mid] = if garbled[mid] == b'A' { b'B' } else { b'A' };
    fs::remove_file(&damaged).unwrap();
    fs::write(&damaged, &garbled).unwrap();
    let out = node.restore(&damaged, &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "backup {}: wrong passphrase or damaged backup; nothing was written",
            damaged.display()
        )
    );
    assert!(!node.keyring.exists());
}

#[test]
fn restore_never_replaces_a_keyring_holding_versions_the_backup_lacks() {
    let node = Node::init();
    let at_v1 = node.path("v1.backup");
    assert_eq!(node.backup(&at_v1, &[]).code(), 0);
    let v1_bytes = node.bytes();
    node.ok(&["rotate", "--promote", "--keyring", node.k()]);
    node.ok(&["rotate", "--keyring", node.k()]);
    let newer = node.bytes();

    let out = node.restore(&at_v1, &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "restore-backup refused: the keyring holds versions 2, 3 that the backup lacks (the backup is older \
             than the keyring); restoring would lose them; {} was left as it is",
            node.k()
        )
    );
    assert_eq!(node.bytes(), newer);
    assert!(
        !node
            .audit_commands()
            .iter()
            .any(|l| l.contains("restore-backup"))
    );

    // The other way round — a node left behind catches up from a newer
    // backup — is allowed, and audited.
    let at_v3 = node.path("v3.backup");
    assert_eq!(node.backup(&at_v3, &[]).code(), 0);
    fs::write(&node.keyring, &v1_bytes).unwrap();
    let out = node.restore(&at_v3, &[]);
    out.ok();
    assert_eq!(
        out.stdout.lines().skip(1).take(3).collect::<Vec<_>>(),
        [
            "  version 1 primary → decrypt-only",
            "  version 2 new → primary",
            "  version 3 new → pending",
        ]
    );
    assert!(out.stdout.starts_with(&format!(
        "restore-backup: updated {} from backup {}",
        node.k(),
        at_v3.display()
    )));
    assert_eq!(node.bytes(), newer);

    // Another keyring's backup is never restored over this one.
    let stranger = Node::init();
    let theirs = stranger.path("theirs");
    assert_eq!(stranger.backup(&theirs, &[]).code(), 0);
    let out = node.restore(&theirs, &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    let ids = (
        store::read(&node.keyring).unwrap().id.to_string(),
        store::read(&stranger.keyring).unwrap().id.to_string(),
    );
    assert!(
        error_message(&out).starts_with(&format!(
            "restore-backup refused: the backup holds keyring {}, but the keyring there is {}",
            ids.1, ids.0
        )),
        "{out:#?}"
    );
    assert_eq!(node.bytes(), newer);
}

#[test]
fn backup_never_replaces_a_file_unless_forced_and_then_only_a_backup() {
    let node = Node::init();
    let out_path = node.path("b");
    assert_eq!(node.backup(&out_path, &[]).code(), 0);
    let first = fs::read_to_string(&out_path).unwrap();
    let created = first
        .lines()
        .nth(2)
        .unwrap()
        .strip_prefix("created ")
        .unwrap();
    let id = store::read(&node.keyring).unwrap().id;

    node.ok(&["rotate", "--promote", "--keyring", node.k()]);
    let out = node.backup(&out_path, &[]);
    assert_eq!(
        out.refused(1),
        format!(
            "backup refused: {} already holds an older backup (keyring {id} taken {created}, versions 1 primary); \
             choose another --out, or pass --force to replace it",
            out_path.display()
        )
    );
    assert_eq!(fs::read_to_string(&out_path).unwrap(), first);

    let out = node.backup(&out_path, &["--force"]);
    out.ok();
    let second = fs::read_to_string(&out_path).unwrap();
    assert!(second.contains("\nversions 1:decrypt-only 2:primary\n"));
    assert_eq!(mode_of(&out_path), 0o600);

    // Same keyring, another passphrase: not the same backup.
    let out = node.run_env(
        &[
            "backup",
            "--keyring",
            node.k(),
            "--out",
            out_path.to_str().unwrap(),
        ],
        &[("KEKD_BACKUP_PASSPHRASE", OTHER_PASS)],
    );
    out.exited(1);
    assert!(
        error_message(&out).contains("that differs from it or was sealed under another passphrase"),
        "{out:#?}"
    );
    assert_eq!(fs::read_to_string(&out_path).unwrap(), second);

    // --force never clobbers what is not a backup — the keyring least of all.
    let keyring = node.bytes();
    let out = node.backup(&node.keyring, &["--force"]);
    assert_eq!(
        out.refused(1),
        format!(
            "backup refused: {0} already exists and is not a kekd backup (line 1 is `kekd-keyring …`: a keyring \
             file, not a backup); --force replaces only an older kekd backup: choose another --out",
            node.k()
        )
    );
    assert_eq!(node.bytes(), keyring);
}

#[test]
fn the_passphrase_never_comes_from_argv_nor_from_a_file_others_can_read() {
    let node = Node::init();
    let out_path = node.path("b");
    let out_arg = out_path.to_str().unwrap();

    let out = node.run(&[
        "backup",
        "--keyring",
        node.k(),
        "--out",
        out_arg,
        "--passphrase",
        PASS,
    ]);
    assert_eq!(out.code(), EX_USAGE, "{out:#?}");

    let open = node.path("open-passphrase");
    write_private(&open, PASS);
    fs::set_permissions(&open, fs::Permissions::from_mode(0o640)).unwrap();
    let out = node.run(&[
        "backup",
        "--keyring",
        node.k(),
        "--out",
        out_arg,
        "--passphrase-file",
        open.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "passphrase file {0} has permissions 0640, which let other users read it; run `chmod 600 {0}`",
            open.display()
        )
    );

    let backup_args = ["backup", "--keyring", node.k(), "--out", out_arg];
    let out = node.run_env(&backup_args, &[("KEKD_BACKUP_PASSPHRASE", "short pass")]);
    assert_eq!(
        out.refused(1),
        "the passphrase has 10 characters; a backup passphrase needs at least 12; nothing was written"
    );
    let out = node.run_env(&backup_args, &[("KEKD_BACKUP_PASSPHRASE", "")]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        "KEKD_BACKUP_PASSPHRASE is set but empty"
    );
    assert!(!out_path.exists());

    // Without a file, the variable or a terminal (setsid: no controlling
    // terminal), there is nothing to ask: a usage error, not a hang.
    let mut cmd = Command::new("setsid");
    cmd.arg(env!("CARGO_BIN_EXE_kekd"))
        .args(["admin", "backup", "--keyring", node.k(), "--out", out_arg])
        .env_remove("KEKD_BACKUP_PASSPHRASE")
        .env_remove("KEKD_BACKUP_PASSPHRASE_FILE")
        .stdin(std::process::Stdio::null());
    let out = run_guarded(cmd, node.dir.path());
    assert_eq!(out.code(), EX_USAGE, "{out:#?}");
    assert!(
        error_message(&out).starts_with(
            "no passphrase: pass --passphrase-file FILE or set KEKD_BACKUP_PASSPHRASE (no terminal to ask on: "
        ),
        "{out:#?}"
    );
    assert!(!out_path.exists());
}

#[test]
fn json_reports_parse() {
    let node = Node::init();
    let out_path = node.path("b");
    let out = node.backup(&out_path, &["--output", "json"]);
    out.ok();
    let j = json_of(&out);
    assert_eq!(j["command"], "backup");
    assert_eq!(j["changed"], true);
    assert_eq!(j["replaced"], false);
    assert_eq!(j["verified"], true);
    assert_eq!(j["out"], out_path.to_str().unwrap());
    assert_eq!(j["versions"][0]["state"], "primary");
    assert_eq!(j["kdf"]["algorithm"], "argon2id");
    assert_eq!(j["kdf"]["memory_kib"], 65536);
    assert_eq!(j["kdf"]["passes"], 3);
    assert_eq!(j["cipher"], "aes-256-gcm");
    let id = j["keyring_id"].as_str().unwrap().to_owned();

    let out = node.backup(&out_path, &["--output", "json"]);
    assert_eq!(json_of(&out)["changed"], false, "{out:#?}");

    // Restore onto a rebuilt node: its directory does not exist yet.
    let rebuilt = node.path("rebuilt/etc/kekd/keyring");
    let wrong = node.path("wrong");
    write_private(&wrong, OTHER_PASS);
    let run = |pass: &Path| {
        node.run(&[
            "restore-backup",
            "--keyring",
            rebuilt.to_str().unwrap(),
            "--from",
            out_path.to_str().unwrap(),
            "--output",
            "json",
            "--passphrase-file",
            pass.to_str().unwrap(),
        ])
    };
    let out = run(&wrong);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    let j = json_of(&out);
    assert_eq!(j["exit_code"], EX_CONFIG);
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .ends_with(": wrong passphrase or damaged backup; nothing was written")
    );

    let out = run(&node.pass_file);
    out.ok();
    let j = json_of(&out);
    assert_eq!(j["command"], "restore-backup");
    assert_eq!(j["changed"], true);
    assert_eq!(j["created"], true);
    assert_eq!(j["keyring_id"], id);
    assert_eq!(j["transitions"][0]["from"], serde_json::Value::Null);
    assert_eq!(j["transitions"][0]["to"], "primary");
    assert_eq!(j["transitions"][0]["key_id"], format!("kekd/{id}/v1"));
    assert_eq!(fs::read(&rebuilt).unwrap(), node.bytes());
    assert_eq!(mode_of(rebuilt.parent().unwrap()), 0o700);

    let out = run(&node.pass_file);
    let j = json_of(&out);
    assert_eq!(j["changed"], false, "{out:#?}");
}

#[test]
fn pkcs11_keys_cannot_be_backed_up() {
    let node = Node::init();
    let out_path = node.path("b");
    for args in [
        vec![
            "backup",
            "--backend",
            "pkcs11",
            "--out",
            out_path.to_str().unwrap(),
        ],
        vec![
            "restore-backup",
            "--backend",
            "pkcs11",
            "--from",
            out_path.to_str().unwrap(),
        ],
    ] {
        let out = node.run_env(&args, &[("KEKD_BACKUP_PASSPHRASE", PASS)]);
        out.exited(1);
        let message = error_message(&out);
        assert!(
            message.ends_with(
                "is for local keyrings. PKCS#11 keys cannot leave the token, so kekd cannot back them up: back up \
                 the token as its vendor documents (see docs/hsm.md)"
            ),
            "{message}"
        );
    }
    assert!(!out_path.exists());
}

/// Makes a FIFO at `path`: opening it to read would wait for a writer.
fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// A FIFO at `--from`, at `--out` or as the passphrase file would block
/// the command forever (the watchdog in `run_guarded` only reports such a
/// hang): each is refused at once, by name, and nothing is written.
#[test]
fn a_fifo_as_a_backup_or_passphrase_file_is_refused_without_blocking() {
    let node = Node::init();
    let before = node.bytes();

    let from = node.path("from.kekd-backup");
    mkfifo(&from);
    let out = node.restore(&from, &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "backup {} is a FIFO, not a regular file; nothing was read from it: name the backup file itself (save \
             a pipe's output to a file first)",
            from.display()
        )
    );
    // A link to a device is followed (Secrets are mounted through links)
    // and the device refused.
    let null = node.path("null.kekd-backup");
    std::os::unix::fs::symlink("/dev/zero", &null).unwrap();
    let out = node.restore(&null, &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "backup {} is a character device, not a regular file; nothing was read from it: name the backup file \
             itself (save a pipe's output to a file first)",
            null.display()
        )
    );

    let out_path = node.path("out.kekd-backup");
    mkfifo(&out_path);
    let out = node.backup(&out_path, &[]);
    assert_eq!(
        out.refused(1),
        format!(
            "backup refused: {0} already exists and cannot be read (backup {0} is a FIFO, not a regular file; \
             nothing was read from it: name the backup file itself (save a pipe's output to a file first)); \
             choose another --out",
            out_path.display()
        )
    );
    assert!(
        fs::symlink_metadata(&out_path)
            .unwrap()
            .file_type()
            .is_fifo()
    );

    let pass = node.path("fifo-passphrase");
    mkfifo(&pass);
    let out = node.run(&[
        "backup",
        "--keyring",
        node.k(),
        "--out",
        node.path("new.kekd-backup").to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "passphrase file {}: is a FIFO, not a regular file; nothing was read from it: give a file holding \
             only the passphrase",
            pass.display()
        )
    );
    assert!(!node.path("new.kekd-backup").exists());
    assert_eq!(node.bytes(), before, "the keyring changed");
}
