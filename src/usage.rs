//! Per-version usage, kept across restarts in `<keyring>.usage.json`.
//!
//! The server counts Encrypts and Decrypts per key version and remembers when
//! each version was last used; `kekd admin list` shows it and `kekd admin
//! retire` refuses a version that served a Decrypt within the apiserver's
//! cache lifetime. The same file tells the admin commands what the running
//! server is serving and whether its last keyring reload was rejected.
//!
//! The file holds no secrets (counts, times, public key ids). It is written
//! atomically every few seconds while something changed, and at shutdown.
//!
//! Each Decrypt is stamped twice: with the wall clock (shown to operators)
//! and with the kernel's boot clock (`CLOCK_BOOTTIME`, milliseconds since
//! boot, together with the boot's id). The wall clock can jump — an NTP step,
//! a wrong RTC, an operator's `date -s` — and a jump forward would make a
//! version that served a Decrypt a minute ago look idle for a year. The boot
//! clock only moves forward, and is read straight from the kernel (not
//! through libc), so `kekd admin retire` measures "how long since the last
//! Decrypt" with it whenever the server wrote the file during this boot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::file::WriteError;
use crate::id::{KeyVersion, KeyringId, Timestamp};

/// What the usage file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageFile {
    /// The keyring the counts belong to.
    pub keyring_id: String,
    /// When the server last wrote the file.
    pub updated: Option<Timestamp>,
    /// What the server is serving now.
    pub serving: Option<Serving>,
    /// The last keyring change the server refused, while it still stands.
    pub reload_error: Option<ReloadProblem>,
    /// Usage per version number.
    pub versions: BTreeMap<u32, VersionUsage>,
    /// The boot the `last_decrypt_boot_ms` stamps belong to
    /// (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// The server's current snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    /// Process id of the server.
    pub pid: u32,
    /// The primary version.
    pub primary: u32,
    /// Its key id.
    pub key_id: String,
    /// When this snapshot was loaded.
    pub since: Timestamp,
}

/// A refused keyring change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadProblem {
    /// When it was refused.
    pub at: Timestamp,
    /// Why.
    pub message: String,
}

/// Counts and last use of one version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionUsage {
    /// Successful Encrypts.
    pub encrypts: u64,
    /// Successful Decrypts.
    pub decrypts: u64,
    /// Last successful Encrypt.
    pub last_encrypt: Option<Timestamp>,
    /// Last successful Decrypt.
    pub last_decrypt: Option<Timestamp>,
    /// Last successful Decrypt on the boot clock (milliseconds since boot of
    /// the boot named by [`UsageFile::boot_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decrypt_boot_ms: Option<u64>,
}

/// Which operation used a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
}

/// Milliseconds since boot on the kernel's `CLOCK_BOOTTIME`: counts suspend,
/// never jumps with the wall clock, and (read by rustix without libc) is not
/// faked by `LD_PRELOAD` time shims either.
pub fn boot_clock_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000_000)
}

/// The id of the current boot, if the kernel tells it.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl UsageFile {
    /// How long ago, by the boot clock, `version` last served a Decrypt —
    /// `None` when the file was written during another boot (or by a kekd
    /// that did not stamp it), so only the wall clock can tell.
    pub fn since_last_decrypt(&self, version: KeyVersion) -> Option<std::time::Duration> {
        let stamp = self.versions.get(&version.get())?.last_decrypt_boot_ms?;
        if self.boot_id.is_none() || self.boot_id != boot_id() {
            return None;
        }
        // A stamp ahead of the clock cannot happen within one boot; treat it
        // as "just now" rather than as long ago.
        Some(std::time::Duration::from_millis(
            boot_clock_ms().saturating_sub(stamp),
        ))
    }
}

/// Largest usage file kekd reads: a few hundred bytes per key version, and
/// a keyring holds at most a few thousand.
const MAX_USAGE_FILE: u64 = 16 << 20;

/// The usage file of the keyring at `keyring`.
pub fn usage_path(keyring: &Path) -> PathBuf {
    crate::file::sibling(keyring, ".usage.json")
}

