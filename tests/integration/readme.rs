//! README.md runs: every fenced block of it is identified here, and every
//! command in it is run **verbatim** by `bash` — only the substitutions
//! below applied — with what README says it prints checked where it says it.
//! kube-apiserver is not needed by any README block (its
//! EncryptionConfiguration is `deploy/encryption-config.yaml`'s, which
//! tests/e2e/run.sh and the conformance suite load).
//!
//! Substitutions (those of tests/e2e/README.md's step 9 table, plus
//! `/var/lib/kekd`, the PKCS#11 config's `state_dir`):
//!
//! | in README | in the run |
//! |---|---|
//! | `cargo run --release -- ARGS` | `kekd ARGS`: this build's binary ([`common::kekd_bin`]), no second build |
//! | `/etc/kekd`, `/etc/kubernetes`, `/etc/systemd/system`, `/var/run/kekd`, `/var/lib/kekd`, `/root`, `/usr/local/bin` | a fresh root directory + the same path |
//!
//! `kekd` is first on `PATH` (a link to this build's binary); no `KEKD_*`
//! variable is inherited. A `kekd serve` command is started in the
//! background (`exec`, so its pid is kekd's) and stopped with SIGTERM by the
//! test, which then checks it exited 0 and removed its socket.
//!
//! A fence's blocks are listed in [`KNOWN`]: a new or changed block fails
//! [`every_readme_block_is_known_and_run`], so none can escape. A block that
//! cannot run is marked `<!-- e2e-skip: REASON -->` on the line before its
//! fence (as in the docs step 9 runs); one command of a block that cannot
//! run is marked ``<!-- e2e-skip `COMMAND`: REASON -->``. The only one is
//! `cargo test --locked` (cargo test cannot run itself): .ci/run runs that
//! line verbatim, which [`fresh_machine_serve_dev_then_probe_prints_what_readme_shows`]
//! checks.

// A test's expect is its assertion.

use crate::common;
use crate::softhsm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;
use yaml_rust2::{Yaml, YamlLoader};

use common::{Finished, Process};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// Every fenced block of README.md, in order: its language, its first
/// non-comment line, and the test that runs (or checks) it.
const KNOWN: &[(&str, &str, &str)] = &[
    (
        "sh",
        "cargo run --release -- serve --dev",
        "fresh_machine_serve_dev_then_probe_prints_what_readme_shows",
    ),
    (
        "sh",
        "cargo run --release -- admin probe --socket kekd-dev/kms.sock",
        "fresh_machine_serve_dev_then_probe_prints_what_readme_shows",
    ),
    (
        "text",
        "probe of kekd-dev/kms.sock",
        "fresh_machine_serve_dev_then_probe_prints_what_readme_shows",
    ),
    (
        "sh",
        "grpcurl -plaintext -unix /var/run/kekd/kms.sock list",
        "grpcurl_commands_run_against_the_node_socket",
    ),
    (
        "sh",
        "kekd admin init --keyring /etc/kekd/keyring",
        "node_init_refuses_a_second_time_and_serve_answers",
    ),
    (
        "yaml",
        "apiVersion: apiserver.config.k8s.io/v1",
        "encryption_configuration_is_the_shipped_one",
    ),
    (
        "sh",
        "kekd admin init --config /etc/kekd/kekd.toml",
        "hsm_init_and_serve_with_the_shipped_pkcs11_config",
    ),
];

/// Languages whose fences hold commands (as tests/e2e/docblocks.py).
const COMMAND_LANGS: &[&str] = &["", "sh", "bash", "shell", "console"];

/// One fenced block of README.md.
#[derive(Debug, Clone)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    body: Vec<String>,
    /// `<!-- e2e-skip: R -->`: the whole block is not run.
    skip: Option<String>,
    /// ``<!-- e2e-skip `CMD`: R -->``: that one command is not run.
    skip_command: Option<(String, String)>,
}

