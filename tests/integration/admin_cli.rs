//! The `kekd admin` keyring commands through the binary: guards and
//! idempotence with exact exit codes and messages, `--output json`, the
//! lock, the audit log, and crash safety under `kill -9`.

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use kekd::id::{KeyVersion, Timestamp};
use kekd::keyring::KeyState;
use kekd::keyring::store::{self, KeyringFile};

use common::{
    EX_CONFIG, EX_TEMPFAIL, EX_USAGE, Finished, Process, Rng, admin, admin_async, error_message,
    json_of, kekd, keks_in, mode_of, run_guarded, tempdir_blocking,
};

/// A keyring made by `kekd admin init` in its own tempdir.
struct Ring {
    dir: TempDir,
    path: PathBuf,
}

impl Ring {
    fn init() -> Self {
        let dir = tempdir_blocking();
        let path = dir.path().join("keyring");
        let out = admin(&["init", "--keyring", path.to_str().unwrap()], dir.path());
        out.ok();
        Self { dir, path }
    }

    /// The keyring path as given on command lines.
    fn k(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn id(&self) -> String {
        store::read(&self.path).unwrap().id.to_string()
    }

    fn key_id(&self, version: u32) -> String {
        format!("kekd/{}/v{version}", self.id())
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }

    fn audit(&self) -> String {
        fs::read_to_string(self.dir.path().join("keyring.audit.jsonl")).unwrap_or_default()
    }

    /// `kekd admin ARGS… --keyring K`.
    fn run(&self, args: &[&str]) -> Finished {
        let mut all = args.to_vec();
        all.extend(["--keyring", self.k()]);
        admin(&all, self.dir.path())
    }

    /// Runs a step that must succeed and print exactly `stdout`.
    #[track_caller]
    fn ok(&self, args: &[&str], stdout: &str) {
        let out = self.run(args);
        assert_eq!(out.code(), 0, "{args:?}: {out:#?}");
        assert_eq!(out.stdout, stdout, "{args:?}");
        assert_eq!(out.stderr, "", "{args:?}");
    }

    /// Runs a step that must change the keyring and print exactly the
    /// `transitions` lines, then `warning: …` if given, then one `next:`
    /// line (and the indented steps of a procedure, if any) that names
    /// `next` (the wording around it is the docs' business).
    #[track_caller]
    fn changed(&self, args: &[&str], transitions: &str, warning: Option<&str>, next: &str) {
        let before = self.bytes();
        let out = self.run(args);
        assert_eq!(out.code(), 0, "{args:?}: {out:#?}");
        assert_eq!(out.stderr, "", "{args:?}");
        let rest = out
            .stdout
            .strip_prefix(transitions)
            .unwrap_or_else(|| panic!("{args:?}: expected transitions\n{transitions}{out:#?}"));
        let rest = match warning {
            Some(w) => rest
                .strip_prefix(&format!("warning: {w}\n"))
                .unwrap_or_else(|| panic!("{args:?}: expected warning {w:?}: {out:#?}")),
            None => rest,
        };
        let next_line = rest
            .strip_prefix("next: ")
            .and_then(|r| r.strip_suffix('\n'))
            .filter(|r| r.lines().skip(1).all(|l| l.starts_with("  ")))
            .unwrap_or_else(|| panic!("{args:?}: expected one `next:` line: {out:#?}"));
        assert!(
            next_line.contains(next),
            "{args:?}: `next:` does not name {next:?}: {out:#?}"
        );
        assert_ne!(self.bytes(), before, "{args:?} changed nothing");
    }

    /// Runs a step that must be a no-op: exit 0, `<command>: nothing to do:
    /// <why>`, and not a byte of the keyring or its audit log changed.
    #[track_caller]
    fn noop(&self, args: &[&str], why: &str) {
        let (before, audit) = (self.bytes(), self.audit());
        self.ok(args, &format!("{}: nothing to do: {why}\n", args[0]));
        assert_eq!(self.bytes(), before, "{args:?} changed the keyring");
        assert_eq!(self.audit(), audit, "{args:?} wrote an audit line");
    }

    /// Runs a step that must be refused with `code` and exactly `message`,
    /// leaving the keyring byte-for-byte and the audit log unchanged.
    #[track_caller]
    fn refused(&self, args: &[&str], code: i32, message: &str) {
        let (before, audit) = (self.bytes(), self.audit());
        let out = self.run(args);
        assert_eq!(out.code(), code, "{args:?}: {out:#?}");
        assert_eq!(error_message(&out), message, "{args:?}");
        assert_eq!(out.stdout, "", "{args:?}");
        assert_eq!(self.bytes(), before, "{args:?} changed the keyring");
        assert_eq!(self.audit(), audit, "{args:?} wrote an audit line");
    }

    fn states(&self) -> Vec<(u32, KeyState)> {
        store::read(&self.path)
            .unwrap()
            .versions
            .iter()
            .map(|v| (v.info.version.get(), v.info.state))
            .collect()
    }

    /// `step: version V FROM → TO (key_id …)` for each transition.
    fn transitions(&self, step: &str, moves: &[(u32, &str, &str)]) -> String {
        moves
            .iter()
            .map(|(v, from, to)| {
                format!(
                    "{step}: version {v} {from} → {to} (key_id {})\n",
                    self.key_id(*v)
                )
            })
            .collect()
    }

    /// What `next:` must name after a promotion: retiring the old primary
    /// with a scan.
    fn next_after_promote(&self, old: u32) -> String {
        format!(
            "\n       kekd admin retire {old} --scan scan.json --keyring {}",
            self.k()
        )
    }

    /// The refusal of `retire V` without a scan for a version that was
    /// primary (its first line).
    fn needs_scan(&self, v: u32) -> String {
        let file = store::read(&self.path).unwrap();
        let promoted = file.versions[v as usize - 1].info.promoted.unwrap();
        format!(
            "retire refused: version {v} was primary (since {promoted}), so objects may be stored under it although \
             it served no Decrypt: an apiserver caches the seeds it made itself and only decrypts them after a \
             restart, so Decrypt counts prove nothing for this version. Retire it only with a fresh scan that shows \
             nothing stored under it (--scan), or pass --force to retire it anyway (objects stored under version \
             {v} become unreadable until `kekd admin restore {v}`). The procedure:"
        )
    }

    /// The warning of a forced retire.
    fn risk(v: u32) -> String {
        format!(
            "retired without a scan: objects stored under version {v} become unreadable (at the latest when an \
             apiserver restarts) until `kekd admin restore {v}`"
        )
    }

    /// What `next:` must name after a retire: how to undo it.
    fn next_after_retire(&self, v: u32) -> String {
        format!("`kekd admin restore {v} --keyring {}`", self.k())
    }

    fn no_usage_warning(&self, v: u32) -> String {
        format!(
            "no usage record for this keyring beside {}: cannot tell whether version {v} is still used; \
             run `kekd admin list` on every node",
            self.k()
        )
    }
}

fn s(v: KeyState) -> &'static str {
    v.as_str()
}

// ----------------------------------------------------- guards and idempotence

#[test]
fn rotate_twice_reports_the_pending_version_and_rotate_promote_then_promotes_it() {
    let ring = Ring::init();
    ring.changed(
        &["rotate"],
        &ring.transitions("rotate", &[(2, "new", "pending")]),
        None,
        &format!("`kekd admin promote 2 --keyring {}`", ring.k()),
    );
    ring.noop(
        &["rotate"],
        "version 2 is already pending; roll it out and run `kekd admin promote 2` (or retire it) before rotating again",
    );
    // --promote uses the pending version rather than adding another.
    ring.changed(
        &["rotate", "--promote"],
        &ring.transitions(
            "rotate",
            &[(1, "primary", "decrypt-only"), (2, "pending", "primary")],
        ),
        None,
        &ring.next_after_promote(1),
    );
    assert_eq!(
        ring.states(),
        [(1, KeyState::DecryptOnly), (2, KeyState::Primary)]
    );
    ring.changed(
        &["rotate", "--promote"],
        &ring.transitions(
            "rotate",
            &[
                (3, "new", "pending"),
                (2, "primary", "decrypt-only"),
                (3, "pending", "primary"),
            ],
        ),
        None,
        &ring.next_after_promote(2),
    );
}

#[test]
fn promote_guards_and_idempotence() {
    let ring = Ring::init();
    ring.refused(
        &["promote", "2"],
        1,
        "promote refused: version 2 is not in this keyring (see `kekd admin list`)",
    );
    ring.noop(&["promote", "1"], "version 1 is already primary");
    ring.run(&["rotate"]);
    ring.changed(
        &["promote", "2"],
        &ring.transitions(
            "promote",
            &[(1, "primary", "decrypt-only"), (2, "pending", "primary")],
        ),
        None,
        &ring.next_after_promote(1),
    );
    ring.noop(&["promote", "2"], "version 2 is already primary");
    ring.refused(
        &["promote", "1"],
        1,
        "promote refused: version 1 is decrypt-only: it was primary before, and making it primary again would \
         reuse its key id (the apiserver forbids A→B→A); run `kekd admin rotate --promote` for a new version",
    );
    ring.run(&["rotate"]);
    ring.run(&["retire", "3"]);
    ring.refused(
        &["promote", "3"],
        1,
        "promote refused: version 3 is retired: restore it first (`kekd admin restore`), and only a \
         never-promoted version can be promoted",
    );
    ring.run(&["destroy", "3", "--yes-destroy-key-material"]);
    ring.refused(
        &["promote", "3"],
        1,
        "promote refused: version 3 is destroyed: its key material is gone",
    );
    assert_eq!(
        ring.states(),
        [
            (1, KeyState::DecryptOnly),
            (2, KeyState::Primary),
            (3, KeyState::Destroyed)
        ]
    );
}

#[test]
fn retire_guards_and_idempotence() {
    let ring = Ring::init();
    ring.refused(
        &["retire", "1"],
        1,
        "retire refused: version 1 is primary: the primary cannot be retired; rotate to a new primary first \
         (`kekd admin rotate --promote`)",
    );
    ring.refused(
        &["retire", "1", "--force"],
        1,
        "retire refused: version 1 is primary: the primary cannot be retired; rotate to a new primary first \
         (`kekd admin rotate --promote`)",
    );
    ring.refused(
        &["retire", "7"],
        1,
        "retire refused: version 7 is not in this keyring (see `kekd admin list`)",
    );
    ring.run(&["rotate", "--promote"]);
    // Version 1 was primary: usage proves nothing, a scan or --force is
    // needed, and the override states what it risks.
    ring.refused(&["retire", "1"], 1, &ring.needs_scan(1));
    ring.changed(
        &["retire", "1", "--force"],
        &ring.transitions("retire", &[(1, "decrypt-only", "retired")]),
        Some(&Ring::risk(1)),
        &ring.next_after_retire(1),
    );
    ring.noop(&["retire", "1"], "version 1 is already retired");
    ring.noop(&["retire", "1", "--force"], "version 1 is already retired");
    // A pending version can be retired (a rotation abandoned before
    // promote); no server has written usage for this keyring: allowed, with
    // a warning.
    ring.run(&["rotate"]);
    ring.changed(
        &["retire", "3"],
        &ring.transitions("retire", &[(3, "pending", "retired")]),
        Some(&ring.no_usage_warning(3)),
        &ring.next_after_retire(3),
    );
    ring.run(&["destroy", "1", "--yes-destroy-key-material"]);
    ring.refused(
        &["retire", "1"],
        1,
        "retire refused: version 1 is destroyed: it is already destroyed",
    );
}

