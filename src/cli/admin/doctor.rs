//! `kekd admin doctor`: checks a node's setup end to end and says, for each
//! finding, what to fix.
//!
//! 1. the keyring (file or token): readable, private, only the serving uid
//!    and root can change it or its directories (the check `kekd serve`
//!    makes), valid, the one this node served (its served-keyring record),
//!    every key passes a seal/open round trip; no secret (PIN, backup
//!    passphrase) supplied through the environment; for a token, only the
//!    serving uid and root can change its `state_dir` (as `kekd serve`
//!    checks);
//! 2. the socket: exists, is a socket, its mode and directory;
//! 3. the EncryptionConfiguration, if given: apiVersion and kind, a `kms`
//!    provider with `apiVersion: v2`, a name without `:`, an endpoint that is
//!    this socket, a sane timeout, no `cachesize`, `identity` after it;
//! 4. a live probe of the plugin (Status, Encrypt, Decrypt).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use yaml_rust2::Yaml;

use super::{Target, report};
use crate::backend::Backend;
use crate::backend::local::LocalBackend;
use crate::backend::pkcs11::Pkcs11Backend;
use crate::cli::CliError;
use crate::config::BackendConfig;
use crate::keyring::access;
use crate::keyring::served::{self, Served};

/// Arguments of `kekd admin doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The plugin's socket (the apiserver's `endpoint: unix://PATH`).
    #[arg(long, env = "KEKD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The apiserver's --encryption-provider-config file, to check against this plugin.
    #[arg(long, value_name = "FILE")]
    pub encryption_config: Option<PathBuf>,
    /// The uid `kekd serve` runs as, for the keyring ownership check
    /// [default: the uid running doctor].
    #[arg(long, value_name = "UID")]
    pub serve_uid: Option<u32>,
    /// Time allowed per probe call.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The keyring (and report format).
    #[command(flatten)]
    pub target: Target,
}

/// How a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// As it should be.
    Ok,
    /// Works, but worth changing.
    Warn,
    /// Broken: the fix says what to do.
    Fail,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: &'static str,
    /// How it stands.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        check,
        level: Level::Ok,
        detail: detail.into(),
        fix: None,
    }
}

fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        check,
        level: Level::Warn,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        check,
        level: Level::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// Runs `kekd admin doctor`.
///
/// # Errors
/// Exit 1 when any finding is a failure.
pub fn run(args: &DoctorArgs) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let mut findings = Vec::new();
    let serve_uid = args
        .serve_uid
        .unwrap_or_else(|| rustix::process::geteuid().as_raw());
    runtime.block_on(check_keyring(&args.target, serve_uid, &mut findings));
    if let Some(socket) = &args.socket {
        findings.extend(check_socket(socket));
    }
    if let Some(config) = &args.encryption_config {
        // The apiserver's endpoint is absolute: compare (and suggest) that.
        let socket = args
            .socket
            .as_deref()
            .map(|s| std::path::absolute(s).unwrap_or_else(|_| s.to_owned()));
        findings.extend(check_encryption_config(config, socket.as_deref()));
    }
    if let Some(socket) = &args.socket {
        let (checks, _) = runtime.block_on(super::probe::probe_checks(socket, args.timeout));
        for c in checks {
            findings.push(if c.ok {
                ok("probe", format!("{}: {}", c.name, c.detail))
            } else {
                fail(
                    "probe",
                    format!("{}: {}", c.name, c.detail),
                    "see `kekd admin probe` and kekd's log",
                )
            });
        }
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warned = findings.iter().filter(|f| f.level == Level::Warn).count();
    let mut text = String::new();
    for f in &findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        text.push_str(&format!("{tag} {:<18} {}\n", f.check, f.detail));
        if let Some(fix) = &f.fix {
            text.push_str(&format!("     {:<18} fix: {fix}\n", ""));
        }
    }
    text.push_str(&format!(
        "{} checks: {failed} failed, {warned} warnings\n",
        findings.len()
    ));
    report(
        args.target.output,
        &json!({"ok": failed == 0, "failed": failed, "warnings": warned, "findings": findings}),
        &text,
    );
    if failed > 0 {
        let mut e = CliError::runtime(format!("doctor found {failed} problem(s)"));
        e.reported = true;
        return Err(e);
    }
    Ok(())
}

