//! The soak (`docs/soak.md`): `kekd serve` on a fresh SoftHSM2
//! token for `KEKD_SOAK_SECS` seconds (default 600), 64 concurrent
//! Encrypt+Decrypt round trips on one connection as the apiserver keeps one,
//! a `kekd admin rotate --promote` every 15 s, and the token taken away from
//! 40% to 55% of the run.
//!
//! It asserts: zero wrong plaintexts; errors only inside the outage window
//! or the recovery grace after it, and there only UNAVAILABLE; ciphertexts
//! sampled from every key version still decrypt at every rotation and at
//! the end; at least two rotations; kekd's resident memory at the end within
//! [`RSS_GROWTH_BOUND_KIB`] of the start (after warm-up). It prints a
//! summary: calls, errors by window, rotations, RSS start/end, p50/p99.
//!
//! Not part of `cargo test` (`test = false` in Cargo.toml); run it with
//! `cargo test --release --locked --test soak` (CI: `KEKD_SOAK_SECS=60`).
//! Without SoftHSM2 it prints SKIPPED, or fails with `KEKD_REQUIRE_ALL=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The soak uses a few of the integration tests' helpers.
#[allow(dead_code)]
#[path = "integration/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "integration/softhsm/mod.rs"]
mod softhsm;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;
use tonic::Code;

use common::{seed, uid};
use kekd::client::Client;
use softhsm::Token;

/// The soak's length when `KEKD_SOAK_SECS` is not set: 10 minutes.
const DEFAULT_SECS: u64 = 600;
/// The shortest soak that still shows two rotations around the outage.
const MIN_SECS: u64 = 60;
/// Round trips in flight at once.
const CONCURRENCY: usize = 64;
/// A `kekd admin rotate --promote` this often.
const ROTATE_EVERY: Duration = Duration::from_secs(15);
/// The token is away from this fraction of the run...
const OUTAGE_FROM: f64 = 0.40;
/// ...to this one.
const OUTAGE_TO: f64 = 0.55;
/// After the token is back, errors are still allowed this long: kekd
/// re-checks every second while unhealthy and re-initializes the PKCS#11
/// module (tests/integration/pkcs11.rs waits for the same recovery by its
/// "self-check passes again" line).
const RECOVERY_GRACE: Duration = Duration::from_secs(12);
/// Rotations are not attempted from this long before the outage until the
/// grace ends (`admin rotate` needs the token too).
const ROTATION_QUIET_BEFORE: Duration = Duration::from_secs(5);
/// Per-call deadline: the apiserver's default KMS timeout.
const CALL_DEADLINE: Duration = Duration::from_secs(3);
/// Warm-up before the start RSS is taken: allocator arenas, the session
/// pool and HTTP/2 buffers reach their working size.
const WARM_UP: Duration = Duration::from_secs(10);
/// Most growth of kekd's VmRSS from the end of warm-up to the end of the
/// soak. A working set that is flat varies by a few MiB (allocator arenas,
/// one more key object per rotation); a per-call leak of even 100 bytes
/// over the ~1M calls of a 10-minute soak exceeds it.
const RSS_GROWTH_BOUND_KIB: i64 = 24 * 1024;
/// Ciphertexts kept per key version and re-decrypted later.
const SAMPLES_PER_VERSION: usize = 16;

/// Which part of the run an instant falls into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Window {
    Before,
    Outage,
    Grace,
    After,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    total: Duration,
    outage_from: Duration,
    outage_to: Duration,
}

impl Plan {
    fn new(secs: u64) -> Self {
        let total = Duration::from_secs(secs);
        Self {
            total,
            outage_from: total.mul_f64(OUTAGE_FROM),
            outage_to: total.mul_f64(OUTAGE_TO),
        }
    }

    fn window(&self, at: Duration) -> Window {
        if at < self.outage_from {
            Window::Before
        } else if at < self.outage_to {
            Window::Outage
        } else if at < self.outage_to + RECOVERY_GRACE {
            Window::Grace
        } else {
            Window::After
        }
    }

    /// Whether a rotation may be attempted at `at`.
    fn may_rotate(&self, at: Duration) -> bool {
        at + ROTATION_QUIET_BEFORE < self.outage_from || at >= self.outage_to + RECOVERY_GRACE
    }
}

/// A ciphertext kept to be decrypted again later.
#[derive(Clone)]
struct Sample {
    key_id: String,
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
}