#[test]
fn destroy_guards_and_idempotence() {
    let ring = Ring::init();
    ring.run(&["rotate", "--promote"]);
    // The state is checked before the confirmation is asked for: a version
    // that cannot be destroyed says so, flag or not.
    for confirm in [&[][..], &["--yes-destroy-key-material"][..]] {
        let with = |v: &'static str| [&["destroy", v][..], confirm].concat();
        ring.refused(
            &with("1"),
            1,
            "destroy refused: version 1 is decrypt-only: only a retired version can be destroyed; retire it \
             first and make sure nothing needs it",
        );
        ring.refused(
            &with("2"),
            1,
            "destroy refused: version 2 is primary: only a retired version can be destroyed; retire it first \
             and make sure nothing needs it",
        );
        ring.refused(
            &with("9"),
            1,
            "destroy refused: version 9 is not in this keyring (see `kekd admin list`)",
        );
    }
    ring.run(&["retire", "1", "--force"]);
    // Still refused without the flag, even once retired.
    ring.refused(
        &["destroy", "1"],
        1,
        "destroy erases the key material of version 1 forever: anything still encrypted under it becomes \
         unreadable. Check `kekd admin list` first, then re-run with --yes-destroy-key-material to confirm",
    );
    let kek1 = keks_in(&ring.path)[0].clone();
    ring.changed(
        &["destroy", "1", "--yes-destroy-key-material"],
        &ring.transitions("destroy", &[(1, "retired", "destroyed")]),
        None,
        "version 1",
    );
    assert!(
        !String::from_utf8(ring.bytes()).unwrap().contains(&kek1),
        "the destroyed key is still in the file"
    );
    ring.noop(
        &["destroy", "1", "--yes-destroy-key-material"],
        "version 1 is already destroyed",
    );
}

#[test]
fn restore_guards_and_idempotence() {
    let ring = Ring::init();
    ring.noop(
        &["restore", "1"],
        "version 1 is primary, not retired: nothing to restore",
    );
    ring.refused(
        &["restore", "4"],
        1,
        "restore refused: version 4 is not in this keyring (see `kekd admin list`)",
    );
    ring.run(&["rotate", "--promote"]);
    ring.run(&["retire", "1", "--force"]);
    ring.changed(
        &["restore", "1"],
        &ring.transitions("restore", &[(1, "retired", "decrypt-only")]),
        None,
        "version 1 decrypts again",
    );
    ring.noop(
        &["restore", "1"],
        "version 1 is decrypt-only, not retired: nothing to restore",
    );
    // A never-promoted version returns to pending.
    ring.run(&["rotate"]);
    ring.run(&["retire", "3"]);
    ring.changed(
        &["restore", "3"],
        &ring.transitions("restore", &[(3, "retired", "pending")]),
        None,
        "version 3 decrypts again",
    );
    ring.noop(
        &["restore", "3"],
        "version 3 is pending, not retired: nothing to restore",
    );
    ring.run(&["retire", "1", "--force"]);
    ring.run(&["destroy", "1", "--yes-destroy-key-material"]);
    ring.refused(
        &["restore", "1"],
        1,
        "restore refused: version 1 is destroyed: its key material was destroyed and cannot be restored (only a \
         backup taken before can)",
    );
}

#[test]
fn expect_primary_makes_rotate_promote_safe_to_rerun() {
    let ring = Ring::init();
    ring.changed(
        &["rotate", "--promote", "--expect-primary", "1"],
        &ring.transitions(
            "rotate",
            &[
                (2, "new", "pending"),
                (1, "primary", "decrypt-only"),
                (2, "pending", "primary"),
            ],
        ),
        None,
        &ring.next_after_promote(1),
    );
    ring.noop(
        &["rotate", "--promote", "--expect-primary", "1"],
        "already rotated: version 2 replaced version 1 as primary",
    );
    ring.refused(
        &["rotate", "--expect-primary", "1"],
        1,
        "rotate refused: the primary is version 2, not 1 as --expect-primary says",
    );
    ring.refused(
        &["rotate", "--promote", "--expect-primary", "3"],
        1,
        "rotate refused: the primary is version 2, not 3 as --expect-primary says",
    );
    assert_eq!(
        ring.states(),
        [(1, KeyState::DecryptOnly), (2, KeyState::Primary)]
    );
}

#[test]
fn usage_errors_exit_64_and_change_nothing() {
    let ring = Ring::init();
    let before = ring.bytes();
    let cases: &[(&[&str], &str)] = &[
        (&["promote"], "<VERSION>"),
        (
            &["promote", "0"],
            "\"0\" is not a version number (1, 2, …; see `kekd admin list`)",
        ),
        (
            &["retire", "one"],
            "\"one\" is not a version number (1, 2, …; see `kekd admin list`)",
        ),
        (&["retire", "1", "--window", "soon"], "--window"),
        (
            &["rotate", "--promote", "--expect-primary", "0"],
            "\"0\" is not a version number",
        ),
        (&["rotate", "--bogus"], "--bogus"),
        (&["destroy"], "<VERSION>"),
        (&["import"], "--from"),
    ];
    for (args, mention) in cases {
        let out = ring.run(args);
        assert_eq!(out.code(), EX_USAGE, "{args:?}: {out:#?}");
        assert!(out.stderr.contains(mention), "{args:?}: {out:#?}");
        assert_eq!(ring.bytes(), before, "{args:?}");
    }
    assert_eq!(ring.audit().lines().count(), 1, "only init is audited");
}

#[test]
fn keyring_from_the_environment() {
    let ring = Ring::init();
    let mut cmd = kekd();
    cmd.args(["admin", "rotate", "--output", "json"])
        .env("KEKD_KEYRING", &ring.path);
    let out = run_guarded(cmd, ring.dir.path());
    out.ok();
    assert_eq!(json_of(&out)["transitions"][0]["version"], 2);
}

#[test]
fn keyring_problems_exit_78_and_change_nothing() {
    let ring = Ring::init();
    let k = ring.k().to_owned();
    // Missing (in an existing directory).
    let missing = ring.dir.path().join("none");
    let m = missing.to_str().unwrap();
    for args in [
        &["rotate", "--keyring", m][..],
        &["promote", "2", "--keyring", m][..],
        &["list", "--keyring", m][..],
    ] {
        let out = admin(args, ring.dir.path());
        assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
        assert_eq!(
            error_message(&out),
            format!("keyring {m} does not exist (create one with `kekd admin init --keyring {m}`)")
        );
    }
    assert!(!missing.exists());

    // None given at all (no --keyring, no KEKD_KEYRING): a configuration
    // problem, as for `kekd serve`.
    let out = admin(&["rotate"], ring.dir.path());
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(error_message(&out).contains("--keyring"), "{out:#?}");

    // Too open.
    fs::set_permissions(&ring.path, fs::Permissions::from_mode(0o640)).unwrap();
    let open = format!(
        "keyring {k} has permissions 0640, which let other users read the keys; run `chmod 600 {k}`"
    );
    ring.refused(&["rotate", "--promote"], EX_CONFIG, &open);
    ring.refused(&["retire", "1", "--force"], EX_CONFIG, &open);
    let out = ring.run(&["list"]);
    assert_eq!(
        (out.code(), error_message(&out)),
        (EX_CONFIG, open.as_str())
    );
    assert_eq!(mode_of(&ring.path), 0o640, "kekd must not chmod by itself");
    fs::set_permissions(&ring.path, fs::Permissions::from_mode(0o600)).unwrap();

    // Damaged: one byte of the key line changed.
    let mut bytes = ring.bytes();
    let at = bytes.windows(4).position(|w| w == b"kek=").unwrap() + 10;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    fs::write(&ring.path, &bytes).unwrap();
    let damaged = format!(
        "keyring {k}: line 4: field `sha256` checksum does not match the file's content (edited by hand or \
         damaged in a copy)"
    );
    ring.refused(&["rotate"], EX_CONFIG, &damaged);
    ring.refused(&["promote", "1"], EX_CONFIG, &damaged);
    ring.refused(&["restore", "1"], EX_CONFIG, &damaged);
    ring.refused(
        &["destroy", "1", "--yes-destroy-key-material"],
        EX_CONFIG,
        &damaged,
    );
}

#[test]
fn a_keyring_in_a_missing_directory_exits_78_and_creates_nothing() {
    let dir = tempdir_blocking();
    let nodir = dir.path().join("nodir");
    let path = nodir.join("keyring");
    let k = path.to_str().unwrap();
    for args in [
        &["rotate", "--keyring", k][..],
        &["retire", "1", "--keyring", k][..],
    ] {
        let out = admin(args, dir.path());
        assert_eq!(
            (out.code(), error_message(&out)),
            (
                EX_CONFIG,
                format!(
                    "keyring {k} does not exist (create one with `kekd admin init --keyring {k}`)"
                )
                .as_str()
            ),
            "{args:?}"
        );
    }
    assert!(!nodir.exists());
}

// ------------------------------------------------------------------- lock

fn hold_lock(ring: &Ring) -> kekd::keyring::lock::KeyringLock {
    kekd::keyring::lock::acquire(&ring.path, Duration::ZERO).expect("take the keyring lock")
}

