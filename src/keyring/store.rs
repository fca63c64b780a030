//! The keyring file: its format, strict parser, and how it is read and
//! replaced (through [`crate::file`]; the admin lock is [`super::lock`]).
//!
//! ```text
//! kekd-keyring v1
//! keyring 5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40
//! version 1 primary created=2026-11-28T09:19:34Z promoted=2026-11-28T09:19:34Z kek=<base64, 32 bytes>
//! version 2 destroyed created=… retired=… destroyed=…
//! sha256 <64 hex digits: SHA-256 of every byte above this line>
//! ```
//!
//! Lines end in `\n`; fields are separated by one space; versions appear once
//! each in increasing order; `kek=` is present exactly when the state is not
//! `destroyed`. The trailing checksum makes a truncated or hand-mangled copy
//! fail to load instead of loading as a smaller keyring. Errors name the file,
//! line and field, never the content (the content is key material).
//!
//! Writes go to a fresh `0600` temp file in the same directory, are fsynced,
//! renamed over (or, for a new keyring, linked without clobbering) the target,
//! and the directory is fsynced: a crash leaves the old file or the new one.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::file::{
    Guard, Links, OpenError, Replace, WriteError, kind_of, open_dir, open_regular, write_durable,
};
use crate::id::{KeyVersion, KeyringId, Timestamp};
use crate::kek::{BackendError, ErrorKind};
use crate::keyring::{KeyState, KeyringError, VersionInfo, validate};
use crate::secret::{KEK_LEN, Kek, RandomError};

/// The first line of every format-1 keyring file (keys inline).
pub const MAGIC: &str = "kekd-keyring v1";
/// The first line of keyring metadata whose keys live in a token. Version 2
/// is the same text; the token stores it with a trailer of key check values
/// and a MAC (see `backend::pkcs11`).
pub const MAGIC_METADATA: &str = "kekd-keyring-meta v2";
/// The first line of token metadata written by a kekd before version 2: no
/// key check values, no MAC. Parsed (for the upgrade), never served.
pub const MAGIC_METADATA_V1: &str = "kekd-keyring-meta v1";

/// Where a keyring's key material is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Material {
    /// In the file, as `kek=` fields (the local backend).
    Inline,
    /// In a PKCS#11 token, one object per version; the file is metadata only.
    Token,
}

impl Material {
    fn magic(self) -> &'static str {
        match self {
            Self::Inline => MAGIC,
            Self::Token => MAGIC_METADATA,
        }
    }
}
/// Keyring files larger than this are refused unread.
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// A keyring as stored in the local file: metadata plus material.
#[derive(Debug)]
pub struct KeyringFile {
    /// Where the key material is.
    pub material: Material,
    /// The keyring's id.
    pub id: KeyringId,
    /// Versions in increasing order.
    pub versions: Vec<StoredVersion>,
}

/// One version of a [`KeyringFile`].
#[derive(Debug)]
pub struct StoredVersion {
    /// Public facts.
    pub info: VersionInfo,
    /// Material; `None` exactly when destroyed.
    pub kek: Option<Kek>,
}

impl KeyringFile {
    /// A new keyring: random id, version 1 primary with a fresh KEK.
    ///
    /// # Errors
    /// When the OS RNG fails.
    pub fn generate(now: Timestamp) -> Result<Self, RandomError> {
        let mut info = VersionInfo::new(KeyVersion::FIRST, KeyState::Primary, now);
        info.promoted = Some(now);
        Ok(Self {
            material: Material::Inline,
            id: KeyringId::generate()?,
            versions: vec![StoredVersion {
                info,
                kek: Some(Kek::generate()?),
            }],
        })
    }

    /// New metadata for a keyring whose keys live in a token: random id,
    /// version 1 primary (its key is generated in the token by the caller).
    ///
    /// # Errors
    /// When the OS RNG fails.
    pub fn generate_metadata(now: Timestamp) -> Result<Self, RandomError> {
        let mut info = VersionInfo::new(KeyVersion::FIRST, KeyState::Primary, now);
        info.promoted = Some(now);
        Ok(Self {
            material: Material::Token,
            id: KeyringId::generate()?,
            versions: vec![StoredVersion { info, kek: None }],
        })
    }