async fn check_keyring(t: &Target, serve_uid: u32, out: &mut Vec<Finding>) {
    let pin_file = t.settings().ok().and_then(|(_, b)| b.pin_file);
    let config = match t.backend_config() {
        Ok(c) => c,
        Err(e) => {
            out.push(fail(
                "keyring",
                e.message,
                "name the keyring with --keyring, or fix the TOML file given with --config",
            ));
            return;
        }
    };
    let pkcs11 = matches!(config, BackendConfig::Pkcs11(_)).then_some(pin_file.as_deref());
    for (name, instead) in crate::cli::serve::secrets_from_environment(pkcs11) {
        out.push(warn(
            "secret in environment",
            format!(
                "{name} supplies a secret: it stays readable in /proc/PID/environ (to this uid and root) for the \
                 life of the process, and kekd cannot erase it"
            ),
            format!("put the secret in a file (chmod 600) and use {instead}; unset {name}"),
        ));
    }
    let backend: Box<dyn Backend> = match config {
        BackendConfig::Local { keyring } => {
            match access::check(&keyring, serve_uid) {
                Ok(()) => out.push(ok(
                    "keyring access",
                    format!(
                        "{}: only {} can change it or its directories",
                        keyring.display(),
                        if serve_uid == 0 {
                            "root".to_owned()
                        } else {
                            format!("uid {serve_uid} and root")
                        }
                    ),
                )),
                Err(e) => out.push(fail(
                    "keyring access",
                    format!(
                        "{} {}: another user could replace the keyring; kekd serve refuses it",
                        e.path.display(),
                        e.what
                    ),
                    e.fix,
                )),
            }
            Box::new(LocalBackend::new(keyring))
        }
        BackendConfig::Pkcs11(settings) => {
            // `kekd serve` refuses a state_dir others can change (it holds
            // the served record, the admin lock and the audit log): the
            // same check gives the same verdict here.
            match access::check_dir(&settings.state_dir, serve_uid) {
                Ok(()) => out.push(ok(
                    "state_dir access",
                    format!(
                        "{}: only {} can change it or its parents",
                        settings.state_dir.display(),
                        if serve_uid == 0 {
                            "root".to_owned()
                        } else {
                            format!("uid {serve_uid} and root")
                        }
                    ),
                )),
                Err(e) => out.push(fail(
                    "state_dir access",
                    format!(
                        "{} {}: another user could plant or remove kekd's state (the served record, the lock); \
                         kekd serve refuses it",
                        e.path.display(),
                        e.what
                    ),
                    e.fix,
                )),
            }
            match Pkcs11Backend::connect(settings) {
                Ok(b) => {
                    out.push(ok("token", b.describe()));
                    Box::new(b)
                }
                Err(e) => {
                    out.push(fail(
                        "token",
                        e.to_string(),
                        "check module, token_label and the PIN (docs/hsm.md)",
                    ));
                    return;
                }
            }
        }
    };
    let anchor = backend.state_anchor();
    let keyring =
        match tokio::task::spawn_blocking(move || backend.load().map(|k| (k, backend.describe())))
            .await
        {
            Ok(Ok((k, name))) => {
                out.push(ok(
                    "keyring",
                    format!(
                        "{name}: {} versions, primary {} ({})",
                        k.versions().count(),
                        k.primary(),
                        k.primary_key_id()
                    ),
                ));
                k
            }
            Ok(Err(e)) => {
                let fix = keyring_fix(&e);
                out.push(fail("keyring", e.to_string(), fix));
                return;
            }
            Err(e) => {
                out.push(fail("keyring", e.to_string(), "retry"));
                return;
            }
        };
    if let Some(anchor) = anchor {
        let target = match (&t.keyring, &t.config) {
            (Some(k), _) => format!("--keyring {}", k.display()),
            (None, Some(c)) => format!("--config {}", c.display()),
            (None, None) => String::new(),
        };
        let record = served::record_path(&anchor);
        match served::read(&anchor, &target).and_then(|r| {
            served::check(&anchor, r, Served::of(&keyring), "the keyring", &target).map(|()| r)
        }) {
            Ok(Some(r)) => out.push(ok(
                "served record",
                format!(
                    "{}: keyring {} up to version {}",
                    record.display(),
                    r.keyring_id,
                    r.highest
                ),
            )),
            Ok(None) => out.push(ok(
                "served record",
                format!("{}: none yet (kekd serve writes it)", record.display()),
            )),
            Err(e) => out.push(fail(
                "served record",
                e.to_string(),
                format!("`kekd admin accept-keyring {target}` if this keyring is the right one"),
            )),
        }
    }
    match keyring.self_check().await {
        Ok(()) => out.push(ok(
            "keys",
            "every decrypt-capable version seals and opens a canary",
        )),
        Err(e) => out.push(fail(
            "keys",
            e.to_string(),
            "restore the damaged version from a backup",
        )),
    }
}

