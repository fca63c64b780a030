//! The files in `deploy/`, checked as an operator would use them:
//! every YAML parses (yaml-rust2, no serde) and says what the runbook
//! promises; the static pod, the kubeadm snippet, the EncryptionConfiguration,
//! the example configs and the systemd unit agree on the socket, the keyring
//! and the ops address; and `systemd-analyze verify` accepts the unit.
//!
//! Without `systemd-analyze` (Debian package `systemd`) the verify test
//! prints SKIPPED, unless `KEKD_REQUIRE_ALL=1`, which makes it fail.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kekd::config::Settings;
use yaml_rust2::{Yaml, YamlLoader};

/// Where the shipped files are.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn deploy(name: &str) -> PathBuf {
    deploy_dir().join(name)
}

/// The one YAML document in a deploy file.
#[track_caller]
fn yaml(name: &str) -> Yaml {
    let path = deploy(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{name}: one document");
    docs.remove(0)
}

/// A string field that must be there.
#[track_caller]
fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

/// A list field that must be there.
#[track_caller]
fn list_of<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what} is not a list: {y:?}"))
}

/// The socket path in `endpoint: unix://PATH` of the shipped
/// EncryptionConfiguration's one kms provider.
fn shipped_socket() -> PathBuf {
    let doc = yaml("encryption-config.yaml");
    let mut endpoints = Vec::new();
    for rule in list_of(&doc["resources"], "resources") {
        for provider in list_of(&rule["providers"], "providers") {
            if !provider["kms"].is_badvalue() {
                endpoints.push(str_of(&provider["kms"]["endpoint"], "endpoint").to_owned());
            }
        }
    }
    assert_eq!(endpoints.len(), 1, "one kms provider: {endpoints:?}");
    let path = endpoints[0]
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("{:?} is not unix://", endpoints[0]));
    assert!(path.starts_with('/'), "absolute socket path: {path}");
    PathBuf::from(path)
}

/// `--flag value` pairs of a command line (every flag after `serve` takes a
/// value in the manifest), checking no flag is given twice.
#[track_caller]
fn flags(args: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        assert!(
            flag.starts_with("--"),
            "expected a --flag, got {flag:?} in {args:?}"
        );
        let value = it.next().unwrap_or_else(|| panic!("{flag} has no value"));
        assert!(
            out.insert(flag.clone(), value.clone()).is_none(),
            "{flag} given twice"
        );
    }
    out
}

