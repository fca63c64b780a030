//! What is stored in etcd, and under which of our key versions.
//!
//! `kekd admin scan` reads every value under a prefix of etcd in pages
//! ([`etcd`]), classifies each one ([`decode`]) and adds it to a [`Tally`]:
//! counters per resource and provider, per kekd key version, and a bounded
//! list of example keys. No value is kept after its page: memory stays
//! bounded whatever the size of the keyspace. The finished tally becomes a
//! [`ScanReport`], whose JSON form (`kekd-scan v1`, documented in
//! `docs/rotation.md`) `kekd admin retire --scan` reads back to refuse
//! retiring a version that stored objects still reference
//! ([`ScanReport::check_retire`]).

pub mod decode;
pub mod etcd;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::{KeyId, KeyVersion, KeyringId, Timestamp};
use decode::{Stored, classify, escape, printable, resource_of};

/// The first field of every scan document; a later format gets a new one.
pub const FORMAT: &str = "kekd-scan v1";
/// How many example keys a report keeps per key version.
pub const EXAMPLES: usize = 5;
/// How many unparseable keys (and header mismatches) a report lists.
pub const LISTED: usize = 100;
/// How old a scan `retire --scan` accepts: objects written since are not in it.
pub const MAX_SCAN_AGE: Duration = Duration::from_secs(24 * 3600);
/// How far in the future a scan may claim to have finished (clock skew).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// The standard storage migration: rewrite every object so the apiserver
/// encrypts it again under its current key.
pub const MIGRATE_COMMAND: &str = "kubectl get RESOURCES -A -o json | kubectl replace -f -";

/// Counters built while values stream past.
#[derive(Debug, Default)]
pub struct Tally {
    keys: u64,
    value_bytes: u64,
    resources: BTreeMap<String, ResourceTally>,
    versions: BTreeMap<(String, u32), VersionTally>,
    unparseable: Vec<KeyProblem>,
    unparseable_total: u64,
    mismatches: Vec<Mismatch>,
    mismatch_total: u64,
}

#[derive(Debug, Default)]
struct ResourceTally {
    objects: u64,
    providers: BTreeMap<String, u64>,
    key_ids: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct VersionTally {
    objects: u64,
    header_mismatches: u64,
    resources: BTreeMap<String, u64>,
    examples: Vec<String>,
}

impl Tally {
    /// Counts one stored value. `prefix` is what the scan read under (for
    /// the resource name); the value is classified and forgotten.
    pub fn add(&mut self, key: &[u8], value: &[u8], prefix: &[u8]) {
        self.keys += 1;
        self.value_bytes += value.len() as u64;
        let resource = resource_of(key, prefix);
        let stored = classify(value);
        let r = self.resources.entry(resource.clone()).or_default();
        r.objects += 1;
        *r.providers.entry(stored.provider_label()).or_default() += 1;
        match stored {
            Stored::KmsV2 {
                key_id,
                kekd: Some(k),
                ..
            } => {
                *r.key_ids.entry(key_id).or_default() += 1;
                let id = k.keyring.to_string();
                let v = self
                    .versions
                    .entry((id.clone(), k.version.get()))
                    .or_default();
                v.objects += 1;
                *v.resources.entry(resource).or_default() += 1;
                if v.examples.len() < EXAMPLES {
                    v.examples.push(printable(key));
                }
                match k.header {
                    Ok(h) if h == k.version => {}
                    header => {
                        if let Ok(h) = header {
                            let hv = self.versions.entry((id, h.get())).or_default();
                            hv.header_mismatches += 1;
                            if hv.examples.len() < EXAMPLES {
                                hv.examples.push(printable(key));
                            }
                        }
                        self.mismatch_total += 1;
                        if self.mismatches.len() < LISTED {
                            self.mismatches.push(Mismatch {
                                key: printable(key),
                                key_id_version: k.version.get(),
                                header: match header {
                                    Ok(h) => format!("version {h}"),
                                    Err(e) => e.to_string(),
                                },
                            });
                        }
                    }
                }
            }
            Stored::KmsV2 { key_id, .. } => *r.key_ids.entry(key_id).or_default() += 1,
            Stored::Unparseable { reason } => {
                self.unparseable_total += 1;
                if self.unparseable.len() < LISTED {
                    self.unparseable.push(KeyProblem {
                        key: printable(key),
                        reason,
                    });
                }
            }
            Stored::OtherProvider { .. } | Stored::Identity { .. } => {}
        }
    }

