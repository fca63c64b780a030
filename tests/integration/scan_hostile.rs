//! `kekd admin scan` against a hostile or broken etcd: a fake
//! `etcdserverpb.KV/Range` written here over raw HTTP/2 (h2) with
//! prost-encoded messages, scripted request by request, so it can answer
//! what no real etcd would. The scan is the evidence `retire --scan` goes
//! by: whatever the endpoint sends, it must either read every key under the
//! prefix exactly once or fail, and fail in bounded time and memory, with
//! an error that cannot drive the admin's terminal.
//!
//! Checked and found to hold (no test here): gRPC errors saying "message
//! length too large" at every page size halve the page down to 1 key, then
//! fail; "compacted" fails with the rerun advice; a count of N with pages
//! holding another number of keys fails as inconsistent; the response
//! header's size is bounded by hyper (16 KiB header list) and a page by
//! `MAX_PAGE_BYTES` before it is buffered; TLS uses only `--cacert` (tonic
//! is built without native or webpki roots), an `https://` endpoint never
//! falls back to plaintext, `http://` with TLS flags and mixed schemes are
//! refused, and a TLS file that is a FIFO, device or over 16 MiB is refused
//! by `open_regular` before any read (symlinks to a regular file are
//! followed, as for every other input file).

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use kekd::scan::etcd::proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use kekd::scan::etcd::proto::mvccpb::KeyValue;
use prost::Message as _;
use tokio::task::JoinSet;
use tonic::codegen::{Bytes, http};

use common::{error_message, tempdir};

/// What the fake etcd answers to one Range request.
enum Answer {
    /// A Range response.
    Page(RangeResponse),
    /// An already encoded message, for one no well-behaved encoder writes.
    Raw(Vec<u8>),
    /// A gRPC error with this code and message (percent-encoded on the
    /// wire, as gRPC does, so it may hold any byte).
    Error(i32, String),
    /// Response headers, then nothing: the message never comes.
    Stall,
}

/// The script: request number (0 = the count) and request → answer.
type Script = dyn Fn(usize, &RangeRequest) -> Answer + Send + Sync;

/// A fake etcd on a loopback port; everything it runs stops on drop.
struct FakeEtcd {
    url: String,
    requests: Arc<Mutex<Vec<RangeRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeEtcd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEtcd {
    async fn start(
        script: impl Fn(usize, &RangeRequest) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let script: Arc<Script> = Arc::new(script);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        // Connections live in this task's JoinSet and their streams in
        // theirs: aborting the task ends them all.
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (script, seen) = (Arc::clone(&script), Arc::clone(&seen));
                connections.spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(socket).await else {
                        return;
                    };
                    let mut streams = JoinSet::new();
                    while let Some(Ok((request, respond))) = conn.accept().await {
                        streams.spawn(answer(
                            request,
                            respond,
                            Arc::clone(&script),
                            Arc::clone(&seen),
                        ));
                    }
                });
            }
        });
        Self {
            url,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<RangeRequest> {
        self.requests.lock().unwrap().clone()
    }
}

async fn answer(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<RangeRequest>>>,
) {
    assert_eq!(request.uri().path(), "/etcdserverpb.KV/Range");
    let mut body = request.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let range = RangeRequest::decode(bytes.get(5..).unwrap_or_default()).unwrap();
    let n = {
        let mut seen = seen.lock().unwrap();
        seen.push(range.clone());
        seen.len() - 1
    };
    let head = || {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
    };
    let message = match script(n, &range) {
        Answer::Page(page) => page.encode_to_vec(),
        Answer::Raw(bytes) => bytes,
        Answer::Error(code, message) => {
            let response = head()
                .header("grpc-status", code.to_string())
                .header("grpc-message", percent_encode(&message))
                .body(())
                .unwrap();
            let _ = respond.send_response(response, true);
            return;
        }
        Answer::Stall => {
            let _stream = respond.send_response(head().body(()).unwrap(), false);
            std::future::pending::<()>().await;
            return;
        }
    };
    let Ok(mut stream) = respond.send_response(head().body(()).unwrap(), false) else {
        return;
    };
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let _ = stream.send_data(Bytes::from(frame), false);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

const REVISION: i64 = 42;

fn header() -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision: REVISION,
        raft_term: 2,
    })
}

/// The count-only answer: `count` keys at [`REVISION`].
fn counted(count: i64) -> Answer {
    Answer::Page(RangeResponse {
        header: header(),
        count,
        ..RangeResponse::default()
    })
}