/// Every changing command waits `LOCK_WAIT` (10 s) for the lock, then exits 75.
#[test]
fn a_held_lock_makes_every_changing_command_exit_75() {
    let ring = Ring::init();
    ring.run(&["rotate"]);
    let copy = ring.dir.path().join("copy");
    fs::copy(&ring.path, &copy).unwrap();
    let before = ring.bytes();
    let audit = ring.audit();
    let lock = hold_lock(&ring);
    let k = ring.k();
    let c = copy.to_str().unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["rotate", "--keyring", k],
        vec!["rotate", "--promote", "--keyring", k],
        vec!["promote", "2", "--keyring", k],
        vec!["retire", "2", "--force", "--keyring", k],
        vec!["restore", "1", "--keyring", k],
        vec!["destroy", "2", "--yes-destroy-key-material", "--keyring", k],
        vec!["import", "--from", c, "--keyring", k],
    ];
    let logs = ring.dir.path();
    let outs: Vec<Finished> = std::thread::scope(|scope| {
        let handles: Vec<_> = commands
            .iter()
            .map(|args| {
                scope.spawn(move || {
                    // A short wait keeps the test fast; the default is 10 s.
                    let mut cmd = kekd();
                    cmd.env("KEKD_LOCK_WAIT", "500ms").arg("admin").args(args);
                    run_guarded(cmd, logs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (args, out) in commands.iter().zip(&outs) {
        assert_eq!(out.code(), EX_TEMPFAIL, "{args:?}: {out:#?}");
        assert!(
            out.stderr.contains(&format!(
                "kekd: keyring {k} is locked by another `kekd admin` command; waiting up to 500ms for it\n"
            )),
            "{args:?}: {out:#?}"
        );
        assert_eq!(
            error_message(out),
            format!(
                "keyring {k} is locked by another `kekd admin` command; wait for it to finish and run this again"
            ),
            "{args:?}"
        );
    }
    // Reading needs no lock.
    let out = ring.run(&["list"]);
    out.ok();
    drop(lock);
    assert_eq!(ring.bytes(), before);
    assert_eq!(ring.audit(), audit);
}

#[test]
fn a_command_waits_for_the_lock_and_then_runs() {
    let ring = Ring::init();
    let before = ring.bytes();
    let lock = hold_lock(&ring);
    let mut cmd = kekd();
    cmd.args(["admin", "rotate", "--keyring", ring.k()]);
    let mut waiting = Process::spawn(cmd, Path::new("/nonexistent"), ring.dir.path());
    // The command found the lock taken and says it waits (up to the default
    // 10 s): it has changed nothing, and is still there.
    let says = format!(
        "kekd: keyring {} is locked by another `kekd admin` command; waiting up to 10s for it",
        ring.k()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !waiting.stderr().contains(&says) {
        assert!(
            waiting.try_exit().is_none(),
            "did not wait for the lock: {}",
            waiting.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "never said it waits: {}",
            waiting.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(waiting.try_exit().is_none(), "did not wait for the lock");
    assert_eq!(ring.bytes(), before);
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = waiting.try_exit() {
            break status;
        }
        assert!(Instant::now() < deadline, "never finished");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", waiting.stderr());
    assert_eq!(
        ring.states(),
        [(1, KeyState::Primary), (2, KeyState::Pending)]
    );
}

// ------------------------------------------------------------ JSON output

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

#[track_caller]
fn assert_keys(v: &Value, expected: &[&str]) {
    assert_eq!(keys(v), expected.iter().copied().collect(), "{v:#}");
}

/// A changed step's document: the documented fields, and its transitions.
#[track_caller]
fn changed_doc(ring: &Ring, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = ring.run(&all);
    out.ok();
    let doc = json_of(&out);
    assert_keys(
        &doc,
        &[
            "command",
            "changed",
            "keyring",
            "transitions",
            "warning",
            "risk",
            "next",
            "procedure",
        ],
    );
    assert_eq!(doc["command"], args[0]);
    assert_eq!(doc["changed"], true);
    assert_eq!(doc["keyring"], ring.k());
    assert!(
        doc["next"].as_str().is_some_and(|n| !n.is_empty()),
        "{doc:#}"
    );
    for t in doc["transitions"].as_array().unwrap() {
        assert_keys(t, &["version", "key_id", "from", "to"]);
        assert_eq!(
            t["key_id"],
            ring.key_id(t["version"].as_u64().unwrap() as u32).as_str()
        );
    }
    doc
}

fn moves(doc: &Value) -> Vec<(u64, Option<&str>, &str)> {
    doc["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["version"].as_u64().unwrap(),
                t["from"].as_str(),
                t["to"].as_str().unwrap(),
            )
        })
        .collect()
}

#[track_caller]
fn noop_doc(ring: &Ring, args: &[&str], message: &str) {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = ring.run(&all);
    out.ok();
    let doc = json_of(&out);
    assert_keys(&doc, &["command", "changed", "keyring", "message"]);
    assert_eq!(doc["command"], args[0]);
    assert_eq!(doc["changed"], false);
    assert_eq!(doc["keyring"], ring.k());
    assert_eq!(doc["message"], message);
}

#[test]
fn json_output_of_every_command() {
    let dir = tempdir_blocking();
    let path = dir.path().join("keyring");
    let k = path.to_str().unwrap();
    let out = admin(&["init", "--output", "json", "--keyring", k], dir.path());
    out.ok();
    let doc = json_of(&out);
    assert_keys(
        &doc,
        &[
            "command",
            "changed",
            "keyring",
            "keyring_id",
            "primary_version",
            "key_id",
        ],
    );
    let ring = Ring {
        dir,
        path: path.clone(),
    };
    assert_eq!(doc["command"], "init");
    assert_eq!(doc["changed"], true);
    assert_eq!(doc["keyring_id"], ring.id().as_str());
    assert_eq!(doc["primary_version"], 1);
    assert_eq!(doc["key_id"], ring.key_id(1).as_str());

    let (p, d, r) = ("primary", "decrypt-only", "retired");
    let doc = changed_doc(&ring, &["rotate"]);
    assert_eq!(moves(&doc), [(2, None, "pending")]);
    assert!(doc["warning"].is_null());
    noop_doc(
        &ring,
        &["rotate"],
        "version 2 is already pending; roll it out and run `kekd admin promote 2` (or retire it) before rotating again",
    );
    let doc = changed_doc(&ring, &["promote", "2"]);
    assert_eq!(moves(&doc), [(1, Some(p), d), (2, Some("pending"), p)]);
    noop_doc(&ring, &["promote", "2"], "version 2 is already primary");
    let doc = changed_doc(&ring, &["retire", "1", "--force"]);
    assert_eq!(moves(&doc), [(1, Some(d), r)]);
    assert!(doc["warning"].is_null(), "{doc}");
    assert_eq!(doc["risk"], Ring::risk(1).as_str());
    noop_doc(&ring, &["retire", "1"], "version 1 is already retired");
    let doc = changed_doc(&ring, &["restore", "1"]);
    assert_eq!(moves(&doc), [(1, Some(r), d)]);
    noop_doc(
        &ring,
        &["restore", "1"],
        "version 1 is decrypt-only, not retired: nothing to restore",
    );
    changed_doc(&ring, &["retire", "1", "--force"]);
    let doc = changed_doc(&ring, &["destroy", "1", "--yes-destroy-key-material"]);
    assert_eq!(moves(&doc), [(1, Some(r), "destroyed")]);
    noop_doc(
        &ring,
        &["destroy", "1", "--yes-destroy-key-material"],
        "version 1 is already destroyed",
    );
    let doc = changed_doc(&ring, &["rotate", "--promote", "--expect-primary", "2"]);
    assert_eq!(
        moves(&doc),
        [
            (3, None, "pending"),
            (2, Some(p), d),
            (3, Some("pending"), p)
        ]
    );
    noop_doc(
        &ring,
        &["rotate", "--promote", "--expect-primary", "2"],
        "already rotated: version 3 replaced version 2 as primary",
    );

    // import: a copy with one more version, then the same copy again.
    let copy = ring.dir.path().join("copy");
    fs::copy(&ring.path, &copy).unwrap();
    let c = copy.to_str().unwrap();
    let out = admin(&["rotate", "--keyring", c], ring.dir.path());
    out.ok();
    let out = ring.run(&["import", "--from", c, "--output", "json"]);
    out.ok();
    let doc = json_of(&out);
    assert_keys(
        &doc,
        &["command", "changed", "keyring", "from", "transitions"],
    );
    assert_eq!(
        (
            &doc["command"],
            &doc["changed"],
            &doc["keyring"],
            &doc["from"]
        ),
        (
            &Value::from("import"),
            &Value::from(true),
            &Value::from(k),
            &Value::from(c)
        )
    );
    assert_eq!(moves(&doc), [(4, None, "pending")]);
    let out = ring.run(&["import", "--from", c, "--output", "json"]);
    out.ok();
    let doc = json_of(&out);
    assert_keys(&doc, &["command", "changed", "keyring", "message"]);
    assert_eq!(doc["changed"], false);
    assert_eq!(doc["message"], "already identical");

    // list
    let out = ring.run(&["list", "--output", "json"]);
    out.ok();
    let doc = json_of(&out);
    assert_keys(
        &doc,
        &[
            "keyring",
            "keyring_id",
            "primary",
            "versions",
            "server",
            "server_running",
            "reload_pending",
            "reload_error",
            "usage_updated",
            "usage_error",
        ],
    );
    assert_eq!(doc["keyring"], k);
    // No server ever recorded itself: neither running nor behind.
    assert!(doc["server_running"].is_null() && doc["reload_pending"] == false);
    assert_eq!(doc["keyring_id"], ring.id().as_str());
    assert_eq!(doc["primary"], 3);
    assert!(
        doc["server"].is_null()
            && doc["reload_error"].is_null()
            && doc["usage_updated"].is_null()
            && doc["usage_error"].is_null()
    );
    let versions = doc["versions"].as_array().unwrap();
    let states: Vec<(u64, &str)> = versions
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(1, "destroyed"), (2, d), (3, p), (4, "pending")]);
    let file = store::read(&path).unwrap();
    for (v, info) in versions.iter().zip(file.infos()) {
        assert_keys(
            v,
            &[
                "version",
                "state",
                "key_id",
                "created",
                "promoted",
                "retired",
                "destroyed",
                "encrypts",
                "decrypts",
                "last_encrypt",
                "last_decrypt",
            ],
        );
        assert_eq!(v["key_id"], ring.key_id(info.version.get()).as_str());
        assert_eq!(v["created"], info.created.to_string().as_str());
        let opt = |t: Option<Timestamp>| t.map_or(Value::Null, |t| Value::from(t.to_string()));
        assert_eq!(v["promoted"], opt(info.promoted));
        assert_eq!(v["retired"], opt(info.retired));
        assert_eq!(v["destroyed"], opt(info.destroyed));
        assert_eq!(
            (&v["encrypts"], &v["decrypts"]),
            (&Value::from(0), &Value::from(0))
        );
    }
}

// -------------------------------------------------------------- audit log

/// (command, version, from, to, overrides) of one audit line.
type AuditEntry<'a> = (&'a str, u64, Option<&'a str>, &'a str, Vec<&'a str>);

/// The login name the audit log should name for this process: the name of
/// its real uid, never `$SUDO_USER` (that is only a claim).
fn expected_user(uid: u32) -> String {
    fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_owned())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

#[test]
fn audit_log_records_each_change_once_and_never_key_material() {
    let ring = Ring::init();
    let mut keks = keks_in(&ring.path);
    let mut outputs = Vec::new();
    let mut step = |args: &[&str], code: i32| {
        let out = ring.run(args);
        assert_eq!(out.code(), code, "{args:?}: {out:#?}");
        outputs.push(out);
    };
    step(&["rotate"], 0);
    step(&["rotate"], 0); // no-op
    step(&["promote", "2"], 0);
    step(&["promote", "2"], 0); // no-op
    step(&["retire", "2"], 1); // refused: primary
    step(&["retire", "1"], 1); // refused: was primary, no scan
    step(&["retire", "1", "--force"], 0);
    step(&["restore", "1"], 0);
    step(&["retire", "1", "--force"], 0);
    step(&["destroy", "1"], 1); // refused: no confirmation
    keks.extend(keks_in(&ring.path));
    step(&["destroy", "1", "--yes-destroy-key-material"], 0);
    step(&["destroy", "1", "--yes-destroy-key-material"], 0); // no-op
    let copy = ring.dir.path().join("copy");
    fs::copy(&ring.path, &copy).unwrap();
    let c = copy.to_str().unwrap().to_owned();
    let out = admin(&["rotate", "--keyring", &c], ring.dir.path());
    out.ok();
    keks.extend(keks_in(&copy));
    step(&["import", "--from", &c], 0);
    step(&["import", "--from", &c], 0); // no-op

    let audit_path = ring.dir.path().join("keyring.audit.jsonl");
    assert_eq!(mode_of(&audit_path), 0o600);
    let text = fs::read_to_string(&audit_path).unwrap();
    for kek in &keks {
        assert!(
            !text.contains(kek.as_str()),
            "key material in the audit log"
        );
        for out in &outputs {
            assert!(
                !out.stdout.contains(kek.as_str()) && !out.stderr.contains(kek.as_str()),
                "key material printed: {out:#?}"
            );
        }
    }
    let uid = rustix::process::getuid().as_raw();
    let id = ring.id();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let got: Vec<AuditEntry<'_>> = lines
        .iter()
        .map(|l| {
            let claimed = l.get("claimed_user").is_some();
            let mut expected_keys = vec!["format", "time", "user", "uid"];
            if claimed {
                // Run under sudo: the environment's claim is kept apart.
                expected_keys.push("claimed_user");
            }
            if l.get("risk").is_some() {
                // A forced retire says what it risks.
                assert_eq!(l["command"], "retire", "{l}");
                assert_eq!(l["risk"], Ring::risk(1).as_str(), "{l}");
            }
            expected_keys.extend([
                "command",
                "keyring",
                "keyring_id",
                "version",
                "key_id",
                "from",
                "to",
                "overrides",
            ]);
            if l.get("risk").is_some() {
                expected_keys.push("risk");
            }
            assert_keys(l, &expected_keys);
            assert_eq!(l["format"], 2, "{l}");
            assert!(
                l["time"].as_str().unwrap().parse::<Timestamp>().is_ok(),
                "{l}"
            );
            assert_eq!(l["user"], expected_user(uid).as_str(), "{l}");
            assert_eq!(l["uid"], uid, "{l}");
            assert_eq!(l["keyring"], ring.k(), "{l}");
            assert_eq!(l["keyring_id"], id.as_str(), "{l}");
            let version = l["version"].as_u64().unwrap();
            assert_eq!(l["key_id"], format!("kekd/{id}/v{version}").as_str(), "{l}");
            (
                l["command"].as_str().unwrap(),
                version,
                l["from"].as_str(),
                l["to"].as_str().unwrap(),
                l["overrides"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o.as_str().unwrap())
                    .collect(),
            )
        })
        .collect();
    let (p, d, r) = (
        s(KeyState::Primary),
        s(KeyState::DecryptOnly),
        s(KeyState::Retired),
    );
    let expected: Vec<AuditEntry<'_>> = vec![
        ("init", 1, None, p, vec![]),
        ("rotate", 2, None, "pending", vec![]),
        ("promote", 1, Some(p), d, vec![]),
        ("promote", 2, Some("pending"), p, vec![]),
        ("retire", 1, Some(d), r, vec!["--force"]),
        ("restore", 1, Some(r), d, vec![]),
        ("retire", 1, Some(d), r, vec!["--force"]),
        (
            "destroy",
            1,
            Some(r),
            "destroyed",
            vec!["--yes-destroy-key-material"],
        ),
        ("import", 3, None, "pending", vec![]),
    ];
    assert_eq!(got, expected, "audit log:\n{text}");
    let times: Vec<Timestamp> = lines
        .iter()
        .map(|l| l["time"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{text}");
}

// ------------------------------------------------------------ crash safety

#[derive(Debug, Clone, Copy)]
enum Op {
    Rotate,
    RotatePromote,
    Promote(u32),
}

impl Op {
    fn args(self) -> Vec<String> {
        match self {
            Self::Rotate => vec!["rotate".into()],
            Self::RotatePromote => vec!["rotate".into(), "--promote".into()],
            Self::Promote(v) => vec!["promote".into(), v.to_string()],
        }
    }

    /// Applies the op to `file` as the command does at `now`.
    fn apply(self, file: &mut KeyringFile, now: Timestamp) {
        match self {
            Self::Rotate => file.rotate(now, false, None),
            Self::RotatePromote => file.rotate(now, true, None),
            Self::Promote(v) => file.promote(KeyVersion::new(v).unwrap(), now),
        }
        .unwrap();
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".keyring.tmp-"))
        .collect()
}

#[test]
fn kill_9_at_random_moments_leaves_the_old_or_the_new_keyring() {
    const ITERATIONS: usize = 240;
    let ring = Ring::init();
    let dir = ring.dir.path().to_owned();
    let mut rng = Rng::from_os();
    let seed = rng.state();

    // How long one complete command takes here, spawn to exit: kills are
    // spread from 0 to 1.5 times that.
    let mut took: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let status = kekd()
                .args(["admin", "rotate", "--promote", "--keyring", ring.k()])
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
            t.elapsed()
        })
        .collect();
    took.sort();
    let mut max_delay_us = (took[2].as_micros() as u64 * 3 / 2).max(200);
    let first_max_delay_us = max_delay_us;

    // If the host's speed changes (other tests), the range follows: after
    // ten kills in a row on one side of the write it widens or narrows.
    let (mut old, mut new, mut temps_seen, mut streak) = (0, 0, 0, 0i32);
    for i in 0..ITERATIONS {
        let before_bytes = ring.bytes();
        let before = KeyringFile::parse(&before_bytes).unwrap();
        let pending = before
            .versions
            .iter()
            .find(|v| v.info.state == KeyState::Pending)
            .map(|v| v.info.version.get());
        let op = match (pending, rng.below(2)) {
            (Some(v), 0) => Op::Promote(v),
            (Some(_), _) | (None, 0) => Op::RotatePromote,
            (None, _) => Op::Rotate,
        };
        let delay = Duration::from_micros(rng.below(max_delay_us + 1));
        let what = format!("iteration {i}: {op:?} killed after {delay:?} (rng seed {seed})");

        let mut child = kekd()
            .arg("admin")
            .args(op.args())
            .arg("--keyring")
            .arg(&ring.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let _ = child.kill();
        let status = child.wait().unwrap();

        let after = store::read(&ring.path)
            .unwrap_or_else(|e| panic!("{what}: the keyring does not load: {e}"));
        if ring.bytes() == before_bytes {
            assert!(!status.success(), "{what}: exited 0 but changed nothing");
            old += 1;
            streak = streak.min(0) - 1;
        } else {
            // The new state: the op applied to the old one at the moment the
            // command took (the time it wrote into the changed version).
            // (`rotate --promote` with a version pending promotes that one.)
            let now = match (op, pending) {
                (Op::Promote(v), _) | (Op::RotatePromote, Some(v)) => {
                    after.versions[v as usize - 1].info.promoted.unwrap()
                }
                _ => after.versions.last().unwrap().info.created,
            };
            let mut expected = KeyringFile::parse(&before_bytes).unwrap();
            op.apply(&mut expected, now);
            let (got, want) = (after.infos(), expected.infos());
            if got != want {
                let differ: Vec<_> = got.iter().zip(&want).filter(|(g, w)| g != w).collect();
                panic!(
                    "{what}: neither the old nor the new keyring: {} versions, expected {}; \
                     differing (got, expected): {differ:#?}",
                    got.len(),
                    want.len()
                );
            }
            let (old_views, new_views) = (before.views(), after.views());
            for (o, n) in old_views.iter().zip(&new_views) {
                assert_eq!(
                    o.fingerprint, n.fingerprint,
                    "{what}: material of v{} changed",
                    o.info.version
                );
            }
            for (i, a) in new_views.iter().enumerate() {
                for b in &new_views[i + 1..] {
                    assert!(
                        a.fingerprint.is_none() || a.fingerprint != b.fingerprint,
                        "{what}: v{} and v{} share a key",
                        a.info.version,
                        b.info.version
                    );
                }
            }
            new += 1;
            streak = streak.max(0) + 1;
        }
        if streak <= -10 {
            max_delay_us = max_delay_us * 3 / 2;
            streak = 0;
        } else if streak >= 10 {
            max_delay_us = (max_delay_us * 2 / 3).max(200);
            streak = 0;
        }
        // A killed writer's temp file (key material) goes with the next
        // command that takes the lock — here a no-op.
        if !temp_files(&dir).is_empty() {
            temps_seen += 1;
            let out = ring.run(&["restore", "1"]);
            assert_eq!(out.code(), 0, "{what}: {out:#?}");
            assert_eq!(temp_files(&dir), Vec::<String>::new(), "{what}");
        }
    }
    eprintln!(
        "{ITERATIONS} kills (seed {seed}, delays up to {first_max_delay_us}..{max_delay_us} µs): {old} left the old keyring, \
         {new} the new one, {temps_seen} a temp file"
    );
    assert!(
        old > 0 && new > 0,
        "kills never landed on both sides of the write: {old} old, {new} new (seed {seed})"
    );
    let out = ring.run(&["restore", "1"]);
    out.ok();
    assert_eq!(temp_files(&dir), Vec::<String>::new());
}

/// `SUDO_USER`/`SUDO_UID` are whatever the caller puts in its environment:
/// the audit line names the real uid (and its passwd name) as the actor and
/// keeps the environment's word only as `claimed_user`.
#[test]
fn the_audit_log_records_the_real_uid_and_sudo_variables_only_as_a_claim() {
    let dir = tempdir_blocking();
    let path = dir.path().join("keyring");
    let mut cmd = kekd();
    cmd.args(["admin", "init", "--keyring", path.to_str().unwrap()])
        .env("SUDO_USER", "mallory\u{1b}[2J")
        .env("SUDO_UID", "1001");
    let out = run_guarded(cmd, dir.path());
    out.ok();
    let text = fs::read_to_string(dir.path().join("keyring.audit.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    let l = &lines[0];
    let uid = rustix::process::getuid().as_raw();
    assert_eq!(l["uid"], uid, "{l}");
    assert_eq!(l["user"], expected_user(uid).as_str(), "{l}");
    assert!(!l["user"].as_str().unwrap().contains("mallory"), "{l}");
    assert_eq!(
        l["claimed_user"],
        serde_json::json!({"name": "mallory\u{1b}[2J", "uid": 1001, "source": "sudo-env"}),
        "{l}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "a raw escape in the audit log: {text:?}"
    );
    if uid == 0 {
        assert_eq!(l["user"], "root", "{l}");
    }
}

// ------------------------------------------------ owners, StrictModes, served

/// The uid and gid tests serve as when they run as root.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether a test that needs a second uid can run (root and setpriv).
fn can_switch_users(test: &str) -> bool {
    let ok = is_root()
        && std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok();
    if !ok {
        common::skip::skip(&format!("{test} needs root and setpriv"));
    }
    ok
}

/// `cmd` run through `setpriv PREFIX… --`, with kekd's clean environment.
fn setpriv(prefix: &[String], cmd: &std::process::Command) -> std::process::Command {
    let mut wrapped = std::process::Command::new("setpriv");
    wrapped
        .args(prefix)
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEKD_") {
            wrapped.env_remove(name);
        }
    }
    wrapped
}

/// setpriv arguments that run as `uid`:`gid` with no other groups.
fn as_user(uid: u32, gid: u32) -> Vec<String> {
    vec![
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".to_owned(),
    ]
}

fn chown_all(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            chown_all(&entry.unwrap().path(), uid, gid);
        }
    }
}

fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap();
    (m.uid(), m.gid())
}

fn serve_cmd(keyring: &Path, socket: &Path) -> std::process::Command {
    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(keyring)
        .arg("--socket")
        .arg(socket)
        .args(["--reload-interval", "200ms"]);
    cmd
}

async fn spawn_guarded(cmd: std::process::Command, socket: &Path, logs: &Path) -> Process {
    let _guard = common::fs_lock().await;
    Process::spawn(cmd, socket, logs)
}

async fn stop(process: Process) {
    process.signal(rustix::process::Signal::TERM);
    let out = process.wait_exit().await;
    out.ok();
}

/// M5: kekd serves as `nobody`; root rotates. The new keyring keeps
/// nobody's ownership, the server reloads the new primary, and a restart
/// works.
#[tokio::test]
async fn a_root_admin_command_keeps_the_keyring_owned_by_the_serving_user() {
    if !can_switch_users("a_root_admin_command_keeps_the_keyring_owned_by_the_serving_user") {
        return;
    }
    let ring = tokio::task::spawn_blocking(Ring::init).await.unwrap();
    chown_all(ring.dir.path(), NOBODY, NOBODY);
    // No audit log yet (a keyring made by hand or restored): root's rotate
    // creates it, and must give it the keyring's owner so the server, as
    // nobody, can still append its own events.
    let audit = ring.dir.path().join("keyring.audit.jsonl");
    fs::remove_file(&audit).unwrap();
    let socket = ring.dir.path().join("kms.sock");
    let nobody = as_user(NOBODY, NOBODY);
    let mut server = spawn_guarded(
        setpriv(&nobody, &serve_cmd(&ring.path, &socket)),
        &socket,
        ring.dir.path(),
    )
    .await;
    let mut client = server.ready().await;
    assert_eq!(client.status().await.unwrap().key_id, ring.key_id(1));

    let out = admin_async(
        &["rotate", "--promote", "--keyring", ring.k()],
        ring.dir.path(),
    )
    .await;
    out.ok();
    assert_eq!(owner_of(&ring.path), (NOBODY, NOBODY));
    assert_eq!(mode_of(&ring.path), 0o600);
    assert_eq!(owner_of(&audit), (NOBODY, NOBODY));
    assert_eq!(mode_of(&audit), 0o600);
    let want = ring.key_id(2);
    common::eventually("the server serves v2", Duration::from_secs(30), || {
        let socket = socket.clone();
        let want = want.clone();
        async move {
            let mut c = common::connect(&socket).await;
            let got = c.status().await.map_err(|e| e.to_string())?.key_id;
            if got == want { Ok(()) } else { Err(got) }
        }
    })
    .await;
    // The server's own event for that switch reached the log root created.
    let audit_for_wait = audit.clone();
    common::eventually(
        "the server audits the switch",
        Duration::from_secs(30),
        || {
            let text = fs::read_to_string(&audit_for_wait).unwrap_or_default();
            async move {
                if text.contains("\"event\":\"snapshot_switched\"") {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        },
    )
    .await;
    // The served record is written after the switch and its audit event:
    // wait for it rather than stopping the server before it is written.
    let record = ring.dir.path().join("keyring.served");
    let served = format!(
        "kekd-served v1\nkeyring_id {}\nhighest_version 2\n",
        ring.id()
    );
    common::eventually(
        "the server records v2 as served",
        Duration::from_secs(30),
        || {
            let text = fs::read_to_string(&record).unwrap_or_default();
            let done = text == served;
            async move { if done { Ok(()) } else { Err(text) } }
        },
    )
    .await;
    stop(server).await;
    assert_eq!(owner_of(&record), (NOBODY, NOBODY));
    assert_eq!(fs::read_to_string(&record).unwrap(), served);

    let mut again = spawn_guarded(
        setpriv(&nobody, &serve_cmd(&ring.path, &socket)),
        &socket,
        ring.dir.path(),
    )
    .await;
    let mut client = again.ready().await;
    assert_eq!(client.status().await.unwrap().key_id, want);
    stop(again).await;
}

/// A process that cannot give the replacement the keyring's owner and group
/// (root without CAP_CHOWN; the owner itself when the group is one it is
/// not in) is refused before it writes anything, and is told who can.
#[test]
fn a_command_that_cannot_keep_the_owner_is_refused_and_changes_nothing() {
    if !can_switch_users("a_command_that_cannot_keep_the_owner_is_refused_and_changes_nothing") {
        return;
    }
    let ring = Ring::init();
    chown_all(ring.dir.path(), NOBODY, NOBODY);
    let before = (ring.bytes(), ring.audit());
    let rotate = |prefix: Vec<String>| {
        let mut cmd = kekd();
        cmd.args(["admin", "rotate", "--promote", "--keyring", ring.k()]);
        run_guarded(setpriv(&prefix, &cmd), ring.dir.path())
    };
    let refusal = |caller: u32, gid: u32| {
        format!(
            "{k} belongs to uid {NOBODY} gid {gid} (nobody), and this process (uid {caller}) cannot give its \
             replacement that owner and group, so kekd running as that user could no longer read it; nothing was \
             changed: run the command as root, or as that user (`sudo -u '#{NOBODY}' -g '#{gid}' kekd admin …` or \
             `setpriv --reuid={NOBODY} --regid={gid} --clear-groups kekd admin …`)",
            k = ring.k()
        )
    };

    let no_chown = vec![
        "--bounding-set=-chown".to_owned(),
        "--inh-caps=-chown".to_owned(),
    ];
    let out = rotate(no_chown);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), refusal(0, NOBODY));
    assert_eq!((ring.bytes(), ring.audit()), before);
    assert_eq!(owner_of(&ring.path), (NOBODY, NOBODY));
    assert_eq!(temp_files(ring.dir.path()), Vec::<String>::new());

    // Owned by nobody, group root: nobody cannot keep group 0.
    std::os::unix::fs::chown(&ring.path, Some(NOBODY), Some(0)).unwrap();
    let out = rotate(as_user(NOBODY, NOBODY));
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), refusal(NOBODY, 0));
    assert_eq!((ring.bytes(), ring.audit()), before);
    assert_eq!(owner_of(&ring.path), (NOBODY, 0));
    assert_eq!(temp_files(ring.dir.path()), Vec::<String>::new());

    // Root (with CAP_CHOWN) keeps both.
    let out = rotate(vec![]);
    out.ok();
    assert_eq!(owner_of(&ring.path), (NOBODY, 0));
    assert_ne!(ring.bytes(), before.0);
}