    /// Values counted so far.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// The report: `run` says how the values were read, `keyring` which of
    /// our keyrings (and its versions' states) to match them against.
    pub fn finish(self, run: ScanRun, keyring: Option<KeyringSeen>) -> ScanReport {
        let mut by_provider: BTreeMap<String, u64> = BTreeMap::new();
        for r in self.resources.values() {
            for (p, n) in &r.providers {
                *by_provider.entry(p.clone()).or_default() += n;
            }
        }
        let mut versions: BTreeMap<(String, u32), VersionSeen> = BTreeMap::new();
        if let Some(k) = &keyring {
            for v in &k.versions {
                versions.insert(
                    (k.id.clone(), v.version),
                    VersionSeen {
                        keyring_id: k.id.clone(),
                        version: v.version,
                        key_id: v.key_id.clone(),
                        state: Some(v.state.clone()),
                        ..VersionSeen::default()
                    },
                );
            }
        }
        for ((id, version), t) in self.versions {
            let key_id = key_id_of(&id, version);
            let seen = versions
                .entry((id.clone(), version))
                .or_insert_with(|| VersionSeen {
                    keyring_id: id,
                    version,
                    key_id,
                    ..VersionSeen::default()
                });
            seen.objects = t.objects;
            seen.header_mismatches = t.header_mismatches;
            seen.resources = t.resources;
            seen.examples = t.examples;
        }
        ScanReport {
            format: FORMAT.to_owned(),
            run,
            keys: self.keys,
            value_bytes: self.value_bytes,
            keyring,
            totals: by_provider,
            versions: versions.into_values().collect(),
            resources: self
                .resources
                .into_iter()
                .map(|(resource, r)| ResourceSeen {
                    resource,
                    objects: r.objects,
                    providers: r.providers,
                    key_ids: r.key_ids,
                })
                .collect(),
            unparseable_total: self.unparseable_total,
            unparseable: self.unparseable,
            mismatch_total: self.mismatch_total,
            mismatches: self.mismatches,
        }
    }
}

fn key_id_of(keyring: &str, version: u32) -> String {
    match (keyring.parse::<KeyringId>(), KeyVersion::new(version)) {
        (Ok(id), Some(v)) => KeyId::new(&id, v).to_string(),
        _ => format!("kekd/{keyring}/v{version}"),
    }
}

/// A scan's result: the `kekd-scan v1` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanReport {
    /// Always [`FORMAT`].
    pub format: String,
    /// How and when the values were read.
    #[serde(flatten)]
    pub run: ScanRun,
    /// Values read.
    pub keys: u64,
    /// Their total size.
    pub value_bytes: u64,
    /// The keyring the scan was matched against (`--keyring`/`--config`).
    pub keyring: Option<KeyringSeen>,
    /// Objects per provider label (`kms:v2:<name>`, `aescbc:v1:<key>`, …,
    /// `identity`, `unparseable`).
    pub totals: BTreeMap<String, u64>,
    /// Every kekd key version seen in a key id or envelope header, and every
    /// version of the given keyring (with 0 objects when none).
    pub versions: Vec<VersionSeen>,
    /// Per resource (`secrets`, `widgets.example.com`, …).
    pub resources: Vec<ResourceSeen>,
    /// How many values were unparseable.
    pub unparseable_total: u64,
    /// The first [`LISTED`] of them, by key.
    pub unparseable: Vec<KeyProblem>,
    /// How many kekd values name one version in the key id and another (or
    /// no valid one) in the envelope header.
    pub mismatch_total: u64,
    /// The first [`LISTED`] of them.
    pub mismatches: Vec<Mismatch>,
}

/// How a scan read etcd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanRun {
    /// When the first page was asked for.
    pub started_at: Timestamp,
    /// When the last page was counted.
    pub finished_at: Timestamp,
    /// The etcd endpoints.
    pub endpoints: Vec<String>,
    /// The key prefix read (the apiserver's `--etcd-prefix` plus `/`).
    pub prefix: String,
    /// The provider name the report calls ours (`--provider-name`).
    pub provider_name: String,
    /// `linearizable` or `serializable`.
    pub consistency: String,
    /// The etcd revision every page was read at: one consistent snapshot.
    pub revision: i64,
    /// Keys under the prefix at that revision, counted before paging.
    pub expected_keys: u64,
    /// Pages read.
    pub pages: u64,
    /// Keys per page asked for (`--page-size`).
    pub page_size: u32,
    /// Keys per page at the end (smaller when a page was over the message limit).
    pub final_page_size: u32,
    /// The scanning process's peak resident memory (VmHWM), if known.
    pub peak_rss_bytes: Option<u64>,
}

