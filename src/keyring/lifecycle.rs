//! Keyring lifecycle operations: rotate, promote, retire, restore, destroy,
//! and the successor rule every change and reload must satisfy.
//!
//! These are pure functions on a [`KeyringFile`]: the admin commands lock,
//! read, apply one of them, write durably and audit; tests drive them
//! directly. Each returns the [`Transition`]s it made — none means the step
//! was already done, and the [`Outcome`] says why.
//!
//! ```text
//!            rotate            promote              promote(another)
//!  (new) ──────────▶ pending ──────────▶ primary ──────────────────▶ decrypt-only
//!                      │  ▲                                            │  ▲
//!               retire │  │ restore (never promoted)            retire │  │ restore
//!                      ▼  │                                            ▼  │
//!                    retired ◀─────────────────────────────────────────┘  │
//!                      │  └───────────────────────────────────────────────┘
//!              destroy ▼
//!                  destroyed   (material erased; the version number stays taken)
//! ```
//!
//! A version that has been primary is never primary again: that would make
//! Status report key id A, then B, then A, which the apiserver forbids.

use std::time::Duration;

use crate::id::{KeyId, KeyVersion, KeyringId, Timestamp};
use crate::keyring::store::{KeyringFile, Material, StoredVersion};
use crate::keyring::{KeyState, VersionInfo};
use crate::secret::{Kek, KeyFingerprint, RandomError};

/// The apiserver caches decrypted seeds for 24 hours: a version that served
/// a Decrypt more recently may still be needed by an apiserver's cache refill.
pub const DEFAULT_RETIRE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What a `retire` goes by.
///
/// Decrypt counts are evidence only for a version that never encrypted: an
/// apiserver keeps the seed of every DEK it made itself, so objects it
/// stored under a version may never have cost that version a Decrypt — not
/// until the apiserver restarts and reads them. Every node may have
/// encrypted under any version that was ever primary (the keyring records
/// when: `promoted`), so such a version needs a scan of what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireBasis {
    /// This node's usage record: only a never-promoted version may be
    /// retired this way, and only if it served no Decrypt within the window.
    Usage,
    /// A fresh scan of etcd that the caller checks, under the keyring lock
    /// and before writing, to show no stored object under the version
    /// (`retire --scan`). It clears the usage guard too: nothing stored
    /// under the version means no apiserver can need it.
    Scan,
    /// The operator's override (`--force` without `--scan`): no guard
    /// applies, and anything still stored under the version becomes
    /// unreadable until `restore` ([`retire_risk`]).
    Force,
}

/// What a forced retire of `version` risks, for its report and audit record.
pub fn retire_risk(version: KeyVersion) -> String {
    format!(
        "retired without a scan: objects stored under version {version} become unreadable (at the latest when an \
         apiserver restarts) until `kekd admin restore {version}`"
    )
}

/// One version changing state (`from: None` for a new version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The version.
    pub version: KeyVersion,
    /// Its state before.
    pub from: Option<KeyState>,
    /// Its state after.
    pub to: KeyState,
}

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// These transitions were made.
    Changed(Vec<Transition>),
    /// Nothing needed doing; the text says why.
    Unchanged(String),
}

