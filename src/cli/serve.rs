//! `kekd serve`: load the keyring, bind the socket, serve until SIGTERM.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;

use crate::backend::{self, Backend, GuardedPath, served};
use crate::cli::CliError;
use crate::config::{ServeConfig, Settings};
use crate::id::Timestamp;
use crate::keyring::access;
use crate::keyring::store::{self, KeyringFile, StoreError};
use crate::{server, telemetry};

/// The directory `--dev` works in, relative to the current directory.
pub const DEV_DIR: &str = "kekd-dev";

/// Arguments of `kekd serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and KEKD_* win over it).
    #[arg(long, env = "KEKD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Development mode: use (and on first run create) ./kekd-dev/keyring and
    /// serve on ./kekd-dev/kms.sock. Not for production: the keyring sits in
    /// the working directory.
    #[arg(long)]
    pub dev: bool,
    /// Settings (also from KEKD_* environment variables or --config).
    #[command(flatten)]
    pub settings: Settings,
}

/// Runs `kekd serve`.
///
/// # Errors
/// Exit 78 for configuration and keyring problems, 1 for runtime failures.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    let file = match &args.config {
        Some(path) => Settings::from_file(path).map_err(CliError::config)?,
        None => Settings::default(),
    };
    let mut settings = args.settings.or(file);
    // Logging first, so that hardening's warnings are seen; hardening
    // before anything reads a key or the PIN (`--dev` creates a keyring,
    // `resolve` reads the PIN file).
    let log_format = match settings.log_format.as_deref() {
        Some(f) => f.parse().map_err(|reason: String| {
            CliError::config(crate::config::ConfigError::Invalid {
                what: "log_format",
                reason,
            })
        })?,
        None => telemetry::LogFormat::Text,
    };
    telemetry::init(log_format, settings.log_level.as_deref().unwrap_or("info"))
        .map_err(CliError::config)?;
    crate::hardening::harden_process();
    if args.dev {
        prepare_dev(&mut settings)?;
    }
    let pin_file = settings.backend.pin_file.clone();
    let config = ServeConfig::resolve(settings).map_err(CliError::config)?;
    if config.backend.secret_env().is_some() {
        warn_secret_in_environment(Some(pin_file.as_deref()));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kekd")
        .build()
        .map_err(CliError::runtime)?;
    // What only the serving user (and root) may change: the keyring file,
    // or the directory of the served record, the admin lock and the audit
    // log. Checked before anything is read from it.
    let uid = rustix::process::geteuid().as_raw();
    if let Some(dir) = config.backend.state_dir() {
        backend::ensure_state_dir(dir).map_err(|e| CliError::backend(&e))?;
    }
    match config.backend.guarded_path() {
        GuardedPath::File(path) => access::check(path, uid),
        GuardedPath::Dir(path) => access::check_dir(path, uid),
    }
    .map_err(CliError::config)?;
    let opened = backend::open(&config.backend).map_err(|e| CliError::backend(&e))?;
    let target = match config.backend.keyring_file() {
        Some(keyring) => format!("--keyring {}", keyring.display()),
        None => args.config.as_deref().map_or_else(
            || "--config FILE (the serving configuration)".to_owned(),
            |c| format!("--config {}", c.display()),
        ),
    };
    let backend: Arc<dyn Backend> = opened;
    let backend: Arc<dyn Backend> = Arc::new(served::Guarded::new(backend, target));
    runtime
        .block_on(server::run(config, backend, shutdown_signal()))
        .map_err(|e| {
            let mut error = CliError::new(e.exit_code(), &e);
            if let server::ServerError::Keyring(b) = &e
                && let Some(fix) = b.fix()
            {
                error.message = format!("{}\n{fix}", error.message);
            }
            error
        })
}

/// Environment variables that can carry a secret, and the file option that
/// should carry it instead. A process's environment stays readable in
/// `/proc/PID/environ` (by its uid and root) for its whole life, and kekd
/// cannot erase it.
pub const SECRET_ENV: [(&str, &str); 2] = [
    (
        "KEKD_PKCS11_PIN",
        "pin_file (--pkcs11-pin-file or KEKD_PKCS11_PIN_FILE)",
    ),
    (
        "KEKD_BACKUP_PASSPHRASE",
        "--passphrase-file (or KEKD_BACKUP_PASSPHRASE_FILE)",
    ),
];

/// Which secrets this process takes from its environment: the PIN when a
/// PKCS#11 backend (`pkcs11` is its `pin_file` setting) has no PIN file, the
/// backup passphrase when no passphrase file is named. Each with the option
/// that should carry it instead.
pub fn secrets_from_environment(
    pkcs11: Option<Option<&Path>>,
) -> Vec<(&'static str, &'static str)> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    SECRET_ENV
        .into_iter()
        .filter(|(name, _)| set(name))
        .filter(|(name, _)| match *name {
            "KEKD_PKCS11_PIN" => matches!(pkcs11, Some(None)),
            _ => !set("KEKD_BACKUP_PASSPHRASE_FILE"),
        })
        .collect()
}

fn warn_secret_in_environment(pkcs11: Option<Option<&Path>>) {
    for (name, instead) in secrets_from_environment(pkcs11) {
        tracing::warn!(
            variable = name,
            "a secret comes from the environment variable {name}, which stays readable in /proc/PID/environ \
             (to this uid and root) for as long as kekd runs; use {instead} instead"
        );
    }
}

/// Fills keyring and socket defaults under ./kekd-dev, creates the dev
/// keyring on first use and prints the EncryptionConfiguration for it.
fn prepare_dev(settings: &mut Settings) -> Result<(), CliError> {
    let cwd = std::env::current_dir().map_err(CliError::runtime)?;
    let dir = cwd.join(DEV_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| CliError::config(format!("cannot create {}: {e}", dir.display())))?;
    let keyring = settings
        .keyring
        .get_or_insert_with(|| dir.join("keyring"))
        .clone();
    let socket = settings
        .socket
        .get_or_insert_with(|| dir.join("kms.sock"))
        .clone();
    match KeyringFile::generate(Timestamp::now()) {
        Ok(file) => match store::create(&keyring, &file) {
            // `serve … 2>&1 | head -1` closes the pipe: these lines are
            // best effort, never a panic (the log carries on or not).
            Ok(()) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "kekd: created development keyring {}",
                    keyring.display()
                );
            }
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(CliError::config(e)),
        },
        Err(e) => return Err(CliError::runtime(e)),
    }
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(encryption_config_snippet(&absolute(&cwd, &socket)).as_bytes())
        .and_then(|()| out.flush());
    Ok(())
}

fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        cwd.join(p)
    }
}

/// An EncryptionConfiguration for kube-apiserver pointing at `socket`.
pub fn encryption_config_snippet(socket: &Path) -> String {
    format!(
        "# kube-apiserver --encryption-provider-config for this kekd:\n\
         apiVersion: apiserver.config.k8s.io/v1\n\
         kind: EncryptionConfiguration\n\
         resources:\n\
         \x20 - resources: [secrets]\n\
         \x20   providers:\n\
         \x20     - kms:\n\
         \x20         apiVersion: v2\n\
         \x20         name: kekd\n\
         \x20         endpoint: unix://{}\n\
         \x20         timeout: 3s\n\
         \x20     - identity: {{}}\n",
        socket.display()
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed; serve anyway.
        tracing::warn!("cannot install SIGTERM/SIGINT handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => info!(signal = "SIGINT", "signal received"),
    }
}