    /// Parses a keyring file's bytes.
    ///
    /// # Errors
    /// The first defect found, with its line and field.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            ParseError::new(line, "is not UTF-8 text")
        })?;
        if let Some(i) = text.find('\r') {
            let line = 1 + text[..i].matches('\n').count();
            return Err(ParseError::new(
                line,
                "has a carriage return: the file was converted to CRLF line endings",
            ));
        }
        // What the file is comes first: a stranger gets "not a kekd keyring",
        // not a complaint about its last line.
        let first = text.split('\n').next().unwrap_or_default();
        let material = match first {
            MAGIC => Material::Inline,
            MAGIC_METADATA | MAGIC_METADATA_V1 => Material::Token,
            _ => {
                return Err(ParseError::new(
                    1,
                    if first.starts_with("kekd-keyring") {
                        "is a keyring format this kekd does not read (expected `kekd-keyring v1`)"
                    } else {
                        "is not `kekd-keyring v1`: not a kekd keyring"
                    },
                ));
            }
        };
        let body_end = text
            .strip_suffix('\n')
            .ok_or_else(|| {
                ParseError::new(line_of_end(text), "does not end in a newline (truncated?)")
            })?
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let (body, last) = text.split_at(body_end);
        let last_no = line_of_end(body);
        check_checksum(body, last, last_no)?;

        // `split`, not `lines`: a `\r` is content here, and is refused.
        let body_lines = body.strip_suffix('\n').unwrap_or(body);
        let mut lines = body_lines
            .split('\n')
            .filter(|_| !body.is_empty())
            .enumerate()
            .map(|(i, l)| (i + 1, l));
        lines.next(); // the magic line, checked above
        let id = match lines.next() {
            Some((n, l)) => {
                let hex = l
                    .strip_prefix("keyring ")
                    .ok_or_else(|| ParseError::new(n, "must be `keyring <id>`"))?;
                hex.parse::<KeyringId>().map_err(|_| {
                    ParseError::field(n, "keyring", "must be 32 lowercase hex digits")
                })?
            }
            None => return Err(ParseError::new(2, "is missing: expected `keyring <id>`")),
        };
        let mut versions = Vec::new();
        for (n, line) in lines {
            versions.push(parse_version(n, line, material)?);
        }
        let infos: Vec<VersionInfo> = versions
            .iter()
            .map(|v: &StoredVersion| v.info.clone())
            .collect();
        validate(&infos).map_err(|e| match e {
            KeyringError::Invalid(msg) => ParseError::whole(msg),
            other => ParseError::whole(other.to_string()),
        })?;
        Ok(Self {
            material,
            id,
            versions,
        })
    }

    /// Serializes the keyring, checksum included. The result holds key
    /// material and is zeroed on drop.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(128 + 160 * self.versions.len()));
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{}", self.material.magic());
        let _ = writeln!(out, "keyring {}", self.id);
        for v in &self.versions {
            let i = &v.info;
            let _ = write!(
                out,
                "version {} {} created={}",
                i.version, i.state, i.created
            );
            for (name, t) in [
                ("promoted", i.promoted),
                ("retired", i.retired),
                ("destroyed", i.destroyed),
            ] {
                if let Some(t) = t {
                    let _ = write!(out, " {name}={t}");
                }
            }
            if let Some(kek) = &v.kek {
                let b64 = Zeroizing::new(BASE64.encode(kek.expose_secret()));
                out.push_str(" kek=");
                out.push_str(&b64);
            }
            out.push('\n');
        }
        let digest = Sha256::digest(out.as_bytes());
        out.push_str("sha256 ");
        for b in digest {
            let _ = write!(out, "{b:02x}");
        }
        out.push('\n');
        out
    }

    /// The public facts of every version.
    pub fn infos(&self) -> Vec<VersionInfo> {
        self.versions.iter().map(|v| v.info.clone()).collect()
    }
}

/// The 1-based number of the line that `s` ends in.
fn line_of_end(s: &str) -> usize {
    1 + s.bytes().filter(|&b| b == b'\n').count()
}

