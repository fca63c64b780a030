//! A fresh SoftHSM2 token per test, and the outside tools that inspect it.
//!
//! Each [`Token`] lives in its own tempdir with its own `softhsm2.conf`
//! (`directories.tokendir = <tmp>/tokens`), a unique label, a random user
//! PIN in a 0600 pin file, and the config files of the kekd "nodes" that use
//! it. SoftHSM reads `SOFTHSM2_CONF` at `C_Initialize`, which is process-wide,
//! so this test process never loads a PKCS#11 module itself: kekd runs as a
//! child process, and the token is inspected and tampered with through
//! `pkcs11-tool` (OpenSC) — both with `SOFTHSM2_CONF` set on their command
//! only.
//!
//! Without SoftHSM2 or pkcs11-tool, [`Token::create`] returns `None` after a
//! loud `SKIPPED` line, so a plain `cargo test` passes on a machine without
//! them; with `KEKD_REQUIRE_ALL=1` (CI) it panics instead.
#![allow(unreachable_pub)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common;

/// The SoftHSM2 module of Debian's `softhsm2` package.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// OpenSC's logging PKCS#11 proxy: forwards to `$PKCS11SPY` and writes
/// every call (with its arguments and return value) to `$PKCS11SPY_OUTPUT`.
pub const SPY_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";
/// p11-kit's client module: forwards to the `p11-kit server` at
/// `$P11_KIT_SERVER_ADDRESS`.
pub const P11_KIT_CLIENT: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

const INSTALL: &str = "softhsm2 is required: apt-get install -y softhsm2 opensc p11-kit";

