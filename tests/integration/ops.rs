//! Operating kekd from the outside: the ops listener
//! (`--ops-addr`) scraped with a plain HTTP/1.1 client written here, the
//! OpenMetrics text parsed line by line, liveness vs readiness under a broken
//! keyring, a lost HSM and a shutdown, the rotation reminder, the server's
//! key events in the audit log, and `kekd admin doctor` on a good and on
//! several broken setups.
//!
//! The server runs in process (`Server::start` with `ops_addr =
//! 127.0.0.1:0`, the bound port from `Server::ops_addr`) where the test needs
//! to hold it mid-shutdown, and as the `kekd serve` binary where its log or a
//! SoftHSM2 token is part of the test (the port is then read from the
//! `ops listener` log line). Without SoftHSM2 the lost-HSM test prints
//! SKIPPED, unless `KEKD_REQUIRE_ALL=1`, which makes it fail.

use crate::common;
use crate::softhsm;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

use common::{Finished, Process, admin_async, eventually, json_of, seed, spawn_serve, uid, wire};
use kekd::backend::local::LocalBackend;
use kekd::client::Client;
use kekd::config::{ServeConfig, Settings};
use kekd::server::{Server, ServerError};
use softhsm::Token;

/// Long enough for any reload, self-check or flush on a slow host.
const WAIT: Duration = Duration::from_secs(15);
/// One HTTP exchange with the ops listener.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

fn p(path: &Path) -> &str {
    path.to_str().expect("tempdir paths are UTF-8")
}

fn no_annotations() -> HashMap<String, Vec<u8>> {
    HashMap::new()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// `sha256:<hex>` of a key id, computed here (not with kekd's helper).
fn hash_key_id(key_id: &str) -> String {
    let hex: String = Sha256::digest(key_id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// `kekd/<id>/v<version>` for the keyring whose version 1 is `v1_key_id`.
fn key_id(v1_key_id: &str, version: u32) -> String {
    let (base, _) = v1_key_id.rsplit_once("/v").unwrap();
    format!("{base}/v{version}")
}

/// The 32-hex keyring id inside a key id.
fn keyring_id(key_id: &str) -> &str {
    key_id.split('/').nth(1).expect("kekd/<id>/vN")
}

// ------------------------------------------------------------ HTTP client

/// One HTTP response.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl HttpResponse {
    fn content_type(&self) -> &str {
        self.headers.get("content-type").map_or("", String::as_str)
    }
}

/// `GET path` on a fresh connection (HTTP/1.1, `Connection: close`).
async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    http_request(addr, "GET", path).await
}

async fn http_request(addr: SocketAddr, method: &str, path: &str) -> Result<HttpResponse, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send {method} {path}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read the answer to {method} {path}: {e}"))?;
        parse_http(&raw).map_err(|e| format!("{method} {path}: {e}"))
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{method} {path}: no answer within {HTTP_TIMEOUT:?}"))?
}

fn parse_http(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|e| format!("headers: {e}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let mut headers = BTreeMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header {line:?}"))?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let mut body = raw[end + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        body = dechunk(&body)?;
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().map_err(|_| format!("content-length {len:?}"))?;
        if body.len() != len {
            return Err(format!(
                "content-length {len} but {} bytes of body",
                body.len()
            ));
        }
    }
    let body = String::from_utf8(body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without CRLF")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".to_owned());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ------------------------------------------------------- OpenMetrics text

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug)]
struct Exposition {
    text: String,
    /// Family name → (TYPE, HELP).
    families: BTreeMap<String, (String, String)>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the OpenMetrics text format, checking its structure: every
    /// family has one TYPE and one HELP before its samples, every sample
    /// belongs to a declared family with a suffix its type allows, and the
    /// text ends with `# EOF`.
    fn parse(text: &str) -> Self {
        let fail = |line: &str, why: &str| -> ! { panic!("{why}: {line:?}\nin:\n{text}") };
        let mut families: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut helps: BTreeMap<String, String> = BTreeMap::new();
        let mut samples = Vec::new();
        let mut eof = false;
        for line in text.lines() {
            if eof {
                fail(line, "a line after # EOF");
            }
            if line == "# EOF" {
                eof = true;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| fail(line, "TYPE"));
                let known = [
                    "counter",
                    "gauge",
                    "histogram",
                    "gaugehistogram",
                    "summary",
                    "info",
                    "stateset",
                    "unknown",
                ];
                if !known.contains(&kind) {
                    fail(line, "unknown metric type");
                }
                let help = helps.get(name).cloned().unwrap_or_default();
                if families
                    .insert(name.to_owned(), (kind.to_owned(), help))
                    .is_some()
                {
                    fail(line, "a second TYPE for the family");
                }
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                if helps.insert(name.to_owned(), help.to_owned()).is_some() {
                    fail(line, "a second HELP for the family");
                }
                if let Some(f) = families.get_mut(name) {
                    f.1 = help.to_owned();
                }
            } else if line.starts_with("# UNIT ") {
            } else if line.starts_with('#') {
                fail(line, "an unknown comment line");
            } else {
                let sample = parse_sample(line).unwrap_or_else(|e| fail(line, &e));
                if family_of(&families, &sample.name).is_none() {
                    fail(
                        line,
                        "a sample of no declared family (or with a suffix its type does not allow)",
                    );
                }
                samples.push(sample);
            }
        }
        assert!(eof, "no `# EOF` at the end:\n{text}");
        for (name, (_, help)) in &families {
            assert!(
                !help.trim().is_empty(),
                "family {name} has no HELP text:\n{text}"
            );
        }
        Self {
            text: text.to_owned(),
            families,
            samples,
        }
    }

    /// The declared TYPE of a family.
    fn kind(&self, family: &str) -> Option<&str> {
        self.families.get(family).map(|(k, _)| k.as_str())
    }

    /// The value of the one sample named `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(
            found.len() <= 1,
            "{name}{want:?} appears {} times:\n{}",
            found.len(),
            self.text
        );
        found.first().map(|s| s.value)
    }

    /// [`Exposition::value`], or 0 when the sample is absent (a counter
    /// that never moved is not exported).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// [`Exposition::value`] of a sample that must be there.
    #[track_caller]
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Every sample named `name`.
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// The family a sample belongs to, given its type's allowed suffixes.
fn family_of<'a>(
    families: &'a BTreeMap<String, (String, String)>,
    sample: &str,
) -> Option<&'a str> {
    families.iter().find_map(|(family, (kind, _))| {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" | "gaugehistogram" => {
                &["_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"]
            }
            "summary" => &["", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        suffixes
            .iter()
            .any(|suffix| sample.strip_suffix(suffix) == Some(family.as_str()))
            .then_some(family.as_str())
    })
}

/// `name{l="v",…} value [timestamp]`, with OpenMetrics label escapes.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| "no value".to_owned())?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let consumed = loop {
            let Some(&(i, c)) = chars.peek() else {
                return Err("unterminated label set".to_owned());
            };
            if c == '}' {
                break i + 1;
            }
            if c == ',' {
                chars.next();
                continue;
            }
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('=')
                || chars.next().map(|(_, c)| c) != Some('"')
            {
                return Err(format!("label {key:?} is not key=\"value\""));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated label value".to_owned()),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, '\\')) => value.push('\\'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key:?} twice"));
            }
        };
        rest = &after[consumed..];
    }
    let mut fields = rest.split_whitespace();
    let value_text = fields.next().ok_or_else(|| "no value".to_owned())?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Scrapes `/metrics`, checking the answer's status and content type.
async fn scrape(ops: SocketAddr) -> Exposition {
    let resp = http_get(ops, "/metrics").await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.content_type()
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{resp:?}"
    );
    Exposition::parse(&resp.body)
}

/// `/livez` or `/readyz`: (status, body).
async fn probe(ops: SocketAddr, path: &str) -> (u16, String) {
    let resp = http_get(ops, path).await.unwrap();
    assert!(
        resp.content_type().starts_with("text/plain"),
        "{path} answers plain text: {resp:?}"
    );
    (resp.status, resp.body)
}