fn check_checksum(body: &str, last: &str, line: usize) -> Result<(), ParseError> {
    let hex = last
        .strip_suffix('\n')
        .and_then(|l| l.strip_prefix("sha256 "))
        .ok_or_else(|| {
            ParseError::new(
                line,
                "must be the `sha256 <digest>` line that ends every keyring (file truncated?)",
            )
        })?;
    let digest = Sha256::digest(body.as_bytes());
    let mut expected = String::with_capacity(64);
    for b in digest {
        let _ = write!(expected, "{b:02x}");
    }
    if hex != expected {
        return Err(ParseError::field(
            line,
            "sha256",
            "checksum does not match the file's content (edited by hand or damaged in a copy)",
        ));
    }
    Ok(())
}

fn parse_version(n: usize, line: &str, material: Material) -> Result<StoredVersion, ParseError> {
    let mut words = line.split(' ');
    if words.next() != Some("version") {
        return Err(ParseError::new(n, "must start with `version`"));
    }
    let version = words
        .next()
        .filter(|w| !w.starts_with('0') && w.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|w| w.parse().ok())
        .and_then(KeyVersion::new)
        .ok_or_else(|| {
            ParseError::field(n, "version", "must be a whole number from 1 to 4294967295")
        })?;
    let state: KeyState = words.next().and_then(|w| w.parse().ok()).ok_or_else(|| {
        ParseError::field(
            n,
            "state",
            "must be pending, primary, decrypt-only, retired or destroyed",
        )
    })?;

    let mut created = None;
    let mut info = VersionInfo::new(version, state, Timestamp::from_unix(0));
    let mut kek = None;
    for word in words {
        let (name, value) = word
            .split_once('=')
            .ok_or_else(|| ParseError::new(n, "has a field that is not `name=value`"))?;
        let name: &'static str = match name {
            "created" => "created",
            "promoted" => "promoted",
            "retired" => "retired",
            "destroyed" => "destroyed",
            "kek" => "kek",
            _ => return Err(ParseError::new(n, "has an unknown field name")),
        };
        let slot = match name {
            "created" => &mut created,
            "promoted" => &mut info.promoted,
            "retired" => &mut info.retired,
            "destroyed" => &mut info.destroyed,
            _ => {
                if kek.is_some() {
                    return Err(ParseError::field(n, name, "appears twice"));
                }
                kek = Some(decode_kek(n, value)?);
                continue;
            }
        };
        if slot.is_some() {
            return Err(ParseError::field(n, name, "appears twice"));
        }
        *slot = Some(value.parse().map_err(|_| {
            ParseError::field(n, name, "must be a UTC time like 2026-01-31T23:59:59Z")
        })?);
    }
    info.created = created.ok_or_else(|| ParseError::field(n, "created", "is missing"))?;
    if material == Material::Token {
        if kek.is_some() {
            return Err(ParseError::field(
                n,
                "kek",
                "must not be present: this keyring's keys live in a token",
            ));
        }
        return Ok(StoredVersion { info, kek });
    }
    match (state.has_material(), &kek) {
        (true, None) => return Err(ParseError::field(n, "kek", "is missing")),
        (false, Some(_)) => {
            return Err(ParseError::field(
                n,
                "kek",
                "must not be present on a destroyed version",
            ));
        }
        _ => {}
    }
    Ok(StoredVersion { info, kek })
}

fn decode_kek(n: usize, value: &str) -> Result<Kek, ParseError> {
    // The decoder's scratch, the key passed by value into its locked page:
    // copies on this thread's stack, zeroed before the key is handed on.
    use crate::secret::{SCRUB_AFTER_SETUP, with_scrubbed_stack};
    with_scrubbed_stack::<SCRUB_AFTER_SETUP, _>(|| {
        let bad = || ParseError::field(n, "kek", "must be the base64 encoding of 32 bytes");
        // Decode into a fixed buffer so no unzeroed copy of the key is left behind.
        let mut buf = Zeroizing::new([0u8; KEK_LEN + 3]);
        let len = BASE64
            .decode_slice(value, &mut buf[..])
            .map_err(|_| bad())?;
        if len != KEK_LEN || value.len() != 44 {
            return Err(bad());
        }
        let mut key = [0u8; KEK_LEN];
        key.copy_from_slice(&buf[..KEK_LEN]);
        let kek = Kek::from_bytes(key);
        zeroize::Zeroize::zeroize(&mut key);
        Ok(kek)
    })
}

