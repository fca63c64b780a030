//! Two control-plane nodes, each running `kekd serve` (the binary) on its own
//! copy of the keyring, through the staged rotation of docs/rotation.md:
//! rotate on A → import on B → promote on A, then B → retire on both →
//! destroy. After every step each node decrypts everything either node
//! encrypted (except what that node legitimately retired), and each node's
//! Status reports the expected key id. `import` refuses damaged and older
//! copies and is a no-op for an identical one.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::Signal;
use tempfile::TempDir;
use tonic::Code;

use kekd::backend::local::keyring_from_file;
use kekd::client::Client;
use kekd::id::{KeyVersion, Timestamp};
use kekd::keyring::store;
use kekd::secret::Plaintext;

use common::{
    EX_CONFIG, Finished, Process, admin_async, error_message, eventually, header_version, json_of,
    seed, spawn_serve, tempdir, uid, version_of,
};

const WAIT: Duration = Duration::from_secs(15);

/// A ciphertext, what it seals, under which key, and who made it.
#[derive(Debug, Clone)]
struct Sealed {
    by: &'static str,
    key_id: String,
    version: u32,
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
}

/// One control-plane node: a directory, its keyring, its kekd.
struct Node {
    name: &'static str,
    dir: TempDir,
    keyring: PathBuf,
    socket: PathBuf,
    server: Option<Process>,
    client: Option<Client>,
    /// Versions this node refuses, and the state it refuses them as.
    refuses: BTreeMap<u32, &'static str>,
}

impl Node {
    async fn new(name: &'static str) -> Self {
        let dir = tempdir().await;
        let keyring = dir.path().join("keyring");
        let socket = dir.path().join("kms.sock");
        Self {
            name,
            dir,
            keyring,
            socket,
            server: None,
            client: None,
            refuses: BTreeMap::new(),
        }
    }

    fn k(&self) -> &str {
        self.keyring.to_str().unwrap()
    }

    fn logs(&self) -> &Path {
        self.dir.path()
    }

    /// `kekd admin ARGS… --keyring <this node's keyring>`.
    async fn admin(&self, args: &[&str]) -> Finished {
        let mut all = args.to_vec();
        all.extend(["--keyring", self.k()]);
        admin_async(&all, self.logs()).await
    }

    async fn admin_ok(&self, args: &[&str]) -> Finished {
        let out = self.admin(args).await;
        assert_eq!(out.code(), 0, "node {}: {args:?}: {out:#?}", self.name);
        out
    }

    async fn start(&mut self) {
        let mut server = spawn_serve(&self.keyring, &self.socket, self.logs(), &[]).await;
        self.client = Some(server.ready().await);
        self.server = Some(server);
    }

    fn client(&self) -> Client {
        self.client.clone().expect("node started")
    }

    async fn wait_for_status(&self, key_id: &str) {
        let what = format!("node {} reports {key_id}", self.name);
        eventually(&what, WAIT, || {
            let mut c = self.client();
            async move {
                let s = c.status().await.map_err(|e| e.to_string())?;
                if s.key_id == key_id {
                    Ok(())
                } else {
                    Err(s.key_id)
                }
            }
        })
        .await;
    }

    async fn encrypt(&self) -> Sealed {
        let plaintext = seed();
        let enc = self
            .client()
            .encrypt(plaintext.clone(), &uid(1))
            .await
            .unwrap_or_else(|e| panic!("node {}: Encrypt failed: {e:?}", self.name));
        let version = version_of(&enc.key_id);
        assert_eq!(header_version(&enc.ciphertext), version);
        Sealed {
            by: self.name,
            key_id: enc.key_id,
            version,
            ciphertext: enc.ciphertext,
            plaintext,
        }
    }

    async fn decrypt(&self, sealed: &Sealed) -> Result<Vec<u8>, tonic::Status> {
        self.client()
            .decrypt(
                sealed.ciphertext.clone(),
                &sealed.key_id,
                HashMap::new(),
                &uid(2),
            )
            .await
    }

    /// Polls until this node's kekd decrypts `sealed` (it picked up a
    /// keyring that holds the version).
    async fn wait_until_decrypts(&self, sealed: &Sealed) {
        let what = format!("node {} decrypts v{}", self.name, sealed.version);
        eventually(&what, WAIT, || async {
            match self.decrypt(sealed).await {
                Ok(p) => {
                    assert_eq!(p, sealed.plaintext);
                    Ok(())
                }
                Err(e) => Err(format!("{:?} {}", e.code(), e.message())),
            }
        })
        .await;
    }

