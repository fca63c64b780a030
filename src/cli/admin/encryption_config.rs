//! Reading the apiserver's EncryptionConfiguration (`--encryption-config`):
//! loaded once here for `doctor`'s checks, and read for the resources
//! kekd's provider encrypts, which a rotation must rewrite before the old
//! version is retired.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

use crate::cli::CliError;

mod endpoint;

pub use endpoint::{Dial, Endpoint, EndpointError, parse_endpoint};

/// What the shipped `deploy/encryption-config.yaml` encrypts, shown when
/// no `--encryption-config` is given.
pub const SHIPPED_RESOURCES: [&str; 2] = ["secrets", "configmaps"];

/// Why an EncryptionConfiguration could not be read: what is wrong, and the
/// fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// What is wrong, naming the file.
    pub detail: String,
    /// What to do.
    pub fix: &'static str,
}

/// EncryptionConfigurations larger than this are refused.
const MAX_CONFIG_LEN: u64 = 16 << 20;

/// Reads `path` as an `apiserver.config.k8s.io/v1` EncryptionConfiguration.
///
/// # Errors
/// The file cannot be read, is not YAML, is empty, or is not one.
pub fn load(path: &Path) -> Result<Yaml, LoadError> {
    use std::io::Read as _;
    let unreadable = |e: &dyn std::fmt::Display| LoadError {
        detail: format!("{}: {e}", path.display()),
        fix: "give the file passed to --encryption-provider-config",
    };
    // Never a plain read: a FIFO there would block doctor forever.
    let (file, _) =
        crate::file::open_regular(path, crate::file::Links::Follow).map_err(|e| match e {
            crate::file::OpenError::NotFound { .. } => unreadable(
                &std::io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error()),
            ),
            crate::file::OpenError::Io { source, .. } => unreadable(&source),
            e => LoadError {
                detail: e.to_string(),
                fix: "give the file passed to --encryption-provider-config",
            },
        })?;
    let mut text = String::new();
    file.take(MAX_CONFIG_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| unreadable(&e))?;
    if text.len() as u64 > MAX_CONFIG_LEN {
        return Err(LoadError {
            detail: format!(
                "{} is more than {MAX_CONFIG_LEN} bytes: not an EncryptionConfiguration",
                path.display()
            ),
            fix: "give the file passed to --encryption-provider-config",
        });
    }
    let docs = YamlLoader::load_from_str(&text).map_err(|e| LoadError {
        detail: format!("{}: not YAML: {e}", path.display()),
        fix: "fix the YAML syntax",
    })?;
    let Some(doc) = docs.into_iter().next() else {
        return Err(LoadError {
            detail: format!("{} is empty", path.display()),
            fix: "write an EncryptionConfiguration (deploy/encryption-config.yaml)",
        });
    };
    if doc["apiVersion"].as_str() != Some("apiserver.config.k8s.io/v1")
        || doc["kind"].as_str() != Some("EncryptionConfiguration")
    {
        return Err(LoadError {
            detail: "not an apiserver.config.k8s.io/v1 EncryptionConfiguration".to_owned(),
            fix: "start from deploy/encryption-config.yaml",
        });
    }
    Ok(doc)
}

/// The resources that must be rewritten before an old version is retired:
/// those an EncryptionConfiguration encrypts with kekd, or the shipped
/// default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    /// The resources, as the configuration names them (`secrets`,
    /// `deployments.apps`, `*.*`), in its order, each once.
    pub resources: Vec<String>,
    /// The file they were read from; `None` for the shipped default.
    pub from: Option<PathBuf>,
    /// The kms provider's name when it is not `kekd` (the scan's
    /// `--provider-name`).
    pub provider_name: Option<String>,
}

impl Encrypted {
    /// What the shipped `deploy/encryption-config.yaml` encrypts.
    pub fn shipped() -> Self {
        Self {
            resources: SHIPPED_RESOURCES.iter().map(|r| (*r).to_owned()).collect(),
            from: None,
            provider_name: None,
        }
    }

    /// The resources of `path` whose providers include a `kms` provider
    /// served on `socket` (any `kms` provider when the socket is unknown).
    ///
    /// # Errors
    /// Exit 78: the file cannot be read, or no rule uses kekd.
    pub fn read(path: &Path, socket: Option<&Path>) -> Result<Self, CliError> {
        let doc = load(path).map_err(|e| {
            CliError::config(format!(
                "--encryption-config {}: {}; {}",
                path.display(),
                e.detail,
                e.fix
            ))
        })?;
        let mut resources: Vec<String> = Vec::new();
        let mut provider_name = None;
        for rule in doc["resources"]
            .as_vec()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let providers = rule["providers"]
                .as_vec()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let ours = providers.iter().map(|p| &p["kms"]).find(|kms| {
                !kms.is_badvalue()
                    && socket.is_none_or(|s| {
                        // The socket the apiserver dials, found as it finds it.
                        kms["endpoint"]
                            .as_str()
                            .and_then(|e| parse_endpoint(e).ok())
                            .is_some_and(|e| e.dial() == Dial::Path(s))
                    })
            });
            let Some(kms) = ours else { continue };
            if let Some(name) = kms["name"].as_str().filter(|n| *n != "kekd") {
                provider_name.get_or_insert_with(|| name.to_owned());
            }
            for r in rule["resources"]
                .as_vec()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(r) = r.as_str()
                    && !resources.iter().any(|have| have == r)
                {
                    resources.push(r.to_owned());
                }
            }
        }
        if resources.is_empty() {
            return Err(CliError::config(format!(
                "--encryption-config {}: no resources are encrypted by a kms provider{}; give the file passed to \
                 kube-apiserver --encryption-provider-config",
                path.display(),
                socket.map_or(String::new(), |s| format!(
                    " with endpoint unix://{}",
                    s.display()
                ))
            )));
        }
        Ok(Self {
            resources,
            from: Some(path.to_owned()),
            provider_name,
        })
    }

    /// One command per resource that rewrites every object of it, so the
    /// apiserver stores it again under the primary.
    pub fn migrate_commands(&self) -> Vec<String> {
        self.resources.iter().map(|r| migrate_command(r)).collect()
    }

    /// The resources and commands as JSON fields.
    pub fn to_json(&self) -> Value {
        json!({
            "resources": self.resources,
            "resources_from": self.from,
            "migrate": self.migrate_commands(),
        })
    }

    /// How the list was found, for the text report.
    pub fn describe(&self) -> String {
        match &self.from {
            Some(path) => format!("every resource {} encrypts with kekd", path.display()),
            None => "every resource your EncryptionConfiguration encrypts with kekd (the shipped \
                     deploy/encryption-config.yaml: secrets and configmaps; pass --encryption-config FILE to list \
                     yours)"
                .to_owned(),
        }
    }
}

