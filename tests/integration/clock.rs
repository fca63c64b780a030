//! Clock jumps: `kekd serve` and the admin commands under a wall
//! clock 400 days ahead or behind, through libfaketime (`apt-get install
//! faketime`), and a jump while serving through a changeable offset.
//!
//! - The first test proves that libfaketime really moves the Rust binary's
//!   clock (the times kekd writes into its audit log follow it); without
//!   that, every other test here would prove nothing.
//! - No premature retire: a version never promoted here (another node
//!   promoted it) that served a Decrypt seconds ago is refused by `retire`
//!   whether the admin's clock is 400 days ahead (the
//!   boot clock, `CLOCK_BOOTTIME`, which a wall-clock jump does not move,
//!   says "seconds ago") or 400 days behind (the last use is in the future:
//!   refused, naming the clock). Destroy needs a retired version anyway.
//! - No key_id flip-flop: while the server's clock jumps +400 d and −400 d,
//!   Status and Encrypt report one key_id, earlier ciphertexts decrypt, a
//!   rotation moves the key_id forward once; the key-age warning fires once
//!   on the jump ahead and never on the jump back; the server's audit events
//!   carry the server's (jumped) time.
//!
//! Without libfaketime the suite prints SKIPPED, unless
//! `KEKD_REQUIRE_ALL=1`, which makes it fail.

use crate::common;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use kekd::id::Timestamp;
use kekd::keyring::store;

use common::{
    Finished, Process, error_message, eventually, json_of, kekd, run_guarded, seed, spawn_serve,
    tempdir, tempdir_blocking, uid,
};

const DAY: u64 = 24 * 3600;
const JUMP: u64 = 400 * DAY;
/// Slack between the test's clock readings and kekd's (process start-up,
/// a slow CI host).
const SLACK: u64 = 120;
const WAIT: Duration = Duration::from_secs(20);

/// Where Debian and Ubuntu install the preload library.
const LIB_CANDIDATES: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

/// libfaketime's preload library, or `None` (after printing SKIPPED) when
/// it is missing and skipping is allowed.
fn libfaketime() -> Option<PathBuf> {
    if let Some(found) = LIB_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    {
        return Some(found);
    }
    common::skip::skip("libfaketime not installed: apt-get install -y faketime");
    None
}

/// Makes `cmd` run with its wall clock `spec` away from the real one
/// (`+400d`, `-400d`). The monotonic clocks stay real, as they do when a
/// real wall clock jumps (NTP step, `date -s`).
fn fake(cmd: &mut Command, lib: &Path, spec: &str) {
    cmd.env("LD_PRELOAD", lib)
        .env("FAKETIME", spec)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
}

/// `kekd admin ARGS…` with the wall clock at `spec` (or the real one).
fn admin_at(lib: &Path, spec: Option<&str>, args: &[&str], logs: &Path) -> Finished {
    let mut cmd = kekd();
    cmd.arg("admin").args(args);
    if let Some(spec) = spec {
        fake(&mut cmd, lib, spec);
    }
    run_guarded(cmd, logs)
}

async fn admin_at_async(lib: &Path, spec: Option<&str>, args: &[&str], logs: &Path) -> Finished {
    let (lib, logs) = (lib.to_owned(), logs.to_owned());
    let spec = spec.map(str::to_owned);
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        admin_at(&lib, spec.as_deref(), &args, &logs)
    })
    .await
    .unwrap()
}