impl Block {
    /// The block's logical commands (`\` continuations joined, blank lines
    /// and comment lines dropped), as docblocks.py cuts them; a command
    /// keeps its trailing comment (bash ignores it).
    fn commands(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur: Vec<&str> = Vec::new();
        for line in &self.body {
            if cur.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
                continue;
            }
            cur.push(line);
            if line.ends_with('\\') {
                continue;
            }
            out.push(cur.join("\n"));
            cur.clear();
        }
        if !cur.is_empty() {
            out.push(cur.join("\n"));
        }
        out
    }

    /// The first non-blank, non-comment line (the identity in [`KNOWN`]).
    fn first(&self) -> String {
        let line = self
            .body
            .iter()
            .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map_or("", String::as_str);
        // A command's trailing comment is not part of its identity.
        match line.find("  #") {
            Some(i) if COMMAND_LANGS.contains(&self.lang.as_str()) => line[..i].trim_end().into(),
            _ => line.trim_end().into(),
        }
    }
}

/// Every fenced block of README.md.
fn blocks() -> Vec<Block> {
    let text = fs::read_to_string(README).expect("read README.md");
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some((indent, fence, lang)) = fence(lines[i]) else {
            i += 1;
            continue;
        };
        let start = i;
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != fence {
            body.push(
                lines[i]
                    .strip_prefix(indent)
                    .unwrap_or(lines[i].trim_start())
                    .to_owned(),
            );
            i += 1;
        }
        assert!(i < lines.len(), "README.md:{}: unclosed fence", start + 1);
        i += 1;
        let marker = start
            .checked_sub(1)
            .and_then(|p| marker(lines[p]))
            .unwrap_or_default();
        let (skip, skip_command) = match marker {
            Marker::None => (None, None),
            Marker::Block(r) => (Some(r), None),
            Marker::Command(c, r) => (None, Some((c, r))),
        };
        out.push(Block {
            line: start + 1,
            lang: lang.to_owned(),
            body,
            skip,
            skip_command,
        });
    }
    out
}

/// `(indent, fence, lang)` of an opening fence line.
fn fence(line: &str) -> Option<(&str, &str, &str)> {
    let rest = line.trim_start();
    let indent = &line[..line.len() - rest.len()];
    let n = rest.bytes().take_while(|&b| b == b'`').count();
    if n < 3 {
        return None;
    }
    let lang = rest[n..].trim();
    lang.chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        .then(|| (indent, &rest[..n], lang))
}

#[derive(Default)]
enum Marker {
    #[default]
    None,
    Block(String),
    Command(String, String),
}

fn marker(line: &str) -> Option<Marker> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("e2e-skip")?;
    if let Some(r) = inner.strip_prefix(':') {
        return Some(Marker::Block(r.trim().to_owned()));
    }
    let rest = inner.trim_start().strip_prefix('`')?;
    let (cmd, rest) = rest.split_once('`')?;
    let reason = rest.strip_prefix(':')?.trim();
    Some(Marker::Command(cmd.to_owned(), reason.to_owned()))
}

/// The one README block [`KNOWN`] lists as `(lang, first)`.
#[track_caller]
fn block(lang: &str, first: &str) -> Block {
    let found: Vec<Block> = blocks()
        .into_iter()
        .filter(|b| b.lang == lang && b.first() == first)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "README.md: expected one ```{lang} block starting `{first}`, found {found:#?}"
    );
    found.into_iter().next().expect("one block (asserted)")
}

#[test]
fn every_readme_block_is_known_and_run() {
    let blocks = blocks();
    let seen: Vec<(String, String)> = blocks.iter().map(|b| (b.lang.clone(), b.first())).collect();
    let known: Vec<(String, String)> = KNOWN
        .iter()
        .map(|(l, f, _)| ((*l).to_owned(), (*f).to_owned()))
        .collect();
    for b in &blocks {
        assert!(
            KNOWN
                .iter()
                .any(|(l, f, _)| *l == b.lang && *f == b.first()),
            "README.md:{}: ```{} block `{}` is run by no test: add it to tests/integration/readme.rs KNOWN \
             and run it, or mark it <!-- e2e-skip: REASON --> (and still list it)",
            b.line,
            b.lang,
            b.first()
        );
    }
    assert_eq!(seen, known, "README.md's blocks, in order");
    // Only the one marked command exists; no block is marked whole.
    let marked: Vec<(usize, String)> = blocks
        .iter()
        .filter_map(|b| b.skip.as_ref().map(|r| (b.line, r.clone())))
        .collect();
    assert_eq!(marked, vec![], "README.md blocks marked not run");
    let commands: Vec<(String, Vec<String>)> = blocks
        .iter()
        .filter_map(|b| {
            let (c, _) = b.skip_command.as_ref()?;
            Some((c.clone(), b.commands()))
        })
        .collect();
    assert_eq!(
        commands.len(),
        1,
        "one command marked not run: {commands:?}"
    );
    let (cmd, in_block) = &commands[0];
    assert_eq!(cmd, "cargo test --locked");
    assert!(
        in_block.iter().any(|c| strip_comment(c) == cmd),
        "the marked command `{cmd}` is not in its block: {in_block:?}"
    );
}

