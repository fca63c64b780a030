//! `kekd admin scan` and `kekd admin retire --scan` against a real etcd
//! (v3.7.3, the binary tests/e2e/run.sh builds): values sealed by a real
//! kekd inside the EncryptedObject the apiserver writes, other providers'
//! prefixes, plaintext objects and garbage; a 100,000-key keyspace read in
//! pages within bounded memory; etcd with TLS client-certificate auth.
//!
//! etcd comes from `KEKD_ETCD_BIN`, else from the e2e cache
//! (`${KEKD_E2E_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kekd-e2e}/bin/etcd-v3.7.3-*/etcd`;
//! `KEKD_E2E_BUILD_ONLY=1 bash tests/e2e/run.sh` builds it). Without it
//! each test fails under `KEKD_REQUIRE_ALL=1` and says SKIPPED otherwise.

use crate::common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kekd::scan::etcd::proto::etcdserverpb::{
    PutRequest, RangeRequest, RequestOp, TxnRequest, kv_client::KvClient, request_op,
};
use serde_json::Value;
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use common::{
    EX_CONFIG, EX_USAGE, TestServer, admin_async, error_message, json_of, kekd, seed, tempdir, uid,
};

/// Every plaintext in this suite contains it; no output may.
const MARKER: &str = "scan-plaintext-marker";

// ------------------------------------------------------------------ etcd

/// The etcd binary, or `None` after saying why (a failure under
/// `KEKD_REQUIRE_ALL=1`).
fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEKD_ETCD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KEKD_ETCD_BIN={} does not exist", p.display());
        return Some(p);
    }
    let cache = std::env::var_os("KEKD_E2E_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
                .join("kekd-e2e")
        });
    let found = fs::read_dir(cache.join("bin"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("etcd-v3.7.3-"))
        .map(|e| e.path().join("etcd"))
        .filter(|p| p.is_file())
        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    if found.is_none() {
        let why = format!(
            "no etcd binary: set KEKD_ETCD_BIN or build it with `KEKD_E2E_BUILD_ONLY=1 bash tests/e2e/run.sh` \
             (looked in {}/bin/etcd-v3.7.3-*/etcd)",
            cache.display()
        );
        common::skip::skip(&why);
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// TLS material for an etcd that requires client certificates.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A real etcd on loopback ports with its data in a tempdir; killed on drop.
struct Etcd {
    child: Child,
    url: String,
    _dir: TempDir,
    tls: Option<Pki>,
}

impl Etcd {
    async fn start(bin: &Path, tls: bool) -> Self {
        let dir = tempdir().await;
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = fs::File::create(dir.path().join("etcd.log")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "scan", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("scan={peer_url}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        let pki = tls.then(|| make_pki(&dir.path().join("pki")));
        if let Some(p) = &pki {
            cmd.arg("--cert-file")
                .arg(p.path("server.crt"))
                .arg("--key-file")
                .arg(p.path("server.key"))
                .arg("--trusted-ca-file")
                .arg(p.path("ca.crt"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut etcd = Self {
            child,
            url,
            _dir: dir,
            tls: pki,
        };
        etcd.wait_ready().await;
        etcd
    }

    /// A KV client of this etcd (connects on its first request).
    async fn client(&self) -> KvClient<Channel> {
        let mut endpoint = Channel::from_shared(self.url.clone())
            .unwrap()
            .timeout(Duration::from_secs(30));
        if let Some(p) = &self.tls {
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(fs::read(p.path("ca.crt")).unwrap()))
                        .identity(Identity::from_pem(
                            fs::read(p.path("client.crt")).unwrap(),
                            fs::read(p.path("client.key")).unwrap(),
                        )),
                )
                .unwrap();
        }
        KvClient::new(endpoint.connect_lazy())
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd exited with {status}:\n{log}");
            }
            if let Ok(mut c) = tokio::time::timeout(Duration::from_secs(2), self.client()).await
                && tokio::time::timeout(Duration::from_secs(2), c.range(get("health-probe")))
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd at {} not ready within 30s",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Puts `pairs` in transactions of 128 (etcd's default --max-txn-ops).
    async fn put_all(&self, pairs: Vec<(String, Vec<u8>)>) {
        let mut client = self.client().await;
        let mut pairs = pairs.into_iter().peekable();
        while pairs.peek().is_some() {
            let ops: Vec<RequestOp> = pairs
                .by_ref()
                .take(128)
                .map(|(k, v)| put_op(k, v))
                .collect();
            client.txn(txn(ops)).await.unwrap();
        }
    }

    /// `--etcd-endpoints URL` plus the TLS flags.
    fn flags(&self) -> Vec<String> {
        let mut f = vec!["--etcd-endpoints".to_owned(), self.url.clone()];
        if let Some(p) = &self.tls {
            for (flag, file) in [
                ("--cacert", "ca.crt"),
                ("--cert", "client.crt"),
                ("--key", "client.key"),
            ] {
                f.push(flag.to_owned());
                f.push(p.path(file).display().to_string());
            }
        }
        f
    }
}

/// A Range request for `key` alone.
fn get(key: &str) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        ..RangeRequest::default()
    }
}

/// A Put request of `value` at `key`.
fn put(key: impl Into<Vec<u8>>, value: Vec<u8>) -> PutRequest {
    PutRequest {
        key: key.into(),
        value,
        ..PutRequest::default()
    }
}

/// A Put as one operation of a transaction.
fn put_op(key: impl Into<Vec<u8>>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put(key, value))),
    }
}

