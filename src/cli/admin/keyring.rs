//! The keyring commands: init, rotate, promote, retire, restore, destroy,
//! list, import.
//!
//! A changing command takes the keyring's lock, reads the keyring, applies
//! one operation from [`crate::keyring::lifecycle`], writes the result atomically
//! and durably, appends the audit log, and only then reports success. A
//! refused step changes nothing; a finished step re-run is a no-op.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::encryption_config::Encrypted;
use super::{LOCK_WAIT, Target, report};
use crate::audit::{self, AuditRecord};
use crate::backend::served::{self, Served};
use crate::backend::{BackendError, ErrorKind, KeySource};
use crate::cli::CliError;
use crate::id::{KeyVersion, Timestamp};
use crate::keyring::KeyState;
use crate::keyring::lifecycle::{
    OpError, Outcome, RetireBasis, Transition, check_successor, retire_risk,
};
use crate::keyring::lock::{self, KeyringLock};
use crate::keyring::store::{self, KeyringFile, StoreError};
use crate::usage;

impl Target {
    /// Resolves where the keyring is (flags, then KEKD_*, then --config) and
    /// opens it: the file, or a connection to the token.
    pub(super) fn open(&self) -> Result<Arc<dyn KeySource>, CliError> {
        let config = self.backend_config()?;
        // The lock, the audit log and the usage file live there.
        if let Some(dir) = config.state_dir() {
            crate::backend::ensure_state_dir(dir).map_err(backend_error)?;
        }
        crate::backend::open(&config).map_err(backend_error)
    }
}

/// How long to wait for another admin command's lock: `KEKD_LOCK_WAIT`
/// (e.g. `30s`, `0s` not to wait) or [`LOCK_WAIT`].
///
/// # Errors
/// Exit 78 naming the variable when it is set but not a duration.
fn lock_wait() -> Result<Duration, CliError> {
    match std::env::var("KEKD_LOCK_WAIT") {
        Err(std::env::VarError::NotPresent) => Ok(LOCK_WAIT),
        Ok(v) => humantime::parse_duration(&v).map_err(|e| {
            CliError::config(format!(
                "KEKD_LOCK_WAIT={v:?} is not a duration ({e}): set it like 30s, or 0s not to wait, or unset it for {}",
                humantime::format_duration(LOCK_WAIT)
            ))
        }),
        Err(std::env::VarError::NotUnicode(_)) => Err(CliError::config(
            "KEKD_LOCK_WAIT is not UTF-8: set it like 30s, or unset it",
        )),
    }
}

/// Takes the admin lock of the keyring at `path` (or of a token's state
/// anchor), waiting up to [`lock_wait`] for another admin command to
/// finish. A command that has to wait says so on stderr first, rather
/// than sit silent for seconds.
///
/// # Errors
/// Exit 78 for a bad `KEKD_LOCK_WAIT`; exit 75 when the wait expires (the
/// keyring is locked); the exit of the store error otherwise.
pub(super) fn take_lock(path: &Path) -> Result<KeyringLock, CliError> {
    let wait = lock_wait()?;
    match lock::acquire(path, Duration::ZERO) {
        Err(StoreError::Locked { .. }) if !wait.is_zero() => {
            eprintln!(
                "kekd: keyring {} is locked by another `kekd admin` command; waiting up to {} for it",
                path.display(),
                humantime::format_duration(wait)
            );
            lock::acquire(path, wait)
        }
        taken => taken,
    }
    .map_err(store_error)
}

pub(super) fn backend_error(e: BackendError) -> CliError {
    CliError::backend(&e)
}

