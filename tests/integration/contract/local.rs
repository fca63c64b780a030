//! The local backend: a keyring file in a tempdir, made through the library
//! as `kekd admin init` makes it, served by `kekd serve --keyring`.

use std::path::PathBuf;

use tempfile::TempDir;

use super::{Backend, Serving};
use crate::common;

/// A keyring file and the `kekd serve` serving it.
pub(crate) struct Local {
    /// Holds the keyring, the socket and kekd's output.
    dir: TempDir,
    keyring: PathBuf,
    key_id: String,
    serving: Serving,
}

impl Local {
    /// A fresh keyring in a tempdir of its own, served.
    async fn keyring() -> Self {
        let dir = common::tempdir().await;
        let keyring = dir.path().join("keyring");
        let key_id = common::create_keyring(&keyring);
        let socket = dir.path().join("kms.sock");
        let flags = super::serve_flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let process = common::spawn_serve(&keyring, &socket, dir.path(), &flags).await;
        Self {
            serving: Serving::ready(process).await,
            dir,
            keyring,
            key_id,
        }
    }
}

impl Backend for Local {
    const NAME: &'static str = "a local keyring file";

    async fn start() -> Option<Self> {
        Some(Self::keyring().await)
    }

    async fn second_keyring(&self) -> Self {
        Self::keyring().await
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn serving(&self) -> &Serving {
        &self.serving
    }

    fn serving_mut(&mut self) -> &mut Serving {
        &mut self.serving
    }

    async fn admin(&self, args: &[&str]) -> serde_json::Value {
        let keyring = self.keyring.to_str().expect("tempdir paths are UTF-8");
        let mut all = args.to_vec();
        all.extend(["--keyring", keyring, "--output", "json"]);
        let out = common::admin_async(&all, self.dir.path()).await;
        assert_eq!(out.code(), 0, "kekd admin {all:?}: {out:#?}");
        common::json_of(&out)
    }

    fn secrets(&self) -> Vec<String> {
        common::keks_in(&self.keyring)
    }
}

suite!(Local);
