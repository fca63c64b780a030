//! `kekd admin …`: keyring lifecycle and checks of a running plugin.
//!
//! Every command says what it did (or why it did nothing), supports
//! `--output json`, and is safe to re-run: a finished step is a no-op that
//! says so, and dangerous steps need an explicit flag. Exit codes: 0 done or
//! already done, 1 refused or failed, 64 usage, 75 keyring locked by another
//! admin command (retry), 78 keyring or configuration problem.

pub mod backup;
pub mod doctor;
pub mod encryption_config;
pub mod keyring;
pub mod probe;
pub mod scan;
pub mod upgrade_token;

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::{BackendConfig, BackendSettings, SettingsError};
use crate::cli::{CliError, Output};
use crate::config::Settings;
use crate::id::KeyVersion;

/// The `kekd admin` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Create a new keyring with version 1 as primary. Never overwrites.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin init --keyring /etc/kekd/keyring\n\
        \x20 kekd admin init --config /etc/kekd/kekd.toml --output json")]
    Init(Target),
    /// Add a new KEK version as pending (or, with --promote, as primary).
    #[command(after_help = "Examples:\n\
        \x20 kekd admin rotate --keyring /etc/kekd/keyring\n\
        \x20 kekd admin rotate --promote --expect-primary 1 --keyring /etc/kekd/keyring")]
    Rotate(RotateArgs),
    /// Make a pending version the primary; the old primary becomes decrypt-only.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin promote 2 --keyring /etc/kekd/keyring --encryption-config /etc/kubernetes/enc.yaml")]
    Promote(PromoteArgs),
    /// Stop a version from decrypting (its material is kept; `restore` undoes it).
    #[command(after_help = "Examples:\n\
        \x20 kekd admin retire 1 --scan scan.json --keyring /etc/kekd/keyring\n\
        \x20 kekd admin retire 3 --keyring /etc/kekd/keyring")]
    Retire(RetireArgs),
    /// Let a retired version decrypt again.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin restore 1 --keyring /etc/kekd/keyring")]
    Restore(VersionArgs),
    /// Erase a retired version's key material for good.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin destroy 1 --yes-destroy-key-material --keyring /etc/kekd/keyring")]
    Destroy(DestroyArgs),
    /// Show every version with its state, times and usage.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin list --keyring /etc/kekd/keyring\n\
        \x20 kekd admin list --config /etc/kekd/kekd.toml --output json")]
    List(Target),
    /// Replace this node's keyring with a copy from another node, after
    /// checking that the copy is intact and loses nothing.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin import --from /tmp/keyring-from-node-a --keyring /etc/kekd/keyring")]
    Import(ImportArgs),
    /// Trust the keyring as it is now as the one this node serves: after a
    /// restore of an older backup, or a deliberately new keyring, which
    /// `kekd serve` otherwise refuses to start from.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin accept-keyring --keyring /etc/kekd/keyring")]
    AcceptKeyring(Target),
    /// Adopt a keyring an older kekd wrote into a PKCS#11 token (metadata
    /// `kekd-keyring-meta v1`): check every key object, record its key check
    /// value and authenticate the metadata. Run once, as the PIN holder.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin upgrade-token --dry-run --config /etc/kekd/kekd.toml\n\
        \x20 kekd admin upgrade-token --config /etc/kekd/kekd.toml")]
    UpgradeToken(upgrade_token::UpgradeTokenArgs),
    /// Check a running plugin: Status, Encrypt and Decrypt, checked against
    /// the apiserver's rules.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin probe --socket /var/run/kekd/kms.sock\n\
        \x20 kekd admin probe --socket /var/run/kekd/kms.sock --keyring /etc/kekd/keyring --output json")]
    Probe(probe::ProbeArgs),
    /// Check this node's setup end to end (keyring or token, socket,
    /// EncryptionConfiguration, live probe) and say what to fix.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin doctor --keyring /etc/kekd/keyring --socket /var/run/kekd/kms.sock --encryption-config /etc/kubernetes/enc.yaml")]
    Doctor(doctor::DoctorArgs),
    /// Write the local keyring to a file sealed under a passphrase
    /// (argon2id, AES-256-GCM). The passphrase is never a flag value.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin backup --out /backup/keyring.kekd-backup --passphrase-file /root/passphrase --keyring /etc/kekd/keyring")]
    Backup(backup::BackupArgs),
    /// Bring a keyring back from a backup: creates a missing keyring, never
    /// replaces one holding versions the backup lacks.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin restore-backup --from /backup/keyring.kekd-backup --passphrase-file /root/passphrase --keyring /etc/kekd/keyring")]
    RestoreBackup(backup::RestoreBackupArgs),
    /// Read every object the apiserver stored in etcd (read-only, paged) and
    /// report per resource which provider and which kekd key version holds it.
    #[command(after_help = "Examples:\n\
        \x20 kekd admin scan --etcd-endpoints https://127.0.0.1:2379 --cacert /etc/kubernetes/pki/etcd/ca.crt --cert /etc/kubernetes/pki/apiserver-etcd-client.crt --key /etc/kubernetes/pki/apiserver-etcd-client.key --keyring /etc/kekd/keyring --output json")]
    Scan(scan::ScanArgs),
}