/// A transaction that applies `ops` unconditionally.
fn txn(ops: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        success: ops,
        ..TxnRequest::default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Only the child this test started, by its own handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, etcd's serving certificate for 127.0.0.1, a client certificate,
/// and a second, unrelated CA — made with openssl.
fn make_pki(dir: &Path) -> Pki {
    fs::create_dir_all(dir).unwrap();
    let sh = r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.crt -days 2 -subj /CN=scan-test-ca
openssl req -x509 $ec -keyout other-ca.key -out other-ca.crt -days 2 -subj /CN=another-ca
openssl req $ec -keyout server.key -out server.csr -subj /CN=etcd
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' >server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.crt
openssl req $ec -keyout client.key -out client.crt.csr -subj /CN=kekd-scan
printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n' >client.ext
openssl x509 -req -in client.crt.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.crt
openssl req $ec -keyout stranger.key -out stranger.csr -subj /CN=stranger
openssl x509 -req -in stranger.csr -CA other-ca.crt -CAkey other-ca.key -CAcreateserial -days 2 -extfile client.ext -out stranger.crt
"#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(sh)
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Pki {
        dir: dir.to_owned(),
    }
}

// ------------------------------------------------------------------ values

/// The value kube-apiserver stores: `k8s:enc:kms:v2:<provider>:` and an
/// EncryptedObject (`docs/kms-v2.md` §8 "What the apiserver stores in
/// etcd"), encoded field by field here so the test does not share the
/// decoder's definition.
fn kms_value(provider: &str, key_id: &str, dek: &[u8], data_len: usize) -> Vec<u8> {
    let mut object = Vec::new();
    let mut data = vec![0u8; data_len];
    common::getrandom(&mut data);
    prost::encoding::bytes::encode(1, &data, &mut object);
    prost::encoding::string::encode(2, &key_id.to_owned(), &mut object);
    prost::encoding::bytes::encode(3, &dek.to_vec(), &mut object);
    prost::encoding::int32::encode(5, &1, &mut object);
    let mut value = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    value.extend(object);
    value
}

/// A seed sealed by the running kekd: (ciphertext, key id).
async fn seal(server: &TestServer) -> (Vec<u8>, String) {
    let reply = server
        .client()
        .await
        .encrypt(seed(), &uid(1))
        .await
        .unwrap();
    (reply.ciphertext, reply.key_id)
}

/// Rotates the server's keyring (`kekd admin rotate --promote`) and waits
/// until it serves the new key id.
async fn rotate(server: &TestServer) -> String {
    let k = server.keyring.display().to_string();
    let old = server.client().await.status().await.unwrap().key_id;
    let out = admin_async(&["rotate", "--promote", "--keyring", &k], server.dir.path()).await;
    out.ok();
    common::eventually(
        "the server serves the new key",
        Duration::from_secs(15),
        || async {
            let now = server
                .client()
                .await
                .status()
                .await
                .map_err(|e| e.to_string())?
                .key_id;
            if now == old {
                Err(format!("still {now}"))
            } else {
                Ok(now)
            }
        },
    )
    .await
}

/// `kekd admin scan ARGS…` (outside the runtime's workers).
async fn scan(args: Vec<String>, logs: &Path) -> common::Finished {
    let mut all = vec!["scan".to_owned()];
    all.extend(args);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    admin_async(&refs, logs).await
}

fn count(doc: &Value, path: &[&str]) -> u64 {
    let mut v = doc;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

fn version<'a>(doc: &'a Value, keyring: &str, n: u64) -> &'a Value {
    doc["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["keyring_id"] == keyring && v["version"] == n)
        .unwrap_or_else(|| panic!("no version {n} of {keyring} in {doc:#}"))
}

fn resource<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resource"] == name)
        .unwrap_or_else(|| panic!("no resource {name} in {doc:#}"))
}

fn keyring_id_of(key_id: &str) -> String {
    key_id.split('/').nth(1).unwrap().to_owned()
}

// ------------------------------------------------------------------ tests

