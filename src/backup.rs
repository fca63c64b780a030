//! Keyring backups: the local keyring sealed under a passphrase.
//!
//! ```text
//! kekd-backup v1
//! keyring 5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40
//! created 2026-11-28T10:00:00Z
//! versions 1:decrypt-only 2:primary
//! kdf argon2id v=19 m=65536 t=3 p=1 salt=<base64 of 16 random bytes>
//! cipher aes-256-gcm nonce=<base64 of 12 random bytes>
//! sealed <base64: the keyring file sealed with AES-256-GCM, tag last>
//! ```
//!
//! The first six lines are the header. It is public — it tells an operator
//! which keyring a backup holds and when it was taken, without the
//! passphrase — and it is authenticated: every byte of it, newlines
//! included, is the AES-256-GCM additional data, so no field can be changed
//! without the backup failing to open. The key is
//! argon2id(passphrase, salt, m KiB, t passes, p lanes) → 32 bytes. What is
//! sealed is the keyring file exactly as [`KeyringFile::encode`] writes it,
//! checksum included, and opening parses it with the keyring's own strict
//! parser.
//!
//! Parsing is strict and never panics: one line per field in a fixed order,
//! canonical numbers and base64, a final newline, nothing after `sealed`.
//! Errors give the line and field, never the content. KDF parameters outside
//! [`KdfParams::MEMORY_KIB`], [`KdfParams::PASSES`] and [`KdfParams::LANES`]
//! are refused before any work is done, so a crafted file cannot make
//! `restore-backup` allocate gigabytes. A wrong passphrase and a damaged
//! sealed body are one opaque error ([`BackupError::Open`]).

use std::fmt::{self, Write as _};
use std::io::{self, Read};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use crate::file::WriteError;
use crate::id::{KeyVersion, KeyringId, Timestamp};
use crate::keyring::KeyState;
use crate::keyring::lifecycle::{SuccessorError, Transition, check_successor};
use crate::keyring::store::{KeyringFile, Material, ParseError};
use crate::secret::{RandomError, fill_random};

/// The first line of every format-1 backup.
pub const MAGIC: &str = "kekd-backup v1";
/// Backups larger than this are refused unread: a keyring of the largest
/// size the store accepts, in base64, plus the header, fits well inside.
pub const MAX_BACKUP_LEN: u64 = 2 << 20;
/// Fewest characters (Unicode scalar values) a backup passphrase may have.
pub const MIN_PASSPHRASE_CHARS: usize = 12;
/// Most bytes a backup passphrase may have.
pub const MAX_PASSPHRASE_LEN: usize = 1024;
/// Bytes of random salt per backup.
pub const SALT_LEN: usize = 16;
/// Bytes of the AES-256-GCM nonce.
pub const NONCE_LEN: usize = 12;

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// A backup passphrase: at least [`MIN_PASSPHRASE_CHARS`] characters,
/// zeroed on drop, never printed.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Takes a passphrase (trailing newlines already removed by the caller).
    ///
    /// # Errors
    /// [`BackupError::PassphraseTooShort`] and
    /// [`BackupError::PassphraseTooLong`]; the string is zeroed either way.
    pub fn new(passphrase: String) -> Result<Self, BackupError> {
        let passphrase = Zeroizing::new(passphrase);
        let chars = passphrase.chars().count();
        if chars < MIN_PASSPHRASE_CHARS {
            return Err(BackupError::PassphraseTooShort { chars });
        }
        if passphrase.len() > MAX_PASSPHRASE_LEN {
            return Err(BackupError::PassphraseTooLong);
        }
        Ok(Self(passphrase))
    }

    /// The passphrase. Call only where it is handed to the KDF or compared.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// argon2id cost parameters, recorded in every backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB (`m`).
    pub memory_kib: u32,
    /// Passes over the memory (`t`).
    pub passes: u32,
    /// Lanes (`p`).
    pub lanes: u32,
}

impl KdfParams {
    /// What every backup is written with: 64 MiB and 3 passes (RFC 9106's
    /// second recommended setting) in one lane: a few tenths of a second.
    pub const WRITE: Self = Self {
        memory_kib: 64 * 1024,
        passes: 3,
        lanes: 1,
    };
    /// Memory accepted on read: OWASP's 19 MiB floor up to 1 GiB, so a
    /// crafted header cannot make a restore allocate more.
    pub const MEMORY_KIB: RangeInclusive<u32> = 19 * 1024..=1024 * 1024;
    /// Passes accepted on read.
    pub const PASSES: RangeInclusive<u32> = 2..=8;
    /// Lanes accepted on read.
    pub const LANES: RangeInclusive<u32> = 1..=4;
}