#[test]
fn every_yaml_in_deploy_parses_and_is_checked_here() {
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(deploy_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
        assert!(!docs.is_empty(), "{name} is empty");
        for doc in &docs {
            assert!(
                doc.as_hash().is_some(),
                "{name}: a document is not a mapping"
            );
            str_of(&doc["apiVersion"], &format!("{name}: apiVersion"));
            str_of(&doc["kind"], &format!("{name}: kind"));
        }
        names.insert(name);
    }
    let checked: BTreeSet<String> = [
        "encryption-config.yaml",
        "kekd-static-pod.yaml",
        "kubeadm-encryption.yaml",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(
        names, checked,
        "every YAML in deploy/ needs its own checks in tests/integration/deploy.rs"
    );
}

#[test]
fn the_encryption_config_is_a_v2_kms_provider_first_for_secrets_and_configmaps() {
    let doc = yaml("encryption-config.yaml");
    assert_eq!(
        str_of(&doc["apiVersion"], "apiVersion"),
        "apiserver.config.k8s.io/v1"
    );
    assert_eq!(str_of(&doc["kind"], "kind"), "EncryptionConfiguration");
    let rules = list_of(&doc["resources"], "resources");
    assert_eq!(rules.len(), 1);
    let resources: Vec<&str> = list_of(&rules[0]["resources"], "resources")
        .iter()
        .map(|r| str_of(r, "resource"))
        .collect();
    assert_eq!(resources, ["secrets", "configmaps"]);
    let providers = list_of(&rules[0]["providers"], "providers");
    let kms = &providers[0]["kms"];
    assert_eq!(str_of(&kms["apiVersion"], "kms.apiVersion"), "v2");
    assert_eq!(str_of(&kms["name"], "kms.name"), "kekd");
    assert!(kms["cachesize"].is_badvalue(), "cachesize is v1 only");
    assert!(humantime::parse_duration(str_of(&kms["timeout"], "kms.timeout")).is_ok());
    assert!(
        providers
            .last()
            .is_some_and(|p| !p["identity"].is_badvalue()),
        "identity last, to read what was stored before"
    );
    assert_eq!(shipped_socket(), Path::new("/var/run/kekd/kms.sock"));
}

#[test]
fn the_static_pod_serves_the_shipped_socket_with_probes_on_its_ops_address() {
    let pod = yaml("kekd-static-pod.yaml");
    assert_eq!(str_of(&pod["apiVersion"], "apiVersion"), "v1");
    assert_eq!(str_of(&pod["kind"], "kind"), "Pod");
    assert_eq!(
        str_of(&pod["metadata"]["namespace"], "namespace"),
        "kube-system"
    );
    assert_eq!(str_of(&pod["metadata"]["name"], "name"), "kekd");
    let spec = &pod["spec"];
    assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "hostNetwork");
    assert_eq!(
        str_of(&spec["priorityClassName"], "priorityClassName"),
        "system-node-critical"
    );
    let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(grace > 10, "longer than kekd's 10s shutdown_grace: {grace}");

    let containers = list_of(&spec["containers"], "containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let command: Vec<String> = list_of(&c["command"], "command")
        .iter()
        .map(|a| str_of(a, "argument").to_owned())
        .collect();
    assert!(
        command.len() > 2 && command[0].ends_with("/kekd") && command[1] == "serve",
        "the container runs `kekd serve`: {command:?}"
    );
    assert!(c["args"].is_badvalue(), "everything is in command");
    let flags = flags(&command[2..]);
    let socket = PathBuf::from(&flags["--socket"]);
    let keyring = PathBuf::from(&flags["--keyring"]);
    assert_eq!(socket, shipped_socket(), "the socket the apiserver dials");
    assert_eq!(flags.get("--socket-mode").map(String::as_str), Some("0600"));
    let ops: SocketAddr = flags["--ops-addr"].parse().unwrap();
    assert!(ops.ip().is_loopback(), "ops listener on loopback: {ops}");

    // Probes: the ops listener's own host and port, the right paths.
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(str_of(&get["path"], "path"), path, "{probe}");
        assert_eq!(
            get["port"].as_i64(),
            Some(i64::from(ops.port())),
            "{probe} port matches --ops-addr"
        );
        assert_eq!(
            str_of(&get["host"], "host"),
            ops.ip().to_string(),
            "{probe} host matches --ops-addr (the kubelet would probe the node IP otherwise)"
        );
        assert_eq!(get["scheme"].as_str().unwrap_or("HTTP"), "HTTP", "{probe}");
        assert!(c[probe]["timeoutSeconds"].as_i64().unwrap_or(1) >= 1);
    }

    // Locked down: read-only root, no privilege escalation, no capabilities.
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(
        !sc["privileged"].as_bool().unwrap_or(false),
        "not privileged"
    );
    let dropped: Vec<&str> = list_of(&sc["capabilities"]["drop"], "drop")
        .iter()
        .map(|d| str_of(d, "capability"))
        .collect();
    assert_eq!(dropped, ["ALL"]);
    assert!(
        sc["capabilities"]["add"].is_badvalue(),
        "no capability added"
    );
    if sc["runAsUser"].as_i64() == Some(0) {
        // Root must be justified right where it is set.
        let text = fs::read_to_string(deploy("kekd-static-pod.yaml")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("runAsUser: 0"))
            .unwrap();
        let comments = lines[..at]
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with('#'))
            .count();
        assert!(comments >= 3, "runAsUser: 0 without a comment saying why");
    } else {
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][resource].is_badvalue(),
                "resources.{kind}.{resource}"
            );
        }
    }

    // Volumes: every mount is a hostPath at the same path inside and out
    // (so paths in flags and in the apiserver's config mean the same), and
    // the socket's and the keyring's directories are mounted.
    let volumes: BTreeMap<&str, &Yaml> = list_of(&spec["volumes"], "volumes")
        .iter()
        .map(|v| (str_of(&v["name"], "volume name"), &v["hostPath"]))
        .collect();
    let mut mounted = BTreeMap::new();
    for m in list_of(&c["volumeMounts"], "volumeMounts") {
        let name = str_of(&m["name"], "mount name");
        let mount_path = str_of(&m["mountPath"], "mountPath");
        let host = volumes
            .get(name)
            .unwrap_or_else(|| panic!("mount {name} has no volume"));
        assert_eq!(
            str_of(&host["path"], "hostPath.path"),
            mount_path,
            "volume {name}: hostPath and mountPath differ"
        );
        mounted.insert(PathBuf::from(mount_path), (name, *host, m));
    }
    assert_eq!(mounted.len(), volumes.len(), "every volume is mounted");
    let socket_dir = socket.parent().unwrap();
    let (_, host, mount) = mounted.get(socket_dir).unwrap_or_else(|| {
        panic!(
            "the socket directory {} is not mounted",
            socket_dir.display()
        )
    });
    assert_eq!(str_of(&host["type"], "type"), "DirectoryOrCreate");
    assert_ne!(
        mount["readOnly"].as_bool(),
        Some(true),
        "kekd creates the socket"
    );
    let keyring_dir = keyring.parent().unwrap();
    let (_, host, mount) = mounted.get(keyring_dir).unwrap_or_else(|| {
        panic!(
            "the keyring directory {} is not mounted",
            keyring_dir.display()
        )
    });
    assert_eq!(
        str_of(&host["type"], "type"),
        "Directory",
        "the keyring must exist (kekd admin init) before kekd starts"
    );
    assert_ne!(
        mount["readOnly"].as_bool(),
        Some(true),
        "kekd appends its audit events and usage counters beside the keyring"
    );
}