/// Every kind of value, counted exactly per resource, provider and version;
/// no value's bytes in any output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_counts_every_kind_of_value() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, false).await;
    let server = TestServer::start_with(|s| s.reload_interval = Some("200ms".to_owned())).await;
    let (ct1, kid1) = seal(&server).await;
    let kid2 = rotate(&server).await;
    let (ct2, kid2b) = seal(&server).await;
    assert_eq!(kid2, kid2b);
    let id = keyring_id_of(&kid1);

    let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..5 {
        pairs.push((
            format!("/registry/secrets/ns1/old-{i}"),
            kms_value("kekd", &kid1, &ct1, 200),
        ));
    }
    for i in 0..3 {
        pairs.push((
            format!("/registry/secrets/ns2/new-{i}"),
            kms_value("kekd", &kid2, &ct2, 200),
        ));
    }
    for i in 0..2 {
        pairs.push((
            format!("/registry/configmaps/ns2/cm-{i}"),
            kms_value("kekd", &kid2, &ct2, 200),
        ));
    }
    pairs.push((
        "/registry/example.com/widgets/ns1/w1".to_owned(),
        kms_value("kekd", &kid1, &ct1, 50),
    ));
    // The key id says version 2, the envelope header version 1.
    pairs.push((
        "/registry/secrets/ns1/mismatch".to_owned(),
        kms_value("kekd", &kid2, &ct1, 50),
    ));
    pairs.push((
        "/registry/secrets/ns3/aes-1".to_owned(),
        b"k8s:enc:aescbc:v1:key1:\x01\x02\x03".to_vec(),
    ));
    pairs.push((
        "/registry/secrets/ns3/aes-2".to_owned(),
        b"k8s:enc:aescbc:v1:key1:\x04\x05\x06".to_vec(),
    ));
    pairs.push((
        "/registry/secrets/ns3/sb".to_owned(),
        b"k8s:enc:secretbox:v1:sb1:\x07".to_vec(),
    ));
    pairs.push((
        "/registry/secrets/ns3/v1".to_owned(),
        b"k8s:enc:kms:v1:legacy:\x08".to_vec(),
    ));
    pairs.push((
        "/registry/secrets/ns3/vault".to_owned(),
        kms_value("vault", "vault-key-7", b"opaque", 50),
    ));
    for ns in ["default", "kube-system", "ns1"] {
        pairs.push((
            format!("/registry/namespaces/{ns}"),
            b"k8s\x00\n\x0f\n\x02v1\x12\tNamespace".to_vec(),
        ));
    }
    pairs.push((
        "/registry/example.com/widgets/ns1/w2".to_owned(),
        format!("{{\"kind\":\"Widget\",\"spec\":\"{MARKER}\"}}").into_bytes(),
    ));
    pairs.push((
        "/registry/secrets/ns3/garbage".to_owned(),
        format!("password={MARKER}").into_bytes(),
    ));
    pairs.push((
        "/registry/secrets/ns3/broken".to_owned(),
        format!("k8s:enc:kms:v2:kekd:{MARKER}").into_bytes(),
    ));
    pairs.push((
        "/other/secrets/x".to_owned(),
        kms_value("kekd", &kid1, &ct1, 10),
    ));
    etcd.put_all(pairs).await;

    let k = server.keyring.display().to_string();
    let mut args = etcd.flags();
    args.extend([
        "--keyring".into(),
        k.clone(),
        "--page-size".into(),
        "4".into(),
        "--output".into(),
        "json".into(),
    ]);
    let out = scan(args, server.dir.path()).await;
    out.ok();
    let doc = json_of(&out);
    assert_eq!(doc["format"], "kekd-scan v1");
    assert_eq!(
        count(&doc, &["keys"]),
        23,
        "the key under /other/ is outside the prefix"
    );
    assert_eq!(count(&doc, &["expected_keys"]), 23);
    assert_eq!(count(&doc, &["pages"]), 6, "23 keys in pages of 4");
    assert_eq!(doc["consistency"], "linearizable");
    assert_eq!(doc["keyring"]["id"], id.as_str());
    assert_eq!(
        doc["totals"],
        serde_json::json!({
            "aescbc:v1:key1": 2, "identity": 4, "kms:v1:legacy": 1, "kms:v2:kekd": 12,
            "kms:v2:vault": 1, "secretbox:v1:sb1": 1, "unparseable": 2
        })
    );
    let v1 = version(&doc, &id, 1);
    assert_eq!(
        (count(v1, &["objects"]), count(v1, &["header_mismatches"])),
        (6, 1)
    );
    assert_eq!(v1["state"], "decrypt-only");
    assert_eq!(
        v1["resources"],
        serde_json::json!({"secrets": 5, "widgets.example.com": 1})
    );
    let v2 = version(&doc, &id, 2);
    assert_eq!(
        (count(v2, &["objects"]), count(v2, &["header_mismatches"])),
        (6, 0)
    );
    assert_eq!(v2["state"], "primary");
    assert_eq!(
        v2["resources"],
        serde_json::json!({"configmaps": 2, "secrets": 4})
    );
    let secrets = resource(&doc, "secrets");
    assert_eq!(count(secrets, &["objects"]), 16);
    assert_eq!(count(secrets, &["providers", "kms:v2:kekd"]), 9);
    assert_eq!(count(secrets, &["key_ids", &kid1]), 5);
    assert_eq!(count(secrets, &["key_ids", &kid2]), 4);
    assert_eq!(count(secrets, &["key_ids", "vault-key-7"]), 1);
    assert_eq!(
        count(resource(&doc, "namespaces"), &["providers", "identity"]),
        3
    );
    let widgets = resource(&doc, "widgets.example.com");
    assert_eq!(
        widgets["providers"],
        serde_json::json!({"identity": 1, "kms:v2:kekd": 1})
    );
    assert_eq!(count(&doc, &["mismatch_total"]), 1);
    assert_eq!(
        doc["mismatches"][0]["key"],
        "/registry/secrets/ns1/mismatch"
    );
    assert_eq!(doc["mismatches"][0]["header"], "version 1");
    let unparseable: Vec<(String, String)> = doc["unparseable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["key"].as_str().unwrap().to_owned(),
                p["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(unparseable.len(), 2);
    assert_eq!(unparseable[0].0, "/registry/secrets/ns3/broken");
    assert!(
        unparseable[0]
            .1
            .starts_with("k8s:enc:kms:v2:kekd: the EncryptedObject does not parse"),
        "{unparseable:?}"
    );
    assert_eq!(
        unparseable[1],
        (
            "/registry/secrets/ns3/garbage".to_owned(),
            "neither a k8s:enc: prefix nor a Kubernetes serialization (protobuf, JSON, CBOR)"
                .to_owned()
        )
    );

    // The same in text: the table, the versions with states, the problems.
    let mut args = etcd.flags();
    args.extend(["--keyring".into(), k]);
    let text = scan(args, server.dir.path()).await;
    text.ok();
    for needle in [
        "23 keys",
        &format!("key_id {kid1}  5"),
        "kms:v2:kekd (ours)",
        "WARNING: 1 kekd value(s) whose key id and envelope header disagree",
        "/registry/secrets/ns1/mismatch  key_id v2, header version 1",
        "2 value(s) are in no known form (listed by key; values are never shown):",
    ] {
        assert!(
            text.stdout.contains(needle),
            "{needle:?} not in:\n{}",
            text.stdout
        );
    }
    assert!(
        text.stdout
            .lines()
            .any(|l| l.split_whitespace().eq(["unparseable", "2"])),
        "no totals line for 2 unparseable values:\n{}",
        text.stdout
    );
    for o in [&out, &text] {
        assert!(
            !o.stdout.contains(MARKER) && !o.stderr.contains(MARKER),
            "a value leaked: {o:#?}"
        );
    }
    // The report is the product: a stdout that cannot take it fails the scan.
    let full = kekd()
        .args(["admin", "scan", "--output", "json"])
        .args(etcd.flags())
        .stdout(
            fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1), "{full:?}");
    assert_eq!(
        String::from_utf8_lossy(&full.stderr),
        "kekd: error: the scan finished, but its report could not be written to stdout: \
         No space left on device (os error 28)\n"
    );
    assert!(
        text.stderr.is_empty(),
        "no progress line when stderr is not a terminal: {:?}",
        text.stderr
    );
}