/// A command without its trailing `  # comment`.
fn strip_comment(cmd: &str) -> &str {
    cmd.find("  #").map_or(cmd, |i| &cmd[..i]).trim_end()
}

// ------------------------------------------------------------ the machine

/// A machine to run README's commands on: a working directory (the
/// checkout), a root for the substituted paths, and `kekd` on `PATH`.
struct Machine {
    dir: TempDir,
}

impl Machine {
    fn new() -> Self {
        let dir = common::tempdir_blocking();
        for d in [
            "cwd",
            "root/etc",
            "root/var/run",
            "root/var/lib",
            "bin",
            "logs",
        ] {
            fs::create_dir_all(dir.path().join(d)).expect("create the machine's directories");
        }
        std::os::unix::fs::symlink(common::kekd_bin(), dir.path().join("bin/kekd"))
            .expect("link kekd into bin/");
        Self { dir }
    }

    fn cwd(&self) -> PathBuf {
        self.dir.path().join("cwd")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// `cmd` with README's substitutions applied.
    fn subst(&self, cmd: &str) -> String {
        let cmd = cmd.replace("cargo run --release -- ", "kekd ");
        subst_paths(&cmd, &self.root())
    }

    /// `bash -o pipefail -c SCRIPT` in the working directory, `kekd` first
    /// on PATH, no inherited `KEKD_*`.
    fn bash(&self, script: &str) -> Command {
        let mut cmd = Command::new("bash");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("KEKD_") {
                cmd.env_remove(name);
            }
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.dir.path().join("bin")];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"))
            .env_remove("RUST_LOG")
            .args(["-o", "pipefail", "-c", script])
            .current_dir(self.cwd())
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Runs README command `cmd` (substituted) to completion.
    fn run(&self, cmd: &str, env: &[(&str, &Path)]) -> Finished {
        let mut c = self.bash(&self.subst(cmd));
        for (k, v) in env {
            c.env(k, v);
        }
        common::run_guarded(c, &self.logs())
    }

    /// Starts README's `kekd serve …` command `cmd` in the background.
    async fn serve(&self, cmd: &str, socket: &Path, env: &[(&str, &Path)]) -> Process {
        let mut c = self.bash(&format!("exec {}", self.subst(cmd)));
        for (k, v) in env {
            c.env(k, v);
        }
        let _guard = common::fs_lock().await;
        Process::spawn(c, socket, &self.logs())
    }
}

/// The paths of the substitution table, longest first where one is a
/// prefix of another.
const PATHS: &[&str] = &[
    "/etc/kekd",
    "/etc/kubernetes",
    "/etc/systemd/system",
    "/var/run/kekd",
    "/var/lib/kekd",
    "/root",
    "/usr/local/bin",
];

/// Prefixes every path of [`PATHS`] standing on its own (not inside a
/// longer word or path) with `root`, in one pass, as docblocks.py does.
fn subst_paths(text: &str, root: &Path) -> String {
    let root = root.to_str().expect("a UTF-8 root");
    let mut out = String::new();
    let mut i = 0;
    'scan: while i < text.len() {
        let before = text[..i].chars().next_back();
        let free = before.is_none_or(|c| !(c.is_alphanumeric() || "_.~-/".contains(c)));
        if free {
            for p in PATHS {
                if let Some(rest) = text[i..].strip_prefix(p) {
                    let after = rest.chars().next();
                    if after.is_none_or(|c| c.is_whitespace() || "/'\")`;".contains(c)) {
                        out.push_str(root);
                        out.push_str(p);
                        i += p.len();
                        continue 'scan;
                    }
                }
            }
        }
        let c = text[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[test]
fn substitution_prefixes_whole_paths_only() {
    let root = Path::new("/tmp/m/root");
    assert_eq!(
        subst_paths(
            "kekd serve --keyring /etc/kekd/keyring --socket /var/run/kekd/kms.sock",
            root
        ),
        "kekd serve --keyring /tmp/m/root/etc/kekd/keyring --socket /tmp/m/root/var/run/kekd/kms.sock"
    );
    assert_eq!(
        subst_paths(
            "state_dir = \"/var/lib/kekd\"  /etc/kekdx /x/etc/kekd /root",
            root
        ),
        "state_dir = \"/tmp/m/root/var/lib/kekd\"  /etc/kekdx /x/etc/kekd /tmp/m/root/root"
    );
}

/// SIGTERM, then: exit 0 and the socket removed, as README's `kekd serve`
/// row says.
async fn stop(kekd: Process) {
    let socket = kekd.socket.clone();
    kekd.signal(rustix::process::Signal::TERM);
    let out = kekd.wait_exit().await;
    assert_eq!(out.code(), 0, "kekd serve after SIGTERM: {out:#?}");
    assert!(
        !socket.exists(),
        "{} is still there after kekd stopped",
        socket.display()
    );
}

/// Runs `f` (which blocks) off the runtime's worker.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking task")
}

// ------------------------------------------------------- "Try it" (blocks 1-3)

/// Whether `tok` looks like a key id: `kekd/<32 hex>/v<N>`.
fn is_key_id(tok: &str) -> bool {
    let mut parts = tok.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("kekd"), Some(id), Some(v), None)
            if id.len() == 32
                && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                && v.strip_prefix('v').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    )
}