/// `kekd serve` and `kekd admin doctor` share one verdict on who can change
/// the keyring (OpenSSH StrictModes): owner, its directory, the ancestors.
#[test]
fn serve_and_doctor_refuse_a_keyring_another_user_can_change() {
    if !can_switch_users("serve_and_doctor_refuse_a_keyring_another_user_can_change") {
        return;
    }
    let refused = |keyring: &Path, path: &Path, what: &str, fix: &str| {
        let dir = keyring.parent().unwrap();
        let out = run_guarded(serve_cmd(keyring, &dir.join("kms.sock")), dir);
        assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
        assert_eq!(
            error_message(&out),
            format!(
                "{} {what}, so another user could replace the keyring with keys of their own; refusing to serve \
                 it: run `{fix}`",
                path.display()
            )
        );
        let doctor = admin(
            &[
                "doctor",
                "--keyring",
                keyring.to_str().unwrap(),
                "--output",
                "json",
            ],
            dir,
        );
        doctor.exited(1);
        let findings = json_of(&doctor)["findings"].clone();
        let access = findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == "keyring access")
            .unwrap_or_else(|| panic!("{findings:#}"))
            .clone();
        assert_eq!(access["level"], "fail", "{access:#}");
        assert_eq!(access["fix"], fix, "{access:#}");
        assert!(
            access["detail"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{} {what}", path.display())),
            "{access:#}"
        );
    };
    let chmod =
        |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();

    // A private keyring owned by another user, served as root.
    let ring = Ring::init();
    std::os::unix::fs::chown(&ring.path, Some(NOBODY), Some(NOBODY)).unwrap();
    let k = ring.path.clone();
    {
        refused(
            &k,
            &k,
            &format!(
                "(keyring) is owned by uid {NOBODY}, not by uid 0 that kekd runs as nor by root"
            ),
            &format!("chown 0 {}", k.display()),
        );
    }
    // doctor, told that kekd serves as nobody, agrees with that owner.
    let doctor = admin(
        &[
            "doctor",
            "--keyring",
            ring.k(),
            "--serve-uid",
            "65534",
            "--output",
            "json",
        ],
        ring.dir.path(),
    );
    doctor.ok();
    std::os::unix::fs::chown(&ring.path, Some(0), Some(0)).unwrap();

    // Its directory writable by every user, or by its group.
    let dir = ring.dir.path().to_owned();
    for (mode, who) in [
        (0o777, "every user"),
        (0o770, "its group"),
        (0o1777, "every user"),
    ] {
        chmod(&dir, mode);
        let (k, d) = (ring.path.clone(), dir.clone());
        {
            refused(
                &k,
                &d,
                &format!("is a directory {who} can write (mode {mode:04o}) and holds the keyring"),
                &format!("chmod go-w {}", d.display()),
            );
        }
    }
    chmod(&dir, 0o700);

    // An ancestor owned by another user; then a writable, non-sticky one.
    let nested = dir.join("a").join("b");
    fs::create_dir_all(&nested).unwrap();
    let keyring = nested.join("keyring");
    create_private(&keyring);
    let a = dir.join("a");
    std::os::unix::fs::chown(&a, Some(NOBODY), Some(NOBODY)).unwrap();
    let (k, anc) = (keyring.clone(), a.clone());
    {
        refused(
            &k,
            &anc,
            &format!(
                "(directory) is owned by uid {NOBODY}, not by uid 0 that kekd runs as nor by root"
            ),
            &format!("chown 0 {}", anc.display()),
        );
    }
    std::os::unix::fs::chown(&a, Some(0), Some(0)).unwrap();
    chmod(&a, 0o777);
    let (k, anc) = (keyring.clone(), a.clone());
    {
        refused(
            &k,
            &anc,
            "is a directory every user can write (mode 0777) on the way to the keyring",
            &format!("chmod go-w {}", anc.display()),
        );
    }

    // A root-owned sticky ancestor (like /tmp) is accepted: kekd serves.
    chmod(&a, 0o1777);
    let socket = nested.join("kms.sock");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut server = spawn_guarded(serve_cmd(&keyring, &socket), &socket, &nested).await;
        server.ready().await;
        stop(server).await;
    });
    let doctor = admin(
        &[
            "doctor",
            "--keyring",
            keyring.to_str().unwrap(),
            "--output",
            "json",
        ],
        &nested,
    );
    doctor.ok();
}