/// A lifecycle step.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// `rotate`.
    Rotate {
        /// `--promote`.
        promote: bool,
        /// `--expect-primary`.
        expect_primary: Option<KeyVersion>,
    },
    /// `promote`.
    Promote(KeyVersion),
    /// `retire`.
    Retire {
        /// The version.
        version: KeyVersion,
        /// `--window`.
        window: Duration,
        /// `--force`.
        force: bool,
        /// `--scan`: checked under the lock before the change is written.
        scan: bool,
    },
    /// `restore`.
    Restore(KeyVersion),
    /// `destroy`.
    Destroy {
        /// The version.
        version: KeyVersion,
        /// `--yes-destroy-key-material`: asked for only once the version
        /// is known to be destroyable.
        confirmed: bool,
    },
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Self::Rotate { .. } => "rotate",
            Self::Promote(_) => "promote",
            Self::Retire { .. } => "retire",
            Self::Restore(_) => "restore",
            Self::Destroy { .. } => "destroy",
        }
    }
}

pub(super) fn store_error(e: StoreError) -> CliError {
    backend_error(BackendError::from(e))
}

/// A keyring is already there: a refusal (exit 1), like every step that
/// would lose keys, not a problem with that keyring (78).
fn init_error(e: BackendError) -> CliError {
    match e.kind() {
        ErrorKind::KeyringExists => CliError::runtime(e),
        _ => backend_error(e),
    }
}

/// `kekd admin init`.
///
/// # Errors
/// Exit 1 if a keyring exists (it is left untouched), 78 if it cannot be
/// written.
pub fn init(t: &Target) -> Result<(), CliError> {
    if let Some(dir) = t
        .keyring
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                CliError::config(format!("cannot create directory {}: {e}", dir.display()))
            })?;
    }
    let store = t.open()?;
    let anchor = store.anchor();
    let _lock = take_lock(&anchor)?;
    let now = Timestamp::now();
    let file = store.generate(now).map_err(init_error)?;
    let not_durable = match store.create(&file) {
        Err(e) if e.kind() == ErrorKind::KeyringExists => return Err(init_error(e)),
        result => written(result)?,
    };
    let version = KeyVersion::FIRST;
    let key_id = file.key_id(version);
    let transition = Transition {
        version,
        from: None,
        to: KeyState::Primary,
    };
    audit::append(
        &anchor,
        &[AuditRecord::new(
            "init",
            &store.name(),
            &file.id,
            &transition,
            vec![],
            now,
        )],
    )
    .map_err(|e| {
        CliError::runtime(format!(
            "keyring created, but the audit log could not be written: {e}"
        ))
    })?;
    report(
        t.output,
        &json!({
            "command": "init",
            "changed": true,
            "keyring": store.name(),
            "keyring_id": file.id.to_string(),
            "primary_version": version.get(),
            "key_id": key_id.as_str(),
        }),
        &format!(
            "created keyring {}\n  keyring id  {}\n  version 1   primary\n  key_id      {key_id}\n{}",
            store.name(),
            file.id,
            if file.material == store::Material::Inline {
                "Back this file up now: if it is lost, every Secret it protects is unreadable.\n"
            } else {
                "The key was generated inside the token and cannot leave it: back up the token as its vendor documents.\n"
            }
        ),
    );
    match not_durable {
        Some(e) => Err(backend_error(e)),
        None => Ok(()),
    }
}

/// Runs one lifecycle step under the keyring lock.
///
/// # Errors
/// Exit 1 when the step is refused, 75 when locked, 78 for keyring problems.
pub fn change(t: &Target, step: Step) -> Result<(), CliError> {
    change_checked(t, step, &Encrypted::shipped(), |_| Ok(()))
}