#[test]
fn the_kubeadm_snippet_gives_the_apiserver_its_config_and_kekds_socket() {
    let doc = yaml("kubeadm-encryption.yaml");
    assert_eq!(
        str_of(&doc["apiVersion"], "apiVersion"),
        "kubeadm.k8s.io/v1beta4"
    );
    assert_eq!(str_of(&doc["kind"], "kind"), "ClusterConfiguration");
    let api = &doc["apiServer"];
    // v1beta4: extraArgs is a list of {name, value}.
    let args: BTreeMap<&str, &str> = list_of(&api["extraArgs"], "extraArgs")
        .iter()
        .map(|a| {
            (
                str_of(&a["name"], "arg name"),
                str_of(&a["value"], "arg value"),
            )
        })
        .collect();
    let config = Path::new(args["encryption-provider-config"]);
    assert!(config.is_absolute(), "{}", config.display());
    assert_eq!(
        config.file_name().unwrap(),
        "encryption-config.yaml",
        "the shipped file, installed under its own name"
    );

    let mut names = BTreeSet::new();
    let mut volumes = Vec::new();
    for v in list_of(&api["extraVolumes"], "extraVolumes") {
        let name = str_of(&v["name"], "name");
        assert!(names.insert(name), "volume {name} twice");
        let host = PathBuf::from(str_of(&v["hostPath"], "hostPath"));
        let mount = PathBuf::from(str_of(&v["mountPath"], "mountPath"));
        assert_eq!(host, mount, "volume {name}: same path inside and out");
        volumes.push((name, mount, v));
    }
    let holding = |path: &Path| {
        volumes
            .iter()
            .find(|(_, mount, _)| path.parent() == Some(mount.as_path()))
            .unwrap_or_else(|| panic!("no extraVolume mounts the directory of {}", path.display()))
    };
    let (_, _, v) = holding(config);
    assert_eq!(
        v["readOnly"].as_bool(),
        Some(true),
        "the config is read-only"
    );
    let socket = shipped_socket();
    let (name, mount, _) = holding(&socket);
    assert_ne!(
        mount.as_path(),
        socket.as_path(),
        "{name}: mount the socket's directory, not the socket"
    );

    // The same directory the static pod shares from the host.
    let pod = yaml("kekd-static-pod.yaml");
    let pod_dirs: Vec<&str> = list_of(&pod["spec"]["volumes"], "volumes")
        .iter()
        .map(|v| str_of(&v["hostPath"]["path"], "path"))
        .collect();
    assert!(
        pod_dirs.contains(&mount.to_str().unwrap()),
        "{} is not one of the static pod's hostPaths {pod_dirs:?}",
        mount.display()
    );
}

#[test]
fn the_example_configs_parse_and_match_the_other_files() {
    let local = Settings::from_file(&deploy("kekd.toml")).unwrap();
    let pkcs11 = Settings::from_file(&deploy("kekd-pkcs11.toml")).unwrap();
    for (name, s) in [("kekd.toml", &local), ("kekd-pkcs11.toml", &pkcs11)] {
        assert_eq!(
            s.socket.as_deref(),
            Some(shipped_socket().as_path()),
            "{name}: the socket the apiserver dials"
        );
        assert_eq!(s.socket_mode.as_deref(), Some("0600"), "{name}");
    }
    assert_eq!(
        local.keyring.as_deref(),
        Some(Path::new("/etc/kekd/keyring"))
    );
    let backend = &pkcs11.backend;
    assert_eq!(backend.kind.as_deref(), Some("pkcs11"));
    assert_eq!(
        backend.state_dir.as_deref(),
        Some(Path::new("/var/lib/kekd")),
        "the unit's StateDirectory=kekd"
    );
}

// ------------------------------------------------------------ systemd unit

/// `key → values` per section of a unit file (a key may repeat).
fn unit_sections(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line:?}"));
        out.entry(section.clone())
            .or_default()
            .entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    out
}