/// Polls `/metrics` until the sample has `value`.
async fn wait_for_sample(ops: SocketAddr, name: &str, labels: &[(&str, &str)], value: f64) {
    let labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    eventually(&format!("{name}{labels:?} = {value}"), WAIT, || {
        let labels = labels.clone();
        async move {
            let labels: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            match scrape(ops).await.value(name, &labels) {
                Some(v) if v == value => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// Polls `/metrics` until `measure` of it reaches `at_least` (`what` names
/// it); returns the value reached. The observable event that N more polls
/// or checks ran, where a test would otherwise sleep through them.
async fn wait_for_at_least(
    ops: SocketAddr,
    what: &str,
    at_least: f64,
    measure: fn(&Exposition) -> f64,
) -> f64 {
    eventually(&format!("{what} ≥ {at_least}"), WAIT, || async move {
        let now = measure(&scrape(ops).await);
        if now >= at_least {
            Ok(now)
        } else {
            Err(format!("{now}"))
        }
    })
    .await
}

/// Background self-checks counted so far (each after its outcome was
/// logged, audited and reflected in `/readyz`).
fn self_checks(m: &Exposition) -> f64 {
    m.all("kekd_self_checks_total")
        .iter()
        .map(|s| s.value)
        .sum()
}

/// Failed background self-checks counted so far.
fn failed_self_checks(m: &Exposition) -> f64 {
    m.get("kekd_self_checks_total", &[("result", "failed")])
}

/// Keyring reload attempts counted so far: every poll and every change
/// event, whatever came of it.
fn reload_attempts(m: &Exposition) -> f64 {
    m.all("kekd_keyring_reloads_total")
        .iter()
        .map(|s| s.value)
        .sum()
}

/// Refused keyring reloads counted so far.
fn refused_reloads(m: &Exposition) -> f64 {
    m.get("kekd_keyring_reloads_total", &[("result", "refused")])
}

/// Polls `/readyz` until it answers `status`; returns the body.
async fn wait_for_readyz(ops: SocketAddr, status: u16) -> String {
    eventually(&format!("/readyz answers {status}"), WAIT, || async move {
        let (got, body) = probe(ops, "/readyz").await;
        if got == status {
            Ok(body)
        } else {
            Err(format!("{got} {body:?}"))
        }
    })
    .await
}

// -------------------------------------------------------------- audit log

/// Every JSON line of an audit log (none when the file does not exist).
fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

/// The server key events named `event`.
fn server_events(path: &Path, event: &str) -> Vec<serde_json::Value> {
    audit_lines(path)
        .into_iter()
        .filter(|l| l["source"] == "server" && l["event"] == event)
        .collect()
}

/// Asserts that no KEK (base64, as in the keyring file) occurs in `text`.
#[track_caller]
fn assert_no_key_material(keks: &[String], what: &str, text: &str) {
    for kek in keks {
        assert!(!text.contains(kek.as_str()), "{what} holds key material");
    }
}

/// Checks the fields every server event has.
#[track_caller]
fn assert_event_envelope(line: &serde_json::Value, keyring_id: &str, pid: u32) {
    assert_eq!(line["source"], "server", "{line}");
    assert_eq!(line["keyring_id"], keyring_id, "{line}");
    assert_eq!(line["pid"], pid, "{line}");
    assert!(
        line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
}

// ------------------------------------------------------ in-process server

/// The real server in this process with its ops listener on 127.0.0.1:0
/// and a 200 ms reload poll.
struct InProcess {
    dir: TempDir,
    keyring: PathBuf,
    socket: PathBuf,
    /// Version 1's key id.
    key_id: String,
    ops: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl InProcess {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let dir = common::tempdir().await;
        let keyring = dir.path().join("keyring");
        let key_id = common::create_keyring(&keyring);
        let socket = dir.path().join("kms.sock");
        let mut settings = Settings {
            keyring: Some(keyring.clone()),
            socket: Some(socket.clone()),
            ops_addr: Some("127.0.0.1:0".to_owned()),
            reload_interval: Some("200ms".to_owned()),
            ..Settings::default()
        };
        adjust(&mut settings);
        let config = ServeConfig::resolve(settings).expect("valid settings");
        let server = {
            let _guard = common::fs_lock().await;
            Server::start(config, Arc::new(LocalBackend::new(&keyring)))
                .await
                .expect("server starts")
        };
        let ops = server.ops_addr().expect("the ops listener is bound");
        assert!(ops.ip().is_loopback() && ops.port() != 0, "{ops}");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Self {
            dir,
            keyring,
            socket,
            key_id,
            ops,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn client(&self) -> Client {
        common::connect(&self.socket).await
    }

    async fn scrape(&self) -> Exposition {
        scrape(self.ops).await
    }

    fn audit(&self) -> PathBuf {
        kekd::audit::audit_path(&self.keyring)
    }

    fn logs(&self) -> &Path {
        self.dir.path()
    }

    /// Signals shutdown without waiting for it.
    fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for `serve` to return.
    async fn stopped(&mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("server stops in time")
            .expect("server task did not panic")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// Replaces the keyring file by rename, as `install` would.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_file_name("incoming");
    fs::write(&tmp, bytes).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Polls Status until it reports `expected`.
async fn wait_for_key_id(client: &Client, expected: &str) {
    eventually(&format!("Status reports {expected}"), WAIT, || {
        let mut c = client.clone();
        async move {
            let s = c.status().await.map_err(|e| e.to_string())?;
            if s.key_id == expected {
                Ok(())
            } else {
                Err(format!("Status reports {}", s.key_id))
            }
        }
    })
    .await;
}

#[track_caller]
fn assert_ok(out: &Finished, what: &str) {
    assert_eq!(out.code(), 0, "{what}: {out:#?}");
}

// ------------------------------------------------------------- metrics

/// Families exported from the start, with their types. Families with
/// labels (`kekd_rpc_requests`, `kekd_rpc_duration_seconds`,
/// `kekd_key_operations`, `kekd_keyring_reloads`,
/// `kekd_hsm_operation_duration_seconds`) appear with their first sample.
const ALWAYS: &[(&str, &str)] = &[
    ("kekd_primary_key_age_seconds", "gauge"),
    ("kekd_rotation_due", "gauge"),
    ("kekd_keyring_last_reload_timestamp_seconds", "gauge"),
    ("kekd_keyring_reload_refused", "gauge"),
    ("kekd_self_check_ok", "gauge"),
    ("kekd_self_checks", "counter"),
    ("kekd_build_info", "gauge"),
    ("kekd_hsm_sessions_open", "gauge"),
    ("kekd_hsm_sessions_in_use", "gauge"),
    ("kekd_ops_connections_shed", "counter"),
    ("kekd_ops_accept_errors", "counter"),
];

/// A histogram series is consistent: buckets never decrease, `+Inf` equals
/// `_count`, and `_count` is `expected`.
#[track_caller]
fn assert_histogram(m: &Exposition, family: &str, labels: &[(&str, &str)], expected: f64) {
    let count = m.get(&format!("{family}_count"), labels);
    assert_eq!(count, expected, "{family}_count{labels:?}:\n{}", m.text);
    let sum = m.get(&format!("{family}_sum"), labels);
    assert!(sum >= 0.0 && sum.is_finite(), "{family}_sum {sum}");
    let mut buckets: Vec<(f64, f64)> = m
        .all(&format!("{family}_bucket"))
        .into_iter()
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                && s.labels.len() == labels.len() + 1
        })
        .map(|s| {
            let le = &s.labels["le"];
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (bound, s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 2, "{family}{labels:?} has buckets");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{family}{labels:?} buckets decrease: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| (b.0, b.1)),
        Some((f64::INFINITY, count)),
        "{family}{labels:?}: le=+Inf equals _count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_named_typed_and_counts_move_with_calls_and_a_rotation() {
    let server = InProcess::start().await;
    let v1 = server.key_id.clone();
    let v2 = key_id(&v1, 2);

    let m = server.scrape().await;
    for (family, kind) in ALWAYS {
        assert_eq!(m.kind(family), Some(*kind), "TYPE of {family}:\n{}", m.text);
    }
    assert_eq!(
        m.get(
            "kekd_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("backend", "local")]
        ),
        1.0
    );
    assert_eq!(m.get("kekd_self_check_ok", &[]), 1.0);
    assert_eq!(m.get("kekd_rotation_due", &[]), 0.0, "default max age 90d");
    let age = m.get("kekd_primary_key_age_seconds", &[]);
    assert!((0.0..120.0).contains(&age), "a fresh key's age: {age}");
    assert_eq!(m.get("kekd_keyring_reload_refused", &[]), 0.0);
    assert_eq!(
        m.get("kekd_keyring_last_reload_timestamp_seconds", &[]),
        0.0,
        "no reload yet"
    );
    // Known series exist from the start, at 0, so rate() sees the first call.
    let before = m.all("kekd_rpc_requests_total");
    assert_eq!(before.len(), 3, "one Ok series per method: {before:?}");
    assert!(
        before.iter().all(|s| s.value == 0.0),
        "no call yet: {before:?}"
    );
    // The local backend has no token: its gauges stay 0.
    assert_eq!(m.get("kekd_hsm_sessions_open", &[]), 0.0);

    let mut client = server.client().await;
    let status = client.status().await.unwrap();
    assert_eq!(status.key_id, v1);
    let plaintext = seed();
    let sealed = client.encrypt(plaintext.clone(), &uid(1)).await.unwrap();
    let opened = client
        .decrypt(
            sealed.ciphertext.clone(),
            &sealed.key_id,
            no_annotations(),
            &uid(2),
        )
        .await
        .unwrap();
    assert_eq!(opened, plaintext);
    let mut tampered = sealed.ciphertext.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let refused = client
        .decrypt(tampered, &sealed.key_id, no_annotations(), &uid(3))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    let m = server.scrape().await;
    assert_eq!(m.kind("kekd_rpc_requests"), Some("counter"), "{}", m.text);
    assert_eq!(
        m.kind("kekd_rpc_duration_seconds"),
        Some("histogram"),
        "{}",
        m.text
    );
    for (method, code) in [
        ("Status", "Ok"),
        ("Encrypt", "Ok"),
        ("Decrypt", "Ok"),
        ("Decrypt", "InvalidArgument"),
    ] {
        let labels = [("method", method), ("code", code)];
        assert_eq!(
            m.get("kekd_rpc_requests_total", &labels),
            1.0,
            "{method} {code}:\n{}",
            m.text
        );
        assert_histogram(&m, "kekd_rpc_duration_seconds", &labels, 1.0);
    }
    assert_eq!(
        m.all("kekd_rpc_requests_total").len(),
        4,
        "one series per method and code seen:\n{}",
        m.text
    );
    // Bounded labels: every label is one of the documented names and no
    // value carries a key id, an error string or a path.
    for s in &m.samples {
        for (k, v) in &s.labels {
            assert!(
                [
                    "method",
                    "code",
                    "op",
                    "version",
                    "key_id_hash",
                    "result",
                    "backend",
                    "reason",
                    "le"
                ]
                .contains(&k.as_str()),
                "unexpected label {k}={v:?} on {}",
                s.name
            );
            assert!(
                !v.contains(' ') && !v.contains('/'),
                "label {k}={v:?} looks like free text"
            );
        }
    }
    assert!(!m.text.contains(&v1), "a raw key id in /metrics");
    assert!(
        !m.text.contains(keyring_id(&v1)),
        "the keyring id in /metrics"
    );

    // A rotation: one applied reload, its time, a Status on the new key.
    let before_rotation = unix_now();
    let out = admin_async(
        &["rotate", "--promote", "--keyring", p(&server.keyring)],
        server.logs(),
    )
    .await;
    assert_ok(&out, "rotate --promote");
    wait_for_key_id(&client, &v2).await;
    let m = server.scrape().await;
    assert_eq!(
        m.kind("kekd_keyring_reloads"),
        Some("counter"),
        "{}",
        m.text
    );
    assert_eq!(
        m.get("kekd_keyring_reloads_total", &[("result", "applied")]),
        1.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.count("kekd_keyring_reloads_total", &[("result", "refused")]),
        0.0
    );
    let last = m.get("kekd_keyring_last_reload_timestamp_seconds", &[]);
    #[allow(clippy::cast_precision_loss)]
    let window = (before_rotation as f64)..=((unix_now() + 1) as f64);
    assert!(
        window.contains(&last),
        "last reload at {last}, expected in {window:?}"
    );
    let sealed2 = client.encrypt(seed(), &uid(4)).await.unwrap();
    assert_eq!(sealed2.key_id, v2);
    let m = server.scrape().await;
    assert_eq!(
        m.get(
            "kekd_rpc_requests_total",
            &[("method", "Encrypt"), ("code", "Ok")]
        ),
        2.0
    );
    assert!(!m.text.contains(&v2), "a raw key id in /metrics");

    // Anything else on the listener: 404 / 405 with a hint, never a panic.
    let nope = http_get(server.ops, "/nope").await.unwrap();
    assert_eq!(nope.status, 404, "{nope:?}");
    assert!(nope.body.contains("/metrics"), "{nope:?}");
    let post = http_request(server.ops, "POST", "/metrics").await.unwrap();
    assert_eq!(post.status, 405, "{post:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_operations_are_counted_per_version_under_a_hashed_key_id() {
    let server = InProcess::start().await;
    let v1 = server.key_id.clone();
    let v2 = key_id(&v1, 2);
    let mut client = server.client().await;
    let sealed = client.encrypt(seed(), &uid(1)).await.unwrap();
    client
        .decrypt(sealed.ciphertext.clone(), &v1, no_annotations(), &uid(2))
        .await
        .unwrap();
    let h1 = hash_key_id(&v1);
    let m = server.scrape().await;
    assert_eq!(m.kind("kekd_key_operations"), Some("counter"), "{}", m.text);
    for op in ["encrypt", "decrypt"] {
        assert_eq!(
            m.value(
                "kekd_key_operations_total",
                &[("op", op), ("version", "1"), ("key_id_hash", &h1)]
            ),
            Some(1.0),
            "{op} under v1:\n{}",
            m.text
        );
    }

    let out = admin_async(
        &["rotate", "--promote", "--keyring", p(&server.keyring)],
        server.logs(),
    )
    .await;
    assert_ok(&out, "rotate --promote");
    wait_for_key_id(&client, &v2).await;
    client.encrypt(seed(), &uid(3)).await.unwrap();
    // v1, now decrypt-only, still opens what it sealed.
    client
        .decrypt(sealed.ciphertext.clone(), &v1, no_annotations(), &uid(4))
        .await
        .unwrap();
    let h2 = hash_key_id(&v2);
    assert_ne!(h1, h2);
    let m = server.scrape().await;
    assert_eq!(
        m.value(
            "kekd_key_operations_total",
            &[("op", "encrypt"), ("version", "2"), ("key_id_hash", &h2)]
        ),
        Some(1.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "kekd_key_operations_total",
            &[("op", "decrypt"), ("version", "1"), ("key_id_hash", &h1)]
        ),
        Some(2.0),
        "{}",
        m.text
    );
    for s in m.all("kekd_key_operations_total") {
        let hash = &s.labels["key_id_hash"];
        let hex = hash.strip_prefix("sha256:").unwrap_or_default();
        assert!(
            hex.len() == 64 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "key_id_hash {hash:?} is not sha256:<64 lowercase hex>"
        );
    }
    assert!(!m.text.contains(&v1) && !m.text.contains(&v2));
    assert!(!m.text.contains(keyring_id(&v1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_listener_is_off_unless_configured() {
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let config = ServeConfig::resolve(Settings {
        keyring: Some(keyring.clone()),
        socket: Some(dir.path().join("kms.sock")),
        ..Settings::default()
    })
    .unwrap();
    assert_eq!(config.ops_addr, None);
    let _guard = common::fs_lock().await;
    let server = Server::start(config, Arc::new(LocalBackend::new(&keyring)))
        .await
        .unwrap();
    assert_eq!(server.ops_addr(), None);
}

// ------------------------------------------------- liveness vs readiness

/// A keyring changed after it was loaded but before the reload loop first
/// looked (a slow start on a busy node) is still noticed: the loop compares
/// with the revision read just before the load, not with what it finds when
/// it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_between_load_and_serve_is_not_missed() {
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let config = ServeConfig::resolve(Settings {
        keyring: Some(keyring.clone()),
        socket: Some(dir.path().join("kms.sock")),
        ops_addr: Some("127.0.0.1:0".to_owned()),
        reload_interval: Some("200ms".to_owned()),
        ..Settings::default()
    })
    .unwrap();
    let server = {
        let _guard = common::fs_lock().await;
        Server::start(config, Arc::new(LocalBackend::new(&keyring)))
            .await
            .unwrap()
    };
    let ops = server.ops_addr().unwrap();
    // Loaded; not serving yet, so no reload loop is running.
    replace_file(&keyring, b"this is not a keyring\n");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async {
        let _ = rx.await;
    }));
    wait_for_sample(ops, "kekd_keyring_reload_refused", &[], 1.0).await;
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_keyring_keeps_the_last_good_one_serving_live_and_ready() {
    let server = InProcess::start().await;
    let v1 = server.key_id.clone();
    let good = fs::read(&server.keyring).unwrap();
    let keks = common::keks_in(&server.keyring);
    let mut client = server.client().await;
    wait_for_readyz(server.ops, 200).await;

    replace_file(&server.keyring, b"this is not a keyring\n");
    wait_for_sample(server.ops, "kekd_keyring_reload_refused", &[], 1.0).await;
    assert_eq!(probe(server.ops, "/livez").await, (200, "ok\n".to_owned()));
    // By design: the last good keyring keeps serving, so kekd stays ready.
    assert_eq!(probe(server.ops, "/readyz").await, (200, "ok\n".to_owned()));
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.healthz.as_str(), status.key_id.as_str()),
        ("ok", v1.as_str())
    );
    assert_eq!(client.encrypt(seed(), &uid(1)).await.unwrap().key_id, v1);
    let m = server.scrape().await;
    assert!(m.get("kekd_keyring_reloads_total", &[("result", "refused")]) >= 1.0);
    assert_eq!(m.get("kekd_self_check_ok", &[]), 1.0);

    // The same problem written again (new inode, new poll): refused again,
    // and still one event.
    let refused = refused_reloads(&server.scrape().await);
    replace_file(&server.keyring, b"this is not a keyring\n");
    wait_for_at_least(
        server.ops,
        "refused reloads",
        refused + 1.0,
        refused_reloads,
    )
    .await;
    let rejected = server_events(&server.audit(), "keyring_rejected");
    assert_eq!(
        rejected.len(),
        1,
        "one event per distinct problem: {rejected:#?}"
    );
    assert_event_envelope(&rejected[0], keyring_id(&v1), std::process::id());
    let reason = rejected[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(p(&server.keyring)),
        "the reason names the file: {reason}"
    );
    assert!(
        !reason.contains("this is not a keyring"),
        "the reason quotes content: {reason}"
    );

    // Fixed: the gauge falls back to 0 and kekd is still ready.
    replace_file(&server.keyring, &good);
    wait_for_sample(server.ops, "kekd_keyring_reload_refused", &[], 0.0).await;
    assert_eq!(probe(server.ops, "/readyz").await.0, 200);
    assert_eq!(probe(server.ops, "/livez").await.0, 200);
    assert_eq!(server_events(&server.audit(), "keyring_rejected").len(), 1);
    let audit = fs::read_to_string(server.audit()).unwrap();
    assert_no_key_material(&keks, "the audit log", &audit);
}

/// Shutdown: the socket stops accepting at once, so `/readyz` answers 503
/// "not accepting" while in-flight calls drain; `/livez` stays 200 until the
/// process is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_with_not_accepting_while_shutting_down() {
    let mut server = InProcess::start_with(|s| s.shutdown_grace = Some("20s".to_owned())).await;
    wait_for_readyz(server.ops, 200).await;
    let raw = wire::RawClient::connect(&server.socket, common::CALL_TIMEOUT).await;
    let plaintext = seed();
    let held = raw
        .held::<_, wire::EncryptResponse>(
            wire::ENCRYPT,
            wire::EncryptRequest {
                plaintext: plaintext.clone(),
                uid: uid(1),
            },
        )
        .await;
    // Answered only after the server has read the held stream's headers: a
    // shutdown that begins earlier would rightly refuse that stream.
    let _: wire::StatusResponse = raw
        .clone()
        .unary(wire::STATUS, wire::StatusRequest {})
        .await
        .unwrap();
    let ops = server.ops;
    server.begin_shutdown();
    let body = wait_for_readyz(ops, 503).await;
    assert!(body.contains("not accepting"), "{body:?}");
    assert_eq!(probe(ops, "/livez").await, (200, "ok\n".to_owned()));
    let m = scrape(ops).await;
    assert_eq!(
        m.get("kekd_self_check_ok", &[]),
        1.0,
        "health is not the reason"
    );

    let reply = held.release().await.expect("the in-flight call completes");
    assert_eq!(reply.key_id, server.key_id);
    server.stopped().await.unwrap();
    assert!(
        http_get(ops, "/livez").await.is_err(),
        "the ops listener is closed once kekd stopped"
    );
}

/// Reads the ops listener's address from `kekd serve`'s log.
async fn ops_addr_of(process: &Process) -> SocketAddr {
    process.wait_for_stderr("ops listener").await;
    let log = process.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("ops listener"))
        .expect("the ops listener line");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
}

/// The one `*.audit.jsonl` in a PKCS#11 node's state directory.
fn audit_in(state_dir: &Path) -> PathBuf {
    let found: Vec<PathBuf> = fs::read_dir(state_dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().ends_with(".audit.jsonl"))
                .collect()
        })
        .unwrap_or_default();
    assert!(found.len() <= 1, "{found:?}");
    found
        .into_iter()
        .next()
        .unwrap_or_else(|| state_dir.join("none.audit.jsonl"))
}

/// A kekd serving a fresh SoftHSM token, self-checking every second, with
/// its ops listener on a free port.
struct HsmNode {
    token: Token,
    node: softhsm::Node,
    v1: String,
    server: Process,
    client: Client,
    ops: SocketAddr,
}

async fn hsm_node(self_check_interval: &str) -> Option<HsmNode> {
    let token = Token::create()?;
    let interval = format!("self_check_interval = \"{self_check_interval}\"");
    let node = token.node(
        "a",
        &token.backend("a"),
        &[&interval, "ops_addr = \"127.0.0.1:0\""],
    );
    let v1 = token.init(&node);
    let mut server = token.spawn_serve(&node);
    let client = server.ready().await;
    let ops = ops_addr_of(&server).await;
    wait_for_readyz(ops, 200).await;
    Some(HsmNode {
        token,
        node,
        v1,
        server,
        client,
        ops,
    })
}

impl HsmNode {
    fn audit(&self) -> PathBuf {
        audit_in(self.node.state_dir.as_deref().unwrap())
    }

    /// Moves the token away (no RPC meanwhile: the background self-check
    /// must notice by itself) and checks kekd is live, not ready, and says
    /// why. Returns how to put the token back.
    async fn lose_the_token(&mut self) -> softhsm::TakenAway {
        let away = self.token.take_away();
        let body = wait_for_readyz(self.ops, 503).await;
        assert!(body.starts_with("not ready: "), "{body:?}");
        assert!(
            body.contains("self-check"),
            "the reason names the self-check: {body:?}"
        );
        assert!(!body.contains(&self.token.pin), "the PIN in /readyz");
        // Through a further failed self-check, /livez answers 200 at every
        // look: a lost HSM never fails liveness.
        let ops = self.ops;
        let failed = failed_self_checks(&scrape(ops).await);
        eventually("another failed self-check", WAIT, || async move {
            assert_eq!(
                probe(ops, "/livez").await.0,
                200,
                "a lost HSM never fails liveness"
            );
            let now = failed_self_checks(&scrape(ops).await);
            if now > failed {
                Ok(())
            } else {
                Err(format!("{now} failed self-checks"))
            }
        })
        .await;
        assert_eq!(probe(ops, "/livez").await.0, 200);
        let m = scrape(self.ops).await;
        assert_eq!(m.get("kekd_self_check_ok", &[]), 0.0, "{}", m.text);
        assert!(
            self.server.try_exit().is_none(),
            "kekd exited during the outage"
        );
        away
    }
}

/// A lost HSM: kekd stays live (a restart cannot bring a token back) but is
/// not ready, saying why, and the audit log records `health_lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hsm_keeps_kekd_live_but_not_ready() {
    let Some(mut n) = hsm_node("1s").await else {
        return;
    };
    assert_eq!(probe(n.ops, "/livez").await.0, 200);
    n.client.encrypt(seed(), &uid(1)).await.unwrap();
    let m = scrape(n.ops).await;
    assert_eq!(
        m.get(
            "kekd_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("backend", "pkcs11")
            ]
        ),
        1.0
    );
    assert_eq!(m.get("kekd_self_check_ok", &[]), 1.0);
    assert!(m.get("kekd_hsm_sessions_open", &[]) >= 1.0, "{}", m.text);
    assert_eq!(
        m.kind("kekd_hsm_operation_duration_seconds"),
        Some("histogram"),
        "{}",
        m.text
    );
    let hsm_calls: f64 = m
        .all("kekd_hsm_operation_duration_seconds_count")
        .iter()
        .map(|s| s.value)
        .sum();
    assert!(hsm_calls >= 1.0, "token operations are timed:\n{}", m.text);

    let away = n.lose_the_token().await;
    let audit = n.audit();
    let lost = eventually("a health_lost event", WAIT, || {
        let lost = server_events(&audit, "health_lost");
        async move {
            if lost.is_empty() {
                Err("none".to_owned())
            } else {
                Ok(lost)
            }
        }
    })
    .await;
    assert_eq!(lost.len(), 1, "{:#?}", audit_lines(&audit));
    let pid = u32::try_from(lost[0]["pid"].as_u64().unwrap()).unwrap();
    assert_event_envelope(&lost[0], keyring_id(&n.v1), pid);
    assert!(lost[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let text = fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(&n.token.pin), "the PIN in the audit log");
    assert!(
        !n.server.stderr().contains(&n.token.pin),
        "the PIN in the log"
    );
    away.put_back();
}

/// Once the token is back, kekd is ready again by itself, with the same key
/// id, and the audit log records `health_recovered` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kekd_is_ready_again_by_itself_once_the_hsm_is_back() {
    let Some(mut n) = hsm_node("1s").await else {
        return;
    };
    let away = n.lose_the_token().await;
    away.put_back();
    wait_for_readyz(n.ops, 200).await;
    wait_for_sample(n.ops, "kekd_self_check_ok", &[], 1.0).await;
    assert_eq!(probe(n.ops, "/livez").await.0, 200);
    assert_eq!(n.client.status().await.unwrap().key_id, n.v1);
    assert_eq!(
        n.client.encrypt(seed(), &uid(2)).await.unwrap().key_id,
        n.v1
    );
    let audit = n.audit();
    let events = health_events(&audit);
    assert_eq!(
        events,
        ["health_lost", "health_recovered"],
        "{:#?}",
        audit_lines(&audit)
    );
}

/// A token outage must not flood the audit log and the log: the reload poll
/// (every 200 ms here) may report each distinct problem it meets once, never
/// once per poll — through 15 polls, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_outage_does_not_flood_the_audit_log_with_rejected_keyrings() {
    let Some(mut n) = hsm_node("1s").await else {
        return;
    };
    let away = n.lose_the_token().await;
    let polls = reload_attempts(&scrape(n.ops).await);
    wait_for_at_least(n.ops, "reload attempts", polls + 15.0, reload_attempts).await;
    let m = scrape(n.ops).await;
    assert!(
        m.get("kekd_keyring_reloads_total", &[("result", "unavailable")]) >= 1.0,
        "polls during the outage count as unavailable:\n{}",
        m.text
    );
    away.put_back();
    wait_for_readyz(n.ops, 200).await;
    let audit = n.audit();
    let reasons: Vec<String> = server_events(&audit, "keyring_rejected")
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    let distinct: std::collections::BTreeSet<&String> = reasons.iter().collect();
    assert!(
        reasons.len() <= 2 && distinct.len() == reasons.len(),
        "{} keyring_rejected events in one outage (15 polls): {reasons:#?}",
        reasons.len()
    );
    let log = n.server.stderr();
    let refused = log
        .lines()
        .filter(|l| l.contains("keyring change refused"))
        .count();
    assert!(
        refused <= 2,
        "{refused} `keyring change refused` errors in one outage"
    );
    wait_for_sample(n.ops, "kekd_keyring_reload_refused", &[], 0.0).await;
}

/// The server's `health_*` events in an audit log, in order.
fn health_events(audit: &Path) -> Vec<String> {
    audit_lines(audit)
        .iter()
        .filter(|l| {
            l["source"] == "server"
                && l["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("health_"))
        })
        .map(|l| l["event"].as_str().unwrap().to_owned())
        .collect()
}

/// An RPC that meets the outage first marks the token unhealthy before the
/// self-check does: the audit log still says `health_lost` exactly once (not
/// again when the self-check fails too), then `health_recovered` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_lost_is_audited_once_even_when_a_call_notices_the_outage_first() {
    let Some(mut n) = hsm_node("3s").await else {
        return;
    };
    let failed = failed_self_checks(&scrape(n.ops).await);
    let away = n.token.take_away();
    let err = n.client.encrypt(seed(), &uid(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let body = wait_for_readyz(n.ops, 503).await;
    assert!(body.contains("self-check"), "{body:?}");
    assert_eq!(scrape(n.ops).await.get("kekd_self_check_ok", &[]), 0.0);
    // The background self-check fails too (counted once it has audited
    // what it found).
    wait_for_at_least(
        n.ops,
        "failed self-checks",
        failed + 1.0,
        failed_self_checks,
    )
    .await;
    let audit = n.audit();
    assert_eq!(
        health_events(&audit),
        ["health_lost"],
        "{:#?}",
        audit_lines(&audit)
    );
    away.put_back();
    wait_for_readyz(n.ops, 200).await;
    assert_eq!(
        health_events(&audit),
        ["health_lost", "health_recovered"],
        "{:#?}",
        audit_lines(&audit)
    );
}

// ------------------------------------------------------ rotation reminder

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_due_sets_the_metric_and_warns_once_per_primary_while_staying_ready() {
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    let v1 = common::create_keyring(&keyring);
    let socket = dir.path().join("kms.sock");
    let mut server = spawn_serve(
        &keyring,
        &socket,
        dir.path(),
        &[
            "--max-key-age",
            "1s",
            "--self-check-interval",
            "1s",
            "--ops-addr",
            "127.0.0.1:0",
        ],
    )
    .await;
    let client = server.ready().await;
    let ops = ops_addr_of(&server).await;
    wait_for_sample(ops, "kekd_rotation_due", &[], 1.0).await;
    let m = scrape(ops).await;
    assert!(
        m.get("kekd_primary_key_age_seconds", &[]) > 1.0,
        "{}",
        m.text
    );
    // Due is a reminder, not an outage.
    assert_eq!(wait_for_readyz(ops, 200).await, "ok\n");
    assert_eq!(probe(ops, "/livez").await.0, 200);
    // Three more self-checks, each after a look at the key's age: at least
    // two looks after the one that warned.
    let checks = self_checks(&scrape(ops).await);
    wait_for_at_least(ops, "self-checks", checks + 3.0, self_checks).await;
    let warnings = |log: &str| {
        log.lines()
            .filter(|l| l.contains("rotation is due"))
            .count()
    };
    let log = server.stderr();
    assert_eq!(
        warnings(&log),
        1,
        "one warning per primary, not per check:\n{log}"
    );
    let line = log.lines().find(|l| l.contains("rotation is due")).unwrap();
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("key.version=1"), "{line}");

    // A rotation resets the age; the new primary is due in turn, warned once.
    let out = admin_async(
        &["rotate", "--promote", "--keyring", p(&keyring)],
        dir.path(),
    )
    .await;
    assert_ok(&out, "rotate --promote");
    wait_for_key_id(&client, &key_id(&v1, 2)).await;
    eventually("a warning for version 2", WAIT, || {
        let log = server.stderr();
        async move {
            if warnings(&log) == 2 {
                Ok(())
            } else {
                Err(format!("{} warnings", warnings(&log)))
            }
        }
    })
    .await;
    let checks = self_checks(&scrape(ops).await);
    wait_for_at_least(ops, "self-checks", checks + 3.0, self_checks).await;
    let log = server.stderr();
    assert_eq!(warnings(&log), 2, "{log}");
    assert!(
        log.lines()
            .filter(|l| l.contains("rotation is due"))
            .nth(1)
            .is_some_and(|l| l.contains("key.version=2")),
        "{log}"
    );
    assert_eq!(probe(ops, "/readyz").await.0, 200);
    server.signal(rustix::process::Signal::TERM);
    let finished = server.wait_exit().await;
    finished.ok();
}

// ------------------------------------------------------- audit: key events

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_while_serving_appends_snapshot_switched_without_key_material() {
    let server = InProcess::start().await;
    let v1 = server.key_id.clone();
    let v2 = key_id(&v1, 2);
    let client = server.client().await;
    let out = admin_async(
        &["rotate", "--promote", "--keyring", p(&server.keyring)],
        server.logs(),
    )
    .await;
    assert_ok(&out, "rotate --promote");
    wait_for_key_id(&client, &v2).await;
    let switched = server_events(&server.audit(), "snapshot_switched");
    assert_eq!(switched.len(), 1, "{:#?}", audit_lines(&server.audit()));
    let line = &switched[0];
    assert_event_envelope(line, keyring_id(&v1), std::process::id());
    assert_eq!(line["from_key_id"], v1.as_str(), "{line}");
    assert_eq!(line["to_key_id"], v2.as_str(), "{line}");
    // The admin command's own lines are in the same file, before it.
    let all = audit_lines(&server.audit());
    let commands: Vec<&str> = all.iter().filter_map(|l| l["command"].as_str()).collect();
    assert!(commands.contains(&"rotate"), "{all:#?}");
    let keks = common::keks_in(&server.keyring);
    assert_eq!(keks.len(), 2);
    assert_no_key_material(
        &keks,
        "the audit log",
        &fs::read_to_string(server.audit()).unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decrypt_under_a_demoted_version_is_audited_once() {
    let server = InProcess::start().await;
    let v1 = server.key_id.clone();
    let v2 = key_id(&v1, 2);
    let mut client = server.client().await;
    let sealed = client.encrypt(seed(), &uid(1)).await.unwrap();
    let out = admin_async(
        &["rotate", "--promote", "--keyring", p(&server.keyring)],
        server.logs(),
    )
    .await;
    assert_ok(&out, "rotate --promote");
    wait_for_key_id(&client, &v2).await;
    // v2 (the primary) decrypting is not an event; v1 (decrypt-only) is, once.
    let fresh = client.encrypt(seed(), &uid(2)).await.unwrap();
    client
        .decrypt(fresh.ciphertext, &v2, no_annotations(), &uid(3))
        .await
        .unwrap();
    for n in 0..3 {
        client
            .decrypt(
                sealed.ciphertext.clone(),
                &v1,
                no_annotations(),
                &uid(10 + n),
            )
            .await
            .unwrap();
    }
    let used = server_events(&server.audit(), "demoted_version_used");
    assert_eq!(used.len(), 1, "{:#?}", audit_lines(&server.audit()));
    let line = &used[0];
    assert_event_envelope(line, keyring_id(&v1), std::process::id());
    assert_eq!(line["version"], 1, "{line}");
    assert_eq!(line["state"], "decrypt-only", "{line}");
    assert_eq!(line["key_id"], v1.as_str(), "{line}");
    let keks = common::keks_in(&server.keyring);
    assert_no_key_material(
        &keks,
        "the audit log",
        &fs::read_to_string(server.audit()).unwrap(),
    );
}

// ------------------------------------------------------------------ doctor

/// `deploy/encryption-config.yaml` as shipped, its endpoint pointed at
/// `socket`, then changed by `edit`.
fn encryption_config(
    dir: &Path,
    name: &str,
    socket: &Path,
    edit: impl FnOnce(String) -> String,
) -> PathBuf {
    let shipped = include_str!("../../deploy/encryption-config.yaml");
    let shipped_endpoint = "endpoint: unix:///var/run/kekd/kms.sock";
    assert_eq!(shipped.matches(shipped_endpoint).count(), 1);
    let text = shipped.replace(
        shipped_endpoint,
        &format!("endpoint: unix://{}", socket.display()),
    );
    let path = dir.join(name);
    fs::write(&path, edit(text)).unwrap();
    path
}

/// `kekd admin doctor ARGS… --output json`: (exit code, report).
async fn doctor(args: &[&str], logs: &Path) -> (i32, serde_json::Value) {
    let mut all = vec!["doctor", "--timeout", "2s"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--output", "json"]);
    let out = admin_async(&all, logs).await;
    (out.code(), json_of(&out))
}

/// The findings of one level.
fn findings(report: &serde_json::Value, level: &str) -> Vec<serde_json::Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["level"] == level)
        .cloned()
        .collect()
}

/// Asserts one failed finding of `check` whose detail contains `detail`
/// and whose fix contains `fix`.
#[track_caller]
fn assert_finding(report: &serde_json::Value, check: &str, detail: &str, fix: &str) {
    let fails = findings(report, "fail");
    assert!(
        fails.iter().any(|f| f["check"] == check
            && f["detail"].as_str().is_some_and(|d| d.contains(detail))
            && f["fix"].as_str().is_some_and(|x| x.contains(fix))),
        "no failed {check:?} finding with detail ~ {detail:?} and fix ~ {fix:?}:\n{report:#}"
    );
}

/// A change to the shipped EncryptionConfiguration's text.
type Edit = fn(String) -> String;

/// A serving kekd for the doctor to look at.
struct DoctorSetup {
    dir: TempDir,
    keyring: PathBuf,
    socket: PathBuf,
    _server: Process,
}

async fn doctor_setup() -> DoctorSetup {
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let socket = dir.path().join("kms.sock");
    let mut server = spawn_serve(&keyring, &socket, dir.path(), &[]).await;
    server.ready().await;
    DoctorSetup {
        dir,
        keyring,
        socket,
        _server: server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_good_setup() {
    let s = doctor_setup().await;
    let config = encryption_config(s.dir.path(), "enc.yaml", &s.socket, |t| t);
    let args = [
        "--keyring",
        p(&s.keyring),
        "--socket",
        p(&s.socket),
        "--encryption-config",
        p(&config),
    ];
    let (code, report) = doctor(&args, s.dir.path()).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["failed"], 0, "{report:#}");
    let checks: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["check"].as_str())
        .collect();
    for check in ["keyring", "keys", "socket", "encryption config", "probe"] {
        assert!(checks.contains(&check), "no {check:?} finding: {report:#}");
    }
    // The text report says the same.
    let mut all = vec!["doctor"];
    all.extend_from_slice(&args);
    let out = admin_async(&all, s.dir.path()).await;
    out.ok();
    assert!(out.stdout.contains(" 0 failed"), "{out:#?}");
    assert!(!out.stdout.contains("FAIL"), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_broken_setup_with_its_fix() {
    let s = doctor_setup().await;
    let dir = s.dir.path();
    let (keyring, socket) = (p(&s.keyring), p(&s.socket));

    // No socket at the path: kekd is not running there.
    let missing = dir.join("missing.sock");
    let (code, report) = doctor(&["--keyring", keyring, "--socket", p(&missing)], dir).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    assert_finding(&report, "socket", "No such file", "start kekd");
    assert_finding(&report, "probe", "connect", "kekd admin probe");

    // A socket every local user may connect to.
    let open = dir.join("open.sock");
    drop(std::os::unix::net::UnixListener::bind(&open).unwrap());
    fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).unwrap();
    let (code, report) = doctor(&["--keyring", keyring, "--socket", p(&open)], dir).await;
    assert_eq!(code, 1, "{report:#}");
    assert_finding(&report, "socket", "mode 0666", "--socket-mode 0600");

    // A keyring other users can read.
    let loose_dir = dir.join("loose");
    fs::create_dir(&loose_dir).unwrap();
    let loose = loose_dir.join("keyring");
    fs::copy(&s.keyring, &loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, report) = doctor(&["--keyring", p(&loose), "--socket", socket], dir).await;
    assert_eq!(code, 1, "{report:#}");
    assert_finding(&report, "keyring", "0644", "");
    let keyring_fail = &findings(&report, "fail")[0];
    assert!(
        keyring_fail["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("chmod 600 {}", p(&loose))),
        "{keyring_fail:#}"
    );
    assert_eq!(
        findings(&report, "fail").len(),
        1,
        "only the keyring: {report:#}"
    );

    // EncryptionConfiguration mistakes, one at a time; everything else is fine.
    let cases: [(&str, Edit, &str, &str); 4] = [
        (
            "no-apiversion.yaml",
            |t| {
                t.lines()
                    .filter(|l| !l.trim_start().starts_with("apiVersion: v2"))
                    .map(|l| format!("{l}\n"))
                    .collect()
            },
            "no apiVersion, which means v1",
            "apiVersion: v2",
        ),
        (
            "elsewhere.yaml",
            |t| {
                t.lines()
                    .map(|l| {
                        if l.trim_start().starts_with("endpoint: ") {
                            "          endpoint: unix:///var/run/other/kms.sock\n".to_owned()
                        } else {
                            format!("{l}\n")
                        }
                    })
                    .collect()
            },
            "not this plugin's socket",
            "endpoint: unix://",
        ),
        (
            "cachesize.yaml",
            |t| {
                t.replace(
                    "          timeout: 3s\n",
                    "          timeout: 3s\n          cachesize: 1000\n",
                )
            },
            "cachesize",
            "remove `cachesize`",
        ),
        (
            "colon.yaml",
            |t| t.replace("name: kekd ", "name: 'ke:kd' "),
            "contains ':'",
            "without ':'",
        ),
    ];
    let unedited =
        fs::read_to_string(encryption_config(dir, "good.yaml", &s.socket, |t| t)).unwrap();
    for (name, edit, detail, fix) in cases {
        let config = encryption_config(dir, name, &s.socket, edit);
        assert_ne!(
            fs::read_to_string(&config).unwrap(),
            unedited,
            "{name} changed nothing"
        );
        let (code, report) = doctor(
            &[
                "--keyring",
                keyring,
                "--socket",
                socket,
                "--encryption-config",
                p(&config),
            ],
            dir,
        )
        .await;
        assert_eq!(code, 1, "{name}: {report:#}");
        assert_eq!(report["ok"], false, "{name}");
        assert_finding(&report, "encryption config", detail, fix);
        assert_eq!(
            findings(&report, "fail").len(),
            1,
            "{name}: only that mistake fails: {report:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fix_for_a_readable_keyring_is_chmod() {
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    fs::set_permissions(&keyring, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, report) = doctor(&["--keyring", p(&keyring)], dir.path()).await;
    assert_eq!(code, 1, "{report:#}");
    assert_finding(
        &report,
        "keyring",
        "0644",
        &format!("chmod 600 {}", p(&keyring)),
    );
}

// ------------------------------------------- the ops listener under attack

/// `GET /livez` on an open keep-alive connection: the status code, or why
/// there was none (the connection was closed).
async fn get_on(stream: &mut TcpStream) -> Result<u16, String> {
    let exchange = async {
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: ops\r\n\r\n")
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {} bytes", raw.len()));
            }
            raw.extend_from_slice(&chunk[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| format!("no content-length in {head:?}"))?;
                if raw.len() >= end + 4 + len {
                    return parse_http(&raw).map(|r| r.status);
                }
            }
        }
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {HTTP_TIMEOUT:?}"))?
}

/// Waits until the peer closes `stream` (EOF or reset); anything it sends
/// first is read and dropped. Panics after [`WAIT`] (a safety net, not a
/// timing assertion: the close is the event waited for).
async fn wait_closed(stream: &mut TcpStream, what: &str) {
    let mut chunk = [0u8; 1024];
    let closed = async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, closed)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {WAIT:?}"));
}

/// At its cap the ops listener closes its oldest connection for a new
/// one: a kubelet probe always gets through a flood of idle connections,
/// and the listener never holds more than the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_cap_the_ops_listener_closes_its_oldest_connection() {
    const CAP: usize = 4;
    let server = InProcess::start_with(|s| {
        s.ops_max_connections = Some(CAP);
        // Long timers: only the cap closes connections here.
        s.ops_header_timeout = Some("1h".to_owned());
        s.ops_connection_lifetime = Some("1h".to_owned());
    })
    .await;
    let mut conns = Vec::new();
    for i in 0..CAP + 2 {
        let mut c = TcpStream::connect(server.ops).await.unwrap();
        // Answered: so accepted, in this order.
        assert_eq!(get_on(&mut c).await, Ok(200), "connection {i}");
        conns.push(c);
    }
    for (i, c) in conns.iter_mut().take(2).enumerate() {
        wait_closed(c, &format!("connection {i}, past the cap")).await;
    }
    // The newest CAP are still served (keep-alive).
    for (i, c) in conns.iter_mut().enumerate().skip(2) {
        assert_eq!(get_on(c).await, Ok(200), "connection {i}, within the cap");
    }
    // The scrape's own connection closes one more.
    let m = server.scrape().await;
    let shed = m.get("kekd_ops_connections_shed_total", &[("reason", "cap")]);
    assert!((2.0..=3.0).contains(&shed), "shed {shed}:\n{}", m.text);
    assert_eq!(
        m.get(
            "kekd_ops_connections_shed_total",
            &[("reason", "fd_exhausted")]
        ),
        0.0
    );
    assert_eq!(m.get("kekd_ops_accept_errors_total", &[]), 0.0);
}

/// Completes the request begun on `stream` with [`PARTIAL_REQUEST`] and
/// reads its answer: the status code, or why there was none.
async fn finish_request(stream: &mut TcpStream) -> Result<u16, String> {
    stream
        .write_all(b"\r\n")
        .await
        .map_err(|e| format!("send the end of the request: {e}"))?;
    read_response(stream).await
}

/// A request head without its final empty line: a request in progress.
const PARTIAL_REQUEST: &[u8] = b"GET /livez HTTP/1.1\r\nHost: ops\r\n";

/// Reads one response (with a content-length) from `stream`: its status.
async fn read_response(stream: &mut TcpStream) -> Result<u16, String> {
    let exchange = async {
        let mut raw = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {} bytes", raw.len()));
            }
            raw.extend_from_slice(&chunk[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| format!("no content-length in {head:?}"))?;
                if raw.len() >= end + 4 + len {
                    return parse_http(&raw).map(|r| r.status);
                }
            }
        }
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {HTTP_TIMEOUT:?}"))?
}

/// At its cap the ops listener closes the oldest *idle* connection: a
/// request in progress (a kubelet probe caught by a flood) on the oldest
/// connection still gets its whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_cap_the_ops_listener_closes_an_idle_connection_before_a_request_in_progress() {
    const CAP: usize = 4;
    let server = InProcess::start_with(|s| {
        s.ops_max_connections = Some(CAP);
        s.ops_header_timeout = Some("1h".to_owned());
        s.ops_connection_lifetime = Some("1h".to_owned());
    })
    .await;
    // The oldest: answered once (so accepted first), then half a request.
    let mut probe_conn = TcpStream::connect(server.ops).await.unwrap();
    assert_eq!(get_on(&mut probe_conn).await, Ok(200));
    probe_conn.write_all(PARTIAL_REQUEST).await.unwrap();
    // The cap filled with idle keep-alive connections, accepted in order.
    let mut idle = Vec::new();
    for i in 1..CAP {
        let mut c = TcpStream::connect(server.ops).await.unwrap();
        assert_eq!(get_on(&mut c).await, Ok(200), "idle connection {i}");
        idle.push(c);
    }
    // One more: answered, so accepted, so one connection was closed.
    let mut newest = TcpStream::connect(server.ops).await.unwrap();
    assert_eq!(get_on(&mut newest).await, Ok(200), "the newest connection");
    // It was the oldest idle one ...
    wait_closed(&mut idle[0], "the oldest idle connection").await;
    // ... and the request in progress completes on the oldest connection.
    assert_eq!(
        finish_request(&mut probe_conn).await,
        Ok(200),
        "the request in progress"
    );
    for (i, c) in idle.iter_mut().enumerate().skip(1) {
        assert_eq!(get_on(c).await, Ok(200), "idle connection {}", i + 1);
    }
    assert_eq!(get_on(&mut newest).await, Ok(200), "the newest connection");
}

/// With no idle connection to close, the cap closes the oldest one (the
/// newest always gets in: a flood of half-sent requests cannot keep a
/// probe out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_cap_with_every_connection_busy_the_ops_listener_closes_the_oldest() {
    const CAP: usize = 3;
    let server = InProcess::start_with(|s| {
        s.ops_max_connections = Some(CAP);
        s.ops_header_timeout = Some("1h".to_owned());
        s.ops_connection_lifetime = Some("1h".to_owned());
    })
    .await;
    let mut busy = Vec::new();
    for i in 0..CAP {
        let mut c = TcpStream::connect(server.ops).await.unwrap();
        assert_eq!(get_on(&mut c).await, Ok(200), "connection {i}");
        c.write_all(PARTIAL_REQUEST).await.unwrap();
        busy.push(c);
    }
    let mut newest = TcpStream::connect(server.ops).await.unwrap();
    assert_eq!(get_on(&mut newest).await, Ok(200), "the newest connection");
    wait_closed(&mut busy[0], "the oldest busy connection").await;
    for (i, c) in busy.iter_mut().enumerate().skip(1) {
        assert_eq!(finish_request(c).await, Ok(200), "connection {i}");
    }
}

/// A kept-alive connection that goes quiet is closed after the header
/// timeout (which bounds the wait for the next request's headers too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_ops_connections_are_closed_by_the_header_timeout() {
    let server = InProcess::start_with(|s| {
        s.ops_header_timeout = Some("200ms".to_owned());
        s.ops_connection_lifetime = Some("1h".to_owned());
    })
    .await;
    let mut idle = TcpStream::connect(server.ops).await.unwrap();
    let mut half = TcpStream::connect(server.ops).await.unwrap();
    half.write_all(b"GET /livez HT").await.unwrap();
    let mut kept = TcpStream::connect(server.ops).await.unwrap();
    assert_eq!(get_on(&mut kept).await, Ok(200));
    wait_closed(&mut idle, "a connection that never sent a byte").await;
    wait_closed(&mut half, "a connection that sent half a request line").await;
    wait_closed(&mut kept, "a kept-alive connection gone quiet").await;
    assert_eq!(probe(server.ops, "/livez").await.0, 200);
}

/// A busy connection ends at its lifetime even while it keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_connection_ends_at_its_lifetime() {
    let server = InProcess::start_with(|s| {
        s.ops_header_timeout = Some("1h".to_owned());
        s.ops_connection_lifetime = Some("300ms".to_owned());
    })
    .await;
    let mut busy = TcpStream::connect(server.ops).await.unwrap();
    // Requests until the listener hangs up: it must, or `WAIT` runs out.
    let ended = async {
        loop {
            if get_on(&mut busy).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, ended)
        .await
        .expect("a busy ops connection outlived its lifetime");
    assert_eq!(probe(server.ops, "/livez").await.0, 200);
}

/// Raises this test process's soft RLIMIT_NOFILE to `want` (or the hard
/// limit, if lower).
fn raise_nofile(want: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    if now.current.unwrap_or(u64::MAX) >= want {
        return;
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want.min(hard)),
            maximum: now.maximum,
        },
    )
    .expect("raise RLIMIT_NOFILE");
}