fn create_private(path: &Path) {
    let out = admin(
        &["init", "--keyring", path.to_str().unwrap()],
        path.parent().unwrap(),
    );
    out.ok();
}

/// A restart refuses a keyring that is not the one this node served (another
/// id) or is older (fewer versions) until `accept-keyring` says so; a new
/// keyring on a new node just starts.
#[tokio::test]
async fn a_restart_refuses_a_rolled_back_or_different_keyring_until_accepted() {
    let ring = tokio::task::spawn_blocking(Ring::init).await.unwrap();
    let socket = ring.dir.path().join("kms.sock");
    let record = ring.dir.path().join("keyring.served");
    let serve_once = |want: String| {
        let (k, s, d) = (
            ring.path.clone(),
            socket.clone(),
            ring.dir.path().to_owned(),
        );
        async move {
            let mut server = spawn_guarded(serve_cmd(&k, &s), &s, &d).await;
            let mut client = server.ready().await;
            assert_eq!(client.status().await.unwrap().key_id, want);
            stop(server).await;
        }
    };
    let record_says =
        |id: &str, v: u32| format!("kekd-served v1\nkeyring_id {id}\nhighest_version {v}\n");
    serve_once(ring.key_id(1)).await;
    assert_eq!(
        fs::read_to_string(&record).unwrap(),
        record_says(&ring.id(), 1)
    );

    let old = ring.dir.path().join("keyring.v1");
    fs::copy(&ring.path, &old).unwrap();
    let out = admin_async(
        &["rotate", "--promote", "--keyring", ring.k()],
        ring.dir.path(),
    )
    .await;
    out.ok();
    serve_once(ring.key_id(2)).await;
    assert_eq!(
        fs::read_to_string(&record).unwrap(),
        record_says(&ring.id(), 2)
    );

    // Rolled back to the copy holding version 1 only.
    fs::rename(&old, &ring.path).unwrap();
    let id = ring.id();
    let refusal = |found: &str, v: u32, why: &str| {
        format!(
            "keyring local keyring {k}: invalid keyring: {r} says this node served keyring {id} up to version 2, \
             but the keyring is keyring {found} with versions up to {v} ({why}); refusing to serve it. If this is on purpose (a restored older backup, a new keyring), \
             accept it with `kekd admin accept-keyring --keyring {k}`, then start kekd again",
            r = record.display(),
            k = ring.k()
        )
    };
    let start_refused = |want: String| {
        let cmd = serve_cmd(&ring.path, &socket);
        let dir = ring.dir.path().to_owned();
        async move {
            let out = tokio::task::spawn_blocking(move || run_guarded(cmd, &dir))
                .await
                .unwrap();
            assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
            assert_eq!(error_message(&out), want, "{out:#?}");
        }
    };
    start_refused(refusal(&id, 1, "an older copy: versions are missing")).await;
    let doctor = admin_async(
        &["doctor", "--keyring", ring.k(), "--output", "json"],
        ring.dir.path(),
    )
    .await;
    doctor.exited(1);
    let served = json_of(&doctor)["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "served record")
        .cloned()
        .unwrap_or_else(|| panic!("{doctor:#?}"));
    assert_eq!(served["level"], "fail", "{served:#}");
    assert_eq!(
        served["fix"],
        format!(
            "`kekd admin accept-keyring --keyring {}` if this keyring is the right one",
            ring.k()
        )
    );

    let accept = || async {
        admin_async(
            &["accept-keyring", "--keyring", ring.k(), "--output", "json"],
            ring.dir.path(),
        )
        .await
    };
    let out = accept().await;
    out.ok();
    let j = json_of(&out);
    assert_eq!(j["changed"], true);
    assert_eq!(j["highest_version"], 1);
    assert_eq!(j["previous"], format!("keyring {id} up to version 2"));
    let out = accept().await;
    out.ok();
    assert_eq!(json_of(&out)["changed"], false);
    assert_eq!(
        ring.audit()
            .matches("\"command\":\"accept-keyring\"")
            .count(),
        1
    );
    serve_once(ring.key_id(1)).await;

    // Another keyring in its place (init just works: no keyring there).
    fs::remove_file(&ring.path).unwrap();
    let out = admin_async(&["init", "--keyring", ring.k()], ring.dir.path()).await;
    out.ok();
    let new_id = ring.id();
    let want = refusal(&new_id, 1, "another keyring").replace("up to version 2", "up to version 1");
    start_refused(want).await;
    let out = accept().await;
    out.ok();
    serve_once(format!("kekd/{new_id}/v1")).await;
}

/// A secret taken from the environment stays in /proc/PID/environ: doctor
/// says so and names the file option; with the file option it says nothing.
#[test]
fn doctor_warns_when_the_environment_supplies_a_secret() {
    let ring = Ring::init();
    let doctor = |env: &[(&str, &str)]| {
        let mut cmd = kekd();
        cmd.args(["admin", "doctor", "--keyring", ring.k(), "--output", "json"])
            .envs(env.iter().copied());
        let out = run_guarded(cmd, ring.dir.path());
        out.ok();
        json_of(&out)["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["check"] == "secret in environment")
            .cloned()
            .collect::<Vec<Value>>()
    };
    let found = doctor(&[("KEKD_BACKUP_PASSPHRASE", "correct horse battery")]);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["level"], "warn");
    assert_eq!(
        found[0]["detail"],
        "KEKD_BACKUP_PASSPHRASE supplies a secret: it stays readable in /proc/PID/environ (to this uid and root) \
         for the life of the process, and kekd cannot erase it"
    );
    assert_eq!(
        found[0]["fix"],
        "put the secret in a file (chmod 600) and use --passphrase-file (or KEKD_BACKUP_PASSPHRASE_FILE); unset \
         KEKD_BACKUP_PASSPHRASE"
    );
    let file = ring.dir.path().join("passphrase");
    assert!(
        doctor(&[
            ("KEKD_BACKUP_PASSPHRASE", "correct horse battery"),
            ("KEKD_BACKUP_PASSPHRASE_FILE", file.to_str().unwrap()),
        ])
        .is_empty()
    );
    assert!(doctor(&[]).is_empty());
}

// ------------------------------------------------ planted files (attacks)

/// A root-owned file outside the keyring's directory, as an attacker's
/// target: `/etc/shadow` in real life.
fn root_victim(dir: &Path, name: &str) -> PathBuf {
    let victim = dir.join(name);
    fs::write(&victim, "root only\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    victim
}

/// The serving user owns the keyring's directory (as StrictModes allows) and
/// plants `<keyring>.lock` as a link to a root-owned file, or to a file that
/// does not exist yet (`/etc/ld.so.preload`), then waits for root to run an
/// admin command. kekd refuses the link: root never creates the target, and
/// never hands a file to the keyring's owner.
#[test]
fn a_planted_lock_link_never_gives_root_files_to_the_keyring_owner() {
    if !can_switch_users("a_planted_lock_link_never_gives_root_files_to_the_keyring_owner") {
        return;
    }
    let ring = Ring::init();
    let outside = tempdir_blocking();
    let victim = root_victim(outside.path(), "shadow");
    let missing = outside.path().join("ld.so.preload");
    chown_all(ring.dir.path(), NOBODY, NOBODY);
    let lock = ring.dir.path().join("keyring.lock");
    let before = ring.bytes();
    for target in [&victim, &missing] {
        let _ = fs::remove_file(&lock);
        std::os::unix::fs::symlink(target, &lock).unwrap();
        std::os::unix::fs::lchown(&lock, Some(NOBODY), Some(NOBODY)).unwrap();
        let out = ring.run(&["rotate"]);
        assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
        assert_eq!(
            error_message(&out),
            format!(
                "{} is a symlink, which kekd never makes there: someone who can write its directory may have \
                 planted it to turn this command against another file; nothing was changed: remove it, and \
                 check who can write that directory (`kekd admin doctor`)",
                lock.display()
            )
        );
        assert_eq!(ring.bytes(), before, "the keyring changed");
    }
    assert_eq!(owner_of(&victim), (0, 0), "root's file was given away");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root only\n");
    assert!(!missing.exists(), "root created the link's target");

    // A FIFO neither hangs the command nor is taken for a lock.
    fs::remove_file(&lock).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &lock,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let out = ring.run(&["rotate"]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out).starts_with(&format!(
            "{} is not a regular file, which kekd never makes there",
            lock.display()
        )),
        "{out:#?}"
    );

    // Removed, the next command creates the lock and gives it the owner.
    fs::remove_file(&lock).unwrap();
    let out = ring.run(&["rotate"]);
    out.ok();
    assert_eq!(owner_of(&lock), (NOBODY, NOBODY));
}

/// The same owner plants `<keyring>.audit.jsonl` as a link to a root file:
/// root's command changes the keyring but never appends to that file, and
/// says the audit log could not be written.
#[test]
fn a_planted_audit_log_link_is_never_appended_to() {
    if !can_switch_users("a_planted_audit_log_link_is_never_appended_to") {
        return;
    }
    let ring = Ring::init();
    let outside = tempdir_blocking();
    let victim = root_victim(outside.path(), "bashrc");
    chown_all(ring.dir.path(), NOBODY, NOBODY);
    let audit = ring.dir.path().join("keyring.audit.jsonl");
    fs::remove_file(&audit).unwrap();
    std::os::unix::fs::symlink(&victim, &audit).unwrap();
    let out = ring.run(&["rotate"]);
    assert_eq!(
        out.refused(1),
        format!(
            "the keyring was changed, but its audit log {0} could not be written: {0} is a symlink, which kekd \
             never makes there: someone who can write its directory may have planted it to turn this command \
             against another file; nothing was changed: remove it, and check who can write that directory \
             (`kekd admin doctor`)",
            audit.display()
        )
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "root only\n");

    // A second name of another file (where fs.protected_hardlinks is off).
    fs::remove_file(&audit).unwrap();
    let other = ring.dir.path().join("other");
    fs::write(&other, "").unwrap();
    fs::hard_link(&other, &audit).unwrap();
    let out = ring.run(&["promote", "2"]);
    out.exited(1);
    assert!(
        error_message(&out).contains(&format!(
            "{} is a hard link to another file, which kekd never makes there",
            audit.display()
        )),
        "{out:#?}"
    );
    assert_eq!(fs::read_to_string(&other).unwrap(), "");
}

/// StrictModes covers the directory the keyring is *named* in: a link in a
/// directory every user can write lets any of them repoint it (at an old
/// copy the serving user owns) and plant or delete `.served` beside it.
#[test]
fn serve_and_doctor_refuse_a_keyring_linked_from_a_directory_others_can_write() {
    if !can_switch_users(
        "serve_and_doctor_refuse_a_keyring_linked_from_a_directory_others_can_write",
    ) {
        return;
    }
    let ring = Ring::init();
    let public = ring.dir.path().join("public");
    fs::create_dir(&public).unwrap();
    fs::set_permissions(&public, fs::Permissions::from_mode(0o777)).unwrap();
    let link = public.join("keyring");
    std::os::unix::fs::symlink(&ring.path, &link).unwrap();
    let message = format!(
        "{} is a directory every user can write (mode 0777) and holds the link to the keyring, so another user \
         could replace the keyring with keys of their own; refusing to serve it: run `chmod go-w {0}`",
        public.display()
    );
    let out = run_guarded(serve_cmd(&link, &ring.dir.path().join("kms.sock")), &public);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), message);
    let doctor = admin(
        &[
            "doctor",
            "--keyring",
            link.to_str().unwrap(),
            "--output",
            "json",
        ],
        ring.dir.path(),
    );
    doctor.exited(1);
    let findings = json_of(&doctor)["findings"].clone();
    let access = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "keyring access")
        .unwrap_or_else(|| panic!("{findings:#}"))
        .clone();
    assert_eq!(access["level"], "fail", "{access:#}");
    assert_eq!(
        access["fix"],
        format!("chmod go-w {}", public.display()),
        "{access:#}"
    );
}