/// [`change`], with one more guard: `check` sees the keyring as read under
/// the lock and may refuse a step that would change it (`retire --scan`).
/// `encrypted` is what a rotation must rewrite before retiring, for the
/// `next:` hint and a refused retire.
///
/// # Errors
/// As [`change`], and whatever `check` returns.
pub fn change_checked(
    t: &Target,
    step: Step,
    encrypted: &Encrypted,
    check: impl FnOnce(&KeyringFile) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let store = t.open()?;
    let anchor = store.anchor();
    let path = &anchor;
    let name = store.name();
    // Read once before locking: a missing keyring is reported as such (exit
    // 78) instead of as a lock file that cannot be created beside it.
    store.read().map_err(backend_error)?;
    let _lock = take_lock(path)?;
    let original = store.read().map_err(backend_error)?;
    let mut file = store.read().map_err(backend_error)?;
    let now = Timestamp::now();
    let mut overrides = Vec::new();
    let mut warning = None;
    let mut risk = None;
    let outcome = match step {
        Step::Rotate {
            promote,
            expect_primary,
        } => file.rotate(now, promote, expect_primary),
        Step::Promote(v) => file.promote(v, now),
        Step::Retire {
            version,
            window,
            force,
            scan,
        } => {
            let basis = match (scan, force) {
                (true, _) => RetireBasis::Scan,
                (false, true) => RetireBasis::Force,
                (false, false) => RetireBasis::Usage,
            };
            if force {
                overrides.push("--force");
            }
            if basis == RetireBasis::Force {
                risk = Some(retire_risk(version));
            }
            let (last, since_last) = if basis == RetireBasis::Usage {
                last_decrypt(path, &file, version, &mut warning)
            } else {
                (None, None)
            };
            // The wall clock first (its refusals name the time), then the
            // boot clock, which a jumped wall clock cannot fool.
            file.retire(version, now, last, window, basis)
                .and_then(|outcome| {
                    if matches!(outcome, Outcome::Changed(_)) {
                        KeyringFile::check_retire_by_boot_clock(
                            version, since_last, last, window, basis,
                        )?;
                    }
                    Ok(outcome)
                })
        }
        Step::Restore(v) => file.restore(v),
        Step::Destroy { version, .. } => {
            overrides.push("--yes-destroy-key-material");
            file.destroy(version, now)
        }
    }
    .map_err(|e| refused(t, step, &e, encrypted))?;
    if let (
        Step::Destroy {
            version,
            confirmed: false,
        },
        Outcome::Changed(_),
    ) = (step, &outcome)
    {
        return Err(CliError::runtime(format!(
            "destroy erases the key material of version {version} forever: anything still encrypted under it \
             becomes unreadable. Check `kekd admin list` first, then re-run with \
             --yes-destroy-key-material to confirm"
        )));
    }

    let transitions = match outcome {
        Outcome::Unchanged(why) => {
            report(
                t.output,
                &json!({"command": step.name(), "changed": false, "keyring": name, "message": why}),
                &format!("{}: nothing to do: {why}\n", step.name()),
            );
            return Ok(());
        }
        Outcome::Changed(transitions) => transitions,
    };
    check(&original)?;
    let not_durable = written(store.replace(&original, &file))?;
    let records: Vec<AuditRecord> = transitions
        .iter()
        .map(|tr| {
            AuditRecord::new(step.name(), &name, &file.id, tr, overrides.clone(), now)
                .with_risk(risk.clone())
        })
        .collect();
    let audit_result = audit::append(path, &records);

    let flags = target_flags(t);
    let next = next_step(step, &transitions, &flags, file.material);
    let procedure = transitions
        .iter()
        .find(|tr| {
            tr.to == KeyState::DecryptOnly && matches!(step, Step::Rotate { .. } | Step::Promote(_))
        })
        .map(|tr| Procedure::new(tr.version, &flags, encrypted));
    let mut text = String::new();
    for tr in &transitions {
        text.push_str(&format!(
            "{}: version {} {} → {} (key_id {})\n",
            step.name(),
            tr.version,
            tr.from.map_or("new", KeyState::as_str),
            tr.to,
            file.key_id(tr.version)
        ));
    }
    if let Some(w) = &warning {
        text.push_str(&format!("warning: {w}\n"));
    }
    if let Some(r) = &risk {
        text.push_str(&format!("warning: {r}\n"));
    }
    text.push_str(&format!("next: {next}\n"));
    if let Some(p) = &procedure {
        text.push_str(&p.text());
    }
    report(
        t.output,
        &json!({
            "command": step.name(),
            "changed": true,
            "keyring": name,
            "transitions": transitions.iter().map(|tr| json!({
                "version": tr.version.get(),
                "key_id": file.key_id(tr.version).as_str(),
                "from": tr.from.map(KeyState::as_str),
                "to": tr.to.as_str(),
            })).collect::<Vec<Value>>(),
            "warning": warning,
            "risk": risk,
            "next": next,
            "procedure": procedure.as_ref().map(Procedure::to_json),
        }),
        &text,
    );
    if let Some(e) = not_durable {
        return Err(backend_error(e));
    }
    audit_result.map_err(|e| {
        CliError::runtime(format!(
            "the keyring was changed, but its audit log {} could not be written: {e}",
            audit::audit_path(path).display()
        ))
    })
}