/// An operation refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// No such version.
    #[error("version {0} is not in this keyring (see `kekd admin list`)")]
    NoSuchVersion(KeyVersion),
    /// The version's state does not allow the operation.
    #[error("version {version} is {state}: {why}")]
    WrongState {
        /// The version.
        version: KeyVersion,
        /// Its state.
        state: KeyState,
        /// Why, and what to do instead.
        why: &'static str,
    },
    /// The version was primary once: usage cannot show it is unused.
    #[error(
        "version {version} was primary (since {promoted}), so objects may be stored under it although it served \
         no Decrypt: an apiserver caches the seeds it made itself and only decrypts them after a restart, so \
         Decrypt counts prove nothing for this version. Retire it only with a fresh scan that shows nothing \
         stored under it (--scan), or pass --force to retire it anyway (objects stored under version {version} \
         become unreadable until `kekd admin restore {version}`)"
    )]
    NeedsScan {
        /// The version.
        version: KeyVersion,
        /// When it became primary.
        promoted: Timestamp,
    },
    /// The version served a Decrypt recently.
    #[error(
        "version {version} served a Decrypt at {last_used}, within the last {window}; apiservers may still need it \
         (wait until {window} after it, or retire it with a fresh scan showing nothing stored under it (--scan), \
         or pass --force)"
    )]
    RecentlyUsed {
        /// The version.
        version: KeyVersion,
        /// Its last Decrypt.
        last_used: Timestamp,
        /// The window.
        window: HumanDuration,
    },
    /// The usage record's last Decrypt is later than this host's clock.
    #[error(
        "version {version} served a Decrypt at {last_used}, later than this host's clock says it is now ({now}): \
         the clock has jumped back or differs from the server's; fix the clock (`timedatectl`) and run this again, \
         or retire it with a fresh scan showing nothing stored under it (--scan), or pass --force"
    )]
    UsedInTheFuture {
        /// The version.
        version: KeyVersion,
        /// Its last Decrypt, by the server's clock.
        last_used: Timestamp,
        /// This host's clock.
        now: Timestamp,
    },
    /// The boot clock says the version served a Decrypt recently, although
    /// the wall clock says it was long ago: the wall clock jumped forward.
    #[error(
        "version {version} served a Decrypt {ago} ago by the system's boot clock, within the last {window}, \
         although the wall clock puts it at {last_used}: the wall clock has jumped; apiservers may still need it \
         (wait until {window} after it, or retire it with a fresh scan showing nothing stored under it (--scan), \
         or pass --force)"
    )]
    RecentlyUsedByBootClock {
        /// The version.
        version: KeyVersion,
        /// How long ago, by the boot clock.
        ago: HumanDuration,
        /// The window.
        window: HumanDuration,
        /// Its last Decrypt, by the server's wall clock.
        last_used: Timestamp,
    },
    /// `--expect-primary` did not match.
    #[error("the primary is version {actual}, not {expected} as --expect-primary says")]
    UnexpectedPrimary {
        /// What the operator expected.
        expected: KeyVersion,
        /// What is primary.
        actual: KeyVersion,
    },
    /// All 2^32-1 version numbers are used.
    #[error("no version numbers are left in this keyring")]
    Exhausted,
    /// The OS RNG failed.
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// A duration printed like `24h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.as_secs();
        if secs > 0 && secs.is_multiple_of(3600) && self.0.subsec_nanos() == 0 {
            write!(f, "{}h", secs / 3600)
        } else {
            humantime::format_duration(self.0).fmt(f)
        }
    }
}

impl KeyringFile {
    /// The version Encrypt uses. A parsed or generated file always has one.
    pub fn primary(&self) -> Option<KeyVersion> {
        self.versions
            .iter()
            .find(|v| v.info.state == KeyState::Primary)
            .map(|v| v.info.version)
    }

    /// The key id of `version` in this keyring.
    pub fn key_id(&self, version: KeyVersion) -> KeyId {
        KeyId::new(&self.id, version)
    }

    fn slot(&mut self, version: KeyVersion) -> Result<&mut StoredVersion, OpError> {
        self.versions
            .iter_mut()
            .find(|v| v.info.version == version)
            .ok_or(OpError::NoSuchVersion(version))
    }