/// `retire --scan`: refused (even with --force) while objects reference the
/// version, naming them and the migration; refused for stale, foreign and
/// non-scan files; done once a fresh scan shows the version unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_with_scan_refuses_a_version_still_in_use() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, false).await;
    let server = TestServer::start_with(|s| s.reload_interval = Some("200ms".to_owned())).await;
    let logs = server.dir.path().to_owned();
    let k = server.keyring.display().to_string();
    let (ct1, kid1) = seal(&server).await;
    let kid2 = rotate(&server).await;
    let (ct2, _) = seal(&server).await;
    let names: Vec<String> = (0..7)
        .map(|i| format!("/registry/secrets/default/s-{i}"))
        .collect();
    etcd.put_all(
        names
            .iter()
            .map(|n| (n.clone(), kms_value("kekd", &kid1, &ct1, 100)))
            .collect(),
    )
    .await;
    etcd.put_all(vec![(
        "/registry/configmaps/default/c".to_owned(),
        kms_value("kekd", &kid2, &ct2, 100),
    )])
    .await;

    let scan_to = |file: PathBuf| {
        let (etcd_flags, k, logs) = (etcd.flags(), k.clone(), logs.clone());
        async move {
            let mut args = etcd_flags;
            args.extend(["--keyring".into(), k, "--output".into(), "json".into()]);
            let out = scan(args, &logs).await;
            out.ok();
            fs::write(&file, &out.stdout).unwrap();
            file.display().to_string()
        }
    };
    let first = scan_to(logs.join("scan-1.json")).await;
    let out = admin_async(
        &["retire", "1", "--scan", &first, "--force", "--keyring", &k],
        &logs,
    )
    .await;
    out.exited(1);
    let msg = error_message(&out);
    assert!(
        msg.starts_with("retire refused: 7 stored object(s) under /registry/ still reference version 1 (scan of "),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "), e.g. {}. Rewrite them under the current key: ",
            names[..5].join(", ")
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with(
            "`kubectl get secrets -A -o json | kubectl replace -f -`; then scan again and retire with the new result"
        ),
        "{msg}"
    );
    let list = admin_async(&["list", "--keyring", &k, "--output", "json"], &logs).await;
    assert_eq!(
        json_of(&list)["versions"][0]["state"],
        "decrypt-only",
        "nothing changed"
    );

    // Stale (edited to 25 hours old), of another keyring, not a scan.
    let mut doc: Value = serde_json::from_str(&fs::read_to_string(&first).unwrap()).unwrap();
    let old = kekd::id::Timestamp::from_unix(kekd::id::Timestamp::now().unix() - 25 * 3600);
    doc["finished_at"] = Value::String(old.to_string());
    let stale = logs.join("stale.json");
    fs::write(&stale, doc.to_string()).unwrap();
    let before = kekd::id::Timestamp::now().unix();
    let out = admin_async(
        &[
            "retire",
            "1",
            "--scan",
            stale.to_str().unwrap(),
            "--keyring",
            &k,
        ],
        &logs,
    )
    .await;
    let after = kekd::id::Timestamp::now().unix();
    out.exited(1);
    // The age is the scan's as the command's clock read it, some moment
    // between `before` and `after` ("1day 1h", or a few seconds more on a
    // slow host).
    let refusal = |now: u64| {
        format!(
            "retire refused: the scan in {} finished at {old} ({} ago): a scan older than 24h may miss objects \
             written since; run `kekd admin scan` again and pass the fresh result",
            stale.display(),
            humantime::format_duration(Duration::from_secs(now - old.unix()))
        )
    };
    let message = error_message(&out);
    assert!(
        (before..=after).any(|now| message == refusal(now)),
        "{message:?} is none of {:#?}",
        (before..=after).map(refusal).collect::<Vec<_>>()
    );
    let other = logs.join("other-keyring");
    let other_kid = common::create_keyring(&other);
    let out = admin_async(
        &["rotate", "--promote", "--keyring", other.to_str().unwrap()],
        &logs,
    )
    .await;
    out.ok();
    let out = admin_async(
        &[
            "retire",
            "1",
            "--scan",
            &first,
            "--keyring",
            other.to_str().unwrap(),
        ],
        &logs,
    )
    .await;
    assert_eq!(
        out.refused(1),
        format!(
            "retire refused: the scan in {first} was matched against keyring {}, but this keyring is {}: scan with \
             --keyring (or --config) naming this keyring",
            keyring_id_of(&kid1),
            keyring_id_of(&other_kid)
        )
    );
    let junk = logs.join("junk.json");
    fs::write(&junk, "{\"keys\": 3}").unwrap();
    let out = admin_async(
        &[
            "retire",
            "1",
            "--scan",
            junk.to_str().unwrap(),
            "--keyring",
            &k,
        ],
        &logs,
    )
    .await;
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "{0} is not a kekd scan result (no \"format\": \"kekd-scan v1\" field); write one with \
             `kekd admin scan … --output json > {0}`",
            junk.display()
        )
    );

    // The migration: every object rewritten under the current key.
    etcd.put_all(
        names
            .iter()
            .map(|n| (n.clone(), kms_value("kekd", &kid2, &ct2, 100)))
            .collect(),
    )
    .await;
    let second = scan_to(logs.join("scan-2.json")).await;
    let out = admin_async(
        &[
            "retire",
            "1",
            "--scan",
            &second,
            "--keyring",
            &k,
            "--output",
            "json",
        ],
        &logs,
    )
    .await;
    out.ok();
    assert_eq!(json_of(&out)["transitions"][0]["to"], "retired");
    assert!(
        out.stderr.contains(
            "found no object under version 1 (8 object(s) under this keyring's other versions)"
        ),
        "{out:#?}"
    );
    // The primary is never retired, scan or not.
    let out = admin_async(&["retire", "2", "--scan", &second, "--keyring", &k], &logs).await;
    out.exited(1);
    assert!(
        error_message(&out).contains("the primary cannot be retired"),
        "{out:#?}"
    );
}