/// Reads the usage file beside `keyring`; `None` if there is none.
///
/// # Errors
/// When it exists but cannot be read or parsed.
pub fn read(keyring: &Path) -> Result<Option<UsageFile>, String> {
    use std::io::Read;
    let path = usage_path(keyring);
    // kekd writes it by rename, never as a link; a FIFO there must not
    // block `serve` or `admin list`.
    let (file, _) = match crate::file::open_regular(&path, crate::file::Links::Refuse) {
        Ok(f) => f,
        Err(crate::file::OpenError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(format!("usage file: {e}")),
    };
    let mut bytes = Vec::new();
    file.take(MAX_USAGE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("usage file {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_USAGE_FILE {
        return Err(format!(
            "usage file {} is more than {MAX_USAGE_FILE} bytes: not kekd's",
            path.display()
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("usage file {}: {e}", path.display()))
}

/// The server's live usage counters.
#[derive(Debug)]
pub struct UsageTracker {
    path: Option<PathBuf>,
    file: Mutex<UsageFile>,
    dirty: AtomicBool,
}

impl UsageTracker {
    /// Counters for keyring `id`, continuing the file beside `keyring` if it
    /// belongs to the same keyring; with `keyring: None`, kept in memory only.
    pub fn load(keyring: Option<&Path>, id: &KeyringId) -> Self {
        let id = id.to_string();
        let mut file = match keyring.map(read) {
            Some(Ok(Some(f))) if f.keyring_id == id => UsageFile {
                serving: None,
                reload_error: None,
                ..f
            },
            Some(Ok(Some(_))) => {
                warn!("usage file belongs to another keyring; starting new counts");
                UsageFile {
                    keyring_id: id,
                    ..UsageFile::default()
                }
            }
            Some(Err(e)) => {
                warn!(error = %e, "usage file unreadable; starting new counts");
                UsageFile {
                    keyring_id: id,
                    ..UsageFile::default()
                }
            }
            _ => UsageFile {
                keyring_id: id,
                ..UsageFile::default()
            },
        };
        // Boot-clock stamps of an earlier boot mean nothing now.
        let boot = boot_id();
        if file.boot_id != boot {
            for u in file.versions.values_mut() {
                u.last_decrypt_boot_ms = None;
            }
            file.boot_id = boot;
        }
        Self {
            path: keyring.map(usage_path),
            file: Mutex::new(file),
            dirty: AtomicBool::new(true),
        }
    }

    /// Counts one successful use.
    pub fn record(&self, version: KeyVersion, op: Use, now: Timestamp) {
        // Read outside the lock, and only for what stores it.
        let boot_ms = (op == Use::Decrypt).then(boot_clock_ms);
        self.update(|f| {
            let u = f.versions.entry(version.get()).or_default();
            match op {
                Use::Encrypt => {
                    u.encrypts += 1;
                    u.last_encrypt = Some(now);
                }
                Use::Decrypt => {
                    u.decrypts += 1;
                    u.last_decrypt = Some(now);
                    u.last_decrypt_boot_ms = boot_ms;
                }
            }
        });
    }

    /// Records what is being served.
    pub fn set_serving(&self, serving: Serving) {
        self.update(|f| f.serving = Some(serving));
    }

    /// Records (or clears) a refused reload.
    pub fn set_reload_error(&self, problem: Option<ReloadProblem>) {
        self.update(|f| f.reload_error = problem);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> UsageFile {
        self.file.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Writes the file if anything changed since the last write.
    ///
    /// # Errors
    /// When the write fails; the counters stay dirty and are written next time.
    pub fn flush(&self, now: Timestamp) -> Result<(), WriteError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut file = self.snapshot();
        file.updated = Some(now);
        // Serializing plain data to a Vec cannot fail.
        let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
        bytes.push(b'\n');
        crate::file::write_file_atomic(path, &bytes)
            .inspect_err(|_| self.dirty.store(true, Ordering::Release))
    }

    fn update(&self, f: impl FnOnce(&mut UsageFile)) {
        // A poisoned lock only means another call panicked mid-update of
        // counters; keep counting rather than fail requests.
        let mut guard = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard);
        self.dirty.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_persist_across_restarts_of_the_same_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring");
        let id = KeyringId::generate().unwrap();
        let v1 = KeyVersion::FIRST;
        let t = Timestamp::from_unix(1_000);
        let tracker = UsageTracker::load(Some(&keyring), &id);
        tracker.record(v1, Use::Encrypt, t);
        tracker.record(v1, Use::Decrypt, t);
        tracker.record(v1, Use::Decrypt, Timestamp::from_unix(2_000));
        tracker.flush(t).unwrap();

        let again = UsageTracker::load(Some(&keyring), &id);
        let u = again.snapshot().versions[&1];
        let stamp = u.last_decrypt_boot_ms.expect("a boot-clock stamp");
        assert!(
            stamp <= boot_clock_ms(),
            "{stamp} is in the boot clock's future"
        );
        assert_eq!(
            u,
            VersionUsage {
                encrypts: 1,
                decrypts: 2,
                last_encrypt: Some(t),
                last_decrypt: Some(Timestamp::from_unix(2_000)),
                last_decrypt_boot_ms: Some(stamp),
            }
        );
        // Another keyring's counts are not inherited.
        let other = UsageTracker::load(Some(&keyring), &KeyringId::generate().unwrap());
        assert!(other.snapshot().versions.is_empty());
    }

    #[test]
    fn the_boot_clock_measures_time_since_the_last_decrypt_within_one_boot() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring");
        let id = KeyringId::generate().unwrap();
        let v1 = KeyVersion::FIRST;
        let tracker = UsageTracker::load(Some(&keyring), &id);
        // A wall clock 400 days off changes nothing on the boot clock: the
        // time since the Decrypt is no more than the boot clock saw pass
        // around it.
        let before = boot_clock_ms();
        tracker.record(v1, Use::Decrypt, Timestamp::from_unix(0));
        tracker.flush(Timestamp::from_unix(0)).unwrap();
        let file = read(&keyring).unwrap().unwrap();
        assert_eq!(file.boot_id, boot_id());
        let since = file.since_last_decrypt(v1).expect("stamped in this boot");
        let around = boot_clock_ms() - before;
        assert!(
            since <= std::time::Duration::from_millis(around),
            "{since:?} since the Decrypt, which the boot clock saw within {around} ms"
        );
        // Never decrypted: no stamp.
        assert_eq!(file.since_last_decrypt(KeyVersion::new(2).unwrap()), None);

        // Written during another boot: the stamp says nothing, and a server
        // starting now drops it.
        let mut other = file.clone();
        other.boot_id = Some("00000000-0000-0000-0000-000000000000".to_owned());
        assert_eq!(other.since_last_decrypt(v1), None);
        let mut bytes = serde_json::to_vec(&other).unwrap();
        bytes.push(b'\n');
        crate::file::write_file_atomic(&usage_path(&keyring), &bytes).unwrap();
        let restarted = UsageTracker::load(Some(&keyring), &id).snapshot();
        assert_eq!(restarted.boot_id, boot_id());
        assert_eq!(restarted.versions[&1].last_decrypt_boot_ms, None);
        assert_eq!(
            restarted.versions[&1].last_decrypt,
            Some(Timestamp::from_unix(0)),
            "the wall-clock time stays"
        );
    }
}