/// The audit log's lines as JSON.
fn audit_lines(keyring: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(kekd::file::sibling(keyring, ".audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn unix_of(v: &serde_json::Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    Timestamp::from(humantime::parse_rfc3339(s).unwrap()).unix()
}

#[track_caller]
fn assert_near(what: &str, got: u64, expected: u64) {
    assert!(
        got.abs_diff(expected) <= SLACK,
        "{what}: {} is not within {SLACK}s of {}",
        Timestamp::from_unix(got),
        Timestamp::from_unix(expected)
    );
}

#[test]
fn faketime_moves_the_wall_clock_of_the_kekd_binary() {
    let Some(lib) = libfaketime() else { return };
    let dir = tempdir_blocking();
    let keyring = dir.path().join("keyring");
    let k = keyring.to_str().unwrap();
    let logs = dir.path();

    let real = Timestamp::now().unix();
    let out = admin_at(&lib, Some("+400d"), &["init", "--keyring", k], logs);
    out.ok();
    let out = admin_at(&lib, Some("-400d"), &["rotate", "--keyring", k], logs);
    out.ok();
    let out = admin_at(&lib, None, &["promote", "2", "--keyring", k], logs);
    out.ok();

    let lines = audit_lines(&keyring);
    let times: Vec<(String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["command"].as_str().unwrap().to_owned(),
                unix_of(&l["time"]),
            )
        })
        .collect();
    assert_eq!(
        times.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        ["init", "rotate", "promote", "promote"],
        "{lines:#?}"
    );
    assert_near("init under +400d", times[0].1, real + JUMP);
    assert_near("rotate under -400d", times[1].1, real - JUMP);
    assert_near("promote on the real clock", times[2].1, real);

    // The keyring records the same times, out of order, and still loads:
    // nothing in kekd requires a version to be younger than the one before.
    let file = store::read(&keyring).unwrap();
    assert_near(
        "v1 created",
        file.versions[0].info.created.unix(),
        real + JUMP,
    );
    assert_near(
        "v2 created",
        file.versions[1].info.created.unix(),
        real - JUMP,
    );
    assert_near(
        "v2 promoted",
        file.versions[1].info.promoted.unwrap().unix(),
        real,
    );
}

/// The prefix and suffix around a variable part of a message; returns it.
#[track_caller]
fn between<'a>(message: &'a str, prefix: &str, suffix: &str) -> &'a str {
    message
        .strip_prefix(prefix)
        .and_then(|m| m.strip_suffix(suffix))
        .unwrap_or_else(|| {
            panic!("{message:?}\n  does not start with {prefix:?}\n  and end with {suffix:?}")
        })
}