/// A defect in a keyring file, located by line and field; never shows content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line, or `None` for a defect of the whole keyring.
    pub line: Option<usize>,
    /// The field at fault, if one.
    pub field: Option<&'static str>,
    /// What is wrong.
    pub reason: String,
}

impl ParseError {
    fn new(line: usize, reason: &str) -> Self {
        Self {
            line: Some(line),
            field: None,
            reason: reason.to_owned(),
        }
    }
    fn field(line: usize, field: &'static str, reason: &str) -> Self {
        Self {
            line: Some(line),
            field: Some(field),
            reason: reason.to_owned(),
        }
    }
    fn whole(reason: String) -> Self {
        Self {
            line: None,
            field: None,
            reason,
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.field) {
            (Some(l), Some(field)) => write!(f, "line {l}: field `{field}` {}", self.reason),
            (Some(l), None) => write!(f, "line {l} {}", self.reason),
            (None, _) => f.write_str(&self.reason),
        }
    }
}

/// Reading or writing the keyring file failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No file at the path.
    #[error("keyring {path} does not exist (create one with `kekd admin init --keyring {path}`)")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The path is a symlink whose target does not exist.
    #[error(
        "keyring {path} is a symlink to {target}, which does not exist; point the link at the keyring, or remove \
         the link if there is no keyring yet"
    )]
    DanglingSymlink {
        /// The link.
        path: PathBuf,
        /// What it points at.
        target: PathBuf,
    },
    /// The file exists and must not be replaced.
    #[error(
        "keyring {path} already exists; refusing to overwrite it (every Secret it encrypted would be lost)"
    )]
    AlreadyExists {
        /// The path.
        path: PathBuf,
    },
    /// Group or other may access the file.
    #[error(
        "keyring {path} has permissions {mode:04o}, which let other users read the keys; run `chmod 600 {path}`"
    )]
    TooOpen {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file.
    #[error("keyring {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Larger than any keyring.
    #[error(
        "keyring {path} is {len} bytes, more than the {MAX_FILE_LEN}-byte limit: not a kekd keyring"
    )]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The content is not a valid keyring.
    #[error("keyring {path}: {error}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// Where and what.
        error: ParseError,
    },
    /// The OS refused an operation.
    #[error("keyring {path}: cannot {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Another admin command holds the keyring's lock.
    #[error(
        "keyring {path} is locked by another `kekd admin` command; wait for it to finish and run this again"
    )]
    Locked {
        /// The keyring.
        path: PathBuf,
    },
    /// A file kekd keeps beside the keyring is something kekd never makes
    /// there: planted by whoever can write the directory.
    #[error(transparent)]
    Planted(#[from] crate::file::Planted),
    /// The OS RNG failed while generating a key.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// A write the keyring shares with kekd's other files failed after the
    /// temp file was made: the directory fsync (the change is in effect but
    /// may not survive a power failure), the replacement's owner, or the
    /// keyring read through a symlink no longer being the one at its end.
    #[error(transparent)]
    Write(crate::file::WriteError),
}

/// A keyring write's failure: a new file that exists already, or an OS
/// error, in the keyring's own words; the rest as the write reported it.
impl From<WriteError> for StoreError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::AlreadyExists { path } => Self::AlreadyExists { path },
            WriteError::Io { path, op, source } => Self::Io { path, op, source },
            WriteError::Random(e) => Self::Random(e),
            e @ (WriteError::NotDurable { .. }
            | WriteError::Moved { .. }
            | WriteError::WrongOwner { .. }) => Self::Write(e),
        }
    }
}

