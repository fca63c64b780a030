//! `kekd admin scan`: which of our key versions the objects stored in etcd
//! still need, per resource, and what else is stored there.
//!
//! Read-only. The values are classified as they stream past and only
//! counters and a few keys are kept (`crate::scan`); no value's bytes are
//! ever printed. With `--keyring`/`--config` the versions found are matched
//! against that keyring's states. `--output json` writes the `kekd-scan v1`
//! document that `kekd admin retire --scan FILE` takes.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Target;
use crate::cli::{CliError, Output};
use crate::id::Timestamp;
use crate::keyring::KeyState;
use crate::scan::decode::escape;
use crate::scan::etcd::{EtcdError, EtcdTarget, Paging, Progress};
use crate::scan::{KeyringSeen, KeyringVersion, ScanReport, ScanRun, Tally, peak_rss_bytes};

/// Arguments of `scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// etcd's client URLs, as the apiserver's --etcd-servers
    /// (e.g. https://127.0.0.1:2379).
    #[arg(long, value_name = "URL[,URL]", value_delimiter = ',', required = true)]
    pub etcd_endpoints: Vec<String>,
    /// The CA of etcd's serving certificate (PEM), for https:// endpoints.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// A client certificate etcd trusts (PEM), e.g. the apiserver's etcd client certificate.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The key prefix to read: the apiserver's --etcd-prefix and a slash.
    #[arg(long, default_value = "/registry/", value_name = "PREFIX")]
    pub prefix: String,
    /// The provider name of kekd in the EncryptionConfiguration.
    #[arg(long, default_value = "kekd", value_name = "NAME")]
    pub provider_name: String,
    /// Keys per Range request.
    #[arg(long, default_value_t = 500, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub page_size: u32,
    /// Serializable reads (the member's own copy, may lag the leader)
    /// instead of linearizable ones.
    #[arg(long)]
    pub serializable: bool,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The keyring to match the versions against (optional).
    #[command(flatten)]
    pub target: Target,
}