/// The usage guard applies to a version this keyring never promoted: a
/// version another node promoted (and encrypted under) is pending here but
/// decrypts. A version that was primary here needs a scan whatever the
/// clock (tests/integration/scan.rs), so this test uses the pending one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_400_days_off_never_makes_a_used_version_retirable() {
    let Some(lib) = libfaketime() else { return };
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    let socket = dir.path().join("kms.sock");
    let logs = dir.path().to_owned();
    let k = keyring.to_str().unwrap().to_owned();
    let out = admin_at_async(&lib, None, &["init", "--keyring", &k], &logs).await;
    out.ok();
    let out = admin_at_async(&lib, None, &["rotate", "--keyring", &k], &logs).await;
    out.ok();
    // Node B got version 2 and promoted it; this node has not yet.
    let b_dir = dir.path().join("b");
    fs::create_dir(&b_dir).unwrap();
    let b_keyring = b_dir.join("keyring");
    fs::copy(&keyring, &b_keyring).unwrap();
    let bk = b_keyring.to_str().unwrap().to_owned();
    let out = admin_at_async(&lib, None, &["promote", "2", "--keyring", &bk], &logs).await;
    out.ok();
    let mut server_b = spawn_serve(&b_keyring, &b_dir.join("kms.sock"), &b_dir, &[]).await;
    let mut client_b = server_b.ready().await;
    let s = seed();
    let sealed = client_b.encrypt(s.clone(), &uid(1)).await.unwrap();
    assert!(sealed.key_id.ends_with("/v2"), "{}", sealed.key_id);

    let mut server = spawn_serve(
        &keyring,
        &socket,
        &logs,
        &["--usage-flush-interval", "100ms"],
    )
    .await;
    let mut client = server.ready().await;
    assert!(client.status().await.unwrap().key_id.ends_with("/v1"));
    // This node's apiserver reads what B's stored: v2 (pending here)
    // serves a Decrypt.
    let decrypted_by = kekd::usage::boot_clock_ms();
    let plain = client
        .decrypt(
            sealed.ciphertext.clone(),
            &sealed.key_id,
            HashMap::new(),
            &uid(2),
        )
        .await
        .unwrap();
    assert_eq!(plain, s);
    let t1 = eventually("the usage file records v2's Decrypt", WAIT, || {
        let (keyring, logs) = (k.clone(), logs.clone());
        let lib = lib.clone();
        async move {
            let out = admin_at_async(
                &lib,
                None,
                &["list", "--output", "json", "--keyring", &keyring],
                &logs,
            )
            .await;
            let doc = json_of(&out);
            match doc["versions"][1]["last_decrypt"].as_str() {
                Some(t) => Ok(t.to_owned()),
                None => Err(doc.to_string()),
            }
        }
    })
    .await;
    let before = fs::read(&keyring).unwrap();
    let audit_before = audit_lines(&keyring).len();

    // The admin's clock 400 days ahead: by the wall clock v2 was last used
    // 400 days ago, but the boot clock says seconds ago.
    let ahead_suffix = |window: &str| {
        format!(
            " ago by the system's boot clock, within the last {window}, although the wall clock puts it at {t1}: \
             the wall clock has jumped; apiservers may still need it (wait until {window} after it, or retire it \
             with a fresh scan showing nothing stored under it (--scan), or pass --force)"
        )
    };
    for (args, window) in [
        (&["retire", "2"][..], "24h"),
        (&["retire", "2", "--window", "1h"][..], "1h"),
    ] {
        let mut all = args.to_vec();
        all.extend(["--keyring", &k]);
        let out = admin_at_async(&lib, Some("+400d"), &all, &logs).await;
        assert_eq!(out.code(), 1, "{args:?}: {out:#?}");
        let ago = between(
            error_message(&out),
            "retire refused: version 2 served a Decrypt ",
            &ahead_suffix(window),
        );
        let ago = humantime::parse_duration(ago).unwrap();
        // No more than the boot clock has seen pass since the Decrypt.
        let since = Duration::from_millis(kekd::usage::boot_clock_ms() - decrypted_by);
        assert!(
            ago <= since,
            "{ago:?} ago, but the Decrypt was {since:?} ago"
        );
        assert_eq!(out.stdout, "", "{out:#?}");
    }

    // 400 days behind: the last use lies in the future. Refused, naming the
    // clock; not "used within the window" for the next 400 days.
    let out = admin_at_async(
        &lib,
        Some("-400d"),
        &["retire", "2", "--keyring", &k],
        &logs,
    )
    .await;
    out.exited(1);
    let fake_now = between(
        error_message(&out),
        &format!(
            "retire refused: version 2 served a Decrypt at {t1}, later than this host's clock says it is now ("
        ),
        "): the clock has jumped back or differs from the server's; fix the clock (`timedatectl`) and run this \
         again, or retire it with a fresh scan showing nothing stored under it (--scan), or pass --force",
    );
    assert_near(
        "the clock the refusal names",
        Timestamp::from(humantime::parse_rfc3339(fake_now).unwrap()).unix(),
        unix_of(&serde_json::json!(t1)) - JUMP,
    );

    // Destroy needs a retired version, whatever the clock.
    for spec in ["+400d", "-400d"] {
        let out = admin_at_async(
            &lib,
            Some(spec),
            &[
                "destroy",
                "2",
                "--yes-destroy-key-material",
                "--keyring",
                &k,
            ],
            &logs,
        )
        .await;
        assert_eq!(
            out.refused(1),
            "destroy refused: version 2 is pending: only a retired version can be destroyed; retire it \
             first and make sure nothing needs it"
        );
    }
    assert_eq!(
        fs::read(&keyring).unwrap(),
        before,
        "a refusal changed the keyring"
    );
    assert_eq!(
        audit_lines(&keyring).len(),
        audit_before,
        "a refusal was audited"
    );

    // The operator's override still works under a jumped clock.
    let out = admin_at_async(
        &lib,
        Some("+400d"),
        &["retire", "2", "--force", "--keyring", &k],
        &logs,
    )
    .await;
    out.ok();

    // The guard is about use, not about the clock: a version that never
    // decrypted retires under either jump.
    let out = admin_at_async(&lib, Some("+400d"), &["rotate", "--keyring", &k], &logs).await;
    out.ok();
    let out = admin_at_async(
        &lib,
        Some("+400d"),
        &["retire", "3", "--keyring", &k],
        &logs,
    )
    .await;
    out.ok();
    let out = admin_at_async(
        &lib,
        Some("-400d"),
        &["restore", "3", "--keyring", &k],
        &logs,
    )
    .await;
    out.ok();
    let out = admin_at_async(
        &lib,
        Some("-400d"),
        &["retire", "3", "--keyring", &k],
        &logs,
    )
    .await;
    out.ok();
    // A retired version is destroyed under a jumped clock like under any.
    let out = admin_at_async(
        &lib,
        Some("+400d"),
        &[
            "destroy",
            "3",
            "--yes-destroy-key-material",
            "--keyring",
            &k,
        ],
        &logs,
    )
    .await;
    out.ok();
    let states: Vec<(u32, kekd::keyring::KeyState)> = store::read(&keyring)
        .unwrap()
        .versions
        .iter()
        .map(|v| (v.info.version.get(), v.info.state))
        .collect();
    {
        use kekd::keyring::KeyState::{Destroyed, Primary, Retired};
        assert_eq!(states, [(1, Primary), (2, Retired), (3, Destroyed)]);
    }

    // The servers served throughout.
    assert!(client.status().await.unwrap().key_id.ends_with("/v1"));
    assert_eq!(client_b.status().await.unwrap().key_id, sealed.key_id);
    for p in [server, server_b] {
        p.signal(rustix::process::Signal::TERM);
        let out = p.wait_exit().await;
        out.ok();
    }
}