impl StoreError {
    /// What went wrong, for everything outside the keyring's own code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } | Self::DanglingSymlink { .. } => ErrorKind::NoKeyring,
            Self::AlreadyExists { .. } => ErrorKind::KeyringExists,
            Self::TooOpen { .. } | Self::NotAFile { .. } => ErrorKind::Misconfigured,
            Self::TooLarge { .. } | Self::Parse { .. } | Self::Planted(_) => ErrorKind::Damaged,
            Self::Io { .. } | Self::Random(_) => ErrorKind::Io,
            Self::Locked { .. } => ErrorKind::Locked,
            Self::Write(e) => match e {
                WriteError::AlreadyExists { .. } => ErrorKind::KeyringExists,
                WriteError::Io { .. } | WriteError::Random(_) => ErrorKind::Io,
                WriteError::NotDurable { .. } => ErrorKind::NotDurable,
                WriteError::Moved { .. } => ErrorKind::Damaged,
                WriteError::WrongOwner { .. } => ErrorKind::Misconfigured,
            },
        }
    }
}

/// A keyring file's error as a backend error: its kind, and for a damaged
/// file the way to get the keyring back.
impl From<StoreError> for BackendError {
    fn from(e: StoreError) -> Self {
        let fix = match &e {
            StoreError::Parse { path, .. } | StoreError::TooLarge { path, .. } => {
                Some(damaged_hint(path))
            }
            _ => None,
        };
        let error = Self::new(e.kind(), e);
        match fix {
            Some(fix) => error.with_fix(fix),
            None => error,
        }
    }
}

/// How to get a damaged keyring file back, as a second line under the
/// error (the first line stays the error itself).
pub fn damaged_hint(path: &Path) -> String {
    let p = path.display();
    format!(
        "hint: if {p} is damaged, move it aside (`mv {p} {p}.damaged`) and bring the keyring back: \
         `kekd admin restore-backup --from BACKUP --keyring {p}`, or `kekd admin import --from COPY --keyring {p}` \
         with the keyring of another node"
    )
}

/// Reads and parses the keyring at `path`, refusing loose permissions.
///
/// Symlinks are followed (Kubernetes mounts Secrets through them); the
/// permission and type checks apply to the file they point at.
///
/// # Errors
/// See [`StoreError`].
pub fn read(path: &Path) -> Result<KeyringFile, StoreError> {
    let (file, meta) = open_keyring(path)?;
    read_open(path, file, &meta)
}

/// [`read`] for a copy that may have arrived with loose permissions (scp
/// keeps the umask's; the checksum proves it intact): any mode is read,
/// and returned for the caller to warn about. One open, so what was
/// checked is what is read.
///
/// # Errors
/// See [`StoreError`]; never [`StoreError::TooOpen`].
pub fn read_loose(path: &Path) -> Result<(KeyringFile, u32), StoreError> {
    let (file, meta) = open_keyring(path)?;
    let mode = meta.permissions().mode() & 0o7777;
    read_checked(path, file, &meta, false).map(|f| (f, mode))
}