/// The public, authenticated first lines of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The id of the keyring sealed in the backup.
    pub keyring_id: KeyringId,
    /// When the backup was taken.
    pub created: Timestamp,
    /// Every version of that keyring, with its state, in increasing order.
    pub versions: Vec<(KeyVersion, KeyState)>,
    /// How the key was derived from the passphrase.
    pub kdf: KdfParams,
    /// The argon2id salt.
    pub salt: [u8; SALT_LEN],
    /// The AES-256-GCM nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// Whether this header describes `keyring`: the same id, the same
    /// versions in the same states. (Whether the material is the same only
    /// opening can tell.)
    pub fn describes(&self, keyring: &KeyringFile) -> bool {
        self.keyring_id == keyring.id && self.versions == summary(keyring)
    }

    /// The header lines, each ending in `\n`: also the AAD of the seal.
    fn encode(&self) -> String {
        let mut out = String::with_capacity(256 + 20 * self.versions.len());
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{MAGIC}");
        let _ = writeln!(out, "keyring {}", self.keyring_id);
        let _ = writeln!(out, "created {}", self.created);
        out.push_str("versions");
        for (version, state) in &self.versions {
            let _ = write!(out, " {version}:{state}");
        }
        out.push('\n');
        let k = self.kdf;
        let _ = writeln!(
            out,
            "kdf argon2id v=19 m={} t={} p={} salt={}",
            k.memory_kib,
            k.passes,
            k.lanes,
            BASE64.encode(self.salt)
        );
        let _ = writeln!(
            out,
            "cipher aes-256-gcm nonce={}",
            BASE64.encode(self.nonce)
        );
        out
    }
}

/// A parsed or freshly sealed backup. Holds no secret: the keyring inside is
/// sealed.
#[derive(Clone, PartialEq, Eq)]
pub struct Backup {
    header: Header,
    sealed: Vec<u8>,
}

impl fmt::Debug for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backup")
            .field("header", &self.header)
            .field("sealed_len", &self.sealed.len())
            .finish()
    }
}

impl Backup {
    /// Seals `keyring` under `passphrase` with [`KdfParams::WRITE`], a fresh
    /// random salt and a fresh random nonce.
    ///
    /// # Errors
    /// [`BackupError::TokenKeyring`] for PKCS#11 metadata (its keys cannot
    /// leave the token); RNG or KDF failure.
    pub fn seal(
        keyring: &KeyringFile,
        passphrase: &Passphrase,
        now: Timestamp,
    ) -> Result<Self, BackupError> {
        Self::seal_with(keyring, passphrase, now, KdfParams::WRITE)
    }

    /// [`Backup::seal`] with chosen KDF parameters (tests only use cheaper
    /// ones; every production path goes through `seal`).
    fn seal_with(
        keyring: &KeyringFile,
        passphrase: &Passphrase,
        now: Timestamp,
        kdf: KdfParams,
    ) -> Result<Self, BackupError> {
        if keyring.material != Material::Inline {
            return Err(BackupError::TokenKeyring);
        }
        let mut salt = [0; SALT_LEN];
        fill_random(&mut salt)?;
        let mut nonce = [0; NONCE_LEN];
        fill_random(&mut nonce)?;
        let header = Header {
            keyring_id: keyring.id,
            created: now,
            versions: summary(keyring),
            kdf,
            salt,
            nonce,
        };
        seal_bytes(header, keyring.encode().as_bytes(), passphrase)
    }