/// `kekd admin accept-keyring`: records the keyring as it is now as the
/// one this node serves, so `kekd serve` starts from it although it is
/// another keyring, or older than the one last served (a restored backup).
/// Audited; re-running it is a no-op.
///
/// # Errors
/// Exit 78 when the keyring cannot be read, 1 when the record or the audit
/// log cannot be written.
pub fn accept(t: &Target) -> Result<(), CliError> {
    let store = t.open()?;
    let anchor = store.anchor();
    let name = store.name();
    store.read().map_err(backend_error)?;
    let _lock = take_lock(&anchor)?;
    let file = store.read().map_err(backend_error)?;
    let found = Served::of_file(&file);
    let record = served::record_path(&anchor);
    let previous = served::read(&anchor, &target_flags(t));
    if matches!(previous, Ok(Some(p)) if p == found) {
        let why = format!(
            "{} already records keyring {} up to version {}",
            record.display(),
            found.keyring_id,
            found.highest
        );
        report(
            t.output,
            &json!({"command": "accept-keyring", "changed": false, "keyring": name, "message": why}),
            &format!(
                "accept-keyring: nothing to do: {why}
"
            ),
        );
        return Ok(());
    }
    let was = match &previous {
        Ok(Some(p)) => format!("keyring {} up to version {}", p.keyring_id, p.highest),
        Ok(None) => "nothing".to_owned(),
        Err(_) => "an unreadable record".to_owned(),
    };
    let not_durable = written(served::write(&anchor, found).map_err(BackendError::from))?;
    let state = file
        .versions
        .iter()
        .find(|v| v.info.version == found.highest)
        .map_or(KeyState::Retired, |v| v.info.state);
    let now = Timestamp::now();
    let audit_result = audit::append(
        &anchor,
        &[AuditRecord::new(
            "accept-keyring",
            &name,
            &file.id,
            &Transition {
                version: found.highest,
                from: Some(state),
                to: state,
            },
            vec![],
            now,
        )],
    );
    report(
        t.output,
        &json!({
            "command": "accept-keyring",
            "changed": true,
            "keyring": name,
            "record": record,
            "keyring_id": found.keyring_id.to_string(),
            "highest_version": found.highest.get(),
            "previous": was,
        }),
        &format!(
            "accept-keyring: {} now records keyring {} up to version {} (was: {was}); `kekd serve` will start from it\n",
            record.display(),
            found.keyring_id,
            found.highest
        ),
    );
    if let Some(e) = not_durable {
        return Err(backend_error(e));
    }
    audit_result.map_err(|e| {
        CliError::runtime(format!(
            "the keyring was accepted, but its audit log {} could not be written: {e}",
            audit::audit_path(&anchor).display()
        ))
    })
}

/// A write's result: `Ok(None)` written, `Ok(Some(e))` in effect but not
/// known to be durable (audit and report it, then fail with `e`), `Err`
/// not written.
fn written(result: Result<(), BackendError>) -> Result<Option<BackendError>, CliError> {
    match result {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == ErrorKind::NotDurable => Ok(Some(e)),
        Err(e) => Err(backend_error(e)),
    }
}