    /// Adds a new version with a fresh KEK, as pending, or — with `promote` —
    /// as the primary in the same step (single-node clusters).
    ///
    /// If a pending version already exists, nothing is generated: plain
    /// `rotate` reports it, `rotate --promote` promotes it. With
    /// `expect_primary`, the call does nothing unless that version is still
    /// primary, so a script can re-run it safely.
    ///
    /// # Errors
    /// [`OpError::UnexpectedPrimary`], [`OpError::Exhausted`], RNG failure.
    pub fn rotate(
        &mut self,
        now: Timestamp,
        promote: bool,
        expect_primary: Option<KeyVersion>,
    ) -> Result<Outcome, OpError> {
        let primary = self.primary();
        if let (Some(expected), Some(actual)) = (expect_primary, primary)
            && expected != actual
        {
            if promote && self.was_rotated_from(expected) {
                return Ok(Outcome::Unchanged(format!(
                    "already rotated: version {actual} replaced version {expected} as primary"
                )));
            }
            return Err(OpError::UnexpectedPrimary { expected, actual });
        }
        if let Some(pending) = self
            .versions
            .iter()
            .find(|v| v.info.state == KeyState::Pending)
        {
            let version = pending.info.version;
            if promote {
                return self.promote(version, now);
            }
            return Ok(Outcome::Unchanged(format!(
                "version {version} is already pending; roll it out and run `kekd admin promote {version}` \
                 (or retire it) before rotating again"
            )));
        }
        let last = self.versions.last().map(|v| v.info.version);
        let version = match last {
            Some(v) => v.next().ok_or(OpError::Exhausted)?,
            None => KeyVersion::FIRST,
        };
        self.versions.push(StoredVersion {
            info: VersionInfo::new(version, KeyState::Pending, now),
            // A token backend generates the key inside the token when the
            // metadata is written (see `backend::pkcs11`).
            kek: match self.material {
                Material::Inline => Some(Kek::generate()?),
                Material::Token => None,
            },
        });
        let mut changes = vec![Transition {
            version,
            from: None,
            to: KeyState::Pending,
        }];
        if promote && let Outcome::Changed(more) = self.promote(version, now)? {
            changes.extend(more);
        }
        Ok(Outcome::Changed(changes))
    }

    /// Whether `version` was primary before the current primary.
    fn was_rotated_from(&self, version: KeyVersion) -> bool {
        self.versions.iter().any(|v| {
            v.info.version == version
                && v.info.promoted.is_some()
                && v.info.state != KeyState::Primary
        })
    }