    /// The public header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Derives the key from `passphrase`, opens the sealed keyring and parses
    /// it strictly. Takes as long as the header's KDF parameters say (a few
    /// tenths of a second for [`KdfParams::WRITE`]).
    ///
    /// # Errors
    /// [`BackupError::Open`] for a wrong passphrase or any change to the
    /// header or the sealed bytes (deliberately one error);
    /// [`BackupError::SealedKeyring`] or [`BackupError::HeaderMismatch`] when
    /// what opened is not what kekd seals.
    pub fn open(&self, passphrase: &Passphrase) -> Result<KeyringFile, BackupError> {
        let cipher = derive_cipher(&self.header, passphrase)?;
        let aad = self.header.encode();
        let plaintext = Zeroizing::new(
            cipher
                .decrypt(
                    (&self.header.nonce).into(),
                    Payload {
                        msg: &self.sealed,
                        aad: aad.as_bytes(),
                    },
                )
                .map_err(|_| BackupError::Open)?,
        );
        let keyring = KeyringFile::parse(&plaintext).map_err(BackupError::SealedKeyring)?;
        if keyring.material != Material::Inline || !self.header.describes(&keyring) {
            return Err(BackupError::HeaderMismatch);
        }
        Ok(keyring)
    }

    /// The backup file's text.
    pub fn encode(&self) -> String {
        let mut out = self.header.encode();
        out.reserve(8 + self.sealed.len().div_ceil(3) * 4);
        out.push_str("sealed ");
        BASE64.encode_string(&self.sealed, &mut out);
        out.push('\n');
        out
    }

    /// Parses a backup file's bytes. Does no KDF work: the parameters are
    /// only checked against their limits.
    ///
    /// # Errors
    /// The first defect, by line and field.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            FormatError::line(line, "is not UTF-8 text")
        })?;
        // What the file is comes first: a stranger gets "not a kekd backup",
        // not a complaint about its last line.
        let first = text.split('\n').next().unwrap_or_default();
        let first = first.strip_suffix('\r').unwrap_or(first);
        if text.is_empty() {
            return Err(FormatError::line(1, "is missing: the file is empty"));
        }
        if first != MAGIC {
            let reason = if !text.contains('\n') && MAGIC.starts_with(first) {
                "is cut short (file truncated?)"
            } else if first.starts_with("kekd-backup") {
                "is a backup format this kekd does not read (expected `kekd-backup v1`)"
            } else if first.starts_with("kekd-keyring") {
                "is `kekd-keyring …`: a keyring file, not a backup"
            } else {
                "is not `kekd-backup v1`: not a kekd backup"
            };
            return Err(FormatError::line(1, reason));
        }
        if let Some(i) = text.find('\r') {
            return Err(FormatError::line(
                1 + text[..i].matches('\n').count(),
                "has a carriage return: the file was converted to CRLF line endings",
            ));
        }

        let mut lines = Lines { rest: text, n: 0 };
        lines.next("`kekd-backup v1`")?;
        let (n, line) = lines.next("`keyring <id>`")?;
        let keyring_id = line
            .strip_prefix("keyring ")
            .ok_or_else(|| FormatError::line(n, "must be `keyring <id>`"))?
            .parse::<KeyringId>()
            .map_err(|_| FormatError::field(n, "keyring", "must be 32 lowercase hex digits"))?;
        let (n, line) = lines.next("`created <time>`")?;
        let created = line
            .strip_prefix("created ")
            .ok_or_else(|| FormatError::line(n, "must be `created <time>`"))?
            .parse::<Timestamp>()
            .map_err(|_| {
                FormatError::field(n, "created", "must be a UTC time like 2026-01-31T23:59:59Z")
            })?;
        let (n, line) = lines.next("`versions <version>:<state> …`")?;
        let versions = parse_versions(n, line)?;
        let (n, line) = lines.next("`kdf argon2id …`")?;
        let (kdf, salt) = parse_kdf(n, line)?;
        let (n, line) = lines.next("`cipher aes-256-gcm nonce=…`")?;
        let nonce = parse_cipher(n, line)?;
        let header_len = text.len() - lines.rest.len();
        let (n, line) = lines.next("`sealed <base64>`")?;
        let sealed = parse_sealed(n, line)?;
        if !lines.rest.is_empty() {
            return Err(FormatError::line(
                n + 1,
                "is unexpected: nothing may follow the `sealed` line",
            ));
        }

        let header = Header {
            keyring_id,
            created,
            versions,
            kdf,
            salt,
            nonce,
        };
        // The fields parsed; the header must also be exactly what kekd
        // writes, as it is the AAD byte for byte.
        let canonical = header.encode();
        if canonical != text[..header_len] {
            let line = canonical
                .split('\n')
                .zip(text[..header_len].split('\n'))
                .position(|(a, b)| a != b)
                .map_or(1, |i| i + 1);
            return Err(FormatError::line(
                line,
                "is not in the canonical form kekd writes (extra spaces, leading zeros or non-canonical base64?)",
            ));
        }
        Ok(Self { header, sealed })
    }
}

