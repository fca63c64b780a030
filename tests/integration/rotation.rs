//! Rotation while serving: calls under a rotating keyring, keyring
//! files that must be refused by a running server and recovery from them,
//! the retire guard fed by real usage, and key ids never reused.
//!
//! The server runs in process ([`TestServer`], reload poll 200 ms) or as the
//! `kekd serve` binary where a restart is part of the test; keyring changes
//! go through the `kekd admin` binary or through the same library calls it
//! makes (`keyring::lock::acquire`, an op, `store::replace`).

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use sha2::{Digest, Sha256};
use tonic::{Code, Status};

use kekd::client::Client;
use kekd::id::{KeyVersion, Timestamp};
use kekd::keyring::KeyState;
use kekd::keyring::store::{self, KeyringFile};
use kekd::secret::Kek;

use common::{
    EX_CONFIG, Rng, TestServer, admin_async, eventually, header_version, json_of, seed,
    spawn_serve, tempdir, uid, version_of,
};

/// Long enough for any reload or usage flush (every 5 s) on a slow host.
const WAIT: Duration = Duration::from_secs(15);

fn p(path: &Path) -> &str {
    path.to_str().expect("tempdir paths are UTF-8")
}

fn no_annotations() -> HashMap<String, Vec<u8>> {
    HashMap::new()
}

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

/// An in-process server that polls its keyring every 200 ms.
async fn start_server() -> TestServer {
    TestServer::start_with(|s| s.reload_interval = Some("200ms".to_owned())).await
}

/// `kekd/<id>/v<version>` for the keyring whose version 1 is `v1_key_id`.
fn key_id(v1_key_id: &str, version: u32) -> String {
    let (base, _) = v1_key_id.rsplit_once("/v").unwrap();
    format!("{base}/v{version}")
}

/// Changes the keyring the way the admin commands do: under its lock, read,
/// apply `op`, write atomically and durably.
fn change_keyring(path: &Path, op: impl FnOnce(&mut KeyringFile)) {
    let _lock = kekd::keyring::lock::acquire(path, Duration::from_secs(10)).unwrap();
    let mut file = store::read(path).unwrap();
    op(&mut file);
    store::replace(path, &file).unwrap();
}