/// The keyring a command acts on, and the report format.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The keyring file (local backend).
    #[arg(long, env = "KEKD_KEYRING", value_name = "PATH")]
    pub keyring: Option<PathBuf>,
    /// A kekd config file: its `keyring` and `[backend]` table say where the
    /// keyring is (e.g. a PKCS#11 token). Flags and KEKD_* win over it.
    #[arg(long, env = "KEKD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the KEKs live.
    #[command(flatten)]
    pub backend: BackendSettings,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// A command on one version.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// The version number (see `kekd admin list`).
    #[arg(value_parser = parse_version)]
    pub version: KeyVersion,
    /// The keyring.
    #[command(flatten)]
    pub target: Target,
}

/// Where the resources to rewrite before a retire come from.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrationArgs {
    /// The apiserver's --encryption-provider-config file: the printed
    /// procedure rewrites every resource its kms provider for kekd encrypts
    /// [default: secrets and configmaps, as deploy/encryption-config.yaml].
    #[arg(long, env = "KEKD_ENCRYPTION_CONFIG", value_name = "FILE")]
    pub encryption_config: Option<PathBuf>,
}

impl MigrationArgs {
    /// The resources to rewrite: those `--encryption-config` encrypts with a
    /// kms provider on kekd's socket (`KEKD_SOCKET` or the `--config`
    /// file's `socket`, when known), else the shipped default.
    ///
    /// # Errors
    /// Exit 78 when the file cannot be read or encrypts nothing with kekd.
    fn encrypted(&self, t: &Target) -> Result<encryption_config::Encrypted, CliError> {
        let Some(path) = &self.encryption_config else {
            return Ok(encryption_config::Encrypted::shipped());
        };
        let socket = match std::env::var_os("KEKD_SOCKET").filter(|s| !s.is_empty()) {
            Some(s) => Some(PathBuf::from(s)),
            None => match &t.config {
                Some(c) => Settings::from_file(c).map_err(CliError::config)?.socket,
                None => None,
            },
        };
        encryption_config::Encrypted::read(path, socket.as_deref())
    }
}

/// Arguments of `promote`.
#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The version number (see `kekd admin list`).
    #[arg(value_parser = parse_version)]
    pub version: KeyVersion,
    /// What the hint says to rewrite.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// The keyring.
    #[command(flatten)]
    pub target: Target,
}

/// Arguments of `rotate`.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// Make the new version primary at once (single-node control planes).
    #[arg(long)]
    pub promote: bool,
    /// Do nothing unless this version is still the primary, so a script can
    /// re-run `rotate --promote` without rotating twice.
    #[arg(long, value_name = "VERSION", value_parser = parse_version)]
    pub expect_primary: Option<KeyVersion>,
    /// What the hint says to rewrite.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// The keyring.
    #[command(flatten)]
    pub target: Target,
}