    /// Makes a pending version the primary; the old primary becomes
    /// decrypt-only.
    ///
    /// # Errors
    /// The version is unknown, or was primary before (re-promoting would
    /// reuse its key id), or is retired or destroyed.
    pub fn promote(&mut self, version: KeyVersion, now: Timestamp) -> Result<Outcome, OpError> {
        let state = self.slot(version)?.info.state;
        match state {
            KeyState::Primary => {
                return Ok(Outcome::Unchanged(format!(
                    "version {version} is already primary"
                )));
            }
            KeyState::Pending => {}
            KeyState::DecryptOnly => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "it was primary before, and making it primary again would reuse its key id \
                          (the apiserver forbids A→B→A); run `kekd admin rotate --promote` for a new version",
                });
            }
            KeyState::Retired => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "restore it first (`kekd admin restore`), and only a never-promoted version can be promoted",
                });
            }
            KeyState::Destroyed => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "its key material is gone",
                });
            }
        }
        let mut changes = Vec::new();
        if let Some(old) = self
            .versions
            .iter_mut()
            .find(|v| v.info.state == KeyState::Primary)
        {
            old.info.state = KeyState::DecryptOnly;
            changes.push(Transition {
                version: old.info.version,
                from: Some(KeyState::Primary),
                to: KeyState::DecryptOnly,
            });
        }
        let slot = self.slot(version)?;
        slot.info.state = KeyState::Primary;
        slot.info.promoted = Some(now);
        changes.push(Transition {
            version,
            from: Some(KeyState::Pending),
            to: KeyState::Primary,
        });
        Ok(Outcome::Changed(changes))
    }

    /// Stops a version from decrypting, keeping its material.
    ///
    /// A version that was ever primary is retired only on `basis`
    /// [`RetireBasis::Scan`] or [`RetireBasis::Force`]. On
    /// [`RetireBasis::Usage`], `last_decrypt` is when the version last
    /// served a Decrypt (from the server's usage file); within `window` of
    /// `now`, or later than `now`, the call is refused.
    ///
    /// # Errors
    /// Unknown version; the primary; destroyed; once primary without a scan;
    /// recently used.
    pub fn retire(
        &mut self,
        version: KeyVersion,
        now: Timestamp,
        last_decrypt: Option<Timestamp>,
        window: Duration,
        basis: RetireBasis,
    ) -> Result<Outcome, OpError> {
        let slot = self.slot(version)?;
        let (state, promoted) = (slot.info.state, slot.info.promoted);
        match state {
            KeyState::Retired => {
                return Ok(Outcome::Unchanged(format!(
                    "version {version} is already retired"
                )));
            }
            KeyState::Primary => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "the primary cannot be retired; rotate to a new primary first (`kekd admin rotate --promote`)",
                });
            }
            KeyState::Destroyed => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "it is already destroyed",
                });
            }
            KeyState::Pending | KeyState::DecryptOnly => {}
        }
        if basis == RetireBasis::Usage {
            if let Some(promoted) = promoted {
                return Err(OpError::NeedsScan { version, promoted });
            }
            if let Some(last) = last_decrypt
                && last > now
            {
                return Err(OpError::UsedInTheFuture {
                    version,
                    last_used: last,
                    now,
                });
            }
            if let Some(last) = last_decrypt
                && now.unix() < last.unix().saturating_add(window.as_secs())
            {
                return Err(OpError::RecentlyUsed {
                    version,
                    last_used: last,
                    window: HumanDuration(window),
                });
            }
        }
        let slot = self.slot(version)?;
        slot.info.state = KeyState::Retired;
        slot.info.retired = Some(now);
        Ok(Outcome::Changed(vec![Transition {
            version,
            from: Some(state),
            to: KeyState::Retired,
        }]))
    }

    /// The boot-clock half of the retire guard, for a retire that
    /// [`retire`](Self::retire) accepted by the wall clock: `since_last` is
    /// how long ago `version` served a Decrypt by the kernel's boot clock
    /// (`None` when unknown, e.g. recorded in another boot). A wall clock
    /// jumped forward cannot make a version in use look idle this way.
    ///
    /// # Errors
    /// [`OpError::RecentlyUsedByBootClock`] within `window`, on
    /// [`RetireBasis::Usage`] only.
    pub fn check_retire_by_boot_clock(
        version: KeyVersion,
        since_last: Option<Duration>,
        last_used: Option<Timestamp>,
        window: Duration,
        basis: RetireBasis,
    ) -> Result<(), OpError> {
        match (since_last, last_used) {
            (Some(ago), Some(last_used)) if basis == RetireBasis::Usage && ago < window => {
                Err(OpError::RecentlyUsedByBootClock {
                    version,
                    // Whole seconds: the operator needs no milliseconds.
                    ago: HumanDuration(Duration::from_secs(ago.as_secs())),
                    window: HumanDuration(window),
                    last_used,
                })
            }
            _ => Ok(()),
        }
    }

    /// Lets a retired version decrypt again: decrypt-only if it was ever
    /// primary, pending otherwise.
    ///
    /// # Errors
    /// Unknown version; destroyed.
    pub fn restore(&mut self, version: KeyVersion) -> Result<Outcome, OpError> {
        let slot = self.slot(version)?;
        let state = slot.info.state;
        match state {
            KeyState::Retired => {}
            KeyState::Destroyed => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "its key material was destroyed and cannot be restored (only a backup taken before can)",
                });
            }
            _ => {
                return Ok(Outcome::Unchanged(format!(
                    "version {version} is {state}, not retired: nothing to restore"
                )));
            }
        }
        let to = if slot.info.promoted.is_some() {
            KeyState::DecryptOnly
        } else {
            KeyState::Pending
        };
        slot.info.state = to;
        slot.info.retired = None;
        Ok(Outcome::Changed(vec![Transition {
            version,
            from: Some(state),
            to,
        }]))
    }

    /// Erases a retired version's material for good; the version stays
    /// listed so its number and key id are never reused.
    ///
    /// # Errors
    /// Unknown version; not retired.
    pub fn destroy(&mut self, version: KeyVersion, now: Timestamp) -> Result<Outcome, OpError> {
        let slot = self.slot(version)?;
        let state = slot.info.state;
        match state {
            KeyState::Destroyed => {
                return Ok(Outcome::Unchanged(format!(
                    "version {version} is already destroyed"
                )));
            }
            KeyState::Retired => {}
            _ => {
                return Err(OpError::WrongState {
                    version,
                    state,
                    why: "only a retired version can be destroyed; retire it first and make sure nothing needs it",
                });
            }
        }
        slot.info.state = KeyState::Destroyed;
        slot.info.destroyed = Some(now);
        // Dropping the Kek zeroes it.
        slot.kek = None;
        Ok(Outcome::Changed(vec![Transition {
            version,
            from: Some(state),
            to: KeyState::Destroyed,
        }]))
    }

    /// Public view of each version with its material fingerprint.
    pub fn views(&self) -> Vec<VersionView> {
        self.versions
            .iter()
            .map(|v| VersionView {
                info: v.info.clone(),
                fingerprint: v.kek.as_ref().map(Kek::fingerprint),
            })
            .collect()
    }
}