/// Sets the offset a serving kekd reads from its timestamp file.
fn set_offset(file: &Path, spec: &str) {
    let tmp = file.with_extension("new");
    fs::write(&tmp, format!("{spec}\n")).unwrap();
    fs::rename(&tmp, file).unwrap();
}

const AGE_WARNING: &str = "the primary key is older than max_key_age: rotation is due";

/// The ops listener's address, from `kekd serve`'s `ops listener` line.
async fn ops_addr_of(process: &Process) -> SocketAddr {
    process.wait_for_stderr("ops listener").await;
    let log = process.stderr();
    let line = log.lines().find(|l| l.contains("ops listener")).unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|a| a.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no addr= in {line:?}"))
}

/// The primary's age as the server's last key-age check computed it on
/// its own clock (`kekd_primary_key_age_seconds` on `/metrics`).
async fn key_age(ops: SocketAddr) -> Result<u64, String> {
    const GAUGE: &str = "kekd_primary_key_age_seconds ";
    let mut stream = tokio::net::TcpStream::connect(ops)
        .await
        .map_err(|e| format!("connect {ops}: {e}"))?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {ops}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    response
        .lines()
        .find_map(|l| l.strip_prefix(GAUGE)?.trim().parse().ok())
        .ok_or_else(|| format!("no {GAUGE}sample in {response:?}"))
}