/// The fix for a keyring that does not load, by what is wrong with it.
fn keyring_fix(e: &crate::backend::BackendError) -> String {
    use crate::backend::BackendError as B;
    use crate::keyring::store::StoreError as S;
    match e {
        B::Store(S::TooOpen { path, .. }) => format!("chmod 600 {}", path.display()),
        B::Store(S::NotFound { path }) => format!(
            "create it with `kekd admin init --keyring {0}`, or restore it \
             (`kekd admin restore-backup --keyring {0} --from BACKUP`)",
            path.display()
        ),
        B::Store(S::NotAFile { path }) => {
            format!("{} must be the keyring file itself", path.display())
        }
        B::Pkcs11(_) => "check module, token_label and the PIN (docs/hsm.md)".to_owned(),
        _ => "restore the keyring from a backup or another node (docs/runbook.md)".to_owned(),
    }
}

fn check_socket(socket: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    match fs::symlink_metadata(socket) {
        Err(e) => out.push(fail(
            "socket",
            format!("{}: {e}", socket.display()),
            "start kekd (`kekd serve`) with this --socket, or point the check at the socket it serves",
        )),
        Ok(m) if m.file_type().is_symlink() => out.push(fail(
            "socket",
            format!("{} is a symlink", socket.display()),
            "point the apiserver and kekd at the real socket path",
        )),
        Ok(m) if !m.file_type().is_socket() => out.push(fail(
            "socket",
            format!("{} is not a socket", socket.display()),
            "remove the file (it is not kekd's) or choose another --socket",
        )),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                out.push(fail(
                    "socket",
                    format!("{} has mode {mode:04o}: every local user can unwrap the cluster's keys", socket.display()),
                    "serve with --socket-mode 0600 (or 0660 with --socket-group)",
                ));
            } else {
                out.push(ok("socket", format!("{} mode {mode:04o} uid {} gid {}", socket.display(), m.uid(), m.gid())));
            }
        }
    }
    out
}

/// Checks an EncryptionConfiguration against the rules kube-apiserver applies
/// and against this plugin's socket.
pub fn check_encryption_config(path: &Path, socket: Option<&Path>) -> Vec<Finding> {
    const C: &str = "encryption config";
    let mut out = Vec::new();
    let doc = match super::encryption_config::load(path) {
        Ok(doc) => doc,
        Err(e) => return vec![fail(C, e.detail, e.fix)],
    };
    let mut found_kms = false;
    for (i, rule) in doc["resources"]
        .as_vec()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let resources: Vec<&str> = rule["resources"]
            .as_vec()
            .map(|v| v.iter().filter_map(Yaml::as_str).collect())
            .unwrap_or_default();
        let providers = rule["providers"]
            .as_vec()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let where_ = format!("resources[{i}] ({})", resources.join(", "));
        let kms_index = providers.iter().position(|p| !p["kms"].is_badvalue());
        let Some(kms_index) = kms_index else { continue };
        found_kms = true;
        let kms = &providers[kms_index]["kms"];
        match kms["apiVersion"].as_str() {
            Some("v2") => out.push(ok(C, format!("{where_}: kms apiVersion v2"))),
            Some(other) => out.push(fail(
                C,
                format!("{where_}: kms apiVersion {other:?}"),
                "set `apiVersion: v2` (kekd speaks KMS v2 only)",
            )),
            None => out.push(fail(
                C,
                format!("{where_}: kms has no apiVersion, which means v1 (disabled since 1.29)"),
                "add `apiVersion: v2` to the kms provider",
            )),
        }
        match kms["name"].as_str() {
            Some(n) if n.contains(':') => out.push(fail(C, format!("{where_}: kms name {n:?} contains ':'"), "choose a name without ':' (and never rename it once data is stored)")),
            Some(n) => out.push(ok(C, format!("{where_}: kms name {n:?} (part of every stored value's prefix: never rename it)"))),
            None => out.push(fail(C, format!("{where_}: kms has no name"), "add `name: kekd`")),
        }
        match kms["endpoint"].as_str() {
            Some(e) => match (e.strip_prefix("unix://"), socket) {
                (None, _) => out.push(fail(
                    C,
                    format!("{where_}: endpoint {e:?} is not unix://…"),
                    "use `endpoint: unix:///var/run/kekd/kms.sock`",
                )),
                (Some(p), Some(sock)) if !same_file(Path::new(p), sock) => out.push(fail(
                    C,
                    format!(
                        "{where_}: endpoint {e:?} is not this plugin's socket {}",
                        sock.display()
                    ),
                    format!(
                        "set `endpoint: unix://{}` or serve kekd on {p}",
                        sock.display()
                    ),
                )),
                (Some(_), _) => out.push(ok(C, format!("{where_}: endpoint {e}"))),
            },
            None => out.push(fail(
                C,
                format!("{where_}: kms has no endpoint"),
                "add `endpoint: unix:///var/run/kekd/kms.sock`",
            )),
        }
        match kms["timeout"].as_str().map(humantime::parse_duration) {
            None => out.push(ok(
                C,
                format!("{where_}: timeout not set (the apiserver's default is 3s)"),
            )),
            Some(Ok(d)) if d > Duration::from_secs(10) => out.push(warn(
                C,
                format!(
                    "{where_}: timeout {} makes every call wait that long when kekd is down",
                    humantime::format_duration(d)
                ),
                "use 3s",
            )),
            Some(Ok(_)) => out.push(ok(C, format!("{where_}: timeout ok"))),
            Some(Err(_)) => out.push(fail(
                C,
                format!("{where_}: timeout is not a duration"),
                "use `timeout: 3s`",
            )),
        }
        if !kms["cachesize"].is_badvalue() {
            out.push(fail(
                C,
                format!("{where_}: kms sets cachesize, which the apiserver rejects for v2"),
                "remove `cachesize`",
            ));
        }
        if kms_index != 0 {
            out.push(fail(
                C,
                format!(
                    "{where_}: kms is provider #{} — the first provider encrypts new writes",
                    kms_index + 1
                ),
                "list the kms provider first",
            ));
        }
        if !providers
            .iter()
            .skip(kms_index + 1)
            .any(|p| !p["identity"].is_badvalue())
        {
            out.push(warn(
                C,
                format!("{where_}: no `identity` provider after kms: data stored before encryption was enabled cannot be read"),
                "add `- identity: {}` after the kms provider until every object has been rewritten",
            ));
        }
        if !resources.iter().any(|r| *r == "secrets" || *r == "*.*") {
            out.push(warn(
                C,
                format!("{where_}: does not cover secrets"),
                "add `secrets` to resources",
            ));
        }
    }
    if !found_kms {
        out.push(fail(
            C,
            "no kms provider: nothing is encrypted by kekd",
            "add the kms provider of deploy/encryption-config.yaml",
        ));
    }
    out
}