/// The state changes that turn `old` into `new`, version by version (a
/// version new in `new` has `from: None`), for reports and the audit log.
pub fn transitions(old: Option<&KeyringFile>, new: &KeyringFile) -> Vec<Transition> {
    new.versions
        .iter()
        .filter_map(|n| {
            let before = old
                .and_then(|o| o.versions.iter().find(|o| o.info.version == n.info.version))
                .map(|o| o.info.state);
            (before != Some(n.info.state)).then_some(Transition {
                version: n.info.version,
                from: before,
                to: n.info.state,
            })
        })
        .collect()
}

/// A version's public facts and a fingerprint of its material.
#[derive(Debug, Clone)]
pub struct VersionView {
    /// Public facts.
    pub info: VersionInfo,
    /// `None` when destroyed.
    pub fingerprint: Option<KeyFingerprint>,
}

/// Why a keyring may not replace the one in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuccessorError {
    /// A different keyring.
    #[error(
        "keyring id changed from {old} to {new}: this is a different keyring, and nothing stored under the old \
         one could be decrypted; restart kekd if this is really intended"
    )]
    OtherKeyring {
        /// In use.
        old: KeyringId,
        /// Offered.
        new: KeyringId,
    },
    /// A version is missing.
    #[error("version {0} is missing: a keyring never loses versions (is this an older copy?)")]
    Missing(KeyVersion),
    /// A version's material differs.
    #[error("version {0} holds different key material than before: its key id would name two keys")]
    MaterialChanged(KeyVersion),
    /// A destroyed version came back.
    #[error("version {0} was destroyed and cannot come back")]
    Resurrected(KeyVersion),
    /// The primary went back to an older version.
    #[error(
        "the primary would go back from version {old} to {new} (an older copy?); key ids must never flip back"
    )]
    PrimaryBackwards {
        /// In use.
        old: KeyVersion,
        /// Offered.
        new: KeyVersion,
    },
}

/// Checks that `new` may follow `old`: same keyring, no version lost or
/// changed, no destroyed version back, the primary not moving backwards.
///
/// # Errors
/// The first rule broken.
pub fn check_successor(
    old_id: &KeyringId,
    old: &[VersionView],
    new_id: &KeyringId,
    new: &[VersionView],
) -> Result<(), SuccessorError> {
    if old_id != new_id {
        return Err(SuccessorError::OtherKeyring {
            old: *old_id,
            new: *new_id,
        });
    }
    for o in old {
        let v = o.info.version;
        let n = new
            .iter()
            .find(|n| n.info.version == v)
            .ok_or(SuccessorError::Missing(v))?;
        match (o.fingerprint, n.fingerprint) {
            (Some(a), Some(b)) if a != b => return Err(SuccessorError::MaterialChanged(v)),
            (None, Some(_)) => return Err(SuccessorError::Resurrected(v)),
            _ => {}
        }
    }
    let primary = |views: &[VersionView]| {
        views
            .iter()
            .find(|v| v.info.state == KeyState::Primary)
            .map(|v| v.info.version)
    };
    if let (Some(o), Some(n)) = (primary(old), primary(new))
        && n < o
    {
        return Err(SuccessorError::PrimaryBackwards { old: o, new: n });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