/// Everything the workers, the rotator and the sampler record.
#[derive(Default)]
struct Record {
    /// (when, what, code, message) of every failed call.
    errors: Vec<(Duration, &'static str, Code, String)>,
    /// Descriptions of every wrong plaintext.
    wrong: Vec<String>,
    /// Samples by key version.
    samples: BTreeMap<u32, Vec<Sample>>,
    /// Round-trip latencies of successful round trips, in microseconds.
    latencies: Vec<u32>,
    /// (when, new key id) of each rotation.
    rotations: Vec<(Duration, String)>,
    /// Rotations skipped because of the outage.
    rotations_skipped: usize,
    /// Failures of rotations attempted outside the outage.
    rotation_failures: Vec<String>,
    /// Samples re-decrypted (at rotations and at the end).
    samples_checked: u64,
}

fn soak_secs() -> u64 {
    match std::env::var("KEKD_SOAK_SECS") {
        Err(_) => DEFAULT_SECS,
        Ok(v) => match v.parse::<u64>() {
            Ok(s) if s >= MIN_SECS => s,
            _ => panic!(
                "KEKD_SOAK_SECS={v:?}: give the soak's length in whole seconds, at least {MIN_SECS} \
                 (two rotations every {ROTATE_EVERY:?} around the outage need that long)"
            ),
        },
    }
}

/// kekd's pid, from the peer credentials of a connection to its socket.
async fn pid_of(socket: &std::path::Path) -> i32 {
    let stream = UnixStream::connect(socket).await.expect("connect for pid");
    stream
        .peer_cred()
        .expect("SO_PEERCRED")
        .pid()
        .expect("the kernel reports the peer's pid")
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn version_of(key_id: &str) -> u32 {
    common::version_of(key_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs = soak_secs();
    let Some(token) = Token::create() else { return };
    let plan = Plan::new(secs);
    let node = token.default_node("soak");
    let first_key_id = token.init(&node);
    let mut server = token.spawn_serve(&node);
    let ready = server.ready().await;
    drop(ready);
    let pid = pid_of(&node.socket).await;
    // One connection, as the apiserver keeps one; calls multiplex on it.
    let client = Client::connect(&node.socket, CALL_DEADLINE)
        .await
        .expect("connect");
    eprintln!(
        "soak: {secs} s, concurrency {CONCURRENCY}, rotation every {ROTATE_EVERY:?}, \
         token away {:?}..{:?} (+{RECOVERY_GRACE:?} grace), kekd pid {pid}",
        plan.outage_from, plan.outage_to
    );

    let record = Arc::new(Mutex::new(Record::default()));
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + plan.total;

    // The workers.
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY {
        let mut client = client.clone();
        let record = Arc::clone(&record);
        let calls = Arc::clone(&calls);
        workers.spawn(async move {
            let mut rng = common::Rng::from_os();
            let mut latencies = Vec::new();
            let mut n = 0usize;
            while Instant::now() < end {
                n += 1;
                let id = uid(w << 32 | n);
                let plaintext = seed();
                let t = Instant::now();
                let enc = client.encrypt(plaintext.clone(), &id).await;
                calls.fetch_add(1, Ordering::Relaxed);
                let enc = match enc {
                    Ok(e) => e,
                    Err(e) => {
                        let at = started.elapsed();
                        record.lock().unwrap().errors.push((
                            at,
                            "encrypt",
                            e.code(),
                            e.message().to_owned(),
                        ));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let dec = client
                    .decrypt(enc.ciphertext.clone(), &enc.key_id, HashMap::new(), &id)
                    .await;
                calls.fetch_add(1, Ordering::Relaxed);
                match dec {
                    Ok(p) if p == plaintext => {
                        latencies.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        let mut r = record.lock().unwrap();
                        let kept = r.samples.entry(version_of(&enc.key_id)).or_default();
                        if kept.len() < SAMPLES_PER_VERSION {
                            kept.push(Sample {
                                key_id: enc.key_id.clone(),
                                ciphertext: enc.ciphertext.clone(),
                                plaintext: plaintext.clone(),
                            });
                        }
                    }
                    Ok(_) => record.lock().unwrap().wrong.push(format!(
                        "round trip under {} returned another plaintext",
                        enc.key_id
                    )),
                    Err(e) => {
                        let at = started.elapsed();
                        record.lock().unwrap().errors.push((
                            at,
                            "decrypt",
                            e.code(),
                            e.message().to_owned(),
                        ));
                    }
                }
                // Every 8th round trip also opens an older ciphertext.
                if n.is_multiple_of(8) {
                    let old = {
                        let r = record.lock().unwrap();
                        let all: Vec<&Sample> = r.samples.values().flatten().collect();
                        (!all.is_empty()).then(|| all[rng.below(all.len() as u64) as usize].clone())
                    };
                    if let Some(old) = old {
                        let got = client
                            .decrypt(old.ciphertext.clone(), &old.key_id, HashMap::new(), &id)
                            .await;
                        calls.fetch_add(1, Ordering::Relaxed);
                        match got {
                            Ok(p) if p == old.plaintext => {}
                            Ok(_) => record.lock().unwrap().wrong.push(format!(
                                "sample under {} returned another plaintext",
                                old.key_id
                            )),
                            Err(e) => {
                                let at = started.elapsed();
                                record.lock().unwrap().errors.push((
                                    at,
                                    "decrypt old",
                                    e.code(),
                                    e.message().to_owned(),
                                ));
                            }
                        }
                    }
                }
            }
            record.lock().unwrap().latencies.extend(latencies);
        });
    }

    // The rotator, the outage, and the RSS readings, on one timeline.
    let mut rss_start: Option<i64> = None;
    let mut rss_max = 0i64;
    let mut away = None;
    let mut next_rotation = ROTATE_EVERY;
    let mut checker = client.clone();
    loop {
        let at = started.elapsed();
        if at >= plan.total {
            break;
        }
        let rss = rss_kib(pid);
        rss_max = rss_max.max(rss);
        if rss_start.is_none() && at >= WARM_UP {
            rss_start = Some(rss);
        }
        if away.is_none() && at >= plan.outage_from && at < plan.outage_to {
            eprintln!("soak: {at:.1?} token taken away");
            away = Some(token.take_away());
        }
        if at >= plan.outage_to
            && let Some(a) = away.take()
        {
            a.put_back();
            eprintln!("soak: {at:.1?} token back");
        }
        if at >= next_rotation {
            next_rotation += ROTATE_EVERY;
            if plan.may_rotate(at) {
                rotate(&token, &node, &record, started).await;
                check_samples(&mut checker, &record, started).await;
            } else {
                record.lock().unwrap().rotations_skipped += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_end = rss_kib(pid);
    while let Some(r) = workers.join_next().await {
        r.expect("worker");
    }
    if let Some(a) = away.take() {
        a.put_back();
    }
    check_samples(&mut checker, &record, started).await;
    let status = checker.status().await.expect("Status at the end");
    assert!(
        server.try_exit().is_none(),
        "kekd exited:\n{}",
        server.stderr()
    );

    // The summary.
    let mut r = record.lock().unwrap();
    let calls = calls.load(Ordering::Relaxed);
    let mut by_window: BTreeMap<Window, BTreeMap<(String, &'static str), usize>> = BTreeMap::new();
    for (at, what, code, message) in &r.errors {
        // One line per kind of error, not per request uid.
        let message = match message.split_once("(request uid ") {
            Some((head, rest)) => {
                format!(
                    "{head}(request uid …{}",
                    rest.split_once(')').map_or("", |r| r.1)
                )
            }
            None => message.clone(),
        };
        *by_window
            .entry(plan.window(*at))
            .or_default()
            .entry((format!("{code:?}: {message}"), what))
            .or_default() += 1;
    }
    r.latencies.sort_unstable();
    let pct = |p: f64| -> Duration {
        let l = &r.latencies;
        if l.is_empty() {
            return Duration::ZERO;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        Duration::from_micros(u64::from(l[i]))
    };
    let rss_start = rss_start.expect("the soak outlasted its warm-up");
    let recovered = r
        .errors
        .iter()
        .map(|e| e.0)
        .max()
        .filter(|last| *last >= plan.outage_to)
        .map_or_else(
            || "at once".to_owned(),
            |last| format!("{:.1?} after the token came back", last - plan.outage_to),
        );
    let versions: Vec<u32> = r.samples.keys().copied().collect();
    eprintln!(
        "\nsoak summary ({secs} s)\n\
         \x20 calls            {calls} ({:.0}/s), round trips ok {}\n\
         \x20 wrong plaintexts {}\n\
         \x20 errors           before {}, outage {}, grace {}, after {}; last error {recovered}\n\
         \x20 rotations        {} done, {} skipped for the outage, {} failed; key versions sampled {versions:?}\n\
         \x20 samples checked  {}\n\
         \x20 latency          p50 {:?}, p99 {:?}, max {:?} (Encrypt+Decrypt round trip)\n\
         \x20 kekd VmRSS       start {} KiB (after {WARM_UP:?}), end {} KiB, growth {} KiB, max {} KiB\n\
         \x20 final key_id     {}",
        calls as f64 / secs as f64,
        r.latencies.len(),
        r.wrong.len(),
        count(&by_window, Window::Before),
        count(&by_window, Window::Outage),
        count(&by_window, Window::Grace),
        count(&by_window, Window::After),
        r.rotations.len(),
        r.rotations_skipped,
        r.rotation_failures.len(),
        r.samples_checked,
        pct(0.50),
        pct(0.99),
        pct(1.0),
        rss_start,
        rss_end,
        rss_end - rss_start,
        rss_max,
        status.key_id,
    );
    for (window, errors) in &by_window {
        for ((what, op), n) in errors {
            eprintln!("  {window:?}: {n} × {op} {what}");
        }
    }

    assert!(r.wrong.is_empty(), "wrong plaintexts: {:?}", r.wrong);
    for window in [Window::Before, Window::After] {
        assert_eq!(
            count(&by_window, window),
            0,
            "errors outside the outage window: {:?}",
            by_window.get(&window)
        );
    }
    assert!(
        count(&by_window, Window::Outage) > 0,
        "no call failed while the token was away: the outage did not happen"
    );
    assert!(
        r.rotation_failures.is_empty(),
        "rotations failed outside the outage: {:?}",
        r.rotation_failures
    );
    assert!(
        r.rotations.len() >= 2,
        "only {} rotations in {secs} s",
        r.rotations.len()
    );
    let last = &r.rotations.last().unwrap().1;
    assert_eq!(
        &status.key_id, last,
        "Status serves the last rotation's key"
    );
    assert_eq!(
        version_of(&status.key_id),
        version_of(&first_key_id) + u32::try_from(r.rotations.len()).unwrap()
    );
    assert!(
        versions.len() > r.rotations.len(),
        "samples from every version: {versions:?}"
    );
    assert!(
        rss_end - rss_start < RSS_GROWTH_BOUND_KIB,
        "kekd's VmRSS grew {} KiB (from {rss_start} to {rss_end} KiB), bound {RSS_GROWTH_BOUND_KIB} KiB",
        rss_end - rss_start
    );
    // Last, so a run that fails here has passed every other check: during
    // the outage the apiserver sees UNAVAILABLE, never INTERNAL.
    for window in [Window::Outage, Window::Grace] {
        for (what, _) in by_window
            .get(&window)
            .map(|e| e.keys())
            .into_iter()
            .flatten()
        {
            assert!(
                what.starts_with("Unavailable: "),
                "{window:?}: an error other than UNAVAILABLE: {what}\nkekd's ERROR lines:\n{}",
                server
                    .stderr()
                    .lines()
                    .filter(|l| l.contains("ERROR"))
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

fn count(
    by_window: &BTreeMap<Window, BTreeMap<(String, &'static str), usize>>,
    w: Window,
) -> usize {
    by_window.get(&w).map_or(0, |e| e.values().sum())
}

/// `kekd admin rotate --promote` on the node's token; records the new key
/// id, or the failure.
async fn rotate(token: &Token, node: &softhsm::Node, record: &Mutex<Record>, started: Instant) {
    let at = started.elapsed();
    let out = tokio::task::block_in_place(|| {
        token.admin(node, "rotate", &["--promote", "--output", "json"])
    });
    if out.code() != 0 {
        record
            .lock()
            .unwrap()
            .rotation_failures
            .push(format!("at {at:?}: {out:?}"));
        return;
    }
    let json = softhsm::json_of(&out);
    let key_id = json["transitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["to"] == "primary")
        .and_then(|t| t["key_id"].as_str())
        .unwrap_or_else(|| panic!("rotate --promote reported no new primary: {json}"))
        .to_owned();
    eprintln!("soak: {at:.1?} rotated to {key_id}");
    record.lock().unwrap().rotations.push((at, key_id));
}

/// Decrypts every sample kept so far; outside the outage, each must return
/// its plaintext.
async fn check_samples(client: &mut Client, record: &Mutex<Record>, started: Instant) {
    let samples: Vec<Sample> = record
        .lock()
        .unwrap()
        .samples
        .values()
        .flatten()
        .cloned()
        .collect();
    for (i, s) in samples.iter().enumerate() {
        let got = client
            .decrypt(s.ciphertext.clone(), &s.key_id, HashMap::new(), &uid(i))
            .await;
        let at = started.elapsed();
        let mut r = record.lock().unwrap();
        r.samples_checked += 1;
        match got {
            Ok(p) if p == s.plaintext => {}
            Ok(_) => r.wrong.push(format!(
                "sample under {} returned another plaintext",
                s.key_id
            )),
            Err(e) => r
                .errors
                .push((at, "decrypt sample", e.code(), e.message().to_owned())),
        }
    }
}