#[test]
fn the_unit_is_hardened_and_serves_the_shipped_config_with_an_ops_listener() {
    let text = fs::read_to_string(deploy("kekd.service")).unwrap();
    let unit = unit_sections(&text);
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let values = service
            .get(key)
            .unwrap_or_else(|| panic!("[Service] has no {key}="));
        assert_eq!(values.len(), 1, "{key}= given {} times", values.len());
        &values[0]
    };
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("LimitCORE", "0"),
        ("RuntimeDirectory", "kekd"),
        // The apiserver bind-mounts the directory: a restart must not
        // replace it (the mount would keep the deleted one).
        ("RuntimeDirectoryPreserve", "yes"),
        ("StateDirectory", "kekd"),
        ("UMask", "0077"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
        ("IPAddressDeny", "any"),
        ("IPAddressAllow", "localhost"),
    ] {
        assert_eq!(one(key), value, "{key}=");
    }
    assert!(
        !service.contains_key("PrivateNetwork"),
        "PrivateNetwork= would hide the ops listener in a network namespace of its own"
    );
    let families: Vec<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    for family in ["AF_UNIX", "AF_INET"] {
        assert!(
            families.contains(&family),
            "RestrictAddressFamilies lacks {family}"
        );
    }

    let exec: Vec<String> = one("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(exec[0], "/usr/local/bin/kekd");
    assert_eq!(exec[1], "serve");
    let flags = flags(&exec[2..]);
    let ops: SocketAddr = flags["--ops-addr"].parse().unwrap();
    assert!(ops.ip().is_loopback());
    assert_eq!(flags["--config"], "/etc/kekd/kekd.toml");
    let config = Settings::from_file(&deploy("kekd.toml")).unwrap();
    assert_eq!(
        config.ops_addr, None,
        "--ops-addr is given on the command line"
    );

    // The socket lies in the RuntimeDirectory, the keyring in a writable path.
    let socket = config.socket.unwrap();
    let runtime = format!("/run/{}", one("RuntimeDirectory"));
    let socket_dir = socket.parent().unwrap().to_str().unwrap().to_owned();
    assert!(
        socket_dir == runtime || socket_dir == format!("/var{runtime}"),
        "socket {} is outside RuntimeDirectory {runtime}",
        socket.display()
    );
    let keyring = config.keyring.unwrap();
    let writable = one("ReadWritePaths");
    assert!(
        keyring.parent() == Some(Path::new(writable)),
        "the keyring {} is not in ReadWritePaths={writable} (usage and audit files are written beside it)",
        keyring.display()
    );
    // Same ops port as the static pod: one scrape config for both.
    let pod = fs::read_to_string(deploy("kekd-static-pod.yaml")).unwrap();
    assert!(
        pod.contains(&format!("- {ops}")),
        "the static pod uses {ops} too"
    );
}

/// Writes a copy of the unit whose ExecStart runs the kekd just built
/// (verify checks that the binary exists), after applying `edit`.
fn unit_copy(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let text = fs::read_to_string(deploy("kekd.service")).unwrap();
    let shipped = "ExecStart=/usr/local/bin/kekd ";
    assert_eq!(text.matches(shipped).count(), 1);
    let text = text.replace(
        shipped,
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_kekd")),
    );
    let path = dir.join("kekd.service");
    fs::write(&path, edit(text)).unwrap();
    path
}

/// `systemd-analyze verify UNIT`: (exit code, stderr lines about the unit).
fn verify(unit: &Path) -> (Option<i32>, Vec<String>) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains("kekd"))
        .map(str::to_owned)
        .collect();
    (out.status.code(), about)
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        common::skip::skip("systemd-analyze not installed: apt-get install -y systemd");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path(), |t| t);
    let (code, complaints) = verify(&unit);
    assert_eq!(
        code,
        Some(0),
        "systemd-analyze verify failed: {complaints:#?}"
    );
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints:#?}"
    );

    // The check is not vacuous: verify reports a bad value and an unknown key.
    let bad_dir = tempfile::tempdir().unwrap();
    let bad = unit_copy(bad_dir.path(), |t| {
        t.replace(
            "NoNewPrivileges=yes",
            "NoNewPrivileges=maybe\nProtectKernel=yes",
        )
    });
    let (_, complaints) = verify(&bad);
    assert!(
        complaints
            .iter()
            .any(|l| l.contains("NoNewPrivileges") || l.contains("maybe")),
        "{complaints:#?}"
    );
    assert!(
        complaints.iter().any(|l| l.contains("ProtectKernel")),
        "{complaints:#?}"
    );
}