/// Arguments of `retire`.
#[derive(Debug, clap::Args)]
pub struct RetireArgs {
    /// The version number.
    #[arg(value_parser = parse_version)]
    pub version: KeyVersion,
    /// Without --scan, refuse a never-promoted version that served a
    /// Decrypt within this window (the apiserver caches seeds for 24h).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Retire without a scan, even a version that was primary or served a
    /// Decrypt within the window: objects stored under it become unreadable
    /// until `kekd admin restore`.
    #[arg(long)]
    pub force: bool,
    /// The JSON result of a fresh `kekd admin scan` (at most 24h old), run
    /// after rewriting every encrypted resource: required for a version that
    /// was ever primary; refuses while any stored object still references the
    /// version (--force does not override this).
    #[arg(long, value_name = "FILE")]
    pub scan: Option<PathBuf>,
    /// What a refusal says to rewrite.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// The keyring.
    #[command(flatten)]
    pub target: Target,
}

/// Arguments of `destroy`.
#[derive(Debug, clap::Args)]
pub struct DestroyArgs {
    /// The version number.
    #[arg(value_parser = parse_version)]
    pub version: KeyVersion,
    /// Confirms that anything still encrypted under this version may become
    /// unreadable forever.
    #[arg(long)]
    pub yes_destroy_key_material: bool,
    /// The keyring.
    #[command(flatten)]
    pub target: Target,
}

/// Arguments of `import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The copy to import (from the node where the last change was made).
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The keyring to replace (created if this node has none yet).
    #[command(flatten)]
    pub target: Target,
}

fn parse_version(s: &str) -> Result<KeyVersion, String> {
    s.parse::<u32>()
        .ok()
        .and_then(KeyVersion::new)
        .ok_or_else(|| format!("{s:?} is not a version number (1, 2, …; see `kekd admin list`)"))
}

/// Runs an admin command.
///
/// # Errors
/// A [`CliError`] with the exit code.
pub fn run(cmd: AdminCommand) -> Result<(), CliError> {
    // Warnings (a hardening step refused by a sandbox, no memory lock) go
    // to stderr; stdout stays the report.
    crate::telemetry::init(crate::telemetry::LogFormat::Text, "warn").map_err(CliError::config)?;
    // Before any key, PIN or passphrase is read.
    crate::hardening::harden_process();
    let output = cmd.output();
    let result = dispatch(cmd);
    if let (Output::Json, Err(e)) = (output, &result)
        && !e.reported
    {
        // Scripts reading stdout get a document either way; the message
        // also goes to stderr as for every failure.
        println!(
            "{}",
            serde_json::json!({"error": e.message, "exit_code": e.code})
        );
    }
    result
}

impl AdminCommand {
    fn output(&self) -> Output {
        match self {
            Self::Init(t) | Self::List(t) | Self::AcceptKeyring(t) => t.output,
            Self::Rotate(a) => a.target.output,
            Self::Promote(a) => a.target.output,
            Self::Restore(a) => a.target.output,
            Self::Retire(a) => a.target.output,
            Self::Destroy(a) => a.target.output,
            Self::Import(a) => a.target.output,
            Self::Backup(a) => a.target.output,
            Self::RestoreBackup(a) => a.target.output,
            Self::Scan(a) => a.target.output,
            Self::UpgradeToken(a) => a.target.output,
            // probe and doctor print their own report, failed or not.
            Self::Probe(_) | Self::Doctor(_) => Output::Text,
        }
    }
}