/// When `version` last served a Decrypt, from the server's usage file: the
/// server's wall-clock time, and how long ago by the boot clock when the
/// server stamped it during this boot.
fn last_decrypt(
    path: &Path,
    file: &KeyringFile,
    version: KeyVersion,
    warning: &mut Option<String>,
) -> (Option<Timestamp>, Option<Duration>) {
    match usage::read(path) {
        Ok(Some(u)) if u.keyring_id == file.id.to_string() => (
            u.versions.get(&version.get()).and_then(|v| v.last_decrypt),
            u.since_last_decrypt(version),
        ),
        Ok(_) => {
            *warning = Some(format!(
                "no usage record for this keyring beside {}: cannot tell whether version {version} is still \
                 used; run `kekd admin list` on every node",
                path.display()
            ));
            (None, None)
        }
        Err(e) => {
            *warning = Some(format!(
                "{e}; cannot tell whether version {version} is still used"
            ));
            (None, None)
        }
    }
}

/// How the operator named the keyring, to repeat it in suggested commands.
pub(super) fn target_flags(t: &Target) -> String {
    match (&t.keyring, &t.config) {
        (Some(k), _) => format!("--keyring {}", k.display()),
        (None, Some(c)) => format!("--config {}", c.display()),
        (None, None) => String::new(),
    }
}

fn next_step(
    step: Step,
    transitions: &[Transition],
    flags: &str,
    material: store::Material,
) -> String {
    let primary = transitions
        .iter()
        .find(|t| t.to == KeyState::Primary)
        .map(|t| t.version);
    let demoted = transitions
        .iter()
        .find(|t| t.to == KeyState::DecryptOnly)
        .map(|t| t.version);
    match (step, primary) {
        (Step::Rotate { .. }, None) if material == store::Material::Token => {
            let v = transitions.first().map_or(0, |t| t.version.get());
            format!(
                "every kekd sharing this token sees version {v} within seconds (`kekd admin list` on each node); \
                 then run `kekd admin promote {v} {flags}` once"
            )
        }
        (Step::Rotate { .. }, None) => {
            let v = transitions.first().map_or(0, |t| t.version.get());
            format!(
                "copy the keyring to every other control-plane node and run `kekd admin import {flags} --from COPY` there \
                 (nodes sharing one HSM token need no copy); then run `kekd admin promote {v} {flags}` on every node"
            )
        }
        (Step::Rotate { .. } | Step::Promote(_), Some(v)) => match demoted {
            Some(d) => format!(
                "kekd switches to version {v} within seconds. Once `kekd admin list` shows version {v} encrypting \
                 (ENCRYPTS 1 or more) on every node — seconds, docs/rotation.md — retire version {d} with \
                 evidence that nothing is stored under it:"
            ),
            None => format!("kekd switches to version {v} within seconds"),
        },
        (Step::Retire { version, .. }, _) => format!(
            "version {version} refuses to decrypt now; if anything fails to read, `kekd admin restore {version} {flags}`. \
             Later, `kekd admin destroy {version} {flags} --yes-destroy-key-material`"
        ),
        (Step::Restore(v), _) => format!("version {v} decrypts again"),
        (Step::Destroy { version: v, .. }, _) => {
            format!("the key material of version {v} is erased; its number stays reserved")
        }
        (Step::Promote(_), None) => String::new(),
    }
}