/// `kekd serve` under `prlimit --nofile=NOFILE` with an ops listener.
async fn serve_at_nofile(nofile: u64, dir: &Path, keyring: &Path, extra: &[&str]) -> Process {
    let socket = dir.join("kms.sock");
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_kekd"))
        .arg("serve")
        .arg("--keyring")
        .arg(keyring)
        .arg("--socket")
        .arg(&socket)
        .args(["--ops-addr", "127.0.0.1:0"])
        .args(extra);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEKD_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    let _guard = common::fs_lock().await;
    Process::spawn(cmd, &socket, dir)
}

/// The apiserver's view: Status every 50 ms with a 100 ms deadline on one
/// connection opened before the attack, from a thread and runtime of its
/// own (so its calls do not queue behind the attack's tasks here).
struct Prober {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Prober {
    async fn start(socket: &Path) -> Self {
        use std::sync::atomic::Ordering;
        let socket = socket.to_owned();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut client = Client::connect(&socket, Duration::from_millis(100))
                    .await
                    .expect("the prober connects");
                client.status().await.expect("first Status");
                let _ = ready_tx.send(());
                let (mut probes, mut failures) = (0, Vec::new());
                while !flag.load(Ordering::Relaxed) {
                    probes += 1;
                    match client.status().await {
                        Ok(s) if s.healthz == "ok" => {}
                        Ok(s) => failures.push(format!("unhealthy {s:?}")),
                        Err(e) => failures.push(format!("{:?} {}", e.code(), e.message())),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (probes, failures)
            })
        });
        ready_rx.await.expect("the prober started");
        Self { stop, thread }
    }

    /// Stops probing; asserts every probe answered healthy in time.
    async fn assert_all_answered(self, what: &str, log: &str) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread;
        let (probes, failures) = tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        assert!(probes >= 1, "{what}: no probe ran");
        assert!(
            failures.is_empty(),
            "{what}: {} of {probes} Status probes failed: {:?}\nkekd's log:\n{log}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );
    }
}