/// What varies from run to run in README's probe output: a key id, or a
/// number of milliseconds.
fn variable(tokens: &[&str], i: usize) -> Option<&'static str> {
    let tok = tokens[i];
    if is_key_id(tok) {
        Some("key id")
    } else if tokens.get(i + 1) == Some(&"ms")
        && !tok.is_empty()
        && tok.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && tok.parse::<f64>().is_ok()
    {
        Some("milliseconds")
    } else {
        None
    }
}

/// `actual` has the lines of `expected`, space for space, with the variable
/// parts (key ids, milliseconds) matched by their shape; returns the key
/// ids `actual` shows.
#[track_caller]
fn assert_same_lines(expected: &[String], actual: &str) -> Vec<String> {
    let actual: Vec<&str> = actual.lines().collect();
    assert_eq!(
        expected.len(),
        actual.len(),
        "README shows {expected:#?}\nkekd printed {actual:#?}"
    );
    let mut key_ids = Vec::new();
    for (e, a) in expected.iter().zip(&actual) {
        let et: Vec<&str> = e.split(' ').collect();
        let at: Vec<&str> = a.split(' ').collect();
        let same = et.len() == at.len()
            && (0..et.len()).all(|i| match variable(&et, i) {
                Some(kind) => variable(&at, i) == Some(kind),
                None => et[i] == at[i],
            });
        assert!(same, "README shows\n  {e:?}\nkekd printed\n  {a:?}");
        key_ids.extend(at.iter().filter(|t| is_key_id(t)).map(|t| (*t).to_owned()));
    }
    key_ids
}

#[test]
fn probe_lines_match_by_pattern_only_where_they_vary() {
    let readme = vec![
        "  ok   encrypt   65-byte ciphertext under kekd/5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40/v1 in 0.4 ms"
            .to_owned(),
    ];
    let ids = assert_same_lines(
        &readme,
        "  ok   encrypt   65-byte ciphertext under kekd/00112233445566778899aabbccddeeff/v7 in 12.75 ms\n",
    );
    assert_eq!(ids, ["kekd/00112233445566778899aabbccddeeff/v7"]);
    for wrong in [
        "  ok   encrypt   66-byte ciphertext under kekd/00112233445566778899aabbccddeeff/v1 in 0.4 ms",
        "  ok  encrypt   65-byte ciphertext under kekd/00112233445566778899aabbccddeeff/v1 in 0.4 ms",
        "  FAIL encrypt   65-byte ciphertext under kekd/00112233445566778899aabbccddeeff/v1 in 0.4 ms",
        "  ok   encrypt   65-byte ciphertext under kekd/0011/v1 in 0.4 ms",
        "  ok   encrypt   65-byte ciphertext under kekd/00112233445566778899aabbccddeeff/v1 in fast ms",
    ] {
        let r = std::panic::catch_unwind(|| assert_same_lines(&readme, wrong));
        assert!(r.is_err(), "matched: {wrong}");
    }
}