/// A page holding `keys` (values stored in plaintext JSON).
fn page(keys: &[&str], more: bool) -> Answer {
    Answer::Page(RangeResponse {
        header: header(),
        kvs: keys
            .iter()
            .map(|k| KeyValue {
                key: k.as_bytes().to_vec(),
                value: b"{}".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                lease: 0,
            })
            .collect(),
        more,
        count: i64::try_from(keys.len()).unwrap(),
    })
}

/// `kekd admin scan --etcd-endpoints URL --timeout 2s EXTRA… --output json`.
async fn scan(etcd: &FakeEtcd, extra: &[&str], logs: &Path) -> common::Finished {
    let mut args = vec!["scan", "--etcd-endpoints", &etcd.url, "--timeout", "2s"];
    args.extend(extra);
    args.extend(["--output", "json"]);
    common::admin_async(&args, logs).await
}

/// Pages that break Range's contract — a key twice, keys going backwards,
/// a key outside the prefix, no progress — while the total still matches
/// the count: each such scan would count some object twice and miss
/// another (here `/registry/secrets/ns/a`, the one `retire --scan` would
/// need to see). The scan refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_that_repeat_reorder_or_leave_the_range_are_refused() {
    let dir = tempdir().await;
    let (a, b, c) = (
        "/registry/secrets/ns/a",
        "/registry/secrets/ns/b",
        "/registry/secrets/ns/c",
    );
    // (what, pages as (keys, more)), after a count of 2.
    type Pages = Vec<(Vec<&'static str>, bool)>;
    let cases: Vec<(&str, Pages)> = vec![
        (
            "a key twice across pages",
            vec![(vec![b], true), (vec![b], false)],
        ),
        ("a key twice in one page", vec![(vec![b, b], false)]),
        ("keys going backwards", vec![(vec![c, b], false)]),
        (
            "a key before the page's start",
            vec![(vec![b], true), (vec![a], false)],
        ),
        (
            "a key after the prefix",
            vec![(vec![b, "/registrz"], false)],
        ),
        ("a key before the prefix", vec![(vec!["/a", b], false)]),
    ];
    for (what, pages) in cases {
        let pages = Arc::new(pages);
        let etcd = FakeEtcd::start(move |n, _| match n {
            0 => counted(2),
            n => pages
                .get(n - 1)
                .map_or_else(|| page(&[], false), |(keys, more)| page(keys, *more)),
        })
        .await;
        let out = scan(&etcd, &["--page-size", "10"], dir.path()).await;
        assert_eq!(out.code(), 1, "{what}: {out:#?}");
        assert!(
            error_message(&out).contains("out of order or outside the prefix"),
            "{what}: {out:#?}"
        );
    }
}

/// An endpoint that keeps saying `more` with ever new keys would keep the
/// scan reading forever: it stops as soon as it has read more keys than
/// were counted. A page that says `more` but holds no key is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_pages_end_at_the_count() {
    let dir = tempdir().await;
    let etcd = FakeEtcd::start(|n, _| match n {
        0 => counted(3),
        n => page(&[&format!("/registry/secrets/ns/{n:012}")], true),
    })
    .await;
    let out = scan(&etcd, &["--page-size", "1"], dir.path()).await;
    assert_eq!(
        out.refused(1),
        format!("etcd counted 3 keys under the prefix at revision {REVISION} but the pages held 4"),
        "{out:#?}"
    );
    assert_eq!(etcd.requests().len(), 5);

    let etcd = FakeEtcd::start(|n, _| match n {
        0 => counted(1),
        1 => page(&["/registry/secrets/ns/a"], true),
        _ => page(&[], true),
    })
    .await;
    let out = scan(&etcd, &["--page-size", "1"], dir.path()).await;
    out.exited(1);
    assert!(
        error_message(&out).contains("says more keys follow but holds none"),
        "{out:#?}"
    );
}

/// The count fixes the revision every page is read at: without a header
/// (revision 0 = "the latest" to etcd) the pages would each be read at
/// whatever revision is current, not one snapshot, and the report would
/// claim revision 0. A negative count is no count either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_without_a_revision_is_refused() {
    let dir = tempdir().await;
    let no_header = |n: usize, _: &RangeRequest| match n {
        0 => Answer::Page(RangeResponse {
            count: 1,
            ..RangeResponse::default()
        }),
        _ => page(&["/registry/secrets/ns/a"], false),
    };
    let negative = |n: usize, _: &RangeRequest| match n {
        0 => counted(-1),
        _ => page(&[], false),
    };
    for (what, etcd) in [
        ("no header", FakeEtcd::start(no_header).await),
        ("negative count", FakeEtcd::start(negative).await),
    ] {
        let out = scan(&etcd, &[], dir.path()).await;
        assert_eq!(out.code(), 1, "{what}: {out:#?}");
        assert!(
            error_message(&out).contains("no revision or count"),
            "{what}: {out:#?}"
        );
        assert_eq!(etcd.requests().len(), 1, "{what}: no page is read");
    }
}