/// Polls Status until it reports `expected`.
async fn wait_for_status(client: &Client, expected: &str) {
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

/// Encrypts a fresh seed and checks the key id and header agree.
async fn encrypt(client: &mut Client, n: usize) -> Sealed {
    let plaintext = seed();
    let enc = client.encrypt(plaintext.clone(), &uid(n)).await.unwrap();
    let version = version_of(&enc.key_id);
    assert_eq!(header_version(&enc.ciphertext), version, "{enc:?}");
    Sealed {
        key_id: enc.key_id,
        version,
        ciphertext: enc.ciphertext,
        plaintext,
    }
}

async fn decrypt(client: &mut Client, sealed: &Sealed) -> Result<Vec<u8>, Status> {
    client
        .decrypt(
            sealed.ciphertext.clone(),
            &sealed.key_id,
            no_annotations(),
            &uid(7),
        )
        .await
}

#[track_caller]
fn assert_decrypts(result: Result<Vec<u8>, Status>, sealed: &Sealed) {
    match result {
        Ok(p) => assert_eq!(p, sealed.plaintext, "v{} decrypted wrongly", sealed.version),
        Err(e) => panic!(
            "decrypt of a v{} ciphertext failed: {:?} {}",
            sealed.version,
            e.code(),
            e.message()
        ),
    }
}

#[track_caller]
fn assert_refused(result: Result<Vec<u8>, Status>, code: Code, message: &str) {
    match result {
        Ok(_) => panic!("expected {code:?} {message:?}, got a plaintext"),
        Err(e) => assert_eq!((e.code(), e.message()), (code, message)),
    }
}

fn retired_message(version: u32) -> String {
    format!(
        "key version {version} is retired and cannot decrypt (restore it with `kekd admin restore`)"
    )
}

/// A ciphertext, what it seals and under which key.
#[derive(Debug, Clone)]
struct Sealed {
    key_id: String,
    version: u32,
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
}

// ------------------------------------------------------- rotation under load

/// When the driver began writing the retire of a version, and when it saw
/// the server refuse that version for the first time.
#[derive(Debug, Default)]
struct RetireLog(Mutex<BTreeMap<u32, (Instant, Option<Instant>)>>);

impl RetireLog {
    fn started(&self, version: u32) {
        self.0
            .lock()
            .unwrap()
            .insert(version, (Instant::now(), None));
    }
    fn visible(&self, version: u32) {
        self.0.lock().unwrap().get_mut(&version).unwrap().1 = Some(Instant::now());
    }
    fn get(&self, version: u32) -> Option<(Instant, Option<Instant>)> {
        self.0.lock().unwrap().get(&version).copied()
    }
}

/// Judges one Decrypt that ran from `started` to `finished`: it must succeed
/// unless its version's retire was written before the call ended, and must
/// fail — with exactly the retired refusal — once the retire was visible
/// before the call started. Returns whether it was (rightly) refused.
fn judge_decrypt(
    sealed: &Sealed,
    started: Instant,
    finished: Instant,
    result: Result<Vec<u8>, Status>,
    retires: &RetireLog,
) -> Result<bool, String> {
    let retire = retires.get(sealed.version);
    match result {
        Ok(p) if p != sealed.plaintext => Err(format!(
            "v{} Decrypt returned different bytes",
            sealed.version
        )),
        Ok(_) => match retire {
            Some((_, Some(visible))) if visible < started => Err(format!(
                "v{} decrypted although its retire was visible before the call",
                sealed.version
            )),
            _ => Ok(false),
        },
        Err(e) => {
            let expected = retired_message(sealed.version);
            if e.code() != Code::FailedPrecondition || e.message() != expected {
                return Err(format!(
                    "v{} Decrypt failed: {:?} {:?}",
                    sealed.version,
                    e.code(),
                    e.message()
                ));
            }
            match retire {
                Some((written, _)) if written < finished => Ok(true),
                _ => Err(format!(
                    "v{} refused as retired before its retire was written",
                    sealed.version
                )),
            }
        }
    }
}

#[derive(Debug, Default)]
struct ClientReport {
    calls: u64,
    refusals: u64,
    encrypt_versions: BTreeSet<u32>,
}

/// Status → Encrypt → Status → Decrypt (own) → Decrypt (a random older
/// ciphertext of any client), until `stop`.
async fn load_client(
    mut client: Client,
    id: usize,
    pool: Arc<Mutex<Vec<Sealed>>>,
    retires: Arc<RetireLog>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) -> Result<ClientReport, String> {
    let mut report = ClientReport::default();
    let mut last_version = 0u32;
    let mut n = id << 32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let before = client.status().await.map_err(|e| format!("Status: {e}"))?;
        let plaintext = seed();
        let enc = client
            .encrypt(plaintext.clone(), &uid(n))
            .await
            .map_err(|e| format!("Encrypt: {e}"))?;
        let after = client.status().await.map_err(|e| format!("Status: {e}"))?;
        report.calls += 3;
        let (s1, e, s2) = (
            version_of(&before.key_id),
            version_of(&enc.key_id),
            version_of(&after.key_id),
        );
        if !(last_version <= s1 && s1 <= e && e <= s2) {
            return Err(format!(
                "client {id}: key ids went backwards: last seen v{last_version}, then Status v{s1}, \
                 Encrypt v{e}, Status v{s2}"
            ));
        }
        last_version = s2;
        if enc.key_id != key_id(&before.key_id, e) || header_version(&enc.ciphertext) != e {
            return Err(format!(
                "client {id}: Encrypt key_id {} disagrees with its header or keyring",
                enc.key_id
            ));
        }
        report.encrypt_versions.insert(e);
        let own = Sealed {
            key_id: enc.key_id,
            version: e,
            ciphertext: enc.ciphertext,
            plaintext,
        };

        let older = {
            let mut pool = pool.lock().unwrap();
            pool.push(own.clone());
            let i = rng.below(pool.len() as u64) as usize;
            pool[i].clone()
        };
        for sealed in [&own, &older] {
            let started = Instant::now();
            let result = client
                .decrypt(
                    sealed.ciphertext.clone(),
                    &sealed.key_id,
                    no_annotations(),
                    &uid(n),
                )
                .await;
            let finished = Instant::now();
            report.calls += 1;
            if judge_decrypt(sealed, started, finished, result, &retires)
                .map_err(|e| format!("client {id}: {e}"))?
            {
                report.refusals += 1;
            }
        }
    }
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_call_and_key_ids_only_move_forward() {
    const CLIENTS: usize = 4;
    const ROUNDS: u32 = 6;
    let server = start_server().await;
    let keyring = p(&server.keyring).to_owned();
    let logs = server.dir.path().to_owned();
    let pool = Arc::new(Mutex::new(Vec::new()));
    let retires = Arc::new(RetireLog::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut rng = Rng::from_os();
    eprintln!("rng seed {}", rng.state());

    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        clients.push(tokio::spawn(load_client(
            server.client().await,
            id,
            Arc::clone(&pool),
            Arc::clone(&retires),
            Arc::clone(&stop),
            Rng::seeded(rng.next_u64()),
        )));
    }

    // The driver: rotate (alternately in one step and in two), wait until the
    // server serves the new primary, retire the version before the previous
    // one and wait until the server refuses it.
    let mut driver = server.client().await;
    let mut samples = BTreeMap::new();
    samples.insert(1, encrypt(&mut driver, 0).await);
    for round in 0..ROUNDS {
        let (old, new) = (round + 1, round + 2);
        if round % 2 == 0 {
            let out = admin_async(&["rotate", "--promote", "--keyring", &keyring], &logs).await;
            out.ok();
            assert!(
                out.stdout.contains(&format!(
                    "rotate: version {new} new → pending (key_id {})\n\
                     rotate: version {old} primary → decrypt-only (key_id {})\n\
                     rotate: version {new} pending → primary (key_id {})\n",
                    key_id(&server.key_id, new),
                    key_id(&server.key_id, old),
                    key_id(&server.key_id, new),
                )),
                "{out:#?}"
            );
        } else {
            let out = admin_async(&["rotate", "--keyring", &keyring], &logs).await;
            out.ok();
            let out =
                admin_async(&["promote", &new.to_string(), "--keyring", &keyring], &logs).await;
            out.ok();
        }
        wait_for_status(&driver, &key_id(&server.key_id, new)).await;
        let sample = encrypt(&mut driver, new as usize).await;
        assert_eq!(sample.version, new);
        samples.insert(new, sample);

        if new >= 3 {
            let gone = new - 2;
            retires.started(gone);
            let out = admin_async(
                &[
                    "retire",
                    &gone.to_string(),
                    "--force",
                    "--keyring",
                    &keyring,
                ],
                &logs,
            )
            .await;
            out.ok();
            let sample = samples[&gone].clone();
            eventually(&format!("the server refuses v{gone}"), WAIT, || {
                let mut c = driver.clone();
                let sample = sample.clone();
                async move {
                    match decrypt(&mut c, &sample).await {
                        Err(e)
                            if e.code() == Code::FailedPrecondition
                                && e.message() == retired_message(gone) =>
                        {
                            Ok(())
                        }
                        Ok(_) => Err("still decrypts".to_owned()),
                        Err(e) => panic!("v{gone} refused wrongly: {e:?}"),
                    }
                }
            })
            .await;
            retires.visible(gone);
        }
    }

    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for c in clients {
        match c.await.unwrap() {
            Ok(r) => reports.push(r),
            Err(e) => panic!("{e}"),
        }
    }

    // Every ciphertext ever issued: the retired versions' are refused, all
    // others still decrypt.
    let retired: BTreeSet<u32> = (1..=ROUNDS - 1).collect();
    let pool = pool.lock().unwrap().clone();
    for sealed in pool.iter().chain(samples.values()) {
        let result = decrypt(&mut driver, sealed).await;
        if retired.contains(&sealed.version) {
            assert_refused(
                result,
                Code::FailedPrecondition,
                &retired_message(sealed.version),
            );
        } else {
            assert_decrypts(result, sealed);
        }
    }

    let used: BTreeSet<u32> = reports
        .iter()
        .flat_map(|r| r.encrypt_versions.iter().copied())
        .collect();
    assert_eq!(
        used,
        (1..=ROUNDS + 1).collect(),
        "every primary served the clients' Encrypts"
    );
    let calls: u64 = reports.iter().map(|r| r.calls).sum();
    let refusals: u64 = reports.iter().map(|r| r.refusals).sum();
    eprintln!(
        "{calls} calls by {CLIENTS} clients, {refusals} expected refusals of retired versions, \
         {} ciphertexts swept",
        pool.len()
    );
    assert!(calls > 100, "the clients barely ran: {calls} calls");
    // Stopped, not dropped: a usage flush racing the tempdir's removal
    // would leave the directory behind.
    server.stop().await.unwrap();
}

// ------------------------------------------ invalid keyrings while serving

/// What is wrong with the file written over the served keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    TruncatedMidLine,
    TruncatedAtLineEnd,
    Garbage,
    NoPrimary,
    DuplicateVersion,
    OlderCopy,
    PrimaryBack,
    OtherKeyring,
    ChangedMaterial,
    WorldReadable,
    Removed,
}

