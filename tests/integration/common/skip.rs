//! Tests that cannot run here (a tool or a privilege is missing) skip
//! through this one helper, which makes the skip impossible to miss.
//!
//! - `KEKD_REQUIRE_ALL=1` (and only `1`) makes a skip a failure: CI sets it.
//! - Otherwise the test returns early and is recorded; when the test binary
//!   exits, one line on the terminal names every skipped test and why.
//!
//! How that last line reaches the terminal: libtest captures `print!` and
//! `eprint!` of passing tests, and has no hook at the end of a run (a
//! `static` is never dropped; `atexit` needs `unsafe`, which the crate
//! forbids). So the first skip starts a tiny `sh` that inherits this
//! process's real stderr and reads summary lines from a pipe; each skip
//! sends the whole updated line. When the test binary exits — passed,
//! failed or killed — the kernel closes the pipe, and `sh` prints the last
//! line it read. It comes right after the binary's `test result:` line.

use std::io::Write as _;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// Whether skipping is forbidden: `KEKD_REQUIRE_ALL=1`, exactly.
pub fn required() -> bool {
    std::env::var_os("KEKD_REQUIRE_ALL").is_some_and(|v| v == "1")
}

/// Skips the calling test because `why` (what is missing, and how to get
/// it). Panics instead under `KEKD_REQUIRE_ALL=1`. The caller returns.
#[track_caller]
pub fn skip(why: &str) {
    assert!(!required(), "{why} (KEKD_REQUIRE_ALL=1 forbids skipping)");
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    eprintln!("SKIPPED {test}: {why}");
    let mut state = SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    state.skipped.push((test, why.to_owned()));
    let line = summary(&state.skipped);
    if state.reporter.is_none() {
        state.reporter = start_reporter();
    }
    if let Some(stdin) = state.reporter.as_mut() {
        // A reporter that died cannot be helped; the per-test line above
        // is still in the test's own output.
        let _ = writeln!(stdin, "{line}").and_then(|()| stdin.flush());
    }
}

/// The one line: how many tests were skipped, grouped by reason.
pub fn summary(skipped: &[(String, String)]) -> String {
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for (test, why) in skipped {
        match reasons.iter_mut().find(|(w, _)| w == why) {
            Some((_, tests)) => tests.push(test),
            None => reasons.push((why, vec![test])),
        }
    }
    let binary = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .map(|n| n.rsplit_once('-').map_or(n.clone(), |(b, _)| b.to_owned()))
        .unwrap_or_default();
    let groups: Vec<String> = reasons
        .iter()
        .map(|(why, tests)| format!("{} ({why})", tests.join(", ")))
        .collect();
    format!(
        "*** SKIPPED {} test(s) in {binary}: {} — set KEKD_REQUIRE_ALL=1 to make a skip a failure ***",
        skipped.len(),
        groups.join("; ")
    )
}

#[derive(Default)]
struct Skipped {
    skipped: Vec<(String, String)>,
    reporter: Option<ChildStdin>,
}

static SKIPPED: Mutex<Skipped> = Mutex::new(Skipped {
    skipped: Vec::new(),
    reporter: None,
});

/// `sh` printing, on this process's stderr, the last line it read once its
/// stdin closes.
// The reporter must outlive this process to print after it: never waited.
#[allow(clippy::zombie_processes)]
fn start_reporter() -> Option<ChildStdin> {
    Command::new("sh")
        .args([
            "-c",
            r#"last=; while IFS= read -r l; do last=$l; done; [ -n "$last" ] && printf '\n%s\n' "$last" >&2"#,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()
        .and_then(|mut child| child.stdin.take())
}
