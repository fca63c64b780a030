//! `kekd admin backup` and `kekd admin restore-backup`: the local keyring
//! sealed under a passphrase ([`crate::backup`]), and brought back.
//!
//! The passphrase comes from `--passphrase-file` (no group or other access),
//! the `KEKD_BACKUP_PASSPHRASE` environment variable, or a prompt on the
//! terminal (twice when taking a backup) — never from argv, which every
//! user can read in `/proc`.
//!
//! `backup` never replaces a file without `--force`, and `--force` replaces
//! only an older kekd backup; re-run with the same file, keyring and
//! passphrase it is a no-op. `restore-backup` takes the keyring lock,
//! creates a missing keyring, and replaces an existing one only with a
//! backup that loses none of its versions (the successor rule of reload and
//! `import`); restoring what is already there is a no-op.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::keyring::{store_error, take_lock};
use super::{Target, report};
use crate::audit::{self, AuditRecord};
use crate::backup::{self, Backup, BackupError, Header, KdfParams, Overwrite, Passphrase};
use crate::backup::{MAX_PASSPHRASE_LEN, RestorePlan};
use crate::cli::CliError;
use crate::id::Timestamp;
use crate::keyring::KeyState;
use crate::keyring::lifecycle::Transition;
use crate::keyring::store::{self, KeyringFile, Material, StoreError};

/// The environment variable a backup passphrase may come from.
pub const PASSPHRASE_ENV: &str = "KEKD_BACKUP_PASSPHRASE";

/// Where the passphrase comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct PassphraseArgs {
    /// File holding the backup passphrase (no group or other access). Without
    /// it kekd reads KEKD_BACKUP_PASSPHRASE, else asks on the terminal. The
    /// passphrase itself is never a flag value.
    #[arg(long, env = "KEKD_BACKUP_PASSPHRASE_FILE", value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Arguments of `backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where to write the backup (mode 0600). An existing file is never
    /// replaced without --force.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an older kekd backup at --out (never any other file).
    #[arg(long)]
    pub force: bool,
    /// The passphrase.
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
    /// The keyring to back up (local backend only).
    #[command(flatten)]
    pub target: Target,
}

/// Arguments of `restore-backup`.
#[derive(Debug, clap::Args)]
pub struct RestoreBackupArgs {
    /// The backup to restore (from `kekd admin backup`).
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The passphrase it was taken with.
    #[command(flatten)]
    pub passphrase: PassphraseArgs,
    /// The keyring to restore: created if missing; an existing one is
    /// replaced only by a backup that loses none of its versions.
    #[command(flatten)]
    pub target: Target,
}

