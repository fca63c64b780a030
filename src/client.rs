//! A KMS v2 client over a Unix socket: `kekd admin probe` and the tests use it.
//!
//! It sends `:authority` `localhost`, as kube-apiserver 1.32+ does; the raw
//! fields of each response are returned so callers can check them against
//! the apiserver's rules themselves.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::pb::key_management_service_client::KeyManagementServiceClient;

/// A connection to a KMS v2 plugin; cheap to clone, calls multiplex on one
/// HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: KeyManagementServiceClient<Channel>,
}

/// What Status returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReply {
    /// `version`.
    pub version: String,
    /// `healthz`.
    pub healthz: String,
    /// `key_id`.
    pub key_id: String,
}

/// What Encrypt returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptReply {
    /// `ciphertext`.
    pub ciphertext: Vec<u8>,
    /// `key_id`.
    pub key_id: String,
    /// `annotations`.
    pub annotations: HashMap<String, Vec<u8>>,
}

impl Client {
    /// Connects to the socket at `path`; each call times out after `timeout`.
    ///
    /// # Errors
    /// When the socket cannot be reached.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ClientError> {
        let path: PathBuf = path.as_ref().to_owned();
        let dial = path.clone();
        let channel = Endpoint::from_static("http://localhost")
            .timeout(timeout)
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_| {
                let p = dial.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|e| ClientError {
                path,
                reason: error_chain(&e),
            })?;
        Ok(Self {
            inner: KeyManagementServiceClient::new(channel)
                .max_decoding_message_size(4 << 20)
                .max_encoding_message_size(usize::MAX),
        })
    }

    /// Calls Status.
    ///
    /// # Errors
    /// The RPC's status.
    pub async fn status(&mut self) -> Result<StatusReply, tonic::Status> {
        let r = self.inner.status(pb::StatusRequest {}).await?.into_inner();
        Ok(StatusReply {
            version: r.version,
            healthz: r.healthz,
            key_id: r.key_id,
        })
    }

    /// Calls Encrypt.
    ///
    /// # Errors
    /// The RPC's status.
    pub async fn encrypt(
        &mut self,
        plaintext: Vec<u8>,
        uid: &str,
    ) -> Result<EncryptReply, tonic::Status> {
        let r = self
            .inner
            .encrypt(pb::EncryptRequest {
                plaintext,
                uid: uid.to_owned(),
            })
            .await?
            .into_inner();
        Ok(EncryptReply {
            ciphertext: r.ciphertext,
            key_id: r.key_id,
            annotations: r.annotations,
        })
    }

    /// Calls Decrypt.
    ///
    /// # Errors
    /// The RPC's status.
    pub async fn decrypt(
        &mut self,
        ciphertext: Vec<u8>,
        key_id: &str,
        annotations: HashMap<String, Vec<u8>>,
        uid: &str,
    ) -> Result<Vec<u8>, tonic::Status> {
        let r = self
            .inner
            .decrypt(pb::DecryptRequest {
                ciphertext,
                uid: uid.to_owned(),
                key_id: key_id.to_owned(),
                annotations,
            })
            .await?
            .into_inner();
        Ok(r.plaintext)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        cur = s.source();
    }
    msg
}

/// The plugin's socket could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {path}: {reason}")]
pub struct ClientError {
    /// The socket.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}