/// Runs `kekd admin scan`.
///
/// # Errors
/// Exit 64 for flags that do not fit, 78 for an unreadable keyring or TLS
/// file, 1 when etcd cannot be read.
pub fn run(args: &ScanArgs) -> Result<(), CliError> {
    if args.prefix.is_empty() {
        return Err(CliError::new(
            crate::exit::USAGE,
            "--prefix must not be empty (the apiserver's --etcd-prefix and a slash, e.g. /registry/)",
        ));
    }
    let keyring = keyring_seen(&args.target)?;
    let etcd = EtcdTarget {
        endpoints: args.etcd_endpoints.clone(),
        cacert: args.cacert.clone(),
        client_cert: args.cert.clone().zip(args.key.clone()),
        timeout: args.timeout,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let prefix = args.prefix.as_bytes();
    let started_at = Timestamp::now();
    let clock = Instant::now();
    let mut tally = Tally::default();
    let mut bar = ProgressLine::new();
    let paged = runtime
        .block_on(etcd.scan(
            prefix,
            Paging {
                page_size: args.page_size,
                serializable: args.serializable,
            },
            |key, value| tally.add(key, value, prefix),
            |p| bar.update(p),
        ))
        .map_err(etcd_error);
    bar.clear();
    let paged = paged?;
    let report = tally.finish(
        ScanRun {
            started_at,
            finished_at: Timestamp::now(),
            endpoints: args.etcd_endpoints.clone(),
            prefix: args.prefix.clone(),
            provider_name: args.provider_name.clone(),
            consistency: if args.serializable {
                "serializable"
            } else {
                "linearizable"
            }
            .to_owned(),
            revision: paged.revision,
            expected_keys: paged.expected,
            pages: paged.pages,
            page_size: args.page_size,
            final_page_size: paged.final_page_size,
            peak_rss_bytes: peak_rss_bytes(),
        },
        keyring,
    );
    // The report is what a scan is for: a stdout that cannot take it (a
    // full disk under `> scan.json`, a closed pipe) fails the command.
    let printed = match args.target.output {
        Output::Json => serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .map(|json| json + "\n"),
        Output::Text => Ok(text(&report, clock.elapsed())),
    }
    .and_then(|doc| {
        let mut out = std::io::stdout().lock();
        out.write_all(doc.as_bytes())?;
        out.flush()
    });
    if let Err(e) = printed {
        let mut error = CliError::runtime(format!(
            "the scan finished, but its report could not be written to stdout: {e}"
        ));
        error.reported = true;
        return Err(error);
    }
    Ok(())
}

fn etcd_error(e: EtcdError) -> CliError {
    match e {
        EtcdError::Usage(_) => CliError::new(crate::exit::USAGE, e),
        EtcdError::File { .. } => CliError::config(e),
        _ => CliError::runtime(e),
    }
}

/// The keyring named by --keyring/--config/KEKD_*, if any: its id and states.
fn keyring_seen(t: &Target) -> Result<Option<KeyringSeen>, CliError> {
    let (keyring, backend) = t.settings()?;
    if keyring.is_none() && backend.keyring_in_a_file() {
        return Ok(None);
    }
    let store = t.open()?;
    let file = store.read().map_err(super::keyring::backend_error)?;
    Ok(Some(KeyringSeen {
        name: store.name(),
        id: file.id.to_string(),
        versions: file
            .versions
            .iter()
            .map(|s| KeyringVersion {
                version: s.info.version.get(),
                state: s.info.state.as_str().to_owned(),
                key_id: file.key_id(s.info.version).to_string(),
            })
            .collect(),
    }))
}

/// A one-line progress indicator on stderr, only when stderr is a terminal.
struct ProgressLine {
    on: bool,
    last: Option<Instant>,
}

impl ProgressLine {
    fn new() -> Self {
        Self {
            on: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn update(&mut self, p: Progress) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let pct = (p.keys * 100).checked_div(p.expected).unwrap_or(100);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[Kscanning: {}/{} keys ({pct}%), {} pages",
            p.keys, p.expected, p.pages
        );
        let _ = err.flush();
    }

    fn clear(&mut self) {
        if self.on && self.last.is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

/// The report for people. Every string that came from etcd (keys, resource
/// and provider names, key ids) or from a scan document is escaped with
/// [`escape`]: a stored key id holding `ESC [2J` or a newline must not
/// clear the admin's terminal or forge a line of the report.
fn text(r: &ScanReport, elapsed: Duration) -> String {
    let mut s = String::new();
    let run = &r.run;
    let _ = writeln!(
        s,
        "scan of {} on {} at revision {} ({} reads): {} keys, {} bytes, {} pages of up to {} in {:.1}s",
        escape(&run.prefix),
        escape(&run.endpoints.join(",")),
        run.revision,
        escape(&run.consistency),
        r.keys,
        r.value_bytes,
        run.pages,
        run.final_page_size,
        elapsed.as_secs_f64()
    );
    let ours = format!("kms:v2:{}", run.provider_name);
    let _ = writeln!(
        s,
        "\n{:<40}  {:>8}  {:<28}  {:>8}",
        "RESOURCE", "OBJECTS", "PROVIDER", "COUNT"
    );
    for res in &r.resources {
        let mut first = true;
        for (provider, n) in &res.providers {
            let (name, objects) = if first {
                (escape(&res.resource), res.objects.to_string())
            } else {
                (String::new(), String::new())
            };
            first = false;
            let mark = if *provider == ours { " (ours)" } else { "" };
            let _ = writeln!(
                s,
                "{name:<40}  {objects:>8}  {:<28}  {n:>8}",
                format!("{}{mark}", escape(provider))
            );
        }
        for (key_id, n) in &res.key_ids {
            let _ = writeln!(s, "{:<40}  {:>8}    key_id {}  {n}", "", "", escape(key_id));
        }
    }
    let _ = writeln!(s, "\ntotals:");
    for (provider, n) in &r.totals {
        let _ = writeln!(s, "  {:<30} {n:>8}", escape(provider));
    }
    match &r.keyring {
        Some(k) => {
            let _ = writeln!(s, "\nkeyring {} (id {}):", escape(&k.name), escape(&k.id));
        }
        None => {
            let _ = writeln!(
                s,
                "\nkekd key versions (no --keyring given: states unknown):"
            );
        }
    }
    let _ = writeln!(
        s,
        "  {:>7}  {:<12}  {:>8}  {:<53}  EXAMPLE",
        "VERSION", "STATE", "OBJECTS", "KEY_ID"
    );
    for v in &r.versions {
        let state = escape(v.state.as_deref().unwrap_or("-"));
        let state = state.as_str();
        let mut objects = v.objects.to_string();
        if v.header_mismatches > 0 {
            let _ = write!(objects, "+{}", v.header_mismatches);
        }
        let _ = writeln!(
            s,
            "  {:>7}  {:<12}  {:>8}  {:<53}  {}",
            v.version,
            state,
            objects,
            escape(&v.key_id),
            v.examples.first().map_or_else(String::new, |e| escape(e))
        );
        let retired = state == KeyState::Retired.as_str() || state == KeyState::Destroyed.as_str();
        if retired && v.references() > 0 {
            let _ = writeln!(
                s,
                "  WARNING: version {} is {state} but {} stored object(s) need it: they cannot be read \
                 (`kekd admin restore {}` if its material is kept)",
                v.version,
                v.references(),
                v.version
            );
        }
        if r.keyring.as_ref().is_some_and(|k| k.id == v.keyring_id) && v.state.is_none() {
            let _ = writeln!(
                s,
                "  WARNING: version {} is not in this keyring: {} object(s) cannot be read",
                v.version,
                v.references()
            );
        }
    }
    if let Some(k) = &r.keyring {
        let others: u64 = r
            .versions
            .iter()
            .filter(|v| v.keyring_id != k.id)
            .map(|v| v.objects)
            .sum();
        if others > 0 {
            let _ = writeln!(
                s,
                "  {others} object(s) carry key ids of another kekd keyring (listed with state -)"
            );
        }
    }
    if r.mismatch_total > 0 {
        let _ = writeln!(
            s,
            "\nWARNING: {} kekd value(s) whose key id and envelope header disagree (kekd refuses to decrypt them):",
            r.mismatch_total
        );
        for m in &r.mismatches {
            let _ = writeln!(
                s,
                "  {}  key_id v{}, header {}",
                escape(&m.key),
                m.key_id_version,
                escape(&m.header)
            );
        }
    }
    if r.unparseable_total > 0 {
        let _ = writeln!(
            s,
            "\n{} value(s) are in no known form (listed by key; values are never shown):",
            r.unparseable_total
        );
        for p in &r.unparseable {
            let _ = writeln!(s, "  {}  {}", escape(&p.key), escape(&p.reason));
        }
        if r.unparseable_total > r.unparseable.len() as u64 {
            let _ = writeln!(
                s,
                "  … and {} more",
                r.unparseable_total - r.unparseable.len() as u64
            );
        }
    }
    s
}

/// Largest scan document `retire --scan` reads (its lists are bounded, so
/// real ones are far smaller).
const MAX_SCAN_FILE: u64 = 16 * 1024 * 1024;

/// Reads a `kekd-scan v1` document for `retire --scan`.
///
/// # Errors
/// Exit 78 when the file cannot be read or is not a scan result.
pub(super) fn read_scan(file: &std::path::Path) -> Result<ScanReport, CliError> {
    use std::io::Read;

    let name = file.display().to_string();
    // A regular file only, checked on what was opened: a FIFO would block.
    let (f, meta) = crate::file::open_regular(file, crate::file::Links::Follow).map_err(|e| match e {
        crate::file::OpenError::NotRegular { what, .. } => CliError::config(format!(
            "--scan {name} is {what}, not a regular file; nothing was read from it: save the output of \
             `kekd admin scan … --output json` to a file and pass that"
        )),
        e => CliError::config(format!("cannot read --scan {name}: {e}")),
    })?;
    if meta.len() > MAX_SCAN_FILE {
        return Err(CliError::config(format!(
            "--scan {name} is {} bytes, more than a scan result ever holds ({MAX_SCAN_FILE}); \
             pass the output of `kekd admin scan … --output json`",
            meta.len()
        )));
    }
    let mut text = String::new();
    f.take(MAX_SCAN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| CliError::config(format!("cannot read --scan {name}: {e}")))?;
    ScanReport::from_json(&name, &text).map_err(CliError::config)
}

/// The `retire --scan` guard, run under the keyring lock on the keyring as read.
///
/// # Errors
/// Exit 1 ("retire refused: …") when the scan is stale, of another keyring,
/// saw nothing of this keyring, or shows objects still under `version`.
pub(super) fn check_retire(
    scan: &ScanReport,
    file: &std::path::Path,
    keyring: &crate::keyring::store::KeyringFile,
    version: crate::id::KeyVersion,
) -> Result<(), CliError> {
    let evidence = scan
        .check_retire(
            &file.display().to_string(),
            &keyring.id,
            version,
            Timestamp::now(),
        )
        .map_err(|e| CliError::runtime(format!("retire refused: {e}")))?;
    eprintln!("kekd: {evidence}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value the apiserver would store under `key_id` (provider `other`).
    fn kms_value(key_id: &str) -> Vec<u8> {
        let mut object = Vec::new();
        prost::encoding::bytes::encode(1, &vec![1u8; 8], &mut object);
        prost::encoding::string::encode(2, &key_id.to_owned(), &mut object);
        prost::encoding::bytes::encode(3, &b"opaque".to_vec(), &mut object);
        let mut value = b"k8s:enc:kms:v2:other:".to_vec();
        value.extend(object);
        value
    }

    #[test]
    fn the_text_report_escapes_every_string_from_etcd() {
        let mut tally = Tally::default();
        let prefix = b"/registry/";
        tally.add(
            b"/registry/secrets/ns/a",
            &kms_value("id\x1b[2J\nFORGED LINE\u{9b}31m\u{202e}"),
            prefix,
        );
        tally.add(
            b"/registry/se\x1bcrets\xff/ns/b",
            b"k8s:enc:kms:v2:other:\x00",
            prefix,
        );
        let now = Timestamp::now();
        let report = tally.finish(
            ScanRun {
                started_at: now,
                finished_at: now,
                endpoints: vec!["http://e\x1b[1m:2379".to_owned()],
                prefix: "/registry/".to_owned(),
                provider_name: "kekd".to_owned(),
                consistency: "linearizable".to_owned(),
                revision: 1,
                expected_keys: 2,
                pages: 1,
                page_size: 500,
                final_page_size: 500,
                peak_rss_bytes: None,
            },
            None,
        );
        let out = text(&report, Duration::ZERO);
        assert!(
            !out.chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{out:?}"
        );
        assert!(
            out.contains("key_id id\\x1b[2J\\x0aFORGED LINE\\xc2\\x9b31m\\u{202e}  1"),
            "{out}"
        );
        assert!(!out.lines().any(|l| l.starts_with("FORGED")), "{out}");
        assert!(out.contains("se\\x1bcrets\\xff"), "{out}");
        assert!(out.contains("http://e\\x1b[1m:2379"), "{out}");
        // The report keeps the exact key id; only the printer escapes.
        assert_eq!(
            report
                .resources
                .iter()
                .find(|r| r.resource == "secrets")
                .and_then(|r| r.key_ids.keys().next())
                .map(String::as_str),
            Some("id\x1b[2J\nFORGED LINE\u{9b}31m\u{202e}")
        );
    }
}