/// `kekd admin backup`.
///
/// # Errors
/// Exit 1 when refused (PKCS#11 keyring, `--out` exists, weak or mistyped
/// passphrase) or the file cannot be written; 64 when no passphrase can be
/// had; 78 for keyring, configuration and passphrase-file problems.
pub fn backup(a: &BackupArgs) -> Result<(), CliError> {
    let path = local_keyring(&a.target, "backup")?;
    let keyring = store::read(&path).map_err(store_error)?;
    if keyring.material != Material::Inline {
        return Err(CliError::runtime(format!(
            "backup refused: {} is PKCS#11 token metadata. {}",
            path.display(),
            BackupError::TokenKeyring
        )));
    }
    let out = &a.out;
    let existing = existing_backup(out, a.force, &keyring)?;
    let passphrase = read_passphrase(&a.passphrase, Ask::Twice)?;

    if let Some(old) = &existing
        && old.header().describes(&keyring)
    {
        match old.open(&passphrase) {
            Ok(k) if *k.encode() == *keyring.encode() => {
                let message = format!(
                    "{} already holds this keyring, sealed under this passphrase (taken {})",
                    out.display(),
                    old.header().created
                );
                report(
                    a.target.output,
                    &json!({"command": "backup", "changed": false, "keyring": path, "out": out, "message": message}),
                    &format!("backup: nothing to do: {message}\n"),
                );
                return Ok(());
            }
            _ if a.force => {}
            _ => {
                return Err(CliError::runtime(format!(
                    "backup refused: {} already holds a backup of this keyring ({}) that differs from it or was \
                     sealed under another passphrase; choose another --out, or pass --force to replace it",
                    out.display(),
                    describe(old.header())
                )));
            }
        }
    }

    let now = Timestamp::now();
    let sealed = Backup::seal(&keyring, &passphrase, now).map_err(CliError::runtime)?;
    let overwrite = if existing.is_some() {
        Overwrite::Replace
    } else {
        Overwrite::Never
    };
    backup::write(out, &sealed, overwrite).map_err(|e| match e {
        BackupError::Exists { .. } => CliError::runtime(format!(
            "backup refused: {e} (it appeared while the backup was being sealed); run this again"
        )),
        e => CliError::runtime(e),
    })?;
    // Read back what is on disk and open it: a backup that was never
    // restored is a hope, not a backup.
    match backup::read(out).and_then(|b| b.open(&passphrase)) {
        Ok(k) if *k.encode() == *keyring.encode() => {}
        Ok(_) => {
            return Err(CliError::runtime(format!(
                "the backup written to {} opens to a different keyring; do not rely on it",
                out.display()
            )));
        }
        Err(e) => {
            return Err(CliError::runtime(format!(
                "the backup written to {} does not open again ({e}); do not rely on it",
                out.display()
            )));
        }
    }

    let header = sealed.header();
    let kdf = header.kdf;
    report(
        a.target.output,
        &json!({
            "command": "backup",
            "changed": true,
            "keyring": path,
            "out": out,
            "replaced": existing.is_some(),
            "keyring_id": header.keyring_id.to_string(),
            "created": header.created,
            "versions": header.versions.iter().map(|(v, s)| json!({
                "version": v.get(),
                "state": s.as_str(),
            })).collect::<Vec<Value>>(),
            "kdf": {
                "algorithm": "argon2id",
                "memory_kib": kdf.memory_kib,
                "passes": kdf.passes,
                "lanes": kdf.lanes,
            },
            "cipher": "aes-256-gcm",
            "verified": true,
        }),
        &[
            format!(
                "backup: wrote {} (mode 0600) from keyring {}",
                out.display(),
                path.display()
            ),
            format!("  keyring id  {}", header.keyring_id),
            format!("  versions    {}", versions_text(header)),
            format!(
                "  sealed      AES-256-GCM, key from the passphrase by argon2id ({}); it opens again",
                kdf_text(kdf)
            ),
            format!(
                "next: keep {out} off this node and the passphrase apart from it. Take a new backup after \
                 every rotate: a backup holds only the versions that existed when it was taken. To restore: \
                 `kekd admin restore-backup --keyring {path} --from {out}`\n",
                out = out.display(),
                path = path.display()
            ),
        ]
        .join("\n"),
    );
    Ok(())
}