/// "Try it": `cargo run --release -- serve --dev` (in the background) then,
/// "in a second terminal", `admin probe`, whose output is README's `text`
/// block line for line. `cargo test --locked` is run verbatim by .ci/run.
#[tokio::test(flavor = "multi_thread")]
async fn fresh_machine_serve_dev_then_probe_prints_what_readme_shows() {
    let machine = blocking(Machine::new).await;
    let cwd = machine.cwd();
    let socket = cwd.join("kekd-dev/kms.sock");

    let first = block("sh", "cargo run --release -- serve --dev");
    let (marked, _) = first
        .skip_command
        .clone()
        .expect("cargo test --locked is marked");
    let mut serve = None;
    for cmd in first.commands() {
        if strip_comment(&cmd) == marked {
            // Not inside cargo test: .ci/run runs this very line.
            let ci = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run"))
                .expect("read .ci/run");
            assert!(
                ci.lines().any(|l| l.trim() == marked),
                ".ci/run has no line `{marked}`: README's marker says it runs it verbatim"
            );
        } else if strip_comment(&cmd) == "cargo run --release -- serve --dev" {
            assert!(serve.is_none(), "serve --dev twice in {first:#?}");
            serve = Some(machine.serve(&cmd, &socket, &[]).await);
        } else {
            panic!(
                "README.md:{}: a command this test does not know: `{cmd}`",
                first.line
            );
        }
    }
    let mut kekd = serve.expect("the block starts kekd serve --dev");
    let served = kekd.ready().await.status().await.expect("Status").key_id;
    // The comment's promise: ./kekd-dev/keyring created, ./kekd-dev/kms.sock served.
    assert!(
        cwd.join("kekd-dev/keyring").is_file(),
        "no ./kekd-dev/keyring"
    );
    // "prints the EncryptionConfiguration that points kube-apiserver at its socket"
    let printed = YamlLoader::load_from_str(&kekd.stdout()).expect("serve --dev prints YAML");
    let kms = &printed[0]["resources"][0]["providers"][0]["kms"];
    assert_eq!(printed[0]["kind"].as_str(), Some("EncryptionConfiguration"));
    assert_eq!(kms["apiVersion"].as_str(), Some("v2"));
    assert_eq!(
        kms["endpoint"].as_str(),
        Some(format!("unix://{}", socket.display()).as_str()),
        "the endpoint: unix:// + the socket's absolute path"
    );

    let probe = block(
        "sh",
        "cargo run --release -- admin probe --socket kekd-dev/kms.sock",
    );
    let expected = block("text", "probe of kekd-dev/kms.sock");
    assert_eq!(probe.commands().len(), 1, "{probe:#?}");
    let cmd = probe.commands().remove(0);
    let m = machine;
    let (m, out) = blocking(move || {
        let out = m.run(&cmd, &[]);
        (m, out)
    })
    .await;
    out.ok();
    let key_ids = assert_same_lines(&expected.body, &out.stdout);
    assert_eq!(key_ids, [served.clone(), served], "the key id served");

    stop(kekd).await;
    drop(m);
}

// ------------------------------------- "Running it on a control-plane node"

