//! The PKCS#11 backend: a fresh SoftHSM2 token (`softhsm::Token`), a
//! keyring made in it by `kekd admin init --config`, served by
//! `kekd serve --config` as a child process (SoftHSM reads its
//! configuration once per process, so this process never loads it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Backend, Serving};
use crate::common;
use crate::softhsm::{Node, Token};

/// One keyring in a SoftHSM2 token and the `kekd serve` serving it.
pub(crate) struct Pkcs11 {
    /// Shared with the token's other keyrings ([`Backend::second_keyring`]).
    shared: Arc<Shared>,
    node: Node,
    key_id: String,
    serving: Serving,
}

/// The token, and how many keyrings were made in it.
struct Shared {
    token: Token,
    keyrings: AtomicUsize,
}

impl Pkcs11 {
    /// A new keyring in `shared`'s token, under a label prefix of its own,
    /// served by a node of its own.
    async fn keyring(shared: Arc<Shared>) -> Self {
        let n = shared.keyrings.fetch_add(1, Ordering::Relaxed);
        let name = format!("k{n}");
        let mut backend = shared.token.backend(&name);
        if n > 0 {
            backend.key_label_prefix = Some(format!("other{n}-"));
        }
        let top = super::serve_config_lines();
        let top: Vec<&str> = top.iter().map(String::as_str).collect();
        let node = shared.token.node(&name, &backend, &top);
        let key_id = {
            let (shared, node) = (Arc::clone(&shared), node.clone());
            tokio::task::spawn_blocking(move || shared.token.init(&node))
                .await
                .expect("admin init task")
        };
        let process = {
            // Spawned outside an in-process bind's narrowed umask.
            let _guard = common::fs_lock().await;
            shared.token.spawn_serve(&node)
        };
        Self {
            serving: Serving::ready(process).await,
            shared,
            node,
            key_id,
        }
    }
}

impl Backend for Pkcs11 {
    const NAME: &'static str = "a PKCS#11 token (SoftHSM2)";

    async fn start() -> Option<Self> {
        let token = Token::create()?;
        let shared = Arc::new(Shared {
            token,
            keyrings: AtomicUsize::new(0),
        });
        Some(Self::keyring(shared).await)
    }

    async fn second_keyring(&self) -> Self {
        Self::keyring(Arc::clone(&self.shared)).await
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
        let (shared, node) = (Arc::clone(&self.shared), self.node.clone());
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.extend(["--output".to_owned(), "json".to_owned()]);
        let (command, rest) = all.split_first().expect("an admin command");
        let (command, rest) = (command.clone(), rest.to_vec());
        let out = tokio::task::spawn_blocking(move || {
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            shared.token.admin(&node, &command, &rest)
        })
        .await
        .expect("admin task");
        assert_eq!(out.code(), 0, "kekd admin {args:?}: {out:#?}");
        common::json_of(&out)
    }

    fn secrets(&self) -> Vec<String> {
        vec![self.shared.token.pin.clone()]
    }
}

suite!(Pkcs11);