// ------------------------------------------------------------ the procedure

/// After a promotion, `next:` gives the one procedure that retires the old
/// version: rewrite what the EncryptionConfiguration encrypts (the shipped
/// default without `--encryption-config`, exactly its resources with it),
/// scan, retire with the scan. JSON carries the same as fields.
#[test]
fn the_hint_after_a_promotion_gives_the_one_procedure() {
    let ring = Ring::init();
    let k = ring.k().to_owned();
    let procedure = |old: u32, what: &str, migrate: &[&str]| {
        let mut text = format!("  1. rewrite {what}:\n");
        for m in migrate {
            text.push_str(&format!("       {m}\n"));
        }
        text.push_str(&format!(
            "  2. scan etcd (the apiserver's etcd client certificate; it must show 0 objects under version {old}):\n\
             \x20      kekd admin scan --etcd-endpoints URL --cacert FILE --cert FILE --key FILE --keyring {k} --output \
             json > scan.json\n\
             \x20 3. on every node (copy scan.json there):\n\
             \x20      kekd admin retire {old} --scan scan.json --keyring {k}\n"
        ));
        text
    };
    let shipped = [
        "kubectl get secrets -A -o json | kubectl replace -f -",
        "kubectl get configmaps -A -o json | kubectl replace -f -",
    ];
    let out = ring.run(&["rotate", "--promote"]);
    out.ok();
    assert_eq!(
        out.stdout,
        format!(
            "{}next: kekd switches to version 2 within seconds. Once `kekd admin list` shows version 2 \
             encrypting (ENCRYPTS 1 or more) on every node — seconds, docs/rotation.md — retire version 1 with \
             evidence that nothing is stored under it:\n{}",
            ring.transitions(
                "rotate",
                &[
                    (2, "new", "pending"),
                    (1, "primary", "decrypt-only"),
                    (2, "pending", "primary")
                ]
            ),
            procedure(
                1,
                "every resource your EncryptionConfiguration encrypts with kekd (the shipped \
                 deploy/encryption-config.yaml: secrets and configmaps; pass --encryption-config FILE to list yours)",
                &shipped
            )
        )
    );

    // The shipped file lists exactly the default.
    let shipped_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/encryption-config.yaml");
    let shipped_path = shipped_file.to_str().unwrap();
    ring.run(&["rotate"]);
    let out = ring.run(&["promote", "3", "--encryption-config", shipped_path]);
    out.ok();
    assert!(
        out.stdout.ends_with(&procedure(
            2,
            &format!("every resource {shipped_path} encrypts with kekd"),
            &shipped
        )),
        "{out:#?}"
    );

    // A configuration with more resources, one of them under another
    // provider: exactly kekd's, from the flag or KEKD_ENCRYPTION_CONFIG.
    let custom = ring.dir.path().join("enc.yaml");
    fs::write(
        &custom,
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  \
         - resources: [secrets, widgets.example.com]\n    providers:\n      - kms:\n          apiVersion: v2\n          \
         name: kekd\n          endpoint: unix:///var/run/kekd/kms.sock\n      - identity: {}\n  \
         - resources: [events]\n    providers:\n      - aescbc: {keys: []}\n",
    )
    .unwrap();
    let c = custom.to_str().unwrap();
    let mut cmd = kekd();
    cmd.args([
        "admin",
        "rotate",
        "--promote",
        "--output",
        "json",
        "--keyring",
        &k,
    ])
    .env("KEKD_ENCRYPTION_CONFIG", c);
    let out = run_guarded(cmd, ring.dir.path());
    out.ok();
    let doc = json_of(&out);
    assert_eq!(
        doc["next"],
        "kekd switches to version 4 within seconds. Once `kekd admin list` shows version 4 encrypting (ENCRYPTS 1 \
         or more) on every node — seconds, docs/rotation.md — retire version 3 with evidence that nothing is \
         stored under it:"
    );
    assert_eq!(
        doc["procedure"],
        serde_json::json!({
            "version": 3,
            "resources": ["secrets", "widgets.example.com"],
            "resources_from": c,
            "migrate": [
                "kubectl get secrets -A -o json | kubectl replace -f -",
                "kubectl get widgets.example.com -A -o json | kubectl replace -f -",
            ],
            "scan": format!("kekd admin scan --etcd-endpoints URL --cacert FILE --cert FILE --key FILE --keyring {k} --output json > scan.json"),
            "retire": format!("kekd admin retire 3 --scan scan.json --keyring {k}"),
        })
    );
    // The refused retire names the same commands.
    let out = ring.run(&["retire", "3", "--encryption-config", c]);
    out.exited(1);
    assert!(
        out.stderr.ends_with(&procedure(
            3,
            &format!("every resource {c} encrypts with kekd"),
            &[
                "kubectl get secrets -A -o json | kubectl replace -f -",
                "kubectl get widgets.example.com -A -o json | kubectl replace -f -",
            ]
        )),
        "{out:#?}"
    );

    // An unusable file is a configuration error before anything changes.
    fs::write(&custom, "kind: Other\n").unwrap();
    ring.run(&["rotate"]);
    ring.refused(
        &["promote", "5", "--encryption-config", c],
        EX_CONFIG,
        &format!(
            "--encryption-config {c}: not an apiserver.config.k8s.io/v1 EncryptionConfiguration; start from \
             deploy/encryption-config.yaml"
        ),
    );
}