/// The case this guard exists for: version 2 was primary and encrypted, but
/// never served a Decrypt (the apiserver caches the seeds it made). After
/// the next rotation `retire 2` must not go by that zero: refused, naming
/// the procedure that clears it; `--scan` with objects under 2 refused; a
/// fresh scan with none allowed; `--force` allowed, stating the risk in
/// text, JSON and audit. A version never promoted retires by its usage as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_encrypted_is_retired_only_on_a_scan_or_by_force() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, false).await;
    let server = TestServer::start_with(|s| {
        s.reload_interval = Some("200ms".to_owned());
        // The test waits for a flush of the usage counters.
        s.usage_flush_interval = Some("100ms".to_owned());
    })
    .await;
    let logs = server.dir.path().to_owned();
    let k = server.keyring.display().to_string();
    let kid2 = rotate(&server).await;
    let (ct2, sealed_kid) = seal(&server).await;
    assert_eq!(sealed_kid, kid2, "Encrypt under version 2");
    let kid3 = rotate(&server).await;
    let (ct3, _) = seal(&server).await;
    // What the apiserver stored under version 2, in both resources the
    // shipped EncryptionConfiguration encrypts.
    etcd.put_all(vec![
        (
            "/registry/secrets/default/s".to_owned(),
            kms_value("kekd", &kid2, &ct2, 100),
        ),
        (
            "/registry/configmaps/default/c".to_owned(),
            kms_value("kekd", &kid2, &ct2, 100),
        ),
    ])
    .await;
    // Version 2 served Encrypt and no Decrypt.
    let list = common::eventually(
        "the usage file counts v2's Encrypt",
        Duration::from_secs(15),
        || {
            let (k, logs) = (k.clone(), logs.clone());
            async move {
                let doc = json_of(
                    &admin_async(&["list", "--keyring", &k, "--output", "json"], &logs).await,
                );
                if doc["versions"][1]["encrypts"].as_u64() > Some(0) {
                    Ok(doc)
                } else {
                    Err(doc.to_string())
                }
            }
        },
    )
    .await;
    assert_eq!(list["versions"][1]["decrypts"], 0, "{list}");
    let promoted = list["versions"][1]["promoted"].as_str().unwrap().to_owned();
    let keyring_bytes = fs::read(&server.keyring).unwrap();

    // 1. Following the old hint literally: refused, with the procedure.
    let out = admin_async(&["retire", "2", "--keyring", &k], &logs).await;
    out.exited(1);
    assert_eq!(
        out.stderr,
        format!(
            "kekd: error: retire refused: version 2 was primary (since {promoted}), so objects may be stored under \
             it although it served no Decrypt: an apiserver caches the seeds it made itself and only decrypts them \
             after a restart, so Decrypt counts prove nothing for this version. Retire it only with a fresh scan \
             that shows nothing stored under it (--scan), or pass --force to retire it anyway (objects stored under \
             version 2 become unreadable until `kekd admin restore 2`). The procedure:\n\
             \x20 1. rewrite every resource your EncryptionConfiguration encrypts with kekd (the shipped \
             deploy/encryption-config.yaml: secrets and configmaps; pass --encryption-config FILE to list yours):\n\
             \x20      kubectl get secrets -A -o json | kubectl replace -f -\n\
             \x20      kubectl get configmaps -A -o json | kubectl replace -f -\n\
             \x20 2. scan etcd (the apiserver's etcd client certificate; it must show 0 objects under version 2):\n\
             \x20      kekd admin scan --etcd-endpoints URL --cacert FILE --cert FILE --key FILE --keyring {k} \
             --output json > scan.json\n\
             \x20 3. on every node (copy scan.json there):\n\
             \x20      kekd admin retire 2 --scan scan.json --keyring {k}\n"
        )
    );
    assert_eq!(out.stdout, "");
    let out = admin_async(&["retire", "2", "--keyring", &k, "--output", "json"], &logs).await;
    out.exited(1);
    let doc = json_of(&out);
    assert_eq!(doc["exit_code"], 1);
    assert_eq!(
        doc["procedure"],
        serde_json::json!({
            "version": 2,
            "resources": ["secrets", "configmaps"],
            "resources_from": null,
            "migrate": [
                "kubectl get secrets -A -o json | kubectl replace -f -",
                "kubectl get configmaps -A -o json | kubectl replace -f -",
            ],
            "scan": format!("kekd admin scan --etcd-endpoints URL --cacert FILE --cert FILE --key FILE --keyring {k} --output json > scan.json"),
            "retire": format!("kekd admin retire 2 --scan scan.json --keyring {k}"),
        })
    );
    assert_eq!(
        fs::read(&server.keyring).unwrap(),
        keyring_bytes,
        "a refusal changed the keyring"
    );

    // 2. A fresh scan that still sees objects under 2: refused.
    let scan_to = |file: PathBuf| {
        let (etcd_flags, k, logs) = (etcd.flags(), k.clone(), logs.clone());
        async move {
            let mut args = etcd_flags;
            args.extend(["--keyring".into(), k, "--output".into(), "json".into()]);
            let out = scan(args, &logs).await;
            out.ok();
            fs::write(&file, &out.stdout).unwrap();
            file.display().to_string()
        }
    };
    let first = scan_to(logs.join("scan-1.json")).await;
    let out = admin_async(&["retire", "2", "--scan", &first, "--keyring", &k], &logs).await;
    out.exited(1);
    let msg = error_message(&out);
    assert!(
        msg.starts_with("retire refused: 2 stored object(s) under /registry/ still reference version 2 (scan of "),
        "{msg}"
    );
    assert!(
        msg.ends_with(
            "`kubectl get configmaps,secrets -A -o json | kubectl replace -f -`; then scan again and retire with the \
             new result"
        ),
        "{msg}"
    );
    assert_eq!(
        fs::read(&server.keyring).unwrap(),
        keyring_bytes,
        "a refusal changed the keyring"
    );

    // 3. Migrated and scanned again: nothing under 2, retired.
    etcd.put_all(vec![
        (
            "/registry/secrets/default/s".to_owned(),
            kms_value("kekd", &kid3, &ct3, 100),
        ),
        (
            "/registry/configmaps/default/c".to_owned(),
            kms_value("kekd", &kid3, &ct3, 100),
        ),
    ])
    .await;
    let second = scan_to(logs.join("scan-2.json")).await;
    let out = admin_async(&["retire", "2", "--scan", &second, "--keyring", &k], &logs).await;
    out.ok();
    assert!(!out.stdout.contains("warning:"), "{out:#?}");
    let out = admin_async(&["restore", "2", "--keyring", &k], &logs).await;
    out.ok();

    // 4. --force without a scan: done, and the risk is stated everywhere.
    let risk = "retired without a scan: objects stored under version 2 become unreadable (at the latest when an \
                apiserver restarts) until `kekd admin restore 2`";
    let out = admin_async(&["retire", "2", "--force", "--keyring", &k], &logs).await;
    out.ok();
    assert!(
        out.stdout.contains(&format!("\nwarning: {risk}\n")),
        "{out:#?}"
    );
    let out = admin_async(&["restore", "2", "--keyring", &k], &logs).await;
    out.ok();
    let out = admin_async(
        &[
            "retire",
            "2",
            "--force",
            "--keyring",
            &k,
            "--output",
            "json",
        ],
        &logs,
    )
    .await;
    out.ok();
    assert_eq!(json_of(&out)["risk"], risk);
    let audit = fs::read_to_string(logs.join("keyring.audit.jsonl")).unwrap();
    let retires: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["command"] == "retire")
        .collect();
    assert_eq!(retires.len(), 3, "{audit}");
    assert!(
        retires[0].get("risk").is_none(),
        "the scanned retire risks nothing: {audit}"
    );
    for r in &retires[1..] {
        assert_eq!(r["risk"], risk, "{audit}");
        assert_eq!(r["overrides"], serde_json::json!(["--force"]), "{audit}");
    }

    // 5. A version never promoted retires by its usage, without a scan.
    let out = admin_async(&["rotate", "--keyring", &k], &logs).await;
    out.ok();
    let out = admin_async(&["retire", "4", "--keyring", &k], &logs).await;
    out.ok();
    assert!(!out.stdout.contains("warning:"), "{out:#?}");
}

