//! `kekd admin probe`: check a running plugin the way the apiserver uses it.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::cli::{CliError, Output};
use crate::client::Client;
use crate::secret::fill_random;

/// Arguments of `kekd admin probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The plugin's socket.
    #[arg(long, env = "KEKD_SOCKET", value_name = "PATH")]
    pub socket: PathBuf,
    /// The keyring the plugin serves: also report whether the plugin serves
    /// its current primary and whether a change to it was refused.
    #[arg(long, env = "KEKD_KEYRING", value_name = "PATH")]
    pub keyring: Option<PathBuf>,
    /// Time allowed per call.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Report format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// One check of `probe`.
#[derive(Debug, Serialize)]
pub(crate) struct Check {
    pub(crate) name: &'static str,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

/// Runs `kekd admin probe`.
///
/// # Errors
/// Exit 1 when any check fails.
pub fn run(args: &ProbeArgs) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let started = Instant::now();
    let (mut checks, status) = runtime.block_on(probe_checks(&args.socket, args.timeout));
    if let Some(keyring) = &args.keyring {
        let result = check_keyring(keyring, status.as_ref().map(|s| s.key_id.as_str()));
        checks.push(Check {
            name: "keyring",
            ok: result.is_ok(),
            detail: result.unwrap_or_else(|e| e),
        });
    }
    let ok = checks.iter().all(|c| c.ok);
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "socket": args.socket,
                "ok": ok,
                "elapsed_ms": started.elapsed().as_millis() as u64,
                "status": status.map(|s| json!({"version": s.version, "healthz": s.healthz, "key_id": s.key_id})),
                "checks": checks,
            })
        ),
        Output::Text => {
            println!("probe of {}", args.socket.display());
            for c in &checks {
                println!(
                    "  {} {:<9} {}",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
        }
    }
    if ok {
        Ok(())
    } else {
        let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
        Err(CliError::runtime(format!(
            "probe of {} failed: {}",
            args.socket.display(),
            failed.join(", ")
        )))
    }
}

pub(crate) async fn probe_checks(
    socket: &Path,
    timeout: Duration,
) -> (Vec<Check>, Option<crate::client::StatusReply>) {
    let mut checks = Vec::new();
    let mut push = |name, result: Result<String, String>| {
        let ok = result.is_ok();
        checks.push(Check {
            name,
            ok,
            detail: result.unwrap_or_else(|e| e),
        });
        ok
    };

    let mut client = match Client::connect(socket, timeout).await {
        Ok(c) => {
            push("connect", Ok("connected".to_owned()));
            c
        }
        Err(e) => {
            push("connect", Err(connect_hint(socket, &e.reason)));
            return (checks, None);
        }
    };

    let status = match client.status().await {
        Ok(s) => s,
        Err(e) => {
            push(
                "status",
                Err(format!("Status failed: {} ({:?})", e.message(), e.code())),
            );
            return (checks, None);
        }
    };
    push("status", check_status(&status));

    let mut seed = vec![0u8; 32];
    let uid = probe_uid();
    if let Err(e) = fill_random(&mut seed) {
        push("encrypt", Err(e.to_string()));
        return (checks, Some(status));
    }
    let started = Instant::now();
    let enc = match client.encrypt(seed.clone(), &uid).await {
        Ok(r) => r,
        Err(e) => {
            push(
                "encrypt",
                Err(format!("Encrypt failed: {} ({:?})", e.message(), e.code())),
            );
            return (checks, Some(status));
        }
    };
    let enc_ms = started.elapsed().as_secs_f64() * 1000.0;
    push(
        "encrypt",
        check_encrypt(&status, &enc).map(|()| {
            format!(
                "{}-byte ciphertext under {} in {enc_ms:.1} ms",
                enc.ciphertext.len(),
                enc.key_id
            )
        }),
    );

    let started = Instant::now();
    let dec = client
        .decrypt(
            enc.ciphertext.clone(),
            &enc.key_id,
            enc.annotations.clone(),
            &uid,
        )
        .await;
    let dec_ms = started.elapsed().as_secs_f64() * 1000.0;
    push(
        "decrypt",
        match dec {
            Ok(p) if p == seed => Ok(format!("round trip returned the seed in {dec_ms:.1} ms")),
            Ok(_) => Err("Decrypt returned different bytes than were encrypted".to_owned()),
            Err(e) => Err(format!("Decrypt failed: {} ({:?})", e.message(), e.code())),
        },
    );
    (checks, Some(status))
}