/// The rewrite command for one EncryptionConfiguration resource entry.
/// Wildcards (`*.*`, `*.apps`, `*.` for the core group) cover every
/// listable resource of the group(s).
fn migrate_command(resource: &str) -> String {
    const REWRITE: &str = "kubectl get \"$r\" -A -o json | kubectl replace -f -";
    match resource.strip_prefix("*.") {
        Some("*") => format!(
            "for r in $(kubectl api-resources --verbs=list,update -o name); do {REWRITE}; done"
        ),
        Some(group) => format!(
            "for r in $(kubectl api-resources --api-group='{group}' --verbs=list,update -o name); do {REWRITE}; done"
        ),
        None => format!("kubectl get {resource} -A -o json | kubectl replace -f -"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn read(yaml: &str, socket: Option<&str>) -> Result<Encrypted, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enc.yaml");
        fs::write(&path, yaml).unwrap();
        Encrypted::read(&path, socket.map(Path::new))
            .map(|e| Encrypted { from: None, ..e })
            .map_err(|e| e.message.replace(&path.display().to_string(), "FILE"))
    }

    #[test]
    fn the_shipped_config_encrypts_secrets_and_configmaps() {
        let shipped = include_str!("../../../deploy/encryption-config.yaml");
        assert_eq!(
            read(shipped, Some("/var/run/kekd/kms.sock")).unwrap(),
            Encrypted::shipped()
        );
        assert_eq!(
            Encrypted::shipped().migrate_commands(),
            [
                "kubectl get secrets -A -o json | kubectl replace -f -",
                "kubectl get configmaps -A -o json | kubectl replace -f -",
            ]
        );
    }

    #[test]
    fn only_rules_with_kekds_provider_count() {
        let yaml = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  \
                    - resources: [secrets, widgets.example.com]\n    providers:\n      - kms:\n          \
                    apiVersion: v2\n          name: vault\n          endpoint: unix:///other.sock\n      \
                    - kms:\n          apiVersion: v2\n          name: kekd2\n          endpoint: unix:///k.sock\n  \
                    - resources: [events]\n    providers:\n      - aescbc: {}\n  \
                    - resources: ['*.apps', '*.', secrets]\n    providers:\n      - kms:\n          name: kekd2\n          \
                    endpoint: unix:///k.sock\n";
        let e = read(yaml, Some("/k.sock")).unwrap();
        assert_eq!(
            e.resources,
            ["secrets", "widgets.example.com", "*.apps", "*."]
        );
        assert_eq!(e.provider_name.as_deref(), Some("kekd2"));
        assert_eq!(
            e.migrate_commands(),
            [
                "kubectl get secrets -A -o json | kubectl replace -f -",
                "kubectl get widgets.example.com -A -o json | kubectl replace -f -",
                "for r in $(kubectl api-resources --api-group='apps' --verbs=list,update -o name); do kubectl get \"$r\" -A -o json | kubectl replace -f -; done",
                "for r in $(kubectl api-resources --api-group='' --verbs=list,update -o name); do kubectl get \"$r\" -A -o json | kubectl replace -f -; done",
            ]
        );
        assert_eq!(
            read(yaml, Some("/nowhere.sock")).unwrap_err(),
            "--encryption-config FILE: no resources are encrypted by a kms provider with endpoint \
             unix:///nowhere.sock; give the file passed to kube-apiserver --encryption-provider-config"
        );
        // The socket is the one the apiserver dials: `unix:/k.sock` is
        // /k.sock; `unix://k.sock` dials nothing (`k.sock` is the host).
        let other_forms = yaml.replace("unix:///k.sock", "unix:/k.sock");
        assert_eq!(read(&other_forms, Some("/k.sock")).unwrap(), e);
        let host_trap = yaml.replace("unix:///k.sock", "unix://k.sock");
        assert!(read(&host_trap, Some("/k.sock")).is_err());
        assert_eq!(
            read("kind: Other\n", None).unwrap_err(),
            "--encryption-config FILE: not an apiserver.config.k8s.io/v1 EncryptionConfiguration; start from \
             deploy/encryption-config.yaml"
        );
    }
}