/// 100,000 keys of ~3 KiB (about 300 MiB of values): the scan reads them
/// in 100 pages of 1,000 and its peak RSS stays under 64 MiB — a fifth of
/// the data, so a scan that held the values would fail. A page is ~3 MiB
/// (held once as the response, once decoded), the process itself (runtime,
/// TLS, clap) ~15 MiB; measured here: under 20 MiB, which leaves the bound
/// room for allocator slack on another machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_keyspace_is_read_in_pages_within_bounded_memory() {
    const KEYS: usize = 100_000;
    const DATA: usize = 3_000;
    const BOUND: u64 = 64 * 1024 * 1024;
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, false).await;
    let server = TestServer::start().await;
    let (ct, kid) = seal(&server).await;
    let t = Instant::now();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = etcd.client().await;
        let (ct, kid) = (ct.clone(), kid.clone());
        writers.push(tokio::spawn(async move {
            for chunk in (w * KEYS / 4..(w + 1) * KEYS / 4)
                .collect::<Vec<_>>()
                .chunks(128)
            {
                let ops: Vec<RequestOp> = chunk
                    .iter()
                    .map(|i| {
                        put_op(
                            format!("/registry/secrets/ns-{}/s-{i:06}", i % 50),
                            kms_value("kekd", &kid, &ct, DATA),
                        )
                    })
                    .collect();
                client.txn(txn(ops)).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    eprintln!("wrote {KEYS} keys in {:.1}s", t.elapsed().as_secs_f64());

    let logs = server.dir.path();
    let stdout = logs.join("big-scan.json");
    let mut cmd = kekd();
    cmd.args(["admin", "scan", "--page-size", "1000", "--output", "json"])
        .args(etcd.flags())
        .arg("--keyring")
        .arg(&server.keyring)
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    // VmHWM only grows: the last value read before the exit is the peak so far.
    let status_file = format!("/proc/{}/status", child.id());
    let mut observed = 0u64;
    let status = loop {
        if let Ok(s) = fs::read_to_string(&status_file)
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            observed = observed.max(kib * 1024);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "scan of {KEYS} keys did not finish in 300s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = t.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "scan failed: {stderr}");
    let doc: Value = serde_json::from_str(&fs::read_to_string(&stdout).unwrap()).unwrap();
    let reported = count(&doc, &["peak_rss_bytes"]);
    eprintln!(
        "scanned {} keys ({} MiB of values) in {} pages in {:.1}s; peak RSS {:.1} MiB reported, {:.1} MiB observed",
        doc["keys"],
        count(&doc, &["value_bytes"]) / (1024 * 1024),
        doc["pages"],
        elapsed.as_secs_f64(),
        reported as f64 / 1048576.0,
        observed as f64 / 1048576.0
    );
    assert_eq!(count(&doc, &["keys"]), KEYS as u64);
    assert_eq!(count(&doc, &["pages"]), 100);
    assert_eq!(count(&doc, &["final_page_size"]), 1000);
    assert!(
        count(&doc, &["value_bytes"]) > 4 * BOUND,
        "the keyspace must dwarf the bound"
    );
    let id = keyring_id_of(&kid);
    assert_eq!(count(version(&doc, &id, 1), &["objects"]), KEYS as u64);
    assert_eq!(count(resource(&doc, "secrets"), &["objects"]), KEYS as u64);
    assert!(observed > 0, "never read the scan's VmHWM");
    // The scan reads its own VmHWM before it writes the report, so the
    // value observed from outside until it exits may be a little higher.
    assert!(reported > 0, "the scan reported no peak RSS");
    assert!(
        observed < BOUND,
        "observed peak RSS {observed} bytes is over {BOUND}"
    );
    assert!(
        reported < BOUND,
        "peak RSS {reported} bytes is over {BOUND}"
    );
}

/// etcd requiring client certificates: the scan authenticates with
/// --cacert/--cert/--key; a wrong CA, a missing or untrusted client
/// certificate, and TLS flags on http:// each get a message naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_and_clear_errors() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, true).await;
    let server = TestServer::start().await;
    let (ct, kid) = seal(&server).await;
    etcd.put_all(
        (0..3)
            .map(|i| {
                (
                    format!("/registry/secrets/tls/s{i}"),
                    kms_value("kekd", &kid, &ct, 100),
                )
            })
            .collect(),
    )
    .await;
    let logs = server.dir.path().to_owned();
    let pki = etcd.tls.as_ref().unwrap();
    let p = |f: &str| pki.path(f).display().to_string();

    let mut args = etcd.flags();
    args.extend(["--output".into(), "json".into()]);
    let out = scan(args, &logs).await;
    out.ok();
    let doc = json_of(&out);
    assert_eq!(count(&doc, &["totals", "kms:v2:kekd"]), 3);
    assert_eq!(doc["consistency"], "linearizable");
    // Serializable reads: the member's own copy, said so in the report.
    let mut args = etcd.flags();
    args.extend(["--serializable".into(), "--output".into(), "json".into()]);
    let out = scan(args, &logs).await;
    out.ok();
    let doc = json_of(&out);
    assert_eq!(count(&doc, &["totals", "kms:v2:kekd"]), 3);
    assert_eq!(doc["consistency"], "serializable");

    let url = etcd.url.clone();
    let base = |cacert: String, cert: &str, key: &str| {
        let mut a = vec![
            "--etcd-endpoints".to_owned(),
            url.clone(),
            "--cacert".to_owned(),
            cacert,
        ];
        if !cert.is_empty() {
            a.extend(["--cert".to_owned(), p(cert), "--key".to_owned(), p(key)]);
        }
        a.extend(["--timeout".to_owned(), "5s".to_owned()]);
        a
    };
    // A CA that did not sign etcd's certificate.
    let out = scan(base(p("other-ca.crt"), "client.crt", "client.key"), &logs).await;
    out.exited(1);
    let msg = error_message(&out);
    assert!(msg.starts_with(&format!("etcd at {url}: ")), "{msg}");
    assert!(
        msg.ends_with(&format!(
            " — etcd's certificate is not signed by --cacert {}: pass the CA of etcd's serving certificate \
             (kubeadm: /etc/kubernetes/pki/etcd/ca.crt)",
            p("other-ca.crt")
        )),
        "{msg}"
    );
    // No client certificate, and one from a CA etcd does not trust.
    for (cert, key, hint) in [
        (
            "",
            "",
            " — etcd requires a client certificate: pass --cert and --key of one it trusts \
             (kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt and .key)"
                .to_owned(),
        ),
        (
            "stranger.crt",
            "stranger.key",
            format!(
                " — etcd refused the client certificate --cert {}: pass --cert and --key of one it trusts \
                 (kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt and .key)",
                p("stranger.crt")
            ),
        ),
    ] {
        let out = scan(base(p("ca.crt"), cert, key), &logs).await;
        out.exited(1);
        let msg = error_message(&out);
        assert!(msg.starts_with(&format!("etcd at {url}: ")), "{msg}");
        assert!(msg.ends_with(&hint), "client cert {cert:?}: {msg}");
    }
    // Usage errors: TLS flags on http://, https:// without a CA, no scheme, --cert without --key.
    let cases: Vec<(Vec<String>, i32, String)> = vec![
        (
            vec!["--etcd-endpoints".into(), "http://127.0.0.1:1".into(), "--cacert".into(), p("ca.crt")],
            EX_USAGE,
            "--cacert/--cert/--key are for https:// endpoints; --etcd-endpoints lists only http:// ones".into(),
        ),
        (
            vec!["--etcd-endpoints".into(), url.clone()],
            EX_USAGE,
            "https:// endpoints need --cacert FILE, the CA of etcd's serving certificate (kubeadm: /etc/kubernetes/pki/etcd/ca.crt)".into(),
        ),
        (
            vec!["--etcd-endpoints".into(), "127.0.0.1:2379".into()],
            EX_USAGE,
            "--etcd-endpoints \"127.0.0.1:2379\": write the URL with its scheme, e.g. https://127.0.0.1:2379 (the apiserver's --etcd-servers)".into(),
        ),
        (
            vec!["--etcd-endpoints".into(), url.clone(), "--cacert".into(), "/nonexistent/ca.crt".into()],
            EX_CONFIG,
            "cannot read --cacert /nonexistent/ca.crt: No such file or directory (os error 2)".into(),
        ),
    ];
    for (args, code, want) in cases {
        let out = scan(args, &logs).await;
        assert_eq!(
            (out.code(), error_message(&out)),
            (code, want.as_str()),
            "{out:#?}"
        );
    }
    let out = scan(
        vec![
            "--etcd-endpoints".into(),
            url,
            "--cert".into(),
            p("client.crt"),
        ],
        &logs,
    )
    .await;
    assert_eq!(out.code(), EX_USAGE, "{out:#?}");
    assert!(out.stderr.contains("--key <FILE>"), "{out:#?}");
}

/// A page larger than the scan's 64 MiB message limit (60 values of
/// 1.4 MiB, etcd's largest accepted is 1.5 MiB) is asked for again with
/// half as many keys, and the scan still reads every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_pages_are_halved() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, false).await;
    let server = TestServer::start().await;
    let (ct, kid) = seal(&server).await;
    let mut client = etcd.client().await;
    for i in 0..60 {
        let value = kms_value("kekd", &kid, &ct, 1_400_000);
        client
            .put(put(format!("/registry/secrets/big/s-{i:02}"), value))
            .await
            .unwrap();
    }
    let mut args = etcd.flags();
    args.extend([
        "--page-size".into(),
        "60".into(),
        "--output".into(),
        "json".into(),
    ]);
    let out = scan(args, server.dir.path()).await;
    out.ok();
    let doc = json_of(&out);
    assert_eq!(count(&doc, &["keys"]), 60);
    assert_eq!(count(&doc, &["page_size"]), 60);
    assert_eq!(
        count(&doc, &["final_page_size"]),
        30,
        "84 MB in one page is over 64 MiB; 42 MB is not"
    );
    assert_eq!(count(&doc, &["pages"]), 2);
    assert_eq!(count(&doc, &["totals", "kms:v2:kekd"]), 60);
}

/// On a terminal (a pty from util-linux `script`), stderr shows a progress
/// line per page that is cleared before the report; off a terminal there is
/// none (checked in `scan_counts_every_kind_of_value`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_line_only_on_a_terminal() {
    let Some(bin) = etcd_binary() else { return };
    if Command::new("script").arg("--version").output().is_err() {
        common::skip::skip("util-linux `script` is missing (apt-get install bsdutils)");
        return;
    }
    let etcd = Etcd::start(&bin, false).await;
    let server = TestServer::start().await;
    let (ct, kid) = seal(&server).await;
    etcd.put_all(
        (0..40)
            .map(|i| {
                (
                    format!("/registry/secrets/p/s{i:02}"),
                    kms_value("kekd", &kid, &ct, 10),
                )
            })
            .collect(),
    )
    .await;
    let scan = format!(
        "{} admin scan --etcd-endpoints {} --page-size 10 >/dev/null",
        env!("CARGO_BIN_EXE_kekd"),
        etcd.url
    );
    // `script` runs the command on a pty and copies what it writes to its own stdout.
    let out = Command::new("script")
        .args(["-qec", &scan, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(
        tty.contains("\r\x1b[Kscanning: 10/40 keys (25%), 1 pages"),
        "{tty:?}"
    );
    assert!(
        tty.ends_with("\r\x1b[K"),
        "the progress line is not cleared: {tty:?}"
    );
}

/// Key ids, keys and resource names come from etcd, where anyone who can
/// write to it (or to the apiserver's storage) chooses them: the human
/// report shows them escaped (`\x1b`, `\x0a`, `\xNN`, `\u{202e}`), so a
/// stored key id cannot clear the admin's terminal or forge report lines.
/// The JSON report keeps the exact strings (serde escapes them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_strings_from_etcd_are_printed_escaped() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = Etcd::start(&bin, false).await;
    let dir = tempdir().await;
    let hostile_id = "evil\x1b[2J\nkekd/00000000000000000000000000000000/v1 forged\u{202e}";
    let mut client = etcd.client().await;
    client
        .put(put(
            "/registry/secrets/ns/\x1b]0;pwned\x07x".as_bytes().to_vec(),
            kms_value("other", hostile_id, b"opaque", 20),
        ))
        .await
        .unwrap();
    client
        .put(put(
            b"/registry/se\x1b[31mcrets\xff/ns/y".to_vec(),
            b"k8s:enc:kms:v2:other:\x00garbage".to_vec(),
        ))
        .await
        .unwrap();

    let out = scan(etcd.flags(), dir.path()).await;
    out.ok();
    for raw in ['\x1b', '\x07', '\u{202e}', '\u{fffd}'] {
        assert!(
            !out.stdout.contains(raw) && !out.stderr.contains(raw),
            "{raw:?} printed raw:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains(
            "key_id evil\\x1b[2J\\x0akekd/00000000000000000000000000000000/v1 forged\\u{202e}  1"
        ),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("kekd/")),
        "a forged line:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("se\\x1b[31mcrets\\xff"),
        "{}",
        out.stdout
    );

    let mut args = etcd.flags();
    args.extend(["--output".to_owned(), "json".to_owned()]);
    let out = scan(args, dir.path()).await;
    out.ok();
    assert!(!out.stdout.contains('\x1b'), "{}", out.stdout);
    let doc = json_of(&out);
    assert_eq!(
        resource(&doc, "secrets")["key_ids"][hostile_id],
        1,
        "the JSON report keeps the exact key id: {doc:#}"
    );
}

/// A FIFO named as a TLS file (`--cacert`, `--cert`, `--key`) is refused at
/// once, by flag and path, before any connection: a plain read would wait
/// for a writer forever. No etcd is needed to reach the read.
#[test]
fn a_fifo_named_as_a_tls_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.pem");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let pem = dir.path().join("ca.crt");
    fs::write(&pem, "not checked before the connection\n").unwrap();
    let (f, c) = (fifo.to_str().unwrap(), pem.to_str().unwrap());
    for (args, flag) in [
        (vec!["--cacert", f], "--cacert"),
        (vec!["--cacert", c, "--cert", f, "--key", c], "--cert"),
        (vec!["--cacert", c, "--cert", c, "--key", f], "--key"),
    ] {
        let mut all = vec!["scan", "--etcd-endpoints", "https://127.0.0.1:1"];
        all.extend(args);
        let out = common::admin(&all, dir.path());
        assert_eq!(
            (out.code(), error_message(&out)),
            (
                EX_CONFIG,
                format!(
                    "cannot read {flag} {f}: it is a FIFO, not a regular file; nothing was read from it: give \
                     {flag} the PEM file itself"
                )
                .as_str()
            ),
            "{out:#?}"
        );
    }
}