/// Does the plugin serve the keyring file's current primary, and did it
/// refuse a change to the file?
fn check_keyring(path: &Path, served: Option<&str>) -> Result<String, String> {
    let file = crate::keyring::store::read(path).map_err(|e| e.to_string())?;
    let primary = file
        .primary()
        .map(|v| file.key_id(v).to_string())
        .unwrap_or_default();
    if let Ok(Some(usage)) = crate::usage::read(path)
        && let Some(problem) = usage.reload_error
    {
        return Err(format!(
            "kekd refused the change to {} at {}: {}; it still serves its last good keyring",
            path.display(),
            problem.at,
            problem.message
        ));
    }
    match served {
        Some(s) if s == primary => Ok(format!(
            "serves the primary of {} ({primary})",
            path.display()
        )),
        Some(s) => Err(format!(
            "serves {s} but the primary of {} is {primary}: a reload is pending (it takes a few seconds) \
             or this is not the keyring the plugin serves",
            path.display()
        )),
        None => Err(format!(
            "the plugin did not report a key_id; the primary of {} is {primary}",
            path.display()
        )),
    }
}

fn connect_hint(socket: &Path, reason: &str) -> String {
    let hint = match fs::metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            "no socket there: is kekd running, and is this the path it serves (--socket)?"
        }
        Err(_) => "the socket cannot be examined",
        Ok(m) if !m.file_type().is_socket() => {
            return format!(
                "{reason}; {} is a {}, not a socket: --socket names the wrong path (kekd serves on the \
                 path of its --socket setting)",
                socket.display(),
                kind_of(&m)
            );
        }
        Ok(_) if reason.contains("ermission denied") => {
            "permission denied: run as the socket's owner or its group (--socket-mode/--socket-group)"
        }
        Ok(_) if reason.contains("onnection refused") => {
            "a socket file exists but nothing accepts on it: kekd is not running (a stale socket)"
        }
        Ok(_) => "the plugin did not answer",
    };
    format!("{reason}; {hint}")
}

/// What a non-socket file is, for a message.
fn kind_of(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// The apiserver's rules for a Status response.
fn check_status(s: &crate::client::StatusReply) -> Result<String, String> {
    if s.version != "v2" && s.version != "v2beta1" {
        return Err(format!(
            "version is {:?}; kube-apiserver requires \"v2\"",
            s.version
        ));
    }
    if s.healthz != "ok" {
        return Err(format!("healthz is {:?}, not \"ok\"", s.healthz));
    }
    check_key_id(&s.key_id)?;
    Ok(format!(
        "version {} healthz ok key_id {}",
        s.version, s.key_id
    ))
}

fn check_key_id(k: &str) -> Result<(), String> {
    match k.len() {
        0 => Err("key_id is empty".to_owned()),
        n if n > 1024 => Err(format!("key_id is {n} bytes; the apiserver allows 1024")),
        _ => Ok(()),
    }
}

/// The apiserver's rules for an Encrypt response.
fn check_encrypt(
    status: &crate::client::StatusReply,
    e: &crate::client::EncryptReply,
) -> Result<(), String> {
    check_key_id(&e.key_id)?;
    if e.key_id != status.key_id {
        return Err(format!(
            "Encrypt key_id {:?} differs from Status key_id {:?}; the apiserver would discard it",
            e.key_id, status.key_id
        ));
    }
    if e.ciphertext.is_empty() || e.ciphertext.len() > 1024 {
        return Err(format!(
            "ciphertext is {} bytes; the apiserver allows 1..=1024",
            e.ciphertext.len()
        ));
    }
    check_annotations(&e.annotations)
}

fn check_annotations(a: &HashMap<String, Vec<u8>>) -> Result<(), String> {
    let mut total = 0;
    for (k, v) in a {
        if !is_annotation_key(k) {
            return Err(format!(
                "annotation key {k:?} is not a lowercase DNS name with two or more labels"
            ));
        }
        total += k.len() + v.len();
    }
    if total > 32 * 1024 {
        return Err(format!(
            "annotations total {total} bytes; the apiserver allows 32768"
        ));
    }
    Ok(())
}

/// A lowercase RFC 1123 subdomain with at least two labels (one trailing dot allowed).
fn is_annotation_key(k: &str) -> bool {
    let name = k.strip_suffix('.').unwrap_or(k);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A random UUIDv4-formatted uid, as the apiserver sends.
fn probe_uid() -> String {
    let mut b = [0u8; 16];
    if fill_random(&mut b).is_err() {
        return "kekd-probe".to_owned();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_keys() {
        for ok in [
            "a.com",
            "version.encryption.remote.io",
            "a.com.",
            "x-1.y2.z",
        ] {
            assert!(is_annotation_key(ok), "{ok}");
        }
        for bad in [
            "com",
            "Dev.k8s.io",
            "kms.example.io/x",
            "a_b.com",
            "-a.com",
            "a..com",
            "",
            ".",
        ] {
            assert!(!is_annotation_key(bad), "{bad}");
        }
        assert!(!is_annotation_key(&format!("{}.com", "a".repeat(64))));
    }

    #[test]
    fn uid_is_uuid_v4_shaped() {
        let u = probe_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