/// Why the SoftHSM suite cannot run here, if it cannot.
fn missing() -> Option<String> {
    let mut missing = Vec::new();
    if !Path::new(MODULE).exists() {
        missing.push(MODULE.to_owned());
    }
    for tool in ["softhsm2-util", "pkcs11-tool"] {
        let found = Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            missing.push(tool.to_owned());
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// A random lowercase hex string of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    common::getrandom(&mut b);
    hex(&b)
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Inverse of [`hex`].
pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// One SoftHSM2 token in a directory of its own.
pub struct Token {
    /// Holds the config, the tokens, pin files, kekd configs and logs.
    pub dir: TempDir,
    /// `softhsm2.conf`.
    pub conf: PathBuf,
    /// `directories.tokendir`.
    pub tokendir: PathBuf,
    /// The token's label (unique per test).
    pub label: String,
    /// The user PIN (random, so finding it in any output is meaningful).
    pub pin: String,
    /// A 0600 file holding [`Token::pin`].
    pub pin_file: PathBuf,
}

impl Token {
    /// Initializes a fresh token, or returns `None` (after a loud SKIPPED
    /// line) when SoftHSM2 is not installed. Panics instead when
    /// `KEKD_REQUIRE_ALL=1`.
    pub fn create() -> Option<Self> {
        if let Some(what) = missing() {
            crate::common::skip::skip(&format!(
                "softhsm2 not installed (missing: {what}): {INSTALL}"
            ));
            return None;
        }
        // Short, so socket paths inside stay far below the 107-byte limit.
        // No in-process server binds in this suite, so the umask lock of
        // `common::tempdir` is not needed (and could not be taken inside a
        // runtime).
        let dir = tempfile::Builder::new()
            .prefix("kekd-hsm-")
            .tempdir_in("/tmp")
            .expect("create a tempdir");
        let tokendir = dir.path().join("tokens");
        fs::create_dir(&tokendir).expect("create the token directory");
        let conf = dir.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokendir.display()
            ),
        )
        .expect("write softhsm2.conf");
        let label = format!("kekd-{}-{}", std::process::id(), random_hex(4));
        let pin = format!("pin-{}", random_hex(8));
        let so_pin = format!("so-{}", random_hex(8));
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", &label, "--pin", &pin])
            .args(["--so-pin", &so_pin])
            .output()
            .expect("run softhsm2-util");
        assert!(out.status.success(), "softhsm2-util --init-token: {out:?}");
        let pin_file = dir.path().join("pin");
        write_private(&pin_file, &format!("{pin}\n"));
        Some(Self {
            dir,
            conf,
            tokendir,
            label,
            pin,
            pin_file,
        })
    }

    /// The directory everything of this test lives in.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `kekd` (no inherited `KEKD_*`) seeing this token's SoftHSM config.
    pub fn kekd(&self) -> Command {
        let mut cmd = common::kekd();
        cmd.env("SOFTHSM2_CONF", &self.conf);
        cmd
    }

    /// `[backend]` settings for a node named `name`: this token through
    /// SoftHSM directly, the pin file, a state directory of its own.
    pub fn backend(&self, name: &str) -> BackendTable {
        BackendTable {
            kind: Some("pkcs11".to_owned()),
            module: Some(MODULE.to_owned()),
            token_label: Some(self.label.clone()),
            pin_file: Some(self.pin_file.clone()),
            key_label_prefix: None,
            pool_size: None,
            state_dir: Some(self.path().join(format!("{name}-state"))),
        }
    }

    /// Writes `<name>.toml`: socket `<name>.sock`, reload poll 200 ms, the
    /// `top` lines, then the `[backend]` table.
    pub fn node(&self, name: &str, backend: &BackendTable, top: &[&str]) -> Node {
        let socket = self.path().join(format!("{name}.sock"));
        let config = self.path().join(format!("{name}.toml"));
        let mut text = format!("socket = {:?}\nreload_interval = \"200ms\"\n", socket);
        for line in top {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&backend.render());
        fs::write(&config, text).expect("write the kekd config");
        Node {
            config,
            socket,
            state_dir: backend.state_dir.clone(),
        }
    }

    /// The default node `name` on this token.
    pub fn default_node(&self, name: &str) -> Node {
        self.node(name, &self.backend(name), &[])
    }

    /// `kekd ARGS…` run to completion.
    pub fn run(&self, args: &[&str]) -> common::Finished {
        let mut cmd = self.kekd();
        cmd.args(args);
        common::run(cmd, self.path())
    }

    /// `kekd admin COMMAND --config NODE ARGS…` run to completion.
    pub fn admin(&self, node: &Node, command: &str, args: &[&str]) -> common::Finished {
        let mut cmd = self.kekd();
        cmd.args(["admin", command, "--config"])
            .arg(&node.config)
            .args(args);
        common::run(cmd, self.path())
    }

    /// `kekd admin init --config NODE --output json`, which must succeed;
    /// returns the key_id it reported.
    pub fn init(&self, node: &Node) -> String {
        let out = self.admin(node, "init", &["--output", "json"]);
        assert_eq!(out.code(), 0, "admin init: {out:#?}");
        let json = json_of(&out);
        json["key_id"]
            .as_str()
            .unwrap_or_else(|| panic!("init reported no key_id: {out:#?}"))
            .to_owned()
    }

    /// `kekd serve --config NODE` as a child process (not yet ready).
    pub fn spawn_serve(&self, node: &Node) -> common::Process {
        let mut cmd = self.kekd();
        cmd.args(["serve", "--config"]).arg(&node.config);
        common::Process::spawn(cmd, &node.socket, self.path())
    }

    /// `pkcs11-tool --module SoftHSM --token-label L --login --pin P ARGS…`.
    pub fn tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", MODULE, "--token-label", &self.label])
            .args(["--login", "--pin", &self.pin])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pkcs11-tool")
    }

    /// [`Token::tool`] without logging in: only public objects are visible.
    pub fn tool_public(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", MODULE, "--token-label", &self.label])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pkcs11-tool")
    }

    /// Every object a logged-in user sees, as `pkcs11-tool -O` lists them,
    /// sorted (the token lists them in no particular order).
    pub fn objects(&self) -> Vec<Object> {
        let out = self.tool(&["--list-objects"]);
        assert!(out.status.success(), "pkcs11-tool -O: {out:?}");
        let mut objects = Object::parse(&String::from_utf8_lossy(&out.stdout));
        objects.sort();
        objects
    }

    /// The secret-key objects, by label.
    pub fn secret_keys(&self) -> Vec<Object> {
        self.objects()
            .into_iter()
            .filter(Object::is_secret_key)
            .collect()
    }

    /// The labels of the secret keys, sorted.
    pub fn secret_key_labels(&self) -> Vec<String> {
        let mut labels: Vec<String> = self.secret_keys().iter().map(Object::label).collect();
        labels.sort();
        labels
    }

    /// `CKA_VALUE` of an object, or what pkcs11-tool said when it refused.
    pub fn read_value(&self, kind: &str, label: &str) -> Result<Vec<u8>, String> {
        let file = self.path().join(format!("read-{}", random_hex(4)));
        let out = self.tool(&[
            "--read-object",
            "--type",
            kind,
            "--label",
            label,
            "--output-file",
            file.to_str().unwrap(),
        ]);
        let value = fs::read(&file).ok();
        let _ = fs::remove_file(&file);
        match (out.status.success(), value) {
            (true, Some(v)) => Ok(v),
            _ => Err(format!(
                "exit {:?}: {}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// Deletes the secret key with this `CKA_ID` (hex), behind kekd's back.
    pub fn delete_secret_key(&self, id_hex: &str) {
        let out = self.tool(&["--delete-object", "--type", "secrkey", "--id", id_hex]);
        assert!(out.status.success(), "pkcs11-tool --delete-object: {out:?}");
    }

    /// The one token directory SoftHSM created inside `tokendir`.
    fn token_subdir(&self) -> PathBuf {
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.tokendir)
            .expect("read the token directory")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(dirs.len(), 1, "one token in {}", self.tokendir.display());
        dirs.remove(0)
    }

    /// Moves the token's files away: to SoftHSM the token is gone.
    pub fn take_away(&self) -> TakenAway {
        let from = self.token_subdir();
        let to = self.path().join("token-away");
        fs::rename(&from, &to).expect("move the token away");
        TakenAway { from, to }
    }
}

/// Where [`Token::take_away`] put the token.
#[derive(Debug)]
pub struct TakenAway {
    from: PathBuf,
    to: PathBuf,
}

impl TakenAway {
    /// Moves the token back where it was.
    pub fn put_back(self) {
        fs::rename(&self.to, &self.from).expect("move the token back");
    }
}

/// Writes `text` to a new 0600 file.
pub fn write_private(path: &Path, text: &str) {
    fs::write(path, text).expect("write a private file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// stdout parsed as one JSON document.
#[track_caller]
pub fn json_of(out: &common::Finished) -> serde_json::Value {
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {out:#?}"))
}

/// The message of the one `kekd: error: …` line on stderr.
#[track_caller]
pub fn error_message(out: &common::Finished) -> String {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter_map(|l| l.strip_prefix("kekd: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one `kekd: error:` line: {out:#?}");
    lines[0].to_owned()
}

/// The `[backend]` table of a kekd config; `None` leaves a key out.
#[derive(Debug, Clone)]
pub struct BackendTable {
    pub kind: Option<String>,
    pub module: Option<String>,
    pub token_label: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub key_label_prefix: Option<String>,
    pub pool_size: Option<usize>,
    pub state_dir: Option<PathBuf>,
}

impl BackendTable {
    fn render(&self) -> String {
        let mut t = String::from("[backend]\n");
        let mut line = |key: &str, value: Option<String>| {
            if let Some(v) = value {
                let _ = writeln!(t, "{key} = {v}");
            }
        };
        line("kind", self.kind.as_ref().map(|v| format!("{v:?}")));
        line("module", self.module.as_ref().map(|v| format!("{v:?}")));
        line(
            "token_label",
            self.token_label.as_ref().map(|v| format!("{v:?}")),
        );
        line(
            "pin_file",
            self.pin_file.as_ref().map(|v| format!("{:?}", v.display())),
        );
        line(
            "key_label_prefix",
            self.key_label_prefix.as_ref().map(|v| format!("{v:?}")),
        );
        line("pool_size", self.pool_size.map(|v| v.to_string()));
        line(
            "state_dir",
            self.state_dir
                .as_ref()
                .map(|v| format!("{:?}", v.display())),
        );
        t
    }
}

/// One kekd "node": its config file, socket and state directory.
#[derive(Debug, Clone)]
pub struct Node {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: Option<PathBuf>,
}

impl Node {
    /// The config path as a string, for argument lists.
    pub fn config_arg(&self) -> &str {
        self.config.to_str().expect("utf-8 path")
    }
}

/// One object as `pkcs11-tool --list-objects` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Object {
    /// The heading line, e.g. `Secret Key Object; AES length 32` or `Data object 4`.
    pub heading: String,
    /// `label`, `ID`, `Usage`, `Access`, `application`, `flags`, …
    pub fields: BTreeMap<String, String>,
}

impl Object {
    fn parse(listing: &str) -> Vec<Self> {
        let mut objects: Vec<Self> = Vec::new();
        for line in listing.lines() {
            if line.trim().is_empty() {
                continue;
            }
            if !line.starts_with(' ') {
                objects.push(Self {
                    heading: line.trim().to_owned(),
                    fields: BTreeMap::new(),
                });
            } else if let (Some(object), Some((key, value))) =
                (objects.last_mut(), line.trim().split_once(':'))
            {
                object
                    .fields
                    .insert(key.trim().to_owned(), value.trim().to_owned());
            }
        }
        objects
    }

    /// Whether it is a secret key.
    pub fn is_secret_key(&self) -> bool {
        self.heading.starts_with("Secret Key Object")
    }

    /// Whether it is a data object.
    pub fn is_data(&self) -> bool {
        self.heading.starts_with("Data object")
    }

    /// Its label, without the quotes pkcs11-tool puts around data labels.
    pub fn label(&self) -> String {
        self.field("label").trim_matches('\'').to_owned()
    }

    /// A field, or "" when absent.
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }

    /// The comma-separated items of a field (`Usage`, `Access`).
    pub fn items(&self, name: &str) -> Vec<&str> {
        self.field(name)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// A `p11-kit server` exporting one SoftHSM token on a Unix socket.
pub struct P11KitServer {
    child: Option<Child>,
    /// `P11_KIT_SERVER_ADDRESS` for clients.
    pub address: String,
    socket: PathBuf,
}

impl P11KitServer {
    /// Starts the server in the foreground on `<dir>/p11-kit.sock` and waits
    /// until the socket exists.
    pub fn start(token: &Token) -> Self {
        let socket = token.path().join("p11-kit.sock");
        let _ = fs::remove_file(&socket);
        let log = fs::File::create(token.path().join(format!("p11-kit-{}.log", random_hex(2))))
            .expect("p11-kit log file");
        let child = Command::new("p11-kit")
            .env("SOFTHSM2_CONF", &token.conf)
            .arg("server")
            .arg("--foreground")
            .arg("--name")
            .arg(&socket)
            .args(["--provider", MODULE])
            .arg(format!("pkcs11:token={}", token.label))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn p11-kit server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "p11-kit server did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child: Some(child),
            address: format!("unix:path={}", socket.display()),
            socket,
        }
    }

    /// Kills the server (our own child, by its handle) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }

    /// Whether p11-kit is installed.
    pub fn available() -> bool {
        Path::new(P11_KIT_CLIENT).exists()
            && Command::new("p11-kit")
                .arg("--help")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
    }

    /// The mechanisms the client module offers for the exported token.
    pub fn client_mechanisms(&self) -> String {
        let out = Command::new("pkcs11-tool")
            .env("P11_KIT_SERVER_ADDRESS", &self.address)
            .args(["--module", P11_KIT_CLIENT, "--list-mechanisms"])
            .stdin(Stdio::null())
            .output()
            .expect("run pkcs11-tool");
        assert!(out.status.success(), "pkcs11-tool -M via p11-kit: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for P11KitServer {
    fn drop(&mut self) {
        self.kill();
    }
}