/// Reads and parses the backup at `path`. Permissions are not checked: a
/// backup is sealed, and copies often arrive with the umask's mode.
///
/// # Errors
/// Missing, unreadable, larger than [`MAX_BACKUP_LEN`], or malformed.
pub fn read(path: &Path) -> Result<Backup, BackupError> {
    let io = |op| {
        move |source: io::Error| BackupError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    };
    // A regular file only: a FIFO (planted at `--out`, or named by
    // mistake) would block the command forever.
    let (file, _) =
        crate::file::open_regular(path, crate::file::Links::Follow).map_err(|e| match e {
            crate::file::OpenError::NotFound { .. } => BackupError::NotFound {
                path: path.to_owned(),
            },
            crate::file::OpenError::NotRegular { what, .. } => BackupError::NotAFile {
                path: path.to_owned(),
                what,
            },
            crate::file::OpenError::Io { source, .. } => io("open")(source),
            // Links are followed here; kept total all the same.
            e @ crate::file::OpenError::Symlink { .. } => io("open")(io::Error::other(e)),
        })?;
    let mut bytes = Vec::new();
    file.take(MAX_BACKUP_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read"))?;
    if bytes.len() as u64 > MAX_BACKUP_LEN {
        return Err(BackupError::TooLarge {
            path: path.to_owned(),
        });
    }
    Backup::parse(&bytes).map_err(|error| BackupError::Malformed {
        path: path.to_owned(),
        error,
    })
}

/// Whether [`write()`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Never: fail if anything exists at the path, even if it appears
    /// while writing.
    Never,
    /// Replace whatever is there, atomically.
    Replace,
}

/// Writes `backup` to `path` the way the keyring is written: a 0600 temp
/// file beside it, fsynced, linked (or renamed) into place, the directory
/// fsynced.
///
/// # Errors
/// [`BackupError::Exists`] with [`Overwrite::Never`] when `path` exists; I/O
/// errors, in which case nothing new is left at `path`.
pub fn write(path: &Path, backup: &Backup, overwrite: Overwrite) -> Result<(), BackupError> {
    let text = backup.encode();
    match overwrite {
        Overwrite::Never => crate::file::write_file_new(path, text.as_bytes()),
        Overwrite::Replace => crate::file::write_file_atomic(path, text.as_bytes()),
    }
    .map_err(|e| match e {
        WriteError::AlreadyExists { .. } => BackupError::Exists {
            path: path.to_owned(),
        },
        WriteError::Io { op, source, .. } => BackupError::Io {
            path: path.to_owned(),
            op,
            source,
        },
        WriteError::Random(e) => BackupError::Random(e),
        // Replacing a backup the caller cannot give the old owner, a
        // directory fsync that failed after the rename: the message says
        // what happened and what to do.
        e @ (WriteError::NotDurable { .. }
        | WriteError::Moved { .. }
        | WriteError::WrongOwner { .. }) => BackupError::Io {
            path: path.to_owned(),
            op: "write",
            source: io::Error::other(e.to_string()),
        },
    })
}

/// What restoring a backup over the keyring at a path would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestorePlan {
    /// No keyring is there: create it. Every version is new.
    Create(Vec<Transition>),
    /// Replace the keyring with the backup's, which loses nothing; these
    /// versions change state (none when only event times differ).
    Replace(Vec<Transition>),
    /// The keyring already is the backup's, byte for byte.
    Unchanged,
}