/// The same path, or two paths naming the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((fs::canonicalize(a), fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(yaml: &str, socket: Option<&str>) -> Vec<Finding> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enc.yaml");
        fs::write(&path, yaml).unwrap();
        check_encryption_config(&path, socket.map(Path::new))
    }

    fn failures(f: &[Finding]) -> Vec<String> {
        f.iter()
            .filter(|f| f.level == Level::Fail)
            .map(|f| f.detail.clone())
            .collect()
    }

    #[test]
    fn shipped_config_passes() {
        let shipped = include_str!("../../../deploy/encryption-config.yaml");
        let f = findings(shipped, Some("/var/run/kekd/kms.sock"));
        assert!(failures(&f).is_empty(), "{f:#?}");
        assert!(f.iter().all(|f| f.level == Level::Ok), "{f:#?}");
    }

    #[test]
    fn each_mistake_is_named() {
        let yaml = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - identity: {}\n      - kms:\n          name: 'a:b'\n          endpoint: unix:///other.sock\n          cachesize: 100\n          timeout: 30s\n";
        let f = findings(yaml, Some("/var/run/kekd/kms.sock"));
        let fails = failures(&f);
        assert!(
            fails
                .iter()
                .any(|d| d.contains("no apiVersion, which means v1")),
            "{fails:#?}"
        );
        assert!(
            fails.iter().any(|d| d.contains("contains ':'")),
            "{fails:#?}"
        );
        assert!(
            fails
                .iter()
                .any(|d| d.contains("is not this plugin's socket")),
            "{fails:#?}"
        );
        assert!(fails.iter().any(|d| d.contains("cachesize")), "{fails:#?}");
        assert!(
            fails.iter().any(|d| d.contains("is provider #2")),
            "{fails:#?}"
        );
        assert!(
            f.iter()
                .any(|f| f.level == Level::Warn && f.detail.contains("timeout 30s")),
            "{f:#?}"
        );
        assert!(
            f.iter()
                .any(|f| f.level == Level::Warn && f.detail.contains("no `identity` provider")),
            "{f:#?}"
        );
    }

    #[test]
    fn not_an_encryption_config() {
        let f = findings("kind: Pod\n", None);
        assert_eq!(
            failures(&f),
            ["not an apiserver.config.k8s.io/v1 EncryptionConfiguration"]
        );
        let f = findings(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources: []\n",
            None,
        );
        assert_eq!(
            failures(&f),
            ["no kms provider: nothing is encrypted by kekd"]
        );
    }
}