/// Waits until the server's key-age check, run on its own clock, reports
/// an age `fits`: the observable event that the server's clock has moved
/// to the offset just set and a check has run on it.
async fn wait_for_key_age(ops: SocketAddr, what: &str, fits: fn(u64) -> bool) {
    eventually(what, WAIT, || async move {
        let age = key_age(ops).await?;
        if fits(age) {
            Ok(())
        } else {
            Err(format!("age {age} s"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ids_never_flip_while_the_servers_clock_jumps_400_days_each_way() {
    let Some(lib) = libfaketime() else { return };
    let dir = tempdir().await;
    let keyring = dir.path().join("keyring");
    let socket = dir.path().join("kms.sock");
    let logs = dir.path().to_owned();
    let offset = dir.path().join("faketime");
    let k = keyring.to_str().unwrap().to_owned();
    let out = admin_at_async(&lib, None, &["init", "--keyring", &k], &logs).await;
    out.ok();
    set_offset(&offset, "+0");

    let mut cmd = kekd();
    cmd.arg("serve")
        .arg("--keyring")
        .arg(&keyring)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--reload-interval",
            "200ms",
            "--self-check-interval",
            "1s",
            "--max-key-age",
            "90d",
            "--ops-addr",
            "127.0.0.1:0",
        ])
        .env("LD_PRELOAD", &lib)
        .env("FAKETIME_TIMESTAMP_FILE", &offset)
        // Re-read the offset at most once a second.
        .env("FAKETIME_CACHE_DURATION", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let mut server = {
        let _guard = common::fs_lock().await;
        Process::spawn(cmd, &socket, &logs)
    };
    let mut client = server.ready().await;
    let ops = ops_addr_of(&server).await;
    let v1 = client.status().await.unwrap().key_id;
    let mut sealed = Vec::new();
    let encrypt_one = |mut c: kekd::client::Client, n: usize| async move {
        let s = seed();
        let r = c.encrypt(s.clone(), &uid(n)).await.unwrap();
        (r, s)
    };
    sealed.push(encrypt_one(client.clone(), 0).await);
    assert_eq!(sealed[0].0.key_id, v1);

    // Every call, while the clock jumps: one key_id, every earlier
    // ciphertext decrypts.
    let check = |client: kekd::client::Client,
                 sealed: Vec<(kekd::client::EncryptReply, Vec<u8>)>,
                 expect: String| async move {
        let mut c = client;
        for round in 0..20 {
            assert_eq!(
                c.status().await.unwrap().key_id,
                expect,
                "Status, round {round}"
            );
            for (i, (r, s)) in sealed.iter().enumerate() {
                let p = c
                    .decrypt(
                        r.ciphertext.clone(),
                        &r.key_id,
                        HashMap::new(),
                        &uid(1000 + i),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("ciphertext {i} under {}: {e}", r.key_id));
                assert_eq!(&p, s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // +400 days: the primary (promoted moments ago) is now 400 days old:
    // one warning, and the key id stays.
    set_offset(&offset, "+400d");
    server.wait_for_stderr(AGE_WARNING).await;
    check(client.clone(), sealed.clone(), v1.clone()).await;
    sealed.push(encrypt_one(client.clone(), 1).await);
    assert_eq!(sealed[1].0.key_id, v1);

    // −400 days: the primary was promoted "in the future"; its age counts
    // as zero, no new warning, nothing else changes.
    set_offset(&offset, "-400d");
    wait_for_key_age(
        ops,
        "the key-age check on the clock 400 days behind",
        |age| age == 0,
    )
    .await;
    check(client.clone(), sealed.clone(), v1.clone()).await;
    sealed.push(encrypt_one(client.clone(), 2).await);
    assert_eq!(sealed[2].0.key_id, v1);

    // A rotation on the real clock while the server's is 400 days behind:
    // the key id moves forward once and stays.
    let out = admin_at_async(&lib, None, &["rotate", "--promote", "--keyring", &k], &logs).await;
    out.ok();
    let v2 = v1.replace("/v1", "/v2");
    eventually("Status reports v2", WAIT, || {
        let mut c = client.clone();
        let v2 = v2.clone();
        async move {
            let id = c.status().await.map_err(|e| e.to_string())?.key_id;
            if id == v2 { Ok(()) } else { Err(id) }
        }
    })
    .await;
    check(client.clone(), sealed.clone(), v2.clone()).await;
    // Back to the real clock: v2, promoted on it, ages by the second
    // (behind, it was promoted "in the future" and stayed at age zero).
    set_offset(&offset, "+0");
    wait_for_key_age(ops, "the key-age check on the real clock again", |age| {
        (1..JUMP).contains(&age)
    })
    .await;
    check(client.clone(), sealed.clone(), v2.clone()).await;
    let r = encrypt_one(client.clone(), 3).await;
    assert_eq!(r.0.key_id, v2);

    server.signal(rustix::process::Signal::TERM);
    let out = server.wait_exit().await;
    out.ok();
    let warnings = out
        .stderr
        .lines()
        .filter(|l| l.contains(AGE_WARNING))
        .collect::<Vec<_>>();
    assert_eq!(
        warnings.len(),
        1,
        "one key-age warning, for the jump ahead: {warnings:#?}"
    );
    // `<time>  WARN … key.version=1 age=<duration> max_key_age=<duration>`:
    // the log's own time and the age both follow the jumped clock.
    let real = Timestamp::now().unix();
    let logged_at = warnings[0].split_whitespace().next().unwrap();
    assert_near(
        "the warning's log time",
        Timestamp::from(humantime::parse_rfc3339_weak(logged_at).unwrap()).unix(),
        real + JUMP,
    );
    let age = between(
        warnings[0],
        &warnings[0][..warnings[0].find("age=").unwrap() + 4],
        &warnings[0][warnings[0].find(" max_key_age=").unwrap()..],
    );
    assert_near(
        "the age the warning names",
        humantime::parse_duration(age).unwrap().as_secs(),
        JUMP,
    );
    assert!(warnings[0].contains("key.version=1 "), "{}", warnings[0]);

    // The server's audit event for the switch to v2 carries the server's
    // clock (400 days behind); the admin's rotate line the real one.
    let lines = audit_lines(&keyring);
    let switched: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "snapshot_switched" && l["to_key_id"] == v2.as_str())
        .collect();
    assert_eq!(switched.len(), 1, "{lines:#?}");
    assert_near(
        "the server's switch event",
        unix_of(&switched[0]["time"]),
        real - JUMP,
    );
    let rotated: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["command"] == "rotate").collect();
    // v2 new → pending, v1 primary → decrypt-only, v2 pending → primary.
    assert_eq!(rotated.len(), 3, "{lines:#?}");
    for line in rotated {
        assert_near("the admin's rotate", unix_of(&line["time"]), real);
    }
}