/// Decides whether `restored` may replace `current` (`None`: no keyring
/// yet). The rule is the successor rule of reload and `import`: the same
/// keyring, every current version kept with the same material, nothing
/// destroyed coming back, the primary not moving backwards.
///
/// # Errors
/// [`BackupError::OtherKeyring`], [`BackupError::WouldLose`] (naming every
/// version lost or changed), [`BackupError::NotSuccessor`].
pub fn plan_restore(
    current: Option<&KeyringFile>,
    restored: &KeyringFile,
) -> Result<RestorePlan, BackupError> {
    let Some(current) = current else {
        return Ok(RestorePlan::Create(crate::keyring::lifecycle::transitions(
            None, restored,
        )));
    };
    if current.id != restored.id {
        return Err(BackupError::OtherKeyring {
            current: current.id,
            backup: restored.id,
        });
    }
    let old = current.views();
    let new = restored.views();
    let mut missing = Vec::new();
    let mut changed = Vec::new();
    for o in &old {
        match new.iter().find(|n| n.info.version == o.info.version) {
            None => missing.push(o.info.version),
            Some(n) => {
                if let (Some(a), Some(b)) = (o.fingerprint, n.fingerprint)
                    && a != b
                {
                    changed.push(o.info.version);
                }
            }
        }
    }
    if !missing.is_empty() || !changed.is_empty() {
        return Err(BackupError::WouldLose { missing, changed });
    }
    check_successor(&current.id, &old, &restored.id, &new).map_err(BackupError::NotSuccessor)?;
    if *current.encode() == *restored.encode() {
        return Ok(RestorePlan::Unchanged);
    }
    Ok(RestorePlan::Replace(
        crate::keyring::lifecycle::transitions(Some(current), restored),
    ))
}

/// Every version's number and state.
fn summary(keyring: &KeyringFile) -> Vec<(KeyVersion, KeyState)> {
    keyring
        .versions
        .iter()
        .map(|v| (v.info.version, v.info.state))
        .collect()
}