/// README's node block run on `machine`: `init` (checked: exit 0, and a
/// second run exits 1 leaving the keyring byte for byte) and `serve` in the
/// background, answering; returns it and the key id init reported.
async fn node(machine: Machine) -> (Machine, Process, String) {
    let b = block("sh", "kekd admin init --keyring /etc/kekd/keyring");
    let cmds = b.commands();
    assert_eq!(cmds.len(), 2, "README.md:{}: {cmds:#?}", b.line);
    assert!(cmds[0].starts_with("kekd admin init --keyring /etc/kekd/keyring"));
    assert!(
        cmds[1]
            .starts_with("kekd serve --keyring /etc/kekd/keyring --socket /var/run/kekd/kms.sock")
    );
    let keyring = machine.root().join("etc/kekd/keyring");
    let init = cmds[0].clone();
    let (machine, first, again, bytes) = blocking(move || {
        let first = machine.run(&init, &[]);
        let bytes = fs::read(&keyring).unwrap_or_default();
        let again = machine.run(&init, &[]);
        (machine, first, again, bytes)
    })
    .await;
    first.ok();
    let key_id = first
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("key_id"))
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|| panic!("init printed no key_id: {first:#?}"));
    // "# once; refuses to overwrite": exit 1 (a refusal), the file untouched.
    again.exited(1);
    assert!(common::error_message(&again).contains("already exists; refusing to overwrite it"));
    assert_eq!(
        fs::read(machine.root().join("etc/kekd/keyring")).expect("the keyring"),
        bytes,
        "a second init changed the keyring"
    );
    let socket = machine.root().join("var/run/kekd/kms.sock");
    let mut kekd = machine.serve(&cmds[1], &socket, &[]).await;
    let status = kekd.ready().await.status().await.expect("Status");
    assert_eq!(status.key_id, key_id);
    (machine, kekd, key_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn node_init_refuses_a_second_time_and_serve_answers() {
    let machine = blocking(Machine::new).await;
    let (machine, kekd, _) = node(machine).await;
    stop(kekd).await;
    drop(machine);
}

/// `$KEKD_GRPCURL`, `grpcurl` on PATH, or `go install`'s `~/go/bin/grpcurl`;
/// `None` after a skip (a failure under `KEKD_REQUIRE_ALL=1`).
fn grpcurl() -> Option<PathBuf> {
    let found = common::grpcurl_path();
    if found.is_none() {
        common::skip::skip(
            "needs grpcurl: go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4",
        );
    }
    found
}

/// "Poke it with grpcurl", against the node of README's next section
/// (`/var/run/kekd/kms.sock`, substituted).
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_commands_run_against_the_node_socket() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let machine = blocking(Machine::new).await;
    // grpcurl on the commands' PATH: the one found (which may be in ~/go/bin).
    std::os::unix::fs::symlink(&grpcurl, machine.dir.path().join("bin/grpcurl"))
        .expect("link grpcurl into bin/");
    let (machine, kekd, key_id) = node(machine).await;
    let b = block("sh", "grpcurl -plaintext -unix /var/run/kekd/kms.sock list");
    let cmds = b.commands();
    let (machine, outs) = blocking(move || {
        let outs: Vec<(String, Finished)> = cmds
            .iter()
            .map(|c| (c.clone(), machine.run(c, &[])))
            .collect();
        (machine, outs)
    })
    .await;
    let mut ran = Vec::new();
    for (cmd, out) in &outs {
        assert_eq!(out.code(), 0, "`{cmd}`: {out:#?}");
        let args = cmd
            .strip_prefix("grpcurl -plaintext -unix /var/run/kekd/kms.sock ")
            .unwrap_or_else(|| panic!("README.md:{}: unknown command `{cmd}`", b.line));
        match args {
            "list" => assert_eq!(
                out.stdout,
                "grpc.reflection.v1.ServerReflection\nv2.KeyManagementService\n"
            ),
            "describe v2.KeyManagementService" => {
                for rpc in ["Decrypt", "Encrypt", "Status"] {
                    let line =
                        format!("rpc {rpc} ( .v2.{rpc}Request ) returns ( .v2.{rpc}Response );");
                    assert!(out.stdout.contains(&line), "{out:#?}");
                }
            }
            "v2.KeyManagementService/Status" => {
                let status: serde_json::Value =
                    serde_json::from_str(&out.stdout).expect("Status as JSON");
                assert_eq!(
                    status,
                    serde_json::json!({"version": "v2", "healthz": "ok", "keyId": key_id})
                );
            }
            _ => panic!("README.md:{}: unknown command `{cmd}`", b.line),
        }
        ran.push(args);
    }
    assert_eq!(
        ran,
        [
            "list",
            "describe v2.KeyManagementService",
            "v2.KeyManagementService/Status"
        ]
    );
    stop(kekd).await;
    drop(machine);
}