/// `kekd admin restore-backup`.
///
/// # Errors
/// Exit 78 when the backup cannot be read or opened (a wrong passphrase
/// included: it cannot be told apart from damage), or would lose or change
/// versions of the keyring there; 75 when locked; 1 for a weak passphrase,
/// I/O failures and a PKCS#11 target; 64 when no passphrase can be had.
pub fn restore(a: &RestoreBackupArgs) -> Result<(), CliError> {
    let path = local_keyring(&a.target, "restore-backup")?;
    let from = &a.from;
    let sealed = backup::read(from).map_err(|e| match e {
        BackupError::Io { .. } => CliError::runtime(e),
        e => CliError::config(e),
    })?;
    let passphrase = read_passphrase(&a.passphrase, Ask::Once)?;
    let restored = sealed.open(&passphrase).map_err(|e| match e {
        BackupError::Kdf(_) => CliError::runtime(e),
        e => CliError::config(format!(
            "backup {}: {e}; nothing was written",
            from.display()
        )),
    })?;

    ensure_parent_dir(&path)?;
    let _lock = take_lock(&path)?;
    let current = match store::read(&path) {
        Ok(f) if f.material == Material::Token => {
            return Err(CliError::runtime(format!(
                "restore-backup refused: {} is PKCS#11 token metadata, and a backup holds a local keyring",
                path.display()
            )));
        }
        Ok(f) => Some(f),
        Err(StoreError::NotFound { .. }) => None,
        Err(e @ StoreError::Parse { .. }) => {
            return Err(CliError::config(format!(
                "{e}. restore-backup replaces only a keyring it can compare with the backup: if this one is \
                 beyond repair, move it aside (`mv {0} {0}.damaged`) and run this again",
                path.display()
            )));
        }
        Err(e) => return Err(store_error(e)),
    };
    let plan = backup::plan_restore(current.as_ref(), &restored).map_err(|e| {
        CliError::config(format!(
            "restore-backup refused: {e}; {} was left as it is",
            path.display()
        ))
    })?;
    let header = sealed.header();
    let (created, transitions) = match plan {
        RestorePlan::Unchanged => {
            let message = format!(
                "{} already matches backup {}",
                path.display(),
                from.display()
            );
            report(
                a.target.output,
                &json!({"command": "restore-backup", "changed": false, "keyring": path, "from": from, "message": message}),
                &format!("restore-backup: nothing to do: {message}\n"),
            );
            return Ok(());
        }
        RestorePlan::Create(t) => (true, t),
        RestorePlan::Replace(t) => (false, t),
    };
    if created {
        store::create(&path, &restored)
    } else {
        store::replace(&path, &restored)
    }
    .map_err(store_error)?;

    let now = Timestamp::now();
    let name = path.display().to_string();
    let records: Vec<AuditRecord> = transitions
        .iter()
        .map(|tr| AuditRecord::new("restore-backup", &name, &restored.id, tr, vec![], now))
        .collect();
    let audit_result = audit::append(&path, &records);

    let mut text = format!(
        "restore-backup: {} {name} from backup {} (keyring {}, taken {})\n",
        if created { "created" } else { "updated" },
        from.display(),
        header.keyring_id,
        header.created
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
        "next: a running kekd picks the keyring up within seconds, or start kekd on it; \
         `kekd admin list --keyring {name}` shows what it serves\n"
    ));
    report(
        a.target.output,
        &json!({
            "command": "restore-backup",
            "changed": true,
            "created": created,
            "keyring": path,
            "from": from,
            "keyring_id": restored.id.to_string(),
            "backup_created": header.created,
            "transitions": transitions_json(&restored, &transitions),
        }),
        &text,
    );
    audit_result.map_err(|e| {
        CliError::runtime(format!(
            "restored, but the audit log {} could not be written: {e}",
            audit::audit_path(&path).display()
        ))
    })
}

/// The local keyring the target names; a PKCS#11 target is refused before
/// anything connects to a token (or asks for its PIN).
fn local_keyring(t: &Target, command: &str) -> Result<PathBuf, CliError> {
    let (keyring, backend) = t.settings()?;
    let token = || {
        CliError::runtime(format!(
            "{command} is for local keyrings. {}",
            BackupError::TokenKeyring
        ))
    };
    if !backend.keyring_in_a_file() {
        return Err(token());
    }
    super::resolve_backend(keyring, backend)?
        .keyring_file()
        .map(Path::to_path_buf)
        .ok_or_else(token)
}

/// What is at `--out` already: `None` when nothing is. Refuses (without
/// asking for a passphrase) whatever may not be replaced.
fn existing_backup(
    out: &Path,
    force: bool,
    keyring: &KeyringFile,
) -> Result<Option<Backup>, CliError> {
    // Anything at all: a file, a directory, a dangling symlink.
    if fs::symlink_metadata(out).is_err() {
        return Ok(None);
    }
    let old = backup::read(out).map_err(|e| {
        let what = match e {
            BackupError::Malformed { error, .. } => format!("is not a kekd backup ({error})"),
            e @ BackupError::TooLarge { .. } => format!("is not a kekd backup ({e})"),
            e => format!("cannot be read ({e})"),
        };
        CliError::runtime(format!(
            "backup refused: {} already exists and {what}; {}",
            out.display(),
            if force {
                "--force replaces only an older kekd backup: choose another --out"
            } else {
                "choose another --out"
            }
        ))
    })?;
    if !force && !old.header().describes(keyring) {
        return Err(CliError::runtime(format!(
            "backup refused: {} already holds an older backup ({}); choose another --out, or pass --force to \
             replace it",
            out.display(),
            describe(old.header())
        )));
    }
    Ok(Some(old))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    Once,
    Twice,
}