fn dispatch(cmd: AdminCommand) -> Result<(), CliError> {
    use keyring::Step;
    match cmd {
        AdminCommand::Init(t) => keyring::init(&t),
        AdminCommand::Rotate(a) => keyring::change_checked(
            &a.target,
            Step::Rotate {
                promote: a.promote,
                expect_primary: a.expect_primary,
            },
            &a.migration.encrypted(&a.target)?,
            |_| Ok(()),
        ),
        AdminCommand::Promote(a) => keyring::change_checked(
            &a.target,
            Step::Promote(a.version),
            &a.migration.encrypted(&a.target)?,
            |_| Ok(()),
        ),
        AdminCommand::Retire(a) => {
            let step = Step::Retire {
                version: a.version,
                window: a.window,
                force: a.force,
                scan: a.scan.is_some(),
            };
            let encrypted = a.migration.encrypted(&a.target)?;
            match &a.scan {
                None => keyring::change_checked(&a.target, step, &encrypted, |_| Ok(())),
                Some(file) => {
                    let scan = scan::read_scan(file)?;
                    keyring::change_checked(&a.target, step, &encrypted, |keyring| {
                        scan::check_retire(&scan, file, keyring, a.version)
                    })
                }
            }
        }
        AdminCommand::Restore(a) => keyring::change(&a.target, Step::Restore(a.version)),
        // The state is checked first: the confirmation is asked for only
        // when the version could be destroyed.
        AdminCommand::Destroy(a) => keyring::change(
            &a.target,
            Step::Destroy {
                version: a.version,
                confirmed: a.yes_destroy_key_material,
            },
        ),
        AdminCommand::List(t) => keyring::list(&t),
        AdminCommand::Import(a) => keyring::import(&a.target, &a.from),
        AdminCommand::AcceptKeyring(t) => keyring::accept(&t),
        AdminCommand::UpgradeToken(a) => upgrade_token::run(&a),
        AdminCommand::Probe(a) => probe::run(&a),
        AdminCommand::Backup(a) => backup::backup(&a),
        AdminCommand::RestoreBackup(a) => backup::restore(&a),
        AdminCommand::Doctor(a) => doctor::run(&a),
        AdminCommand::Scan(a) => scan::run(&a),
    }
}

/// How long an admin command waits for another to release the keyring lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

impl Target {
    /// The keyring path and backend settings this target names: a flag
    /// beats its `KEKD_*` variable, which beats the `--config` file.
    ///
    /// # Errors
    /// When the config file cannot be read.
    pub(crate) fn settings(&self) -> Result<(Option<PathBuf>, BackendSettings), CliError> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path).map_err(CliError::config)?,
            None => Settings::default(),
        };
        Ok((
            self.keyring.clone().or(file.keyring),
            self.backend.clone().or(file.backend),
        ))
    }

    /// Where the keyring is, validated (for PKCS#11 this reads the PIN).
    ///
    /// # Errors
    /// Exit 78 naming the missing or invalid setting.
    pub(crate) fn backend_config(&self) -> Result<BackendConfig, CliError> {
        let (keyring, backend) = self.settings()?;
        resolve_backend(keyring, backend)
    }
}

/// [`BackendConfig::resolve`] with the admin commands' way to name a keyring
/// in the error (no `--dev` here).
pub(crate) fn resolve_backend(
    keyring: Option<PathBuf>,
    backend: BackendSettings,
) -> Result<BackendConfig, CliError> {
    BackendConfig::resolve(keyring, backend).map_err(|e| match e {
        SettingsError::Missing { what: "keyring", .. } => CliError::config(
            "no keyring given: set --keyring PATH (or KEKD_KEYRING), or --config FILE with `keyring = \"PATH\"` \
             or a [backend] table",
        ),
        e => CliError::config(e),
    })
}

/// Prints a report: the JSON document, or the text.
///
/// The report comes after the work is done (written, audited): a stdout
/// that cannot take it (a full disk, a closed pipe) gets a warning on
/// stderr, not a panic that would read as a failed command.
fn report(output: Output, json: &serde_json::Value, text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let printed = match output {
        Output::Json => writeln!(out, "{json}"),
        Output::Text => out.write_all(text.as_bytes()),
    }
    .and_then(|()| out.flush());
    if let Err(e) = printed {
        eprintln!("kekd: warning: the command completed, but its report could not be printed: {e}");
    }
}