    /// Polls until this node's kekd refuses `version` as `state`.
    async fn wait_until_refuses(&self, sealed: &Sealed, state: &'static str) {
        let what = format!("node {} refuses v{} as {state}", self.name, sealed.version);
        let prefix = format!(
            "key version {} is {state} and cannot decrypt",
            sealed.version
        );
        eventually(&what, WAIT, || async {
            match self.decrypt(sealed).await {
                Err(e)
                    if e.code() == Code::FailedPrecondition && e.message().starts_with(&prefix) =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// The states in this node's keyring file, per `kekd admin list`.
    async fn listed_states(&self) -> Vec<(u64, String)> {
        let out = self.admin_ok(&["list", "--output", "json"]).await;
        json_of(&out)["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["version"].as_u64().unwrap(),
                    v["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    async fn stop(&mut self) {
        let server = self.server.take().expect("running");
        server.signal(Signal::TERM);
        let out = server.wait_exit().await;
        assert_eq!(out.code(), 0, "node {}: {out:#?}", self.name);
        assert!(
            !out.stderr.contains("keyring change refused"),
            "node {} refused a keyring change during the procedure:\n{}",
            self.name,
            out.stderr
        );
    }
}

/// A ciphertext under `version` of the keyring at `path` although that
/// version is only pending there: sealed by the library from a copy in
/// which it is promoted. A node decrypts it once it has the version.
async fn sealed_under_pending(path: &Path, version: u32) -> Sealed {
    let mut file = store::read(path).unwrap();
    file.promote(KeyVersion::new(version).unwrap(), Timestamp::now())
        .unwrap();
    let keyring = keyring_from_file(file).unwrap();
    let plaintext = seed();
    let (key_id, ciphertext) = keyring
        .encrypt(&Plaintext::new(plaintext.clone()))
        .await
        .unwrap();
    Sealed {
        by: "library",
        key_id: key_id.to_string(),
        version,
        ciphertext,
        plaintext,
    }
}

/// Each node encrypts once (under `expected` key id), then every node
/// decrypts every ciphertext made so far, unless it refuses that version.
async fn check_step(step: &str, nodes: [&Node; 2], expected: [&str; 2], ledger: &mut Vec<Sealed>) {
    for (node, key_id) in nodes.iter().zip(expected) {
        let s = node.client().status().await.unwrap();
        assert_eq!(
            (s.healthz.as_str(), s.key_id.as_str()),
            ("ok", key_id),
            "{step}: node {} Status",
            node.name
        );
        let sealed = node.encrypt().await;
        assert_eq!(sealed.key_id, key_id, "{step}: node {} Encrypt", node.name);
        ledger.push(sealed);
    }
    for node in nodes {
        for sealed in ledger.iter() {
            let result = node.decrypt(sealed).await;
            match node.refuses.get(&sealed.version) {
                None => match result {
                    Ok(p) => assert_eq!(p, sealed.plaintext, "{step}"),
                    Err(e) => panic!(
                        "{step}: node {} cannot decrypt v{} from {}: {:?} {}",
                        node.name,
                        sealed.version,
                        sealed.by,
                        e.code(),
                        e.message()
                    ),
                },
                Some(state) => {
                    let e = result.expect_err("a refused version decrypted");
                    assert_eq!(e.code(), Code::FailedPrecondition, "{step}: {e:?}");
                    assert!(
                        e.message().starts_with(&format!(
                            "key version {} is {state} and cannot decrypt",
                            sealed.version
                        )),
                        "{step}: node {}: {e:?}",
                        node.name
                    );
                }
            }
        }
    }
}

fn key_id(v1: &str, version: u32) -> String {
    format!("{}/v{version}", v1.rsplit_once("/v").unwrap().0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_rotation_on_two_nodes_keeps_every_ciphertext_readable() {
    let mut a = Node::new("A").await;
    let mut b = Node::new("B").await;

    // Node A creates the keyring; node B gets it by import.
    a.admin_ok(&["init"]).await;
    let v1 = format!("kekd/{}/v1", store::read(&a.keyring).unwrap().id);
    let (v2, v1s) = (key_id(&v1, 2), v1.as_str());
    let out = b
        .admin_ok(&["import", "--output", "json", "--from", a.k()])
        .await;
    let doc = json_of(&out);
    assert_eq!(doc["changed"], true, "{doc:#}");
    assert_eq!(doc["transitions"][0]["to"], "primary", "{doc:#}");
    assert_eq!(fs::read(&b.keyring).unwrap(), fs::read(&a.keyring).unwrap());
    let a_v1_only = fs::read(&a.keyring).unwrap();
    a.start().await;
    b.start().await;
    let mut ledger = Vec::new();
    check_step("start", [&a, &b], [v1s, v1s], &mut ledger).await;

    // 1. Rotate on A: v2 pending there; nothing encrypts under it yet.
    a.admin_ok(&["rotate"]).await;
    let probe_v2 = sealed_under_pending(&a.keyring, 2).await;
    a.wait_until_decrypts(&probe_v2).await;
    let e = b.decrypt(&probe_v2).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "key version 2 is not in this keyring"
        ),
        "B cannot have v2 before the roll-out"
    );
    assert_eq!(
        a.listed_states().await,
        [(1, "primary".into()), (2, "pending".into())]
    );
    check_step("rotate on A", [&a, &b], [v1s, v1s], &mut ledger).await;

    // 2. Roll out: copy A's keyring to B and import it there.
    let copy = b.dir.path().join("keyring.new");
    fs::copy(&a.keyring, &copy).unwrap();
    let c = copy.to_str().unwrap().to_owned();
    let out = b.admin_ok(&["import", "--from", &c]).await;
    assert!(
        out.stdout.starts_with(&format!(
            "import: {} now matches {c}\n  version 2 new → pending\n",
            b.k()
        )),
        "{out:#?}"
    );
    b.wait_until_decrypts(&probe_v2).await;
    assert_eq!(
        b.listed_states().await,
        [(1, "primary".into()), (2, "pending".into())]
    );
    check_step("import on B", [&a, &b], [v1s, v1s], &mut ledger).await;

    // import refuses damaged and older copies, leaving B's keyring intact,
    // and an identical copy is a no-op.
    let b_keyring = fs::read(&b.keyring).unwrap();
    let good = fs::read(&copy).unwrap();
    let bad_copy = b.dir.path().join("keyring.bad");
    let bc = bad_copy.to_str().unwrap().to_owned();
    let last_line_start = good[..good.len() - 1]
        .iter()
        .rposition(|&c| c == b'\n')
        .unwrap()
        + 1;
    let cases: [(&str, Vec<u8>, String); 3] = [
        (
            "truncated mid-line",
            {
                let mut cut = good.len() * 2 / 3;
                while good[cut - 1] == b'\n' {
                    cut -= 1;
                }
                good[..cut].to_vec()
            },
            "does not end in a newline (truncated?)".to_owned(),
        ),
        (
            "truncated after a line",
            good[..last_line_start].to_vec(),
            "must be the `sha256 <digest>` line that ends every keyring (file truncated?)"
                .to_owned(),
        ),
        (
            "older copy",
            a_v1_only.clone(),
            format!(
                "import refused: {bc} cannot replace {}: version 2 is missing: a keyring never loses versions \
                 (is this an older copy?)",
                b.k()
            ),
        ),
    ];
    for (what, bytes, problem) in cases {
        fs::write(&bad_copy, &bytes).unwrap();
        let out = b.admin(&["import", "--from", &bc]).await;
        assert_eq!(out.code(), EX_CONFIG, "{what}: {out:#?}");
        let message = error_message(&out);
        assert!(
            message.contains(&problem) && message.contains(&bc),
            "{what}: {message:?} does not name {bc} and {problem:?}"
        );
        assert_eq!(
            fs::read(&b.keyring).unwrap(),
            b_keyring,
            "{what}: B's keyring changed"
        );
    }
    let out = b.admin_ok(&["import", "--from", &c]).await;
    assert_eq!(
        out.stdout,
        format!("import: nothing to do: {} already matches {c}\n", b.k())
    );
    assert_eq!(fs::read(&b.keyring).unwrap(), b_keyring);
    check_step("refused imports on B", [&a, &b], [v1s, v1s], &mut ledger).await;

    // 3. Promote on A first: A encrypts under v2, B (still v1) decrypts it.
    a.admin_ok(&["promote", "2"]).await;
    a.wait_for_status(&v2).await;
    check_step("promote on A", [&a, &b], [&v2, v1s], &mut ledger).await;

    // 4. Promote on B.
    b.admin_ok(&["promote", "2"]).await;
    b.wait_for_status(&v2).await;
    check_step("promote on B", [&a, &b], [&v2, &v2], &mut ledger).await;

    // 5./6. (The wait and the data rewrite are skipped.) Retire v1 on A,
    // then on B; each refuses v1 from its own retire on.
    let old_v1 = ledger.iter().find(|s| s.version == 1).unwrap().clone();
    a.admin_ok(&["retire", "1", "--force"]).await;
    a.wait_until_refuses(&old_v1, "retired").await;
    a.refuses.insert(1, "retired");
    check_step("retire on A", [&a, &b], [&v2, &v2], &mut ledger).await;
    b.admin_ok(&["retire", "1", "--force"]).await;
    b.wait_until_refuses(&old_v1, "retired").await;
    b.refuses.insert(1, "retired");
    check_step("retire on B", [&a, &b], [&v2, &v2], &mut ledger).await;

    // 7. Destroy v1 on both.
    for node in [&mut a, &mut b] {
        node.admin_ok(&["destroy", "1", "--yes-destroy-key-material"])
            .await;
        node.wait_until_refuses(&old_v1, "destroyed").await;
        node.refuses.insert(1, "destroyed");
    }
    check_step("destroy on both", [&a, &b], [&v2, &v2], &mut ledger).await;
    for node in [&a, &b] {
        assert_eq!(
            node.listed_states().await,
            [(1, "destroyed".into()), (2, "primary".into())]
        );
    }
    assert!(ledger.iter().any(|s| s.by == "A" && s.version == 2));
    assert!(ledger.iter().any(|s| s.by == "B" && s.version == 1));
    a.stop().await;
    b.stop().await;
}