/// How it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// A complete file renamed over the keyring (as `install`/admin do).
    Rename,
    /// The keyring itself truncated and rewritten (`cat > keyring`).
    Overwrite,
}

/// `body` followed by its `sha256` line: a keyring whose checksum is right.
fn with_checksum(body: &str) -> Vec<u8> {
    let mut out = body.to_owned();
    out.push_str("sha256 ");
    for b in Sha256::digest(body.as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out.push('\n');
    out.into_bytes()
}

/// The file's text without its `sha256` line.
fn body_of(bytes: &[u8]) -> String {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let cut = text.trim_end_matches('\n').rfind('\n').unwrap() + 1;
    assert!(text[cut..].starts_with("sha256 "));
    text[..cut].to_owned()
}

fn write_keyring(path: &Path, bytes: &[u8], how: How, mode: u32) {
    match how {
        How::Rename => {
            let tmp = path.with_file_name("incoming");
            fs::write(&tmp, bytes).unwrap();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
            fs::rename(&tmp, path).unwrap();
        }
        How::Overwrite => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if path.exists() && mode != 0o644 {
                fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
            }
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(bytes))
                .unwrap();
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        }
    }
}

/// `kekd admin list --output json`, whatever its exit code (78 when the file
/// on disk cannot be read; it still reports what the server serves).
async fn list_json(keyring: &str, logs: &Path) -> (i32, serde_json::Value) {
    let out = admin_async(&["list", "--output", "json", "--keyring", keyring], logs).await;
    (out.code(), json_of(&out))
}