/// `retire --help` shows the window's value, not a Rust path.
#[test]
fn retire_help_shows_the_window_as_a_value() {
    let dir = tempdir_blocking();
    let out = admin(&["retire", "--help"], dir.path());
    out.ok();
    assert!(!out.stdout.contains("kekd::"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("within this window (the apiserver caches seeds for 24h)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("[default: 24h]"), "{}", out.stdout);
}

/// A chain whose middle link lies in a directory another user owns: that
/// user could repoint it (at an old copy of the keyring, or, between the
/// check and a read, at a file of their own). Every directory that holds a
/// link of the chain passes the same rules as the one the keyring is named in.
#[test]
fn serve_and_doctor_refuse_a_link_chain_through_a_directory_another_user_owns() {
    if !can_switch_users(
        "serve_and_doctor_refuse_a_link_chain_through_a_directory_another_user_owns",
    ) {
        return;
    }
    let ring = Ring::init();
    // ring.dir/named → ring.dir/theirs/middle → ring.dir/keyring, where
    // `theirs` belongs to nobody (mode 0755: only its owner writes).
    let theirs = ring.dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    let middle = theirs.join("middle");
    std::os::unix::fs::symlink(&ring.path, &middle).unwrap();
    chown_all(&theirs, NOBODY, NOBODY);
    let named = ring.dir.path().join("named");
    std::os::unix::fs::symlink(&middle, &named).unwrap();
    let doctor = admin(
        &[
            "doctor",
            "--keyring",
            named.to_str().unwrap(),
            "--output",
            "json",
        ],
        ring.dir.path(),
    );
    let findings = json_of(&doctor)["findings"].clone();
    let access = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "keyring access")
        .unwrap_or_else(|| panic!("{findings:#}"))
        .clone();
    assert_eq!(access["level"], "fail", "{access:#}");
    assert_eq!(
        access["fix"],
        format!("chown 0 {}", theirs.display()),
        "{access:#}"
    );
    doctor.exited(1);
    let out = run_guarded(
        serve_cmd(&named, &ring.dir.path().join("kms.sock")),
        ring.dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out).starts_with(&format!(
            "{} (directory) is owned by uid {NOBODY}, not by uid 0 that kekd runs as nor by root",
            theirs.display()
        )),
        "{out:#?}"
    );
}

/// The other hops of a chain: a relative middle link (resolved against its
/// own directory), and a link to the keyring's *directory* that lies in a
/// directory another user owns (`named/keyring` where `named` →
/// `theirs/dirlink` → the keyring's directory). Each is a link that user
/// can repoint; doctor and serve refuse both, naming that directory.
#[test]
fn serve_and_doctor_refuse_relative_and_directory_links_in_directories_another_user_owns() {
    if !can_switch_users(
        "serve_and_doctor_refuse_relative_and_directory_links_in_directories_another_user_owns",
    ) {
        return;
    }
    let check = |ring: &Ring, named: &Path, theirs: &Path| {
        let doctor = admin(
            &[
                "doctor",
                "--keyring",
                named.to_str().unwrap(),
                "--output",
                "json",
            ],
            ring.dir.path(),
        );
        let findings = json_of(&doctor)["findings"].clone();
        let access = findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == "keyring access")
            .unwrap_or_else(|| panic!("{findings:#}"))
            .clone();
        assert_eq!(access["level"], "fail", "{access:#}");
        assert_eq!(
            access["fix"],
            format!("chown 0 {}", theirs.display()),
            "{access:#}"
        );
        doctor.exited(1);
        let out = run_guarded(
            serve_cmd(named, &ring.dir.path().join("kms.sock")),
            ring.dir.path(),
        );
        assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
        assert!(
            error_message(&out).starts_with(&format!(
                "{} (directory) is owned by uid {NOBODY}, not by uid 0 that kekd runs as nor by root",
                theirs.display()
            )),
            "{out:#?}"
        );
    };
    // named → theirs/a (relative: `../keyring` from theirs/sub/.. ) → keyring.
    let ring = Ring::init();
    let theirs = ring.dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::symlink("../keyring", theirs.join("a")).unwrap();
    chown_all(&theirs, NOBODY, NOBODY);
    let named = ring.dir.path().join("named");
    std::os::unix::fs::symlink("theirs/a", &named).unwrap();
    check(&ring, &named, &theirs);

    // named/keyring, where named → theirs/dirlink → the keyring's directory.
    let ring = Ring::init();
    let theirs = ring.dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::symlink(ring.dir.path(), theirs.join("dirlink")).unwrap();
    chown_all(&theirs, NOBODY, NOBODY);
    let named = ring.dir.path().join("named");
    std::os::unix::fs::symlink(theirs.join("dirlink"), &named).unwrap();
    check(&ring, &named.join("keyring"), &theirs);
}

// ------------------------------- special files where kekd reads a file

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

/// The message of `serve` (run to its exit: the watchdog in `run_guarded`
/// only reports a hang) on the keyring of `ring`.
fn serve_error(ring: &Ring) -> (i32, String) {
    let out = run_guarded(
        serve_cmd(&ring.path, &ring.dir.path().join("kms.sock")),
        ring.dir.path(),
    );
    (out.code(), error_message(&out).to_owned())
}