/// Derives the AES-256-GCM key from the passphrase with the header's
/// parameters; the raw key is zeroed, the cipher state is zeroed on drop.
fn derive_cipher(header: &Header, passphrase: &Passphrase) -> Result<Aes256Gcm, BackupError> {
    let kdf = header.kdf;
    let params = Params::new(kdf.memory_kib, kdf.passes, kdf.lanes, Some(KEY_LEN))
        .map_err(|e| BackupError::Kdf(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(
            passphrase.expose_secret().as_bytes(),
            &header.salt,
            &mut key[..],
        )
        .map_err(|e| BackupError::Kdf(e.to_string()))?;
    Aes256Gcm::new_from_slice(&key[..])
        .map_err(|_| BackupError::Kdf("derived key has the wrong length".to_owned()))
}

/// Seals `plaintext` under `header` (whose encoding is the AAD).
fn seal_bytes(
    header: Header,
    plaintext: &[u8],
    passphrase: &Passphrase,
) -> Result<Backup, BackupError> {
    let cipher = derive_cipher(&header, passphrase)?;
    let aad = header.encode();
    let sealed = cipher
        .encrypt(
            (&header.nonce).into(),
            Payload {
                msg: plaintext,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| BackupError::Seal)?;
    Ok(Backup { header, sealed })
}

/// The lines of a backup, each required to end in `\n`.
struct Lines<'a> {
    rest: &'a str,
    n: usize,
}

impl<'a> Lines<'a> {
    /// The next line without its `\n`, and its number; `what` names the
    /// expected line for the error when it is missing.
    fn next(&mut self, what: &str) -> Result<(usize, &'a str), FormatError> {
        self.n += 1;
        if self.rest.is_empty() {
            return Err(FormatError {
                line: self.n,
                field: None,
                reason: format!("is missing: expected {what} (file truncated?)"),
            });
        }
        let (line, rest) = self.rest.split_once('\n').ok_or_else(|| {
            FormatError::line(self.n, "does not end in a newline (file truncated?)")
        })?;
        self.rest = rest;
        Ok((self.n, line))
    }
}

fn parse_versions(n: usize, line: &str) -> Result<Vec<(KeyVersion, KeyState)>, FormatError> {
    let list = line
        .strip_prefix("versions ")
        .ok_or_else(|| FormatError::line(n, "must be `versions <version>:<state> …`"))?;
    let mut versions: Vec<(KeyVersion, KeyState)> = Vec::new();
    for word in list.split(' ') {
        let bad = || {
            FormatError::field(
                n,
                "versions",
                "must list `<version>:<state>` pairs, one space apart",
            )
        };
        let (v, s) = word.split_once(':').ok_or_else(bad)?;
        let version = number(v).and_then(KeyVersion::new).ok_or_else(bad)?;
        let state = s.parse::<KeyState>().map_err(|_| bad())?;
        if versions.last().is_some_and(|(last, _)| *last >= version) {
            return Err(FormatError::field(
                n,
                "versions",
                "must list each version once, in increasing order",
            ));
        }
        versions.push((version, state));
    }
    Ok(versions)
}

fn parse_kdf(n: usize, line: &str) -> Result<(KdfParams, [u8; SALT_LEN]), FormatError> {
    let mut words = line.split(' ');
    if words.next() != Some("kdf") {
        return Err(FormatError::line(n, "must be `kdf argon2id …`"));
    }
    if words.next() != Some("argon2id") {
        return Err(FormatError::field(
            n,
            "kdf",
            "must be argon2id, the only KDF kekd reads",
        ));
    }
    if field(n, words.next(), "v")? != "19" {
        return Err(FormatError::field(
            n,
            "v",
            "must be 19 (argon2 version 1.3)",
        ));
    }
    let ranged = |word, name, range: RangeInclusive<u32>, reason| {
        field(n, word, name).and_then(|v| {
            number(v)
                .filter(|v| range.contains(v))
                .ok_or_else(|| FormatError::field(n, name, reason))
        })
    };
    let memory_kib = ranged(
        words.next(),
        "m",
        KdfParams::MEMORY_KIB,
        "must be a whole number of KiB from 19456 to 1048576",
    )?;
    let passes = ranged(
        words.next(),
        "t",
        KdfParams::PASSES,
        "must be a whole number of passes from 2 to 8",
    )?;
    let lanes = ranged(
        words.next(),
        "p",
        KdfParams::LANES,
        "must be a whole number of lanes from 1 to 4",
    )?;
    let salt = base64_array(field(n, words.next(), "salt")?)
        .ok_or_else(|| FormatError::field(n, "salt", "must be the base64 encoding of 16 bytes"))?;
    if words.next().is_some() {
        return Err(FormatError::line(n, "has a field after `salt`"));
    }
    Ok((
        KdfParams {
            memory_kib,
            passes,
            lanes,
        },
        salt,
    ))
}

fn parse_cipher(n: usize, line: &str) -> Result<[u8; NONCE_LEN], FormatError> {
    let mut words = line.split(' ');
    if words.next() != Some("cipher") {
        return Err(FormatError::line(n, "must be `cipher aes-256-gcm nonce=…`"));
    }
    if words.next() != Some("aes-256-gcm") {
        return Err(FormatError::field(
            n,
            "cipher",
            "must be aes-256-gcm, the only cipher kekd reads",
        ));
    }
    let nonce = base64_array(field(n, words.next(), "nonce")?)
        .ok_or_else(|| FormatError::field(n, "nonce", "must be the base64 encoding of 12 bytes"))?;
    if words.next().is_some() {
        return Err(FormatError::line(n, "has a field after `nonce`"));
    }
    Ok(nonce)
}

fn parse_sealed(n: usize, line: &str) -> Result<Vec<u8>, FormatError> {
    let b64 = line
        .strip_prefix("sealed ")
        .ok_or_else(|| FormatError::line(n, "must be `sealed <base64>`"))?;
    let sealed = BASE64
        .decode(b64)
        .map_err(|_| FormatError::field(n, "sealed", "is not valid base64 (damaged in a copy?)"))?;
    if sealed.len() <= TAG_LEN {
        return Err(FormatError::field(
            n,
            "sealed",
            "is too short to hold a keyring",
        ));
    }
    Ok(sealed)
}

/// The value of `name=value`, which must be the next word.
fn field<'a>(n: usize, word: Option<&'a str>, name: &'static str) -> Result<&'a str, FormatError> {
    word.and_then(|w| w.strip_prefix(name))
        .and_then(|w| w.strip_prefix('='))
        .ok_or_else(|| FormatError::field(n, name, "is missing or out of order"))
}

/// A decimal number without sign or leading zeros.
fn number(s: &str) -> Option<u32> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// Exactly `N` bytes of canonical, padded base64.
fn base64_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    // Room for the decoder's slack; the length is checked below.
    let mut scratch = vec![0u8; N + 3];
    let len = BASE64.decode_slice(s, &mut scratch).ok()?;
    if len != N || s.len() != N.div_ceil(3) * 4 {
        return None;
    }
    buf.copy_from_slice(&scratch[..N]);
    Some(buf)
}

/// A defect in a backup file, located by line and field; never shows content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// 1-based line.
    pub line: usize,
    /// The field at fault, if one.
    pub field: Option<&'static str>,
    /// What is wrong.
    pub reason: String,
}

impl FormatError {
    fn line(line: usize, reason: &str) -> Self {
        Self {
            line,
            field: None,
            reason: reason.to_owned(),
        }
    }