/// Opens the keyring at `path` as [`read`] does.
fn open_keyring(path: &Path) -> Result<(File, fs::Metadata), StoreError> {
    let io = |op| {
        move |source: io::Error| StoreError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    open_regular(path, Links::Follow).map_err(|e| match e {
        OpenError::NotFound { .. } => match fs::read_link(path) {
            Ok(target) => StoreError::DanglingSymlink {
                path: path.to_owned(),
                target,
            },
            Err(_) => StoreError::NotFound {
                path: path.to_owned(),
            },
        },
        // Refused before a byte is read: a FIFO would block forever.
        OpenError::NotRegular { .. } => StoreError::NotAFile {
            path: path.to_owned(),
        },
        OpenError::Io { source, .. } => io("open")(source),
        // Links are followed here; kept total all the same.
        e @ OpenError::Symlink { .. } => io("open")(io::Error::other(e)),
    })
}

/// Checks and parses the keyring opened at `path` (a regular file, with
/// `meta` its metadata).
fn read_open(path: &Path, file: File, meta: &fs::Metadata) -> Result<KeyringFile, StoreError> {
    read_checked(path, file, meta, true)
}

/// [`read_open`], refusing loose permissions only when `strict`.
fn read_checked(
    path: &Path,
    mut file: File,
    meta: &fs::Metadata,
    strict: bool,
) -> Result<KeyringFile, StoreError> {
    let io = |op| {
        move |source: io::Error| StoreError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if strict && mode & 0o077 != 0 {
        return Err(StoreError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(StoreError::TooLarge {
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    (&mut file)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read"))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(StoreError::TooLarge {
            path: path.to_owned(),
            len: bytes.len() as u64,
        });
    }
    KeyringFile::parse(&bytes).map_err(|error| StoreError::Parse {
        path: path.to_owned(),
        error,
    })
}

/// Writes a new keyring at `path`, never replacing an existing file, even one
/// created concurrently.
///
/// # Errors
/// [`StoreError::AlreadyExists`] when `path` exists; I/O errors otherwise,
/// in which case nothing is left at `path`.
pub fn create(path: &Path, keyring: &KeyringFile) -> Result<(), StoreError> {
    // Never through a dangling symlink: the key would land wherever it points.
    if let (Ok(target), Err(_)) = (fs::read_link(path), fs::metadata(path)) {
        return Err(StoreError::DanglingSymlink {
            path: path.to_owned(),
            target,
        });
    }
    if fs::symlink_metadata(path).is_ok() {
        return Err(StoreError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    write_durable(
        path,
        keyring.encode().as_bytes(),
        Replace::Never,
        None,
        Guard::None,
    )
    .map_err(StoreError::from)
}

/// Atomically replaces the keyring at `path` with `keyring`.
///
/// When `path` is a symlink, the file it points at is replaced (in its own
/// directory): replacing the link itself would fork the keyring into two
/// files, and a server reading through the link elsewhere would never see
/// the change.
///
/// # Errors
/// I/O errors; the previous file is then untouched.
pub fn replace(path: &Path, keyring: &KeyringFile) -> Result<(), StoreError> {
    let target = match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(|source| StoreError::Io {
                path: path.to_owned(),
                op: "resolve the symlink",
                source,
            })?
        }
        _ => {
            return write_durable(
                path,
                keyring.encode().as_bytes(),
                Replace::Always,
                None,
                Guard::Same,
            )
            .map_err(StoreError::from);
        }
    };
    // Whoever owns the link's directory can point it elsewhere between the
    // read and this write (at a root-owned file, when root runs the
    // command), and whoever owns a directory on the target's path can swap
    // it for a link: the target's directory is opened once, without
    // following a link anywhere on its (resolved) path, the file is read
    // from it, and replaced in it only while it is still that same file of
    // this same keyring.
    let moved = |why: String| {
        StoreError::Write(WriteError::Moved {
            path: path.to_owned(),
            target: target.clone(),
            why,
        })
    };
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(moved("it is no file in a directory".to_owned()));
    };
    let dir_fd = open_dir(dir, Links::Refuse).map_err(|e| match e.raw_os_error() {
        Some(c)
            if [rustix::io::Errno::LOOP, rustix::io::Errno::NOTDIR]
                .iter()
                .any(|n| n.raw_os_error() == c) =>
        {
            moved(format!(
                "a directory on the way to {} became a symlink",
                dir.display()
            ))
        }
        _ => moved(format!("cannot open {}: {e}", dir.display())),
    })?;
    use rustix::fs::{Mode, OFlags};
    let file = rustix::fs::openat(
        &dir_fd,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => moved("it is a symlink now".to_owned()),
        e => moved(format!("cannot open it: {}", io::Error::from(e))),
    })?;
    let file = File::from(file);
    let meta = file
        .metadata()
        .map_err(|e| moved(format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(moved(format!("it is {}", kind_of(meta.file_type()))));
    }
    let flags =
        rustix::fs::fcntl_getfl(&file).map_err(|e| moved(io::Error::from(e).to_string()))?;
    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
        .map_err(|e| moved(io::Error::from(e).to_string()))?;
    let identity = {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    };
    match read_open(&target, file, &meta) {
        Ok(there) if there.id == keyring.id && there.material == keyring.material => {}
        Ok(there) => return Err(moved(format!("it holds keyring {}", there.id))),
        Err(e) => return Err(moved(e.to_string())),
    }
    write_durable(
        &target,
        keyring.encode().as_bytes(),
        Replace::Always,
        None,
        Guard::Read {
            dir: dir_fd,
            identity,
            named: path,
        },
    )
    .map_err(StoreError::from)
}

#[cfg(test)]
mod tests;