/// `--timeout` bounds each request as a whole, not only the wait for the
/// response headers: an endpoint that sends headers and then never the
/// message, or never answers at all, fails the scan with "timed out"
/// (without the timeout it would hang until the harness kills it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_never_comes_times_out() {
    let dir = tempdir().await;
    for (what, etcd) in [
        (
            "a count that never comes",
            FakeEtcd::start(|_, _| Answer::Stall).await,
        ),
        (
            "a page that never comes",
            FakeEtcd::start(|n, _| match n {
                0 => counted(1),
                _ => Answer::Stall,
            })
            .await,
        ),
    ] {
        let out = scan(&etcd, &[], dir.path()).await;
        assert_eq!(out.code(), 1, "{what}: {out:#?}");
        assert!(
            error_message(&out).contains("timed out"),
            "{what}: {out:#?}"
        );
    }
}

/// An https:// endpoint that accepts the connection and never speaks TLS:
/// the handshake is bounded by `--timeout` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_never_ends_times_out() {
    let dir = tempdir().await;
    let ca = dir.path().join("ca.crt");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=scan-hostile-ca", "-keyout"])
        .arg(dir.path().join("ca.key"))
        .arg("-out")
        .arg(&ca)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(out.status.success(), "{out:?}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let out = common::admin_async(
        &[
            "scan",
            "--etcd-endpoints",
            &url,
            "--cacert",
            ca.to_str().unwrap(),
            "--timeout",
            "2s",
        ],
        dir.path(),
    )
    .await;
    silent.abort();
    out.exited(1);
    assert!(error_message(&out).contains("timed out"), "{out:#?}");
}

/// A gRPC error's message is the endpoint's text: it reaches the terminal
/// escaped (no ESC, BEL or newline can clear the screen, retitle the window
/// or forge a line) and cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_text_from_the_endpoint_is_printed_escaped() {
    let dir = tempdir().await;
    let hostile = format!(
        "\x1b[2J\x1b]0;pwned\x07\nkekd: error: forged\u{202e}{}",
        "A".repeat(8000)
    );
    let etcd = FakeEtcd::start(move |_, _| Answer::Error(2, hostile.clone())).await;
    let out = scan(&etcd, &[], dir.path()).await;
    out.exited(1);
    for raw in ['\x1b', '\x07', '\u{202e}'] {
        assert!(!out.stderr.contains(raw), "{raw:?} printed raw: {out:#?}");
    }
    let message = error_message(&out);
    assert!(
        message.contains("\\x1b[2J\\x1b]0;pwned\\x07\\x0akekd: error: forged\\u{202e}AAA"),
        "{message}"
    );
    assert!(message.len() < 2000, "{} bytes", message.len());
}

/// A page of tens of millions of empty pairs fits in the 64 MiB message
/// limit (two bytes each) but decodes to gigabytes of `KeyValue`s. A page
/// holding more pairs than the limit asked for is refused before they are
/// decoded: under a 1 GiB address-space limit the scan fails cleanly
/// instead of aborting on a failed allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_millions_of_empty_pairs_is_refused_in_bounded_memory() {
    let dir = tempdir().await;
    let mut flood = Vec::with_capacity(60 << 20);
    // Field 1 (header), then field 2 (kvs) as empty messages, 2 bytes each.
    let mut head = Vec::new();
    prost::encoding::message::encode(1, &header().unwrap(), &mut head);
    flood.extend_from_slice(&head);
    while flood.len() + 2 <= 60 << 20 {
        flood.extend_from_slice(&[0x12, 0x00]);
    }
    let flood = Arc::new(flood);
    let etcd = FakeEtcd::start(move |n, _| match n {
        0 => counted(1),
        _ => Answer::Raw(flood.as_ref().clone()),
    })
    .await;
    let mut cmd = Command::new("sh");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .arg("-c")
        .arg(r#"ulimit -v 1048576 && exec "$0" "$@""#)
        .arg(common::kekd_bin())
        .args(["admin", "scan", "--etcd-endpoints", &etcd.url])
        .args(["--timeout", "10s", "--page-size", "500"]);
    let logs = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || common::run(cmd, &logs))
        .await
        .unwrap();
    out.exited(1);
    assert!(
        error_message(&out).contains("pairs, more than the 500 asked for"),
        "{out:#?}"
    );
}
