//! `kekd admin upgrade-token`: the PKCS#11 backend's own admin command,
//! which adopts the keyring metadata an older kekd wrote into a token.
//! The one file outside `src/backend/` that names a concrete backend: the
//! command exists only for that backend (docs/design.md, "Adding a
//! backend").

use serde_json::{Value, json};

use super::keyring::{backend_error, take_lock, target_flags};
use super::{Target, report};
use crate::audit::{self, AuditRecord};
use crate::backend::pkcs11::{MetadataKey, Pkcs11Backend, UpgradeOutcome};
use crate::backend::{BackendConfig, KeyringStore};
use crate::cli::CliError;
use crate::id::{KeyVersion, Timestamp};
use crate::keyring::KeyState;
use crate::keyring::lifecycle::Transition;
use crate::keyring::store::{MAGIC_METADATA, MAGIC_METADATA_V1};

/// Arguments of `upgrade-token`.
#[derive(Debug, clap::Args)]
pub struct UpgradeTokenArgs {
    /// Check everything and print what would be adopted; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The token (a `[backend]` table with `kind = "pkcs11"`).
    #[command(flatten)]
    pub target: Target,
}

/// `kekd admin upgrade-token`: adopts the keyring an older kekd wrote into
/// a PKCS#11 token as authenticated version-2 metadata, under the admin
/// lock (docs/hsm.md). Audited; re-running it is a no-op that says so.
///
/// # Errors
/// Exit 78 when there is no keyring or a key object is refused (nothing is
/// written), 1 for a local keyring, a concurrent change or token failures.
pub fn run(a: &UpgradeTokenArgs) -> Result<(), CliError> {
    let t = &a.target;
    let config = t.backend_config()?;
    let settings = match &config {
        BackendConfig::Pkcs11(settings) => settings,
        BackendConfig::Local { keyring } => {
            return Err(CliError::runtime(format!(
                "upgrade-token is for keyrings in a PKCS#11 token ([backend] kind = \"pkcs11\"); {} is a local \
                 keyring file, which has no older format to upgrade",
                keyring.display()
            )));
        }
    };
    if let Some(dir) = config.state_dir() {
        crate::backend::ensure_state_dir(dir).map_err(backend_error)?;
    }
    let backend = Pkcs11Backend::connect(settings.clone()).map_err(|e| backend_error(e.into()))?;
    let anchor = backend.anchor();
    let name = backend.name();
    // A dry run only reads: it does not wait for another admin command.
    let _lock = if a.dry_run {
        None
    } else {
        Some(take_lock(&anchor)?)
    };
    let now = Timestamp::now();
    let up = backend.token().upgrade(a.dry_run).map_err(backend_error)?;
    let id = up.keyring_id;
    let key_id = |v: KeyVersion| crate::id::KeyId::new(&id, v).to_string();

    let (changed, from_format) = match up.outcome {
        UpgradeOutcome::AlreadyCurrent => (false, MAGIC_METADATA),
        UpgradeOutcome::WouldAdopt => (false, MAGIC_METADATA_V1),
        UpgradeOutcome::Adopted => (true, MAGIC_METADATA_V1),
    };
    let metadata_key = match up.metadata_key {
        MetadataKey::Existing => "existing",
        MetadataKey::Generated => "generated",
        MetadataKey::Leftover => "leftover",
    };
    let message = match up.outcome {
        UpgradeOutcome::AlreadyCurrent => format!(
            "the keyring metadata is {MAGIC_METADATA} already (revision {}, authenticated)",
            up.revision
        ),
        UpgradeOutcome::WouldAdopt => format!(
            "dry run: every key object passed; nothing was written. Run `kekd admin upgrade-token {}` to adopt it",
            target_flags(t)
        ),
        UpgradeOutcome::Adopted => format!(
            "revision {} ({MAGIC_METADATA_V1}) → revision {} ({MAGIC_METADATA}, authenticated)",
            up.from_revision, up.revision
        ),
    };
    let next = match up.outcome {
        UpgradeOutcome::Adopted => Some(
            "start (or restart) every kekd serving this token with this version: it serves the upgraded keyring. \
             An older kekd cannot read the new metadata: replace it on every node now, and run admin commands \
             with this version only"
                .to_owned(),
        ),
        _ => None,
    };

    let versions: Vec<Value> = up
        .versions
        .iter()
        .map(|v| {
            json!({
                "version": v.info.version.get(),
                "state": v.info.state.as_str(),
                "key_id": key_id(v.info.version),
                "key_object": v.key_object,
            })
        })
        .collect();
    let json = json!({
        "command": "upgrade-token",
        "changed": changed,
        "dry_run": a.dry_run,
        "keyring": name,
        "keyring_id": id.to_string(),
        "from_format": from_format,
        "format": if changed { MAGIC_METADATA } else { from_format },
        "from_revision": up.from_revision,
        "revision": up.revision,
        "versions": versions,
        "metadata_key": {"label": up.metadata_key_label, "source": metadata_key},
        "erased": up.erased.iter().map(|v| v.get()).collect::<Vec<u32>>(),
        "message": message,
        "next": next,
    });
    let mut text = match up.outcome {
        UpgradeOutcome::AlreadyCurrent => {
            format!("upgrade-token: nothing to do: keyring {id} in {name}: {message}\n")
        }
        UpgradeOutcome::WouldAdopt => format!(
            "upgrade-token --dry-run: would adopt keyring {id} in {name} (revision {}, {MAGIC_METADATA_V1}):\n",
            up.from_revision
        ),
        UpgradeOutcome::Adopted => {
            format!("upgrade-token: adopted keyring {id} in {name}: {message}:\n")
        }
    };
    if up.outcome != UpgradeOutcome::AlreadyCurrent {
        for v in &up.versions {
            text.push_str(&format!(
                "  version {:<4} {:<12}  {}\n",
                v.info.version,
                v.info.state.as_str(),
                match (&v.key_object, up.outcome == UpgradeOutcome::Adopted) {
                    (None, _) => "no key material".to_owned(),
                    (Some(label), true) =>
                        format!("key object {label}: checked, check value recorded"),
                    (Some(label), false) => format!("key object {label}: checked"),
                }
            ));
        }
        text.push_str(&format!(
            "  metadata key {}: {}\n",
            up.metadata_key_label,
            match (up.metadata_key, up.outcome == UpgradeOutcome::Adopted) {
                (MetadataKey::Leftover, _) =>
                    "left by an earlier run that stopped before writing; checked and adopted",
                (_, true) => "generated in the token",
                (_, false) => "would be generated in the token",
            }
        ));
        for v in &up.erased {
            text.push_str(&format!(
                "  version {v} is destroyed: its leftover key object was erased\n"
            ));
        }
        match &next {
            Some(next) => text.push_str(&format!("next: {next}\n")),
            None => text.push_str(&format!("{message}\n")),
        }
    }

    // One audit line for the whole upgrade, naming the primary version
    // (its state unchanged); no-ops and dry runs write none.
    let audit_result = match up
        .versions
        .iter()
        .find(|v| v.info.state == KeyState::Primary)
    {
        Some(v) if changed => audit::append(
            &anchor,
            &[AuditRecord::new(
                "upgrade-token",
                &name,
                &id,
                &Transition {
                    version: v.info.version,
                    from: Some(v.info.state),
                    to: v.info.state,
                },
                vec![],
                now,
            )],
        ),
        _ => Ok(()),
    };
    report(t.output, &json, &text);
    audit_result.map_err(|e| {
        CliError::runtime(format!(
            "the token was upgraded, but its audit log {} could not be written: {e}",
            audit::audit_path(&anchor).display()
        ))
    })
}