    fn field(line: usize, field: &'static str, reason: &str) -> Self {
        Self {
            line,
            field: Some(field),
            reason: reason.to_owned(),
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(f, "line {}: field `{field}` {}", self.line, self.reason),
            None => write!(f, "line {} {}", self.line, self.reason),
        }
    }
}

/// A backup could not be written, read, opened or restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The passphrase is too short to resist guessing.
    #[error(
        "the passphrase has {chars} characters; a backup passphrase needs at least {MIN_PASSPHRASE_CHARS}"
    )]
    PassphraseTooShort {
        /// How many it has.
        chars: usize,
    },
    /// The passphrase is absurdly long.
    #[error("the passphrase is longer than {MAX_PASSPHRASE_LEN} bytes")]
    PassphraseTooLong,
    /// The keyring's keys live in a PKCS#11 token.
    #[error(
        "PKCS#11 keys cannot leave the token, so kekd cannot back them up: back up the token as its vendor \
         documents (see docs/hsm.md)"
    )]
    TokenKeyring,
    /// Wrong passphrase, or the header or sealed bytes were changed.
    #[error("wrong passphrase or damaged backup")]
    Open,
    /// What opened is not a valid keyring.
    #[error(
        "the backup opened, but the keyring sealed in it is invalid ({0}); kekd did not write it"
    )]
    SealedKeyring(ParseError),
    /// What opened does not match the header.
    #[error(
        "the backup opened, but its header does not describe the keyring sealed in it; kekd did not write it"
    )]
    HeaderMismatch,
    /// argon2id refused its parameters.
    #[error("argon2id failed: {0}")]
    Kdf(String),
    /// AES-256-GCM refused to seal.
    #[error("AES-256-GCM sealing failed")]
    Seal,
    /// The OS RNG failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// No file at the path.
    #[error("backup {path} does not exist")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// Not a regular file; nothing was read from it.
    #[error(
        "backup {path} is {what}, not a regular file; nothing was read from it: name the backup file itself \
         (save a pipe's output to a file first)"
    )]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// `a FIFO`, `a directory`, …
        what: &'static str,
    },
    /// Larger than any backup.
    #[error("backup {path} is more than {MAX_BACKUP_LEN} bytes: not a kekd backup")]
    TooLarge {
        /// The path.
        path: PathBuf,
    },
    /// The file is not a well-formed backup.
    #[error("backup {path}: {error}")]
    Malformed {
        /// The path.
        path: PathBuf,
        /// Where and what.
        error: FormatError,
    },
    /// Something is at the path, and it must not be replaced.
    #[error("{path} already exists; refusing to overwrite it")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// The OS refused an operation.
    #[error("backup {path}: cannot {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The backup holds another keyring than the one at the path.
    #[error(
        "the backup holds keyring {backup}, but the keyring there is {current}: nothing encrypted under one can \
         be decrypted with the other. Restore to another path, or move that keyring aside if it really is to go"
    )]
    OtherKeyring {
        /// The keyring at the path.
        current: KeyringId,
        /// The backup's.
        backup: KeyringId,
    },
    /// Restoring would lose versions or change their key material.
    #[error("{}", would_lose(missing, changed))]
    WouldLose {
        /// Versions the keyring has and the backup lacks.
        missing: Vec<KeyVersion>,
        /// Versions whose key material differs in the backup.
        changed: Vec<KeyVersion>,
    },
    /// Restoring would break another rule of the successor check.
    #[error("{0}")]
    NotSuccessor(SuccessorError),
}

fn would_lose(missing: &[KeyVersion], changed: &[KeyVersion]) -> String {
    let list = |vs: &[KeyVersion]| {
        let numbers: Vec<String> = vs.iter().map(ToString::to_string).collect();
        match numbers.len() {
            1 => format!("version {}", numbers[0]),
            _ => format!("versions {}", numbers.join(", ")),
        }
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "the keyring holds {} that the backup lacks (the backup is older than the keyring); restoring would lose {}",
            list(missing),
            if missing.len() == 1 { "it" } else { "them" }
        ));
    }
    if !changed.is_empty() {
        parts.push(format!(
            "{} {} different key material in the backup than in the keyring",
            list(changed),
            if changed.len() == 1 { "has" } else { "have" }
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests;