/// A FIFO (or a directory, or a link to a device) planted where kekd reads
/// a file of its own would block it forever or feed it garbage: `serve`,
/// `accept-keyring`, `doctor` and `list` fail (or go on) at once, saying
/// which path and what to do.
#[test]
fn a_fifo_planted_beside_the_keyring_never_blocks_kekd() {
    let ring = Ring::init();
    let served = ring.dir.path().join("keyring.served");
    let unreadable = |what: &str| {
        format!(
            "keyring local keyring {k}: invalid keyring: {r}: {what}, which kekd never makes there (remove it); it \
             should hold the keyring this node served. Check how it changed; to trust the keyring as it is now, \
             run `kekd admin accept-keyring --keyring {k}`",
            k = ring.k(),
            r = served.display()
        )
    };
    // The served record: a FIFO, a directory, a link to /dev/null.
    mkfifo(&served);
    assert_eq!(
        serve_error(&ring),
        (EX_CONFIG, unreadable("it is a FIFO, not a regular file"))
    );
    let doctor = ring.run(&["doctor", "--output", "json"]);
    doctor.exited(1);
    let finding = json_of(&doctor)["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "served record")
        .cloned()
        .unwrap_or_else(|| panic!("{doctor:#?}"));
    assert_eq!(finding["level"], "fail", "{finding:#}");
    assert!(
        finding["detail"].as_str().unwrap().starts_with(&format!(
            "{}: it is a FIFO, not a regular file, which kekd never makes there (remove it)",
            served.display()
        )),
        "{finding:#}"
    );
    // The fix named: accept-keyring replaces it with a record.
    let out = ring.run(&["accept-keyring"]);
    out.ok();
    assert!(fs::symlink_metadata(&served).unwrap().is_file(), "{out:#?}");
    fs::remove_file(&served).unwrap();
    fs::create_dir(&served).unwrap();
    assert_eq!(
        serve_error(&ring),
        (
            EX_CONFIG,
            unreadable("it is a directory, not a regular file")
        )
    );
    fs::remove_dir(&served).unwrap();
    std::os::unix::fs::symlink("/dev/null", &served).unwrap();
    assert_eq!(
        serve_error(&ring),
        (EX_CONFIG, unreadable("it is a symlink"))
    );
    fs::remove_file(&served).unwrap();

    // The usage file: `list` goes on without the counts, and says why
    // (never "no kekd has recorded usage").
    let usage = ring.dir.path().join("keyring.usage.json");
    mkfifo(&usage);
    let out = ring.run(&["list"]);
    out.ok();
    let why = format!(
        "usage file: {} is a FIFO, not a regular file; nothing was read from it: put the file itself there (a \
         pipe's output must be saved to a file first)",
        usage.display()
    );
    assert!(
        out.stdout.contains(&format!(
            "WARNING: cannot tell what kekd serves or how often each version is used: {why}\n         (the \
             serving kekd rewrites the usage file every few seconds; if none runs, remove what is at that path)\n"
        )),
        "{out:#?}"
    );
    assert!(
        !out.stdout.contains("no kekd has recorded usage"),
        "{out:#?}"
    );
    let out = ring.run(&["list", "--output", "json"]);
    out.ok();
    assert_eq!(json_of(&out)["usage_error"], why.as_str(), "{out:#?}");
    fs::remove_file(&usage).unwrap();
    let out = ring.run(&["list", "--output", "json"]);
    assert_eq!(json_of(&out)["usage_error"], Value::Null, "{out:#?}");

    // The keyring itself, and a link from it to a device.
    let keyring = ring.dir.path().join("fifo-keyring");
    mkfifo(&keyring);
    let out = admin(
        &["list", "--keyring", keyring.to_str().unwrap()],
        ring.dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!("keyring {} is not a regular file", keyring.display())
    );
    let linked = ring.dir.path().join("null-keyring");
    std::os::unix::fs::symlink("/dev/null", &linked).unwrap();
    let out = run_guarded(
        serve_cmd(&linked, &ring.dir.path().join("kms.sock")),
        ring.dir.path(),
    );
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!("keyring {} is not a regular file", linked.display())
    );

    // The audit log: the change is made, the log refused by name.
    let audit = ring.dir.path().join("keyring.audit.jsonl");
    fs::remove_file(&audit).unwrap();
    mkfifo(&audit);
    let out = ring.run(&["rotate"]);
    out.exited(1);
    assert!(
        error_message(&out).starts_with(&format!(
            "the keyring was changed, but its audit log {0} could not be written: {0} is a FIFO, which kekd never \
             makes there",
            audit.display()
        )),
        "{out:#?}"
    );
}

/// `list` run by the keyring's owner on a usage file it cannot read (root's
/// 0600 file): the counts are missing, and `list` says why instead of "no
/// kekd has recorded usage".
#[test]
fn list_says_why_it_cannot_read_the_usage_file() {
    if !can_switch_users("list_says_why_it_cannot_read_the_usage_file") {
        return;
    }
    let ring = Ring::init();
    let dir = ring.dir.path();
    let usage = dir.join("keyring.usage.json");
    fs::write(&usage, "{}").unwrap();
    fs::set_permissions(&usage, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    chown_all(&ring.path, NOBODY, NOBODY);
    let mut cmd = kekd();
    cmd.args(["admin", "list", "--keyring", ring.k()]);
    let out = run_guarded(setpriv(&as_user(NOBODY, NOBODY), &cmd), dir);
    out.ok();
    assert!(
        out.stdout.contains(&format!(
            "WARNING: cannot tell what kekd serves or how often each version is used: usage file: cannot open {}: \
             Permission denied (os error 13)\n",
            usage.display()
        )),
        "{out:#?}"
    );
    assert!(
        !out.stdout.contains("no kekd has recorded usage"),
        "{out:#?}"
    );
}

/// A FIFO named as the configuration, the PIN file or `--scan`: refused at
/// once, with the fix.
#[test]
fn a_fifo_named_as_an_input_file_is_refused_without_blocking() {
    let ring = Ring::init();
    let dir = ring.dir.path();
    let config = dir.join("kekd.toml");
    mkfifo(&config);
    let mut cmd = kekd();
    cmd.args(["serve", "--config", config.to_str().unwrap()]);
    let out = run_guarded(cmd, dir);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "config file {}: it is a FIFO, not a regular file; nothing was read from it: give --config the TOML \
             file itself",
            config.display()
        )
    );

    let pin = dir.join("pin");
    mkfifo(&pin);
    let toml = dir.join("pkcs11.toml");
    fs::write(
        &toml,
        format!(
            "socket = \"{d}/kms.sock\"\n[backend]\nkind = \"pkcs11\"\nmodule = \"/nonexistent.so\"\n\
             token_label = \"t\"\npin_file = \"{p}\"\nstate_dir = \"{d}/state\"\n",
            d = dir.display(),
            p = pin.display()
        ),
    )
    .unwrap();
    let mut cmd = kekd();
    cmd.args(["serve", "--config", toml.to_str().unwrap()]);
    let out = run_guarded(cmd, dir);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "invalid pin_file: {} is a FIFO, not a regular file; point pin_file at a file holding only the PIN",
            pin.display()
        )
    );

    // `import --from`, `doctor --encryption-config`: refused by path, at once.
    let from = dir.join("copy");
    mkfifo(&from);
    let out = ring.run(&["import", "--from", from.to_str().unwrap()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!("keyring {} is not a regular file", from.display())
    );
    let encryption = dir.join("encryption-config.yaml");
    mkfifo(&encryption);
    {
        let out = ring.run(&[
            "doctor",
            "--encryption-config",
            encryption.to_str().unwrap(),
            "--output",
            "json",
        ]);
        out.exited(1);
        let finding = json_of(&out)["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == "encryption config")
            .cloned()
            .unwrap_or_else(|| panic!("{out:#?}"));
        assert_eq!(finding["level"], "fail", "{finding:#}");
        assert_eq!(
            finding["detail"],
            format!(
                "{} is a FIFO, not a regular file; nothing was read from it: put the file itself there (a pipe's \
                 output must be saved to a file first)",
                encryption.display()
            ),
            "{finding:#}"
        );
    }

    let scan = dir.join("scan.json");
    mkfifo(&scan);
    let out = ring.run(&["retire", "1", "--scan", scan.to_str().unwrap()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "--scan {} is a FIFO, not a regular file; nothing was read from it: save the output of `kekd admin \
             scan … --output json` to a file and pass that",
            scan.display()
        )
    );
}

/// Another user who can write the keyring's directory plants
/// `<keyring>.served` as a link to a record of their own: kekd never reads
/// through it, and root's `accept-keyring` replaces the link with a record
/// owned like the keyring, never by the planter.
#[test]
fn a_planted_served_record_link_is_neither_read_nor_handed_to_its_planter() {
    if !can_switch_users("a_planted_served_record_link_is_neither_read_nor_handed_to_its_planter") {
        return;
    }
    let ring = Ring::init();
    let dir = ring.dir.path();
    // A shared directory: root's, sticky, writable by all.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o1777)).unwrap();
    // nobody plants the link and the record it points at.
    let forged = dir.join("forged");
    let served = dir.join("keyring.served");
    let plant = format!(
        "echo forged > {f} && ln -s {f} {s}",
        f = forged.display(),
        s = served.display()
    );
    let mut sh = std::process::Command::new("sh");
    sh.args(["-c", &plant]);
    let out = run_guarded(setpriv(&as_user(NOBODY, NOBODY), &sh), dir);
    out.ok();
    assert_eq!(owner_of(&forged), (NOBODY, NOBODY));

    let out = ring.run(&["doctor", "--output", "json"]);
    let findings = json_of(&out)["findings"].clone();
    let record = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "served record")
        .cloned()
        .unwrap_or_else(|| panic!("{findings:#}"));
    assert_eq!(record["level"], "fail", "{record:#}");
    assert!(
        record["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}: it is a symlink", served.display())),
        "{record:#}"
    );
    let out = ring.run(&["accept-keyring"]);
    out.ok();
    let meta = fs::symlink_metadata(&served).unwrap();
    assert!(meta.is_file(), "{meta:?}");
    assert_eq!(
        owner_of(&served),
        owner_of(&ring.path),
        "the record went to the link's planter"
    );
    assert_eq!(fs::read_to_string(&forged).unwrap(), "forged\n");
}

/// `KEKD_LOCK_WAIT` set to something that is not a duration is refused
/// (exit 78, naming the variable and the fix) before the keyring is touched,
/// rather than silently replaced by the default wait.
#[test]
fn a_bad_kekd_lock_wait_is_refused_before_the_keyring_is_touched() {
    let ring = Ring::init();
    let (before, audit) = (ring.bytes(), ring.audit());
    for command in [&["rotate"][..], &["promote", "1"], &["retire", "1"]] {
        let mut cmd = common::kekd();
        cmd.arg("admin")
            .args(command)
            .args(["--keyring", ring.k()])
            .env("KEKD_LOCK_WAIT", "often");
        let out = common::run_guarded(cmd, ring.dir.path());
        assert_eq!(
            out.refused(78),
            "KEKD_LOCK_WAIT=\"often\" is not a duration (expected number at 0): set it like 30s, \
             or 0s not to wait, or unset it for 10s",
            "{command:?}"
        );
        assert_eq!(ring.bytes(), before, "{command:?} changed the keyring");
        assert_eq!(ring.audit(), audit, "{command:?} wrote an audit line");
    }
}