/// The passphrase: `--passphrase-file`, else `KEKD_BACKUP_PASSPHRASE`, else
/// the terminal.
fn read_passphrase(args: &PassphraseArgs, ask: Ask) -> Result<Passphrase, CliError> {
    let weak = |e: BackupError| CliError::runtime(format!("{e}; nothing was written"));
    if let Some(file) = &args.passphrase_file {
        return Passphrase::new(read_passphrase_file(file)?).map_err(weak);
    }
    match std::env::var(PASSPHRASE_ENV) {
        Ok(p) if p.is_empty() => {
            return Err(CliError::config(format!(
                "{PASSPHRASE_ENV} is set but empty"
            )));
        }
        Ok(p) => return Passphrase::new(p).map_err(weak),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(CliError::config(format!(
                "{PASSPHRASE_ENV} is not UTF-8 text"
            )));
        }
        Err(std::env::VarError::NotPresent) => {}
    }
    let prompt = |text: &str| {
        rpassword::prompt_password(text)
            .map(Zeroizing::new)
            .map_err(|e| {
                CliError::new(
                    crate::exit::USAGE,
                    format!(
                        "no passphrase: pass --passphrase-file FILE or set {PASSPHRASE_ENV} \
                         (no terminal to ask on: {e})"
                    ),
                )
            })
    };
    let mut first = match ask {
        Ask::Once => prompt("Backup passphrase: ")?,
        Ask::Twice => prompt(&format!(
            "Passphrase for the backup (at least {} characters): ",
            backup::MIN_PASSPHRASE_CHARS
        ))?,
    };
    let passphrase = Passphrase::new(std::mem::take(&mut *first)).map_err(weak)?;
    if ask == Ask::Twice {
        let again = prompt("Repeat the passphrase: ")?;
        if again.as_str() != passphrase.expose_secret() {
            return Err(CliError::runtime(
                "the two passphrases differ; nothing was written",
            ));
        }
    }
    Ok(passphrase)
}

/// Reads a passphrase file, which must not be open to group or others;
/// trailing newlines are not part of the passphrase.
fn read_passphrase_file(path: &Path) -> Result<String, CliError> {
    let bad =
        |reason: String| CliError::config(format!("passphrase file {}: {reason}", path.display()));
    // A regular file only, checked on what was opened: a FIFO would block.
    let (file, meta) = crate::file::open_regular(path, crate::file::Links::Follow).map_err(|e| match e {
        crate::file::OpenError::NotRegular { what, .. } => bad(format!(
            "is {what}, not a regular file; nothing was read from it: give a file holding only the passphrase"
        )),
        e => bad(e.to_string()),
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CliError::config(format!(
            "passphrase file {0} has permissions {mode:04o}, which let other users read it; run `chmod 600 {0}`",
            path.display()
        )));
    }
    // Sized up front so no reallocation leaves an unzeroed copy behind.
    let limit = MAX_PASSPHRASE_LEN + 2;
    let mut bytes = Zeroizing::new(Vec::with_capacity(limit + 1));
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() > limit {
        return Err(bad(format!(
            "is longer than {MAX_PASSPHRASE_LEN} bytes: not a passphrase file"
        )));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("is not UTF-8 text".to_owned()))?;
    let passphrase = text.trim_end_matches(['\n', '\r']);
    if passphrase.is_empty() {
        return Err(bad("is empty".to_owned()));
    }
    Ok(passphrase.to_owned())
}

/// Creates the keyring's directory (0700) when a restore is the first thing
/// on a rebuilt node.
fn ensure_parent_dir(path: &Path) -> Result<(), CliError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                CliError::config(format!("cannot create directory {}: {e}", dir.display()))
            }),
        _ => Ok(()),
    }
}

/// `keyring X taken T, versions 1 decrypt-only, 2 primary`.
fn describe(h: &Header) -> String {
    format!(
        "keyring {} taken {}, versions {}",
        h.keyring_id,
        h.created,
        versions_text(h)
    )
}

fn versions_text(h: &Header) -> String {
    h.versions
        .iter()
        .map(|(v, s)| format!("{v} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn kdf_text(k: KdfParams) -> String {
    let mem = if k.memory_kib.is_multiple_of(1024) {
        format!("{} MiB", k.memory_kib / 1024)
    } else {
        format!("{} KiB", k.memory_kib)
    };
    format!(
        "{mem}, {} passes, {} lane{}",
        k.passes,
        k.lanes,
        if k.lanes == 1 { "" } else { "s" }
    )
}

fn transitions_json(file: &KeyringFile, transitions: &[Transition]) -> Vec<Value> {
    transitions
        .iter()
        .map(|tr| {
            json!({
                "version": tr.version.get(),
                "key_id": file.key_id(tr.version).as_str(),
                "from": tr.from.map(KeyState::as_str),
                "to": tr.to.as_str(),
            })
        })
        .collect()
}