/// A command line: the words that are not empty, joined by spaces.
fn command(words: &[&str]) -> String {
    words
        .iter()
        .filter(|w| !w.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The one way to retire a version that was primary: rewrite what the
/// EncryptionConfiguration encrypts, scan etcd, retire with the scan.
struct Procedure {
    version: KeyVersion,
    encrypted: Encrypted,
    scan: String,
    retire: String,
}

impl Procedure {
    fn new(version: KeyVersion, flags: &str, encrypted: &Encrypted) -> Self {
        let provider = encrypted
            .provider_name
            .as_ref()
            .map_or(String::new(), |n| format!("--provider-name {n}"));
        Self {
            version,
            encrypted: encrypted.clone(),
            scan: command(&[
                "kekd admin scan --etcd-endpoints URL --cacert FILE --cert FILE --key FILE",
                &provider,
                flags,
                "--output json > scan.json",
            ]),
            retire: command(&[
                &format!("kekd admin retire {version} --scan scan.json"),
                flags,
            ]),
        }
    }

    fn text(&self) -> String {
        let mut text = format!("  1. rewrite {}:\n", self.encrypted.describe());
        for c in self.encrypted.migrate_commands() {
            text.push_str(&format!("       {c}\n"));
        }
        text.push_str(&format!(
            "  2. scan etcd (the apiserver's etcd client certificate; it must show 0 objects under version {}):\n       {}\n",
            self.version, self.scan
        ));
        text.push_str(&format!(
            "  3. on every node (copy scan.json there):\n       {}\n",
            self.retire
        ));
        text
    }

    fn to_json(&self) -> Value {
        let mut doc = self.encrypted.to_json();
        if let Some(o) = doc.as_object_mut() {
            o.insert("version".to_owned(), json!(self.version.get()));
            o.insert("scan".to_owned(), json!(self.scan));
            o.insert("retire".to_owned(), json!(self.retire));
        }
        doc
    }
}

/// A refused step as an error; a retire refused for want of a scan also
/// gives the procedure that clears it, in text and JSON.
fn refused(t: &Target, step: Step, e: &OpError, encrypted: &Encrypted) -> CliError {
    let message = format!("{} refused: {e}", step.name());
    let OpError::NeedsScan { version, .. } = e else {
        return CliError::runtime(message);
    };
    let procedure = Procedure::new(*version, &target_flags(t), encrypted);
    let mut error = CliError::runtime(format!(
        "{message}. The procedure:\n{}",
        procedure.text().trim_end()
    ));
    if t.output == crate::cli::Output::Json {
        error.reported = true;
        report(
            t.output,
            &json!({
                "error": error.message,
                "exit_code": error.code,
                "procedure": procedure.to_json(),
            }),
            "",
        );
    }
    error
}

/// `kekd admin list`.
///
/// # Errors
/// Exit 78 when the keyring cannot be read.
pub fn list(t: &Target) -> Result<(), CliError> {
    let store = t.open()?;
    let anchor = store.anchor();
    let path = &anchor;
    let file = match store.read() {
        Ok(f) => f,
        Err(e) => return Err(unreadable_keyring(t, path, e)),
    };
    // What the server serves and its refusals are shown whatever keyring the
    // file now holds; the counts only when they belong to this keyring.
    // An unreadable usage file (a FIFO planted there, a permission error)
    // is said, never passed off as "no kekd has recorded usage".
    let (usage, usage_error) = match usage::read(path) {
        Ok(u) => (u, None),
        Err(e) => (None, Some(e)),
    };
    let counts = usage
        .as_ref()
        .filter(|u| u.keyring_id == file.id.to_string());
    let use_of = |v: KeyVersion| {
        counts
            .and_then(|u| u.versions.get(&v.get()))
            .copied()
            .unwrap_or_default()
    };
    let versions: Vec<Value> = file
        .versions
        .iter()
        .map(|s| {
            let i = &s.info;
            let u = use_of(i.version);
            json!({
                "version": i.version.get(),
                "state": i.state.as_str(),
                "key_id": file.key_id(i.version).as_str(),
                "created": i.created,
                "promoted": i.promoted,
                "retired": i.retired,
                "destroyed": i.destroyed,
                "encrypts": u.encrypts,
                "decrypts": u.decrypts,
                "last_encrypt": u.last_encrypt,
                "last_decrypt": u.last_decrypt,
            })
        })
        .collect();
    let mut text = format!("keyring {} (id {})\n", store.name(), file.id);
    text.push_str(&format!(
        "{:>7}  {:<12}  {:<20}  {:<20}  {:<20}  {:>9}  {:>9}  {:<20}\n",
        "VERSION",
        "STATE",
        "CREATED",
        "PROMOTED",
        "RETIRED",
        "ENCRYPTS",
        "DECRYPTS",
        "LAST DECRYPT"
    ));
    let opt = |t: Option<Timestamp>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
    for s in &file.versions {
        let i = &s.info;
        let u = use_of(i.version);
        text.push_str(&format!(
            "{:>7}  {:<12}  {:<20}  {:<20}  {:<20}  {:>9}  {:>9}  {:<20}\n",
            i.version.get(),
            i.state.as_str(),
            i.created.to_string(),
            opt(i.promoted),
            opt(i.retired.or(i.destroyed)),
            u.encrypts,
            u.decrypts,
            opt(u.last_decrypt)
        ));
    }
    let server = usage.as_ref().and_then(|u| u.serving.clone());
    let reload_error = usage.as_ref().and_then(|u| u.reload_error.clone());
    let running = server.as_ref().map(|s| process_alive(s.pid));
    let primary = file.primary().map(KeyVersion::get);
    // The server publishes a change as soon as it has loaded it; until then
    // the file's primary differs from the one served.
    let pending = server
        .as_ref()
        .is_some_and(|s| running == Some(true) && Some(s.primary) != primary);
    match (&server, usage.as_ref().and_then(|u| u.updated)) {
        (Some(s), Some(updated)) if running == Some(false) => text.push_str(&format!(
            "kekd (pid {}) is not running (in this PID namespace): it served version {} ({}) \
             until it stopped; counts as of {updated}\n",
            s.pid, s.primary, s.key_id
        )),
        (Some(s), Some(updated)) if pending => text.push_str(&format!(
            "kekd (pid {}) still serves version {} ({}): it has not loaded this keyring's primary \
             (version {}) yet; it reloads by itself (`kekd admin probe --keyring` checks it); \
             counts as of {updated}\n",
            s.pid,
            s.primary,
            s.key_id,
            primary.map_or_else(|| "-".to_owned(), |p| p.to_string())
        )),
        (Some(s), Some(updated)) => text.push_str(&format!(
            "kekd (pid {}) serves version {} ({}); counts as of {updated}\n",
            s.pid, s.primary, s.key_id
        )),
        _ if usage_error.is_some() => {}
        _ => text.push_str("no kekd has recorded usage for this keyring yet\n"),
    }
    if let Some(e) = &usage_error {
        text.push_str(&format!(
            "WARNING: cannot tell what kekd serves or how often each version is used: {e}\n         (the serving \
             kekd rewrites the usage file every few seconds; if none runs, remove what is at that path)\n"
        ));
    }
    if let Some(e) = &reload_error {
        text.push_str(&format!(
            "WARNING: kekd refused the keyring change at {}: {}\n         it keeps serving its last good keyring; fix the file (or bring it back with `kekd admin restore-backup`,\n         or `kekd admin import` of another node's keyring) and it reloads by itself\n",
            e.at, e.message
        ));
    }
    report(
        t.output,
        &json!({
            "keyring": store.name(),
            "keyring_id": file.id.to_string(),
            "primary": primary,
            "versions": versions,
            "server": server,
            "server_running": running,
            "reload_pending": pending,
            "reload_error": reload_error,
            "usage_updated": usage.as_ref().and_then(|u| u.updated),
            "usage_error": usage_error,
        }),
        &text,
    );
    Ok(())
}

/// Whether process `pid` exists (in this PID namespace). A process of
/// another uid exists too: the signal is refused, not unknown.
fn process_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// The keyring cannot be read: say so, and what the server still serves.
fn unreadable_keyring(t: &Target, anchor: &Path, e: BackendError) -> CliError {
    let usage = usage::read(anchor).ok().flatten();
    let serving = usage
        .as_ref()
        .and_then(|u| u.serving.clone())
        .filter(|s| process_alive(s.pid));
    let mut error = backend_error(e);
    if let Some(s) = &serving {
        error.reported = true;
        report(
            t.output,
            &json!({
                "keyring": anchor,
                "error": error.message,
                "exit_code": error.code,
                "server": s,
                "reload_error": usage.as_ref().and_then(|u| u.reload_error.clone()),
            }),
            &format!(
                "kekd (pid {}) keeps serving version {} ({}) from its last good keyring;\n\
                 it reloads by itself once the file is fixed (restore it from a backup or another node)\n",
                s.pid, s.primary, s.key_id
            ),
        );
    }
    error
}

/// `kekd admin import`.
///
/// # Errors
/// Exit 78 when the copy is damaged or would lose or change key material.
pub fn import(t: &Target, from: &Path) -> Result<(), CliError> {
    let store = t.open()?;
    if store
        .read()
        .is_ok_and(|f| f.material == store::Material::Token)
        || !t.backend.keyring_in_a_file()
    {
        return Err(CliError::runtime(
            "import is for local keyrings: every kekd pointed at the same PKCS#11 token already shares its keyring",
        ));
    }
    let path: PathBuf = store.anchor();
    let path = &path;
    let incoming = read_copy(from)?;
    let _lock = take_lock(path)?;
    let now = Timestamp::now();
    let existing = match store::read(path) {
        Ok(f) => Some(f),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(store_error(e)),
    };
    let transitions: Vec<Transition> = match &existing {
        Some(local) => {
            check_successor(&local.id, &local.views(), &incoming.id, &incoming.views()).map_err(
                |e| {
                    CliError::config(format!(
                        "import refused: {} cannot replace {}: {e}",
                        from.display(),
                        path.display()
                    ))
                },
            )?;
            crate::keyring::lifecycle::transitions(Some(local), &incoming)
        }
        None => crate::keyring::lifecycle::transitions(None, &incoming),
    };
    if existing.is_some()
        && transitions.is_empty()
        && existing.as_ref().map(KeyringFile::infos) == Some(incoming.infos())
    {
        report(
            t.output,
            &json!({"command": "import", "changed": false, "keyring": path, "message": "already identical"}),
            &format!(
                "import: nothing to do: {} already matches {}\n",
                path.display(),
                from.display()
            ),
        );
        return Ok(());
    }
    let not_durable = written(
        match existing {
            Some(_) => store::replace(path, &incoming),
            None => store::create(path, &incoming),
        }
        .map_err(BackendError::from),
    )?;
    let records: Vec<AuditRecord> = transitions
        .iter()
        .map(|tr| AuditRecord::new("import", &store.name(), &incoming.id, tr, vec![], now))
        .collect();
    let audit_result = audit::append(path, &records);
    let mut text = format!(
        "import: {} now matches {}\n",
        path.display(),
        from.display()
    );
    for tr in &transitions {
        text.push_str(&format!(
            "  version {} {} → {}\n",
            tr.version,
            tr.from.map_or("new", KeyState::as_str),
            tr.to
        ));
    }
    text.push_str(&format!(
        "kekd serving {} picks this up within seconds (`kekd admin list` shows what it serves). \
         Delete the copy {} once every node has it.\n",
        path.display(),
        from.display()
    ));
    report(
        t.output,
        &json!({
            "command": "import",
            "changed": true,
            "keyring": path,
            "from": from,
            "transitions": transitions.iter().map(|tr| json!({
                "version": tr.version.get(),
                "from": tr.from.map(KeyState::as_str),
                "to": tr.to.as_str(),
            })).collect::<Vec<Value>>(),
        }),
        &text,
    );
    if let Some(e) = not_durable {
        return Err(backend_error(e));
    }
    audit_result.map_err(|e| {
        CliError::runtime(format!(
            "imported, but the audit log could not be written: {e}"
        ))
    })
}

/// Reads a keyring copy that may have arrived with loose permissions (scp
/// keeps the umask's); the checksum is what proves it intact.
fn read_copy(from: &Path) -> Result<KeyringFile, CliError> {
    // One open (never a plain read, which a FIFO swapped in would block):
    // the file whose mode is warned about is the file read.
    let (file, mode) = store::read_loose(from).map_err(store_error)?;
    if mode & 0o077 != 0 {
        eprintln!(
            "kekd: warning: {} is readable by other users ({:04o}); delete it after the import",
            from.display(),
            mode & 0o777
        );
    }
    Ok(file)
}