/// kekd at 256 descriptors (so the KMS socket serves at most 128
/// connections and keeps 128 free): a flood of KMS connections at its cap
/// plus 800 ops connections — idle ones and ones that send half a request
/// line and stall — never runs kekd out of descriptors. Status answers
/// throughout, a rotation is still loaded (reading the keyring needs a
/// descriptor), every flood connection is shed or timed out, and a fresh
/// /livez answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_flood_at_a_low_fd_limit_never_starves_the_kms_socket() {
    raise_nofile(8192);
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    let key_id = common::create_keyring(&keyring);
    let mut process = serve_at_nofile(
        256,
        dir.path(),
        &keyring,
        &[
            "--reload-interval",
            "200ms",
            "--ops-max-connections",
            "8",
            "--ops-header-timeout",
            "300ms",
        ],
    )
    .await;
    let client = process.ready().await;
    let ops = ops_addr_of(&process).await;
    let prober = Prober::start(&process.socket).await;

    let mut kms_flood = Vec::new();
    for _ in 0..200 {
        kms_flood.push(
            tokio::net::UnixStream::connect(&process.socket)
                .await
                .unwrap(),
        );
    }
    let mut ops_flood = Vec::new();
    for i in 0..800 {
        let mut c = TcpStream::connect(ops).await.unwrap();
        if i % 2 == 1 {
            c.write_all(b"GET /livez HT").await.unwrap();
        }
        ops_flood.push(c);
    }
    // A rotation while both floods are on: the reload opens the keyring.
    let rotate = admin_async(
        &["rotate", "--promote", "--keyring", p(&keyring)],
        dir.path(),
    )
    .await;
    assert_ok(&rotate, "rotate --promote");
    wait_for_key_id(&client, &self::key_id(&key_id, 2)).await;
    for (i, c) in ops_flood.iter_mut().enumerate() {
        wait_closed(c, &format!("ops flood connection {i}")).await;
    }
    let (status, body) = probe(ops, "/livez").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    prober
        .assert_all_answered("ops flood", &process.stderr())
        .await;
    let m = scrape(ops).await;
    assert_eq!(
        m.get("kekd_ops_accept_errors_total", &[]),
        0.0,
        "the ops listener ran out of descriptors:\n{}",
        process.stderr()
    );
    let log = process.stderr();
    assert!(
        !log.contains("Too many open files"),
        "kekd ran out of descriptors:\n{log}"
    );
    drop(kms_flood);
    assert!(process.try_exit().is_none(), "kekd exited:\n{log}");
}