async fn invalid_keyring_case(bad: Bad, how: How) {
    let server = start_server().await;
    let path = server.keyring.clone();
    let keyring = p(&path).to_owned();
    let logs = server.dir.path().to_owned();
    let v1 = server.key_id.clone();
    let (v2, v3) = (key_id(&v1, 2), key_id(&v1, 3));
    let mut client = server.client().await;
    let ct1 = encrypt(&mut client, 1).await;

    // Serve v1 decrypt-only + v2 primary, keeping the two older states.
    let only_v1 = fs::read(&path).unwrap();
    change_keyring(&path, |f| {
        f.rotate(Timestamp::now(), false, None).unwrap();
    });
    let v2_pending = fs::read(&path).unwrap();
    change_keyring(&path, |f| {
        f.promote(v(2), Timestamp::now()).unwrap();
    });
    wait_for_status(&client, &v2).await;
    let ct2 = encrypt(&mut client, 2).await;
    assert_eq!(ct2.key_id, v2);
    let good = fs::read(&path).unwrap();
    let good_file = KeyringFile::parse(&good).unwrap();

    let mut mode = 0o600;
    let (bytes, problem, parses) = match bad {
        Bad::TruncatedMidLine => {
            let mut cut = good.len() / 2;
            while good[cut - 1] == b'\n' {
                cut -= 1;
            }
            (
                good[..cut].to_vec(),
                "does not end in a newline (truncated?)".to_owned(),
                false,
            )
        }
        Bad::TruncatedAtLineEnd => (
            body_of(&good).into_bytes(),
            "must be the `sha256 <digest>` line that ends every keyring (file truncated?)"
                .to_owned(),
            false,
        ),
        Bad::Garbage => (
            b"this is not a keyring\n".to_vec(),
            "line 1 is not `kekd-keyring v1`: not a kekd keyring".to_owned(),
            false,
        ),
        Bad::NoPrimary => {
            let mut f = KeyringFile::parse(&good).unwrap();
            f.versions[1].info.state = KeyState::DecryptOnly;
            (
                f.encode().as_bytes().to_vec(),
                "no version is primary; exactly one must be (kekd admin promote)".to_owned(),
                false,
            )
        }
        Bad::DuplicateVersion => {
            let body = body_of(&good);
            let v2_line = body
                .lines()
                .find(|l| l.starts_with("version 2 "))
                .unwrap()
                .to_owned();
            (
                with_checksum(&format!("{body}{v2_line}\n")),
                "version 2 appears after version 2; versions must be listed once each, in increasing order"
                    .to_owned(),
                false,
            )
        }
        Bad::OlderCopy => (
            only_v1.clone(),
            "version 2 is missing: a keyring never loses versions (is this an older copy?)"
                .to_owned(),
            true,
        ),
        Bad::PrimaryBack => (
            v2_pending.clone(),
            "the primary would go back from version 2 to 1 (an older copy?); key ids must never flip back"
                .to_owned(),
            true,
        ),
        Bad::OtherKeyring => {
            let other = KeyringFile::generate(Timestamp::now()).unwrap();
            let problem = format!(
                "keyring id changed from {} to {}: this is a different keyring",
                good_file.id, other.id
            );
            (other.encode().as_bytes().to_vec(), problem, true)
        }
        Bad::ChangedMaterial => {
            let mut f = KeyringFile::parse(&good).unwrap();
            f.versions[1].kek = Some(Kek::generate().unwrap());
            (
                f.encode().as_bytes().to_vec(),
                "version 2 holds different key material than before: its key id would name two keys"
                    .to_owned(),
                true,
            )
        }
        Bad::WorldReadable => {
            mode = 0o644;
            (
                good.clone(),
                format!(
                    "keyring {keyring} has permissions 0644, which let other users read the keys; \
                     run `chmod 600 {keyring}`"
                ),
                false,
            )
        }
        Bad::Removed => (
            Vec::new(),
            format!(
                "keyring {keyring} does not exist (create one with `kekd admin init --keyring {keyring}`)"
            ),
            false,
        ),
    };
    // What the server reports: the file's own error, except that a node
    // that was serving never advises `kekd admin init` (a new keyring
    // would orphan every ciphertext). `admin probe` reads the file itself.
    let reload_problem = if bad == Bad::Removed {
        "the keyring is no longer there (the key store is out, or the keyring was moved or deleted); \
         still serving the last good keyring: bring it back (restore the file or the token's objects), \
         and do not run `kekd admin init`, which would orphan every ciphertext"
            .to_owned()
    } else {
        problem.clone()
    };
    if bad == Bad::Removed {
        // Moved away (Rename) or deleted (Overwrite).
        match how {
            How::Rename => fs::rename(&path, path.with_file_name("keyring.moved")).unwrap(),
            How::Overwrite => fs::remove_file(&path).unwrap(),
        }
    } else {
        write_keyring(&path, &bytes, how, mode);
    }

    // The server keeps serving v2 and reports the problem once its usage
    // file is flushed (every 5 s).
    let reported = eventually("list shows the refused reload", WAIT, || {
        let (keyring, logs, mut c) = (keyring.clone(), logs.clone(), client.clone());
        let (v2, ct1, ct2) = (v2.clone(), ct1.clone(), ct2.clone());
        async move {
            let s = c.status().await.unwrap();
            assert_eq!((s.healthz.as_str(), s.key_id.as_str()), ("ok", v2.as_str()));
            let fresh = encrypt(&mut c, 3).await;
            assert_eq!(fresh.key_id, v2);
            for sealed in [&ct1, &ct2, &fresh] {
                assert_decrypts(decrypt(&mut c, sealed).await, sealed);
            }
            let (code, doc) = list_json(&keyring, &logs).await;
            if doc["reload_error"].is_null() {
                Err(format!("list (exit {code}): {doc}"))
            } else {
                Ok((code, doc))
            }
        }
    })
    .await;
    let (code, doc) = reported;
    assert_eq!(code, if parses { 0 } else { EX_CONFIG }, "{doc:#}");
    let message = doc["reload_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&keyring) && message.contains(&reload_problem),
        "reload_error does not name the file and {problem:?}: {doc:#}"
    );
    assert_eq!(doc["server"]["key_id"], v2.as_str(), "{doc:#}");
    assert_eq!(doc["server"]["primary"], 2, "{doc:#}");

    let probe = admin_async(
        &[
            "probe",
            "--output",
            "json",
            "--socket",
            p(&server.socket),
            "--keyring",
            &keyring,
        ],
        &logs,
    )
    .await;
    probe.exited(1);
    let report = json_of(&probe);
    let checks: BTreeMap<String, (bool, String)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                (
                    c["ok"].as_bool().unwrap(),
                    c["detail"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    for name in ["connect", "status", "encrypt", "decrypt"] {
        assert!(checks[name].0, "probe check {name} failed: {report:#}");
    }
    assert!(!checks["keyring"].0, "{report:#}");
    assert!(
        checks["keyring"].1.contains(&problem),
        "probe's keyring check does not name {problem:?}: {report:#}"
    );

    // The fix is picked up by itself and clears the report: a good successor
    // of what is served (v3 promoted), or, for some cases written in place,
    // the very keyring being served (Status stays v2).
    let same_again = how == How::Overwrite
        && matches!(
            bad,
            Bad::Garbage | Bad::NoPrimary | Bad::WorldReadable | Bad::Removed
        );
    let (fixed, primary) = if same_again {
        write_keyring(&path, &good, how, 0o600);
        (v2.clone(), 2)
    } else {
        let mut next = KeyringFile::parse(&good).unwrap();
        next.rotate(Timestamp::now(), true, None).unwrap();
        write_keyring(&path, next.encode().as_bytes(), how, 0o600);
        (v3.clone(), 3)
    };
    wait_for_status(&client, &fixed).await;
    eventually("list clears the refused reload", WAIT, || {
        let (keyring, logs) = (keyring.clone(), logs.clone());
        async move {
            let (code, doc) = list_json(&keyring, &logs).await;
            if code == 0 && doc["reload_error"].is_null() && doc["server"]["primary"] == primary {
                Ok(())
            } else {
                Err(format!("list (exit {code}): {doc}"))
            }
        }
    })
    .await;
    let probe = admin_async(
        &[
            "probe",
            "--socket",
            p(&server.socket),
            "--keyring",
            &keyring,
        ],
        &logs,
    )
    .await;
    probe.ok();
    assert!(
        probe.stdout.contains(&format!(
            "ok   keyring   serves the primary of {keyring} ({fixed})"
        )),
        "{probe:#?}"
    );
    let fresh = encrypt(&mut client, 4).await;
    assert_eq!(fresh.key_id, fixed);
    for sealed in [&ct1, &ct2, &fresh] {
        assert_decrypts(decrypt(&mut client, sealed).await, sealed);
    }
    server.stop().await.unwrap();
}

/// Runs the cases concurrently (each waits for two usage flushes) and
/// reports every failing one.
async fn run_invalid_keyring_cases(cases: &[Bad]) {
    let mut tasks = Vec::new();
    for &bad in cases {
        for how in [How::Rename, How::Overwrite] {
            tasks.push(((bad, how), tokio::spawn(invalid_keyring_case(bad, how))));
        }
    }
    let mut failures = Vec::new();
    for (case, task) in tasks {
        if let Err(e) = task.await {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{case:?}: {message}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keyring_written_while_serving_keeps_the_last_good_one_until_fixed() {
    run_invalid_keyring_cases(&[
        Bad::TruncatedMidLine,
        Bad::TruncatedAtLineEnd,
        Bad::Garbage,
        Bad::NoPrimary,
        Bad::DuplicateVersion,
        Bad::OlderCopy,
        Bad::PrimaryBack,
        Bad::ChangedMaterial,
        Bad::WorldReadable,
        Bad::Removed,
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keyring_written_while_serving_is_refused_and_reported() {
    run_invalid_keyring_cases(&[Bad::OtherKeyring]).await;
}

// ------------------------------------------------- usage and the retire guard

/// Per-version (encrypts, decrypts, last_decrypt) from `list --output json`.
fn usage_of(doc: &serde_json::Value) -> BTreeMap<u32, (u64, u64, Option<String>)> {
    doc["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap() as u32,
                (
                    v["encrypts"].as_u64().unwrap(),
                    v["decrypts"].as_u64().unwrap(),
                    v["last_decrypt"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_guard_reads_real_usage_and_counts_survive_a_restart() {
    let dir = tempdir().await;
    let logs = dir.path().to_owned();
    let path = dir.path().join("keyring");
    let keyring = p(&path).to_owned();
    let socket = dir.path().join("kms.sock");
    let out = admin_async(&["init", "--keyring", &keyring], &logs).await;
    out.ok();
    let v1 = format!(
        "kekd/{}/v1",
        KeyringFile::parse(&fs::read(&path).unwrap()).unwrap().id
    );

    let mut server = spawn_serve(&path, &socket, &logs, &["--usage-flush-interval", "100ms"]).await;
    let mut client = server.ready().await;
    // v1: 3 encrypts, 2 decrypts.
    let mut ct1 = Vec::new();
    for n in 0..3 {
        ct1.push(encrypt(&mut client, n).await);
    }
    for sealed in &ct1[..2] {
        assert_decrypts(decrypt(&mut client, sealed).await, sealed);
    }
    let rotate = |logs: std::path::PathBuf, keyring: String| async move {
        let out = admin_async(&["rotate", "--promote", "--keyring", &keyring], &logs).await;
        out.ok();
    };
    // v2: 1 encrypt, 1 decrypt. v3: never used. v4: primary.
    rotate(logs.clone(), keyring.clone()).await;
    wait_for_status(&client, &key_id(&v1, 2)).await;
    let ct2 = encrypt(&mut client, 10).await;
    assert_eq!(ct2.version, 2);
    assert_decrypts(decrypt(&mut client, &ct2).await, &ct2);
    rotate(logs.clone(), keyring.clone()).await;
    wait_for_status(&client, &key_id(&v1, 3)).await;
    rotate(logs.clone(), keyring.clone()).await;
    wait_for_status(&client, &key_id(&v1, 4)).await;

    // The counts reach the usage file within one flush (100 ms here).
    let doc = eventually("list shows the usage", WAIT, || {
        let (keyring, logs) = (keyring.clone(), logs.clone());
        async move {
            let (code, doc) = list_json(&keyring, &logs).await;
            assert_eq!(code, 0, "{doc:#}");
            let u = usage_of(&doc);
            if u[&1].1 == 2 && u[&2].1 == 1 && doc["server"]["primary"] == 4 {
                Ok(doc)
            } else {
                Err(doc.to_string())
            }
        }
    })
    .await;
    let usage = usage_of(&doc);
    let t1 = usage[&1].2.clone().expect("v1 last_decrypt");
    let t2 = usage[&2].2.clone().expect("v2 last_decrypt");
    assert_eq!((usage[&1].0, usage[&1].1), (3, 2), "{doc:#}");
    assert_eq!((usage[&2].0, usage[&2].1), (1, 1), "{doc:#}");
    assert_eq!(usage[&3], (0, 0, None), "{doc:#}");
    assert_eq!(doc["server"]["key_id"], key_id(&v1, 4).as_str());
    assert!(doc["usage_updated"].is_string(), "{doc:#}");
    assert!(doc["reload_error"].is_null(), "{doc:#}");

    // v1 was primary (and decrypted moments ago): refused without a scan,
    // whatever its usage says.
    let before = fs::read(&path).unwrap();
    let needs_scan = |v: u32| {
        format!(
            "retire refused: version {v} was primary (since {}), so objects may be stored under it although it \
             served no Decrypt: an apiserver caches the seeds it made itself and only decrypts them after a \
             restart, so Decrypt counts prove nothing for this version. Retire it only with a fresh scan that \
             shows nothing stored under it (--scan), or pass --force to retire it anyway (objects stored under \
             version {v} become unreadable until `kekd admin restore {v}`). The procedure:",
            doc["versions"][v as usize - 1]["promoted"]
                .as_str()
                .unwrap()
        )
    };
    let out = admin_async(&["retire", "1", "--keyring", &keyring], &logs).await;
    assert_eq!(out.refused(1), needs_scan(1));
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "a refusal changed the keyring"
    );
    let out = admin_async(&["retire", "1", "--force", "--keyring", &keyring], &logs).await;
    out.ok();
    assert!(
        out.stdout.starts_with(&format!(
            "retire: version 1 decrypt-only → retired (key_id {v1})\nwarning: retired without a scan: objects \
             stored under version 1 become unreadable (at the latest when an apiserver restarts) until `kekd admin \
             restore 1`\n"
        )),
        "{out:#?}"
    );
    // v3 was primary and never served a Decrypt: its zero proves nothing
    // (the apiserver caches the seeds it made), so it is refused too, and
    // no window makes a difference.
    for window in ["24h", "1s"] {
        let out = admin_async(
            &["retire", "3", "--window", window, "--keyring", &keyring],
            &logs,
        )
        .await;
        assert_eq!(out.refused(1), needs_scan(3));
    }
    let out = admin_async(&["retire", "2", "--force", "--keyring", &keyring], &logs).await;
    out.ok();

    // The server stops decrypting v1. Polled with a damaged v1 ciphertext:
    // failures are not use, so the counts stay exact.
    let mut damaged = ct1[2].clone();
    *damaged.ciphertext.last_mut().unwrap() ^= 1;
    eventually("the server refuses v1", WAIT, || {
        let (mut c, sealed) = (client.clone(), damaged.clone());
        async move {
            match decrypt(&mut c, &sealed).await {
                Err(e) if e.code() == Code::FailedPrecondition => {
                    assert_eq!(e.message(), retired_message(1));
                    Ok(())
                }
                Err(e) if e.message() == "ciphertext could not be decrypted" => {
                    Err("not reloaded yet".to_owned())
                }
                other => panic!("{other:?}"),
            }
        }
    })
    .await;

    // Counts are written at shutdown and continue after a restart.
    server.signal(Signal::TERM);
    let exit = server.wait_exit().await;
    exit.ok();
    let (code, doc) = list_json(&keyring, &logs).await;
    assert_eq!(code, 0, "{doc:#}");
    let after_stop = usage_of(&doc);
    assert_eq!(after_stop[&1], (3, 2, Some(t1.clone())), "{doc:#}");
    assert_eq!(after_stop[&2], (1, 1, Some(t2.clone())), "{doc:#}");

    let mut server = spawn_serve(&path, &socket, &logs, &[]).await;
    let mut client = server.ready().await;
    let (code, doc) = list_json(&keyring, &logs).await;
    assert_eq!(code, 0, "{doc:#}");
    assert_eq!(usage_of(&doc)[&1], (3, 2, Some(t1.clone())), "{doc:#}");
    let out = admin_async(&["restore", "1", "--keyring", &keyring], &logs).await;
    out.ok();
    eventually("the server decrypts v1 again", WAIT, || {
        let (mut c, sealed) = (client.clone(), ct1[2].clone());
        async move {
            match decrypt(&mut c, &sealed).await {
                Ok(p) => {
                    assert_eq!(p, sealed.plaintext);
                    Ok(())
                }
                Err(e) => Err(format!("{e:?}")),
            }
        }
    })
    .await;
    let ct4 = encrypt(&mut client, 40).await;
    assert_eq!(ct4.version, 4);
    server.signal(Signal::TERM);
    let exit = server.wait_exit().await;
    exit.ok();
    let (code, doc) = list_json(&keyring, &logs).await;
    assert_eq!(code, 0, "{doc:#}");
    let usage = usage_of(&doc);
    assert_eq!(
        (usage[&1].0, usage[&1].1),
        (3, 3),
        "counts continued: {doc:#}"
    );
    assert_eq!((usage[&2].0, usage[&2].1), (1, 1), "{doc:#}");
    assert_eq!(usage[&4].0, after_stop[&4].0 + 1, "{doc:#}");
}

// ------------------------------------------------ key ids are never reused

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_version_number_and_key_id_are_never_issued_again() {
    let server = start_server().await;
    let keyring = p(&server.keyring).to_owned();
    let logs = server.dir.path().to_owned();
    let mut client = server.client().await;
    let mut issued = BTreeSet::from([server.key_id.clone()]);
    let ct1 = encrypt(&mut client, 1).await;

    let admin_ok = |args: Vec<String>| {
        let (logs, keyring) = (logs.clone(), keyring.clone());
        async move {
            let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
            args.extend(["--output", "json", "--keyring", &keyring]);
            let out = admin_async(&args, &logs).await;
            out.ok();
            json_of(&out)
        }
    };
    let new_versions = |doc: &serde_json::Value| -> Vec<(u32, String)> {
        doc["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["from"].is_null())
            .map(|t| {
                (
                    t["version"].as_u64().unwrap() as u32,
                    t["key_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // v2 primary; v1 retired and destroyed.
    let doc = admin_ok(args(&["rotate", "--promote"])).await;
    assert_eq!(new_versions(&doc), [(2, key_id(&server.key_id, 2))]);
    issued.insert(key_id(&server.key_id, 2));
    wait_for_status(&client, &key_id(&server.key_id, 2)).await;
    let ct2 = encrypt(&mut client, 2).await;
    admin_ok(args(&["retire", "1", "--force"])).await;
    admin_ok(args(&["destroy", "1", "--yes-destroy-key-material"])).await;

    // v3 (the newest) pending, retired and destroyed; the next is v4.
    let doc = admin_ok(args(&["rotate"])).await;
    assert_eq!(new_versions(&doc), [(3, key_id(&server.key_id, 3))]);
    issued.insert(key_id(&server.key_id, 3));
    admin_ok(args(&["retire", "3"])).await; // never promoted: no scan needed
    admin_ok(args(&["destroy", "3", "--yes-destroy-key-material"])).await;
    let doc = admin_ok(args(&["rotate", "--promote"])).await;
    let fresh = new_versions(&doc);
    assert_eq!(fresh.len(), 1, "{doc:#}");
    let (version, new_key_id) = fresh[0].clone();
    assert_eq!(version, 4, "a destroyed version number was reused: {doc:#}");
    assert!(
        !issued.contains(&new_key_id),
        "key id {new_key_id} was issued before"
    );
    wait_for_status(&client, &new_key_id).await;
    let ct4 = encrypt(&mut client, 4).await;
    assert_eq!(ct4.key_id, new_key_id);

    let file = store::read(&server.keyring).unwrap();
    let states: Vec<(u32, KeyState)> = file
        .versions
        .iter()
        .map(|s| (s.info.version.get(), s.info.state))
        .collect();
    assert_eq!(
        states,
        [
            (1, KeyState::Destroyed),
            (2, KeyState::DecryptOnly),
            (3, KeyState::Destroyed),
            (4, KeyState::Primary)
        ]
    );
    assert!(file.versions[0].kek.is_none() && file.versions[2].kek.is_none());

    // The destroyed version's ciphertexts are refused as destroyed; the rest decrypt.
    let result = decrypt(&mut client, &ct1).await;
    let e = result.expect_err("a destroyed version decrypted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .starts_with("key version 1 is destroyed and cannot decrypt"),
        "{e:?}"
    );
    assert_decrypts(decrypt(&mut client, &ct2).await, &ct2);
    assert_decrypts(decrypt(&mut client, &ct4).await, &ct4);
    server.stop().await.unwrap();
}

/// The JSON lines of the keyring's audit log.
fn audit_lines(keyring: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(kekd::audit::audit_path(keyring))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `list` (text and JSON) right after the server logged a reload event: no
/// wait for a periodic usage flush.
async fn list_now(keyring: &str, logs: &Path) -> (serde_json::Value, String) {
    let (code, doc) = list_json(keyring, logs).await;
    assert_eq!(code, 0, "{doc:#}");
    let text = admin_async(&["list", "--keyring", keyring], logs).await;
    text.ok();
    (doc, text.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_keeps_the_primary_audits_no_snapshot_switch() {
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    let v1 = common::create_keyring(&keyring);
    let v2 = key_id(&v1, 2);
    let socket = dir.path().join("kms.sock");
    let mut server = spawn_serve(&keyring, &socket, dir.path(), &[]).await;
    server.ready().await;
    let k = p(&keyring);
    let out = admin_async(&["rotate", "--keyring", k], dir.path()).await;
    out.ok();
    // The reload of the keyring with v2 pending is applied …
    server.wait_for_stderr("keyring reloaded").await;
    let out = admin_async(&["promote", "2", "--keyring", k], dir.path()).await;
    out.ok();
    server.wait_for_stderr("new primary").await;
    // … and audited only when the primary moved: one line, v1 to v2.
    let switched: Vec<_> = audit_lines(&keyring)
        .into_iter()
        .filter(|l| l["event"] == "snapshot_switched")
        .collect();
    assert_eq!(switched.len(), 1, "{switched:#?}");
    assert_eq!(switched[0]["from_key_id"], v1.as_str());
    assert_eq!(switched[0]["to_key_id"], v2.as_str());
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_a_refusal_its_repair_a_pending_change_and_a_stopped_server_at_once() {
    let dir = tempdir().await;
    let logs = dir.path();
    let path = dir.path().join("keyring");
    let v1 = common::create_keyring(&path);
    let v2 = key_id(&v1, 2);
    let keyring = p(&path).to_owned();
    let good = fs::read(&path).unwrap();
    let socket = dir.path().join("kms.sock");
    let mut server = spawn_serve(&path, &socket, logs, &[]).await;
    server.ready().await;

    // A damaged keyring: the refusal is published as it is logged.
    write_keyring(&path, b"not a keyring\n", How::Rename, 0o600);
    server.wait_for_stderr("keyring change refused").await;
    let (code, doc) = list_json(&keyring, logs).await;
    assert_eq!(code, EX_CONFIG, "{doc:#}");
    assert!(doc["reload_error"]["message"].is_string(), "{doc:#}");

    // Repaired: logged, and list clears the refusal at once.
    write_keyring(&path, &good, How::Rename, 0o600);
    server.wait_for_stderr("keyring problem resolved").await;
    let (doc, text) = list_now(&keyring, logs).await;
    assert!(doc["reload_error"].is_null(), "{doc:#}");
    assert_eq!(doc["server_running"], true, "{doc:#}");
    assert_eq!(doc["reload_pending"], false, "{doc:#}");
    assert!(!text.contains("WARNING"), "{text}");

    // A promotion the (stopped) server has not loaded yet is said to be
    // pending, not reported as served.
    server.signal(Signal::STOP);
    let out = admin_async(&["rotate", "--promote", "--keyring", &keyring], logs).await;
    out.ok();
    let (doc, text) = list_now(&keyring, logs).await;
    assert_eq!(doc["server"]["primary"], 1, "{doc:#}");
    assert_eq!(doc["reload_pending"], true, "{doc:#}");
    assert!(
        text.contains("still serves version 1 (")
            && text.contains("has not loaded this keyring's primary (version 2) yet"),
        "{text}"
    );
    // Once it runs, the switch is published as it is logged.
    server.signal(Signal::CONT);
    server.wait_for_stderr("new primary").await;
    let (doc, text) = list_now(&keyring, logs).await;
    assert_eq!(doc["server"]["key_id"], v2.as_str(), "{doc:#}");
    assert_eq!(doc["reload_pending"], false, "{doc:#}");
    assert!(text.contains(") serves version 2 ("), "{text}");

    // A stopped server is named as stopped, not as serving.
    server.signal(Signal::TERM);
    assert_eq!(server.wait_exit().await.code(), 0);
    let (doc, text) = list_now(&keyring, logs).await;
    assert_eq!(doc["server_running"], false, "{doc:#}");
    assert!(
        text.contains("is not running (in this PID namespace): it served version 2 ("),
        "{text}"
    );
    assert!(!text.contains(") serves version"), "{text}");
}