/// The keyring a scan was matched against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyringSeen {
    /// Where it is (path or token).
    pub name: String,
    /// Its id (32 hex digits).
    pub id: String,
    /// Its versions.
    pub versions: Vec<KeyringVersion>,
}

/// One version of the keyring a scan was matched against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyringVersion {
    /// Its number.
    pub version: u32,
    /// `primary`, `decrypt-only`, `pending`, `retired` or `destroyed`.
    pub state: String,
    /// Its key id.
    pub key_id: String,
}

/// What a scan found for one kekd key version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VersionSeen {
    /// The keyring id in the key id.
    pub keyring_id: String,
    /// The version.
    pub version: u32,
    /// `kekd/<keyring id>/v<version>`.
    pub key_id: String,
    /// Its state in the given keyring; `null` for another keyring or without one.
    pub state: Option<String>,
    /// Objects whose key id names this version.
    pub objects: u64,
    /// Objects whose envelope header names this version while their key id
    /// names another.
    pub header_mismatches: u64,
    /// Objects per resource (by key id).
    pub resources: BTreeMap<String, u64>,
    /// Up to [`EXAMPLES`] keys of objects referencing this version.
    pub examples: Vec<String>,
}

impl VersionSeen {
    /// Objects that need this version to be read.
    pub fn references(&self) -> u64 {
        self.objects + self.header_mismatches
    }
}

/// What a scan found for one resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceSeen {
    /// `secrets`, `configmaps`, `widgets.example.com`, …
    pub resource: String,
    /// Values stored.
    pub objects: u64,
    /// Objects per provider label.
    pub providers: BTreeMap<String, u64>,
    /// KMS v2 objects per key id (kekd's and other plugins').
    pub key_ids: BTreeMap<String, u64>,
}

/// A value that is none of the known forms, named by its key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyProblem {
    /// The key (escaped).
    pub key: String,
    /// Why (never the value's bytes).
    pub reason: String,
}

/// A kekd value whose key id and envelope header disagree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mismatch {
    /// The key (escaped).
    pub key: String,
    /// The version the key id names.
    pub key_id_version: u32,
    /// What the header names (`version N`) or why it does not parse.
    pub header: String,
}

/// Why `retire --scan` refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetireScanError {
    /// Not a `kekd-scan v1` document.
    #[error(
        "{file} is not a kekd scan result ({why}); write one with `kekd admin scan … --output json > {file}`"
    )]
    NotAScan {
        /// The file.
        file: String,
        /// What is wrong.
        why: String,
    },
    /// Older than [`MAX_SCAN_AGE`].
    #[error(
        "the scan in {file} finished at {finished} ({age} ago): a scan older than 24h may miss objects written since; \
         run `kekd admin scan` again and pass the fresh result"
    )]
    Stale {
        /// The file.
        file: String,
        /// When the scan finished.
        finished: Timestamp,
        /// How long ago.
        age: String,
    },
    /// Finished in the future.
    #[error(
        "the scan in {file} says it finished at {finished}, later than now ({now}): check this node's clock, then scan again"
    )]
    Future {
        /// The file.
        file: String,
        /// Its finish time.
        finished: Timestamp,
        /// This node's time.
        now: Timestamp,
    },
    /// Matched against another keyring.
    #[error(
        "the scan in {file} was matched against keyring {scanned}, but this keyring is {ours}: scan with --keyring (or --config) naming this keyring"
    )]
    OtherKeyring {
        /// The file.
        file: String,
        /// The id in the scan.
        scanned: String,
        /// Ours.
        ours: String,
    },
    /// Nothing of this keyring was seen: probably the wrong etcd or prefix.
    #[error(
        "the scan in {file} found no object encrypted by keyring {ours} under {prefix} at {endpoints}: wrong --etcd-endpoints \
         or --prefix (the apiserver's --etcd-prefix plus `/`)? If nothing is encrypted by this keyring, retire without --scan"
    )]
    NothingOfOurs {
        /// The file.
        file: String,
        /// Our keyring id.
        ours: String,
        /// The prefix scanned.
        prefix: String,
        /// Where.
        endpoints: String,
    },
    /// Objects still reference the version.
    #[error(
        "{count} stored object(s) under {prefix} still reference version {version} (scan of {finished}), e.g. {examples}. \
         Rewrite them under the current key: `{command}`; then scan again and retire with the new result"
    )]
    StillUsed {
        /// The version.
        version: KeyVersion,
        /// How many objects.
        count: u64,
        /// The prefix scanned.
        prefix: String,
        /// When the scan finished.
        finished: Timestamp,
        /// Up to [`EXAMPLES`] keys.
        examples: String,
        /// The migration command for the resources concerned.
        command: String,
    },
}