/// kekd at a descriptor limit below what its ops listener may hold: accept
/// fails with EMFILE over and over. Each failure closes the oldest ops
/// connection and backs off; the log says so at most once per
/// `ACCEPT_ERROR_LOG_EVERY` (10 s) however many failures there are, and
/// the KMS connection keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_on_the_ops_listener_back_off_and_do_not_flood_the_log() {
    const MESSAGE: &str = "ops listener: accept failed";
    const FAILURES: f64 = 20.0;
    raise_nofile(8192);
    let dir = common::tempdir().await;
    let keyring = dir.path().join("keyring");
    common::create_keyring(&keyring);
    let started = std::time::Instant::now();
    // An idle kekd holds about 17 descriptors; 24 leaves room for a handful
    // of ops connections, far fewer than the cap of 32.
    let mut process = serve_at_nofile(
        24,
        dir.path(),
        &keyring,
        &["--reload-interval", "1h", "--ops-header-timeout", "1h"],
    )
    .await;
    let mut client = process.ready().await;
    let ops = ops_addr_of(&process).await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(ops).await.unwrap());
    }
    // The observable event: kekd counted at least FAILURES failed accepts.
    let errors = eventually("failed accepts counted", WAIT, || async move {
        let resp = http_get(ops, "/metrics").await?;
        let m = Exposition::parse(&resp.body);
        let n = m.value("kekd_ops_accept_errors_total", &[]).unwrap_or(0.0);
        if resp.status == 200 && n >= FAILURES {
            Ok(n)
        } else {
            Err(format!("{}: {n} failed accepts", resp.status))
        }
    })
    .await;
    let log = process.stderr();
    let lines = log.lines().filter(|l| l.contains(MESSAGE)).count();
    let periods = started.elapsed().as_secs() / 10;
    assert!(lines >= 1, "no {MESSAGE:?} line:\n{log}");
    assert!(
        u64::try_from(lines).unwrap() <= 1 + periods,
        "{lines} {MESSAGE:?} lines for {errors} failures in {periods} log period(s):\n{log}"
    );
    assert!(log.contains("Too many open files"), "{log}");
    // Each failure closed an ops connection to free a descriptor.
    let m = scrape(ops).await;
    assert!(
        m.get(
            "kekd_ops_connections_shed_total",
            &[("reason", "fd_exhausted")]
        ) >= 1.0,
        "{}",
        m.text
    );
    drop(flood);
    assert_eq!(client.status().await.unwrap().healthz, "ok");
    assert!(process.try_exit().is_none(), "kekd exited:\n{log}");
}