/// README's EncryptionConfiguration is the one shipped in deploy/ (which
/// tests/e2e/run.sh hands to kube-apiserver with only its endpoint changed):
/// the same document, comments aside.
#[test]
fn encryption_configuration_is_the_shipped_one() {
    let b = block("yaml", "apiVersion: apiserver.config.k8s.io/v1");
    let readme = YamlLoader::load_from_str(&b.body.join("\n")).expect("README's YAML parses");
    let shipped = YamlLoader::load_from_str(
        &fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/encryption-config.yaml"
        ))
        .expect("read deploy/encryption-config.yaml"),
    )
    .expect("deploy/encryption-config.yaml parses");
    assert_eq!(
        readme, shipped,
        "README.md:{} and deploy/encryption-config.yaml",
        b.line
    );
    assert!(matches!(readme[0]["resources"], Yaml::Array(_)));
}

// ------------------------------------------------------------ "KEKs in an HSM"

/// The HSM block: `deploy/kekd-pkcs11.toml` as `/etc/kekd/kekd.toml` (only
/// its paths substituted), a SoftHSM2 token labelled `kekd` with the PIN in
/// `/etc/kekd/pin`, `SOFTHSM2_CONF` in the environment (the unit's
/// `Environment=`); `init --config` then `serve --config`.
#[tokio::test(flavor = "multi_thread")]
async fn hsm_init_and_serve_with_the_shipped_pkcs11_config() {
    let Some(token) = blocking(softhsm::Token::create).await else {
        return;
    };
    let machine = blocking(Machine::new).await;
    let root = machine.root();
    // A token with the label deploy/kekd-pkcs11.toml names, in this test's
    // own SoftHSM2 tokendir.
    let init = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &token.conf)
        .args([
            "--init-token",
            "--free",
            "--label",
            "kekd",
            "--pin",
            &token.pin,
        ])
        .args(["--so-pin", &format!("so-{}", softhsm::random_hex(8))])
        .output()
        .expect("run softhsm2-util");
    assert!(
        init.status.success(),
        "softhsm2-util --init-token: {init:?}"
    );
    fs::create_dir_all(root.join("etc/kekd")).expect("mkdir /etc/kekd");
    fs::set_permissions(
        root.join("etc/kekd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod 700 /etc/kekd");
    softhsm::write_private(&root.join("etc/kekd/pin"), &format!("{}\n", token.pin));
    let shipped = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kekd-pkcs11.toml"
    ))
    .expect("read deploy/kekd-pkcs11.toml");
    let config = subst_paths(&shipped, &root);
    let changed: Vec<&str> = shipped
        .lines()
        .zip(config.lines())
        .filter(|(a, b)| a != b && !a.starts_with('#'))
        .map(|(a, _)| a.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(
        changed,
        ["socket", "pin_file", "state_dir"],
        "only paths substituted"
    );
    fs::write(root.join("etc/kekd/kekd.toml"), config).expect("write /etc/kekd/kekd.toml");

    let b = block("sh", "kekd admin init --config /etc/kekd/kekd.toml");
    let cmds = b.commands();
    assert_eq!(cmds.len(), 2, "README.md:{}: {cmds:#?}", b.line);
    assert!(cmds[0].starts_with("kekd admin init --config /etc/kekd/kekd.toml"));
    assert_eq!(cmds[1], "kekd serve --config /etc/kekd/kekd.toml");
    let conf = token.conf.clone();
    let init = cmds[0].clone();
    let (machine, out) = blocking(move || {
        let out = machine.run(&init, &[("SOFTHSM2_CONF", &conf)]);
        (machine, out)
    })
    .await;
    out.ok();
    let key_id = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("key_id"))
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|| panic!("init printed no key_id: {out:#?}"));
    let socket = root.join("var/run/kekd/kms.sock");
    let mut kekd = machine
        .serve(&cmds[1], &socket, &[("SOFTHSM2_CONF", &token.conf)])
        .await;
    let mut client = kekd.ready().await;
    assert_eq!(client.status().await.expect("Status").key_id, key_id);
    let seed = common::seed();
    let sealed = client
        .encrypt(seed, &common::uid(1))
        .await
        .expect("Encrypt under the token's KEK");
    assert_eq!(sealed.key_id, key_id);
    assert!(
        root.join("var/lib/kekd").is_dir(),
        "state_dir /var/lib/kekd not used"
    );
    assert!(
        !kekd.stderr().contains(&token.pin) && !kekd.stdout().contains(&token.pin),
        "the PIN in kekd's output"
    );
    drop(client);
    stop(kekd).await;
    drop((machine, token));
}