impl ScanReport {
    /// Parses a scan document written by `kekd admin scan --output json`.
    ///
    /// # Errors
    /// [`RetireScanError::NotAScan`] naming what is wrong.
    pub fn from_json(file: &str, text: &str) -> Result<Self, RetireScanError> {
        let not_a_scan = |why: String| RetireScanError::NotAScan {
            file: file.to_owned(),
            why: escape(&why),
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| not_a_scan(format!("not JSON: {e}")))?;
        match value.get("format").and_then(serde_json::Value::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(not_a_scan(format!(
                    "format {other:?}, this kekd reads {FORMAT:?}"
                )));
            }
            None => return Err(not_a_scan(format!("no \"format\": {FORMAT:?} field"))),
        }
        serde_json::from_value(value).map_err(|e| not_a_scan(e.to_string()))
    }

    /// Whether retiring `version` of keyring `ours` is safe by this scan:
    /// fresh (finished at most [`MAX_SCAN_AGE`] before `now`), matched
    /// against this keyring if against any, seeing at least one object of
    /// this keyring, and no stored object referencing `version` by key id
    /// or envelope header. Returns a one-line summary of the evidence.
    ///
    /// # Errors
    /// The [`RetireScanError`] saying why not, and the fix.
    pub fn check_retire(
        &self,
        file: &str,
        ours: &KeyringId,
        version: KeyVersion,
        now: Timestamp,
    ) -> Result<String, RetireScanError> {
        let finished = self.run.finished_at;
        if finished.unix() > now.unix() + MAX_CLOCK_SKEW.as_secs() {
            return Err(RetireScanError::Future {
                file: file.to_owned(),
                finished,
                now,
            });
        }
        let age = now.unix().saturating_sub(finished.unix());
        if age > MAX_SCAN_AGE.as_secs() {
            return Err(RetireScanError::Stale {
                file: file.to_owned(),
                finished,
                age: humantime::format_duration(Duration::from_secs(age)).to_string(),
            });
        }
        let ours_hex = ours.to_string();
        if let Some(k) = &self.keyring
            && k.id != ours_hex
        {
            return Err(RetireScanError::OtherKeyring {
                file: file.to_owned(),
                scanned: escape(&k.id),
                ours: ours_hex,
            });
        }
        let mine: Vec<&VersionSeen> = self
            .versions
            .iter()
            .filter(|v| v.keyring_id == ours_hex)
            .collect();
        if mine.iter().all(|v| v.references() == 0) {
            return Err(RetireScanError::NothingOfOurs {
                file: file.to_owned(),
                ours: ours_hex,
                prefix: escape(&self.run.prefix),
                endpoints: escape(&self.run.endpoints.join(",")),
            });
        }
        if let Some(v) = mine
            .iter()
            .find(|v| v.version == version.get() && v.references() > 0)
        {
            let resources: Vec<String> = v.resources.keys().map(|r| escape(r)).collect();
            let resources = if resources.is_empty() {
                "secrets".to_owned()
            } else {
                resources.join(",")
            };
            return Err(RetireScanError::StillUsed {
                version,
                count: v.references(),
                prefix: escape(&self.run.prefix),
                finished,
                examples: escape(&v.examples.join(", ")),
                command: MIGRATE_COMMAND.replace("RESOURCES", &resources),
            });
        }
        let total: u64 = mine.iter().map(|v| v.references()).sum();
        Ok(format!(
            "the scan of {} at {finished} found no object under version {version} ({total} object(s) under this keyring's other versions)",
            escape(&self.run.prefix)
        ))
    }
}

/// This process's peak resident set size (`VmHWM` of `/proc/self/status`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests;
