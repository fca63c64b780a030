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
//!    provider with `apiVersion: v2`, a name without `:`, an endpoint whose
//!    socket — the one the apiserver really dials, which ignores the URL's
//!    host part — is this socket, a sane timeout, no `cachesize`, `identity`
//!    after it;
//! 4. a live probe of the plugin (Status, Encrypt, Decrypt).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use yaml_rust2::Yaml;

use super::encryption_config::{self, Dial};
use super::{Target, report};
use crate::backend::GuardedPath;
use crate::backend::served::{self, Served};
use crate::cli::CliError;
use crate::keyring::access;

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
    let pkcs11 = config.secret_env().is_some().then_some(pin_file.as_deref());
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
    let who = if serve_uid == 0 {
        "root".to_owned()
    } else {
        format!("uid {serve_uid} and root")
    };
    // `kekd serve` refuses a keyring, or a state_dir (it holds the served
    // record, the admin lock and the audit log), that others can change:
    // the same check gives the same verdict here.
    match config.guarded_path() {
        GuardedPath::File(keyring) => match access::check(keyring, serve_uid) {
            Ok(()) => out.push(ok(
                "keyring access",
                format!(
                    "{}: only {who} can change it or its directories",
                    keyring.display()
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
        },
        GuardedPath::Dir(dir) => match access::check_dir(dir, serve_uid) {
            Ok(()) => out.push(ok(
                "state_dir access",
                format!("{}: only {who} can change it or its parents", dir.display()),
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
        },
    }
    let backend = match crate::backend::open(&config) {
        // A keyring file is opened when it is read, below; a key store is
        // reached now.
        Ok(b) if config.keyring_file().is_some() => b,
        Ok(b) => {
            out.push(ok("token", b.describe()));
            b
        }
        Err(e) => {
            out.push(fail("token", e.to_string(), keyring_fix(&e)));
            return;
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
    use crate::backend::ErrorKind as K;
    use crate::keyring::store::StoreError as S;
    // A keyring file's own errors know the path to name.
    match e.downcast_ref::<S>() {
        Some(S::TooOpen { path, .. }) => return format!("chmod 600 {}", path.display()),
        Some(S::NotFound { path }) => {
            return format!(
                "create it with `kekd admin init --keyring {0}`, or restore it \
                 (`kekd admin restore-backup --keyring {0} --from BACKUP`)",
                path.display()
            );
        }
        Some(S::NotAFile { path }) => {
            return format!("{} must be the keyring file itself", path.display());
        }
        _ => {}
    }
    match e.kind() {
        K::StoreMissing | K::AuthenticationFailed | K::Misconfigured | K::Unavailable => {
            "check the [backend] settings and the key store (docs/hsm.md for PKCS#11)".to_owned()
        }
        K::NoKeyring
        | K::KeyringExists
        | K::Locked
        | K::Damaged
        | K::Io
        | K::NotDurable
        | K::Decrypt
        | K::Internal => {
            "restore the keyring from a backup or another node (docs/runbook.md)".to_owned()
        }
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
            Some(e) => out.push(check_endpoint(&where_, e, socket)),
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

/// A kms provider's `endpoint`: the socket the apiserver really dials (it
/// parses the endpoint as a URL and dials its path; see
/// [`super::encryption_config::parse_endpoint`]), against this plugin's.
fn check_endpoint(where_: &str, endpoint: &str, socket: Option<&Path>) -> Finding {
    const C: &str = "encryption config";
    let want = socket.unwrap_or(Path::new("/var/run/kekd/kms.sock"));
    // An absolute path after `unix://`: three slashes.
    let fix = format!("set `endpoint: unix://{}`", want.display());
    let parsed = match encryption_config::parse_endpoint(endpoint) {
        Ok(parsed) => parsed,
        Err(e) => {
            return fail(
                C,
                format!("{where_}: the apiserver refuses endpoint {endpoint:?}: {e}"),
                fix,
            );
        }
    };
    // What the apiserver ignores, and why.
    let trap = match (&parsed.authority, &parsed.opaque) {
        (Some(host), _) => format!(
            " ({host:?} after `unix://` is the URL's host, which the apiserver ignores: the socket's path starts \
             at the next `/`)"
        ),
        (None, Some(opaque)) => format!(
            " (`unix:` followed by {opaque:?}, not `/`, is a URL without a path: the apiserver dials no file)"
        ),
        (None, None) => String::new(),
    };
    match parsed.dial() {
        Dial::Empty => fail(
            C,
            format!("{where_}: endpoint {endpoint:?} gives the apiserver no socket to dial{trap}"),
            format!("{fix} (the socket's absolute path after `unix://`)"),
        ),
        Dial::Abstract(name) => fail(
            C,
            format!(
                "{where_}: endpoint {endpoint:?} makes the apiserver dial the abstract socket {name:?}, and kekd \
                 serves a socket file"
            ),
            fix,
        ),
        Dial::Path(dials) => match socket {
            Some(sock) if !same_file(dials, sock) => fail(
                C,
                format!(
                    "{where_}: endpoint {endpoint:?} makes the apiserver dial {dials:?}, not this plugin's socket \
                     {sock:?}{trap}"
                ),
                if trap.is_empty() {
                    format!("{fix} or serve kekd on {dials:?}")
                } else {
                    fix
                },
            ),
            _ if !trap.is_empty() => warn(
                C,
                format!("{where_}: endpoint {endpoint:?} makes the apiserver dial {dials:?}{trap}"),
                format!("set `endpoint: unix://{}`", dials.display()),
            ),
            _ => ok(
                C,
                format!("{where_}: endpoint {endpoint:?}: the apiserver dials {dials:?}"),
            ),
        },
    }
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
            fails.iter().any(|d| d.contains("not this plugin's socket")),
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

    /// The socket doctor names is the one kube-apiserver dials
    /// (tests/conformance/testdata/endpoints.json holds the apiserver's own
    /// answers); the host part of `unix://HOST/PATH` is named as a trap.
    #[test]
    fn endpoints_are_read_as_the_apiserver_reads_them() {
        let sock = Some(Path::new("/var/run/kekd/kms.sock"));
        let f = |e: &str, sock: Option<&Path>| check_endpoint("resources[0] (secrets)", e, sock);
        let level_detail_fix = |f: Finding| (f.level, f.detail, f.fix.unwrap_or_default());

        // unix:/PATH is a path: it works.
        assert_eq!(
            level_detail_fix(f("unix:/var/run/kekd/kms.sock", sock)),
            (
                Level::Ok,
                r#"resources[0] (secrets): endpoint "unix:/var/run/kekd/kms.sock": the apiserver dials "/var/run/kekd/kms.sock""#
                    .to_owned(),
                String::new()
            )
        );
        // The host trap: `var` is the host, the apiserver dials /run/kekd/kms.sock.
        assert_eq!(
            level_detail_fix(f("unix://var/run/kekd/kms.sock", sock)),
            (
                Level::Fail,
                r#"resources[0] (secrets): endpoint "unix://var/run/kekd/kms.sock" makes the apiserver dial "/run/kekd/kms.sock", not this plugin's socket "/var/run/kekd/kms.sock" ("var" after `unix://` is the URL's host, which the apiserver ignores: the socket's path starts at the next `/`)"#
                    .to_owned(),
                "set `endpoint: unix:///var/run/kekd/kms.sock`".to_owned()
            )
        );
        // Without --socket, doctor still names what the apiserver dials.
        let trap = f("unix://kekd-dev/kms.sock", None);
        assert_eq!(trap.level, Level::Warn, "{trap:#?}");
        assert!(
            trap.detail
                .contains(r#"dial "/kms.sock" ("kekd-dev" after `unix://` is the URL's host"#),
            "{trap:#?}"
        );
        assert_eq!(
            trap.fix.as_deref(),
            Some("set `endpoint: unix:///kms.sock`")
        );
        // A host and nothing else: no socket at all.
        let empty = f("unix://kms.sock", sock);
        assert_eq!(empty.level, Level::Fail, "{empty:#?}");
        assert!(
            empty
                .detail
                .contains(r#"gives the apiserver no socket to dial ("kms.sock" after `unix://`"#),
            "{empty:#?}"
        );
        let opaque = f("unix:kms.sock", sock);
        assert_eq!(opaque.level, Level::Fail, "{opaque:#?}");
        assert!(
            opaque.detail.contains("is a URL without a path"),
            "{opaque:#?}"
        );
        // Abstract sockets, refusals, another socket.
        assert_eq!(f("unix:///@kekd", sock).level, Level::Fail);
        let refused = f("unix:///a%zz", sock);
        assert_eq!(
            refused.detail,
            r#"resources[0] (secrets): the apiserver refuses endpoint "unix:///a%zz": invalid endpoint "unix:///a%zz" for remote KMS provider, error: parse "unix:///a%zz": invalid URL escape "%zz""#
        );
        let other = f("unix:///other.sock", sock);
        assert_eq!(
            other.fix.as_deref(),
            Some(r#"set `endpoint: unix:///var/run/kekd/kms.sock` or serve kekd on "/other.sock""#)
        );
        // Control bytes from a %-escape are shown escaped.
        let escaped = f("unix:///a%1Bb", sock);
        assert!(
            escaped.detail.contains(r#"dial "/a\u{1b}b""#),
            "{escaped:#?}"
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
