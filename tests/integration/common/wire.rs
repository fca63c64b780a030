//! The KMS v2 wire contract written from `docs/kms-v2.md` §1 "The service and
//! its messages" (method paths, field names and numbers), independent of
//! kekd's `.proto`, plus a raw gRPC client that can hold a call open: it
//! sends the request headers now and the message later, which is how the
//! tests keep calls in flight across a shutdown.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// `/v2.KeyManagementService/Status`.
pub const STATUS: &str = "/v2.KeyManagementService/Status";
/// `/v2.KeyManagementService/Encrypt`.
pub const ENCRYPT: &str = "/v2.KeyManagementService/Encrypt";
/// `/v2.KeyManagementService/Decrypt`.
pub const DECRYPT: &str = "/v2.KeyManagementService/Decrypt";

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub healthz: String,
    #[prost(string, tag = "3")]
    pub key_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EncryptRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub plaintext: Vec<u8>,
    #[prost(string, tag = "2")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EncryptResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
    #[prost(string, tag = "2")]
    pub key_id: String,
    #[prost(map = "string, bytes", tag = "3")]
    pub annotations: HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DecryptRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub ciphertext: Vec<u8>,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub key_id: String,
    #[prost(map = "string, bytes", tag = "4")]
    pub annotations: HashMap<String, Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DecryptResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub plaintext: Vec<u8>,
}

/// A gRPC client on one HTTP/2 connection, sending `:authority` localhost
/// as kube-apiserver 1.32+ does. Clones share the connection.
#[derive(Clone)]
pub struct RawClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl RawClient {
    pub async fn connect(socket: &Path, timeout: Duration) -> Self {
        let socket = socket.to_owned();
        let channel = Endpoint::from_static("http://localhost")
            .timeout(timeout)
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
            }))
            .await
            .expect("connect the raw client");
        Self {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    /// One unary call at `path`.
    pub async fn unary<Req, Resp>(
        &mut self,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.ready().await?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        self.grpc
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map(tonic::Response::into_inner)
    }

    /// Starts a call at `path` whose single request message is sent only when
    /// [`HeldCall::release`] is called. Returns once HTTP/2 has taken the
    /// request headers (it polls the body only after queueing them), so a
    /// call started afterwards on this connection reaches the server later.
    pub async fn held<Req, Resp>(&self, path: &'static str, request: Req) -> HeldCall<Req, Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let (polled_tx, polled_rx) = oneshot::channel();
        let body = Announce {
            inner: ReceiverStream::new(rx),
            polled: Some(polled_tx),
        };
        let mut this = self.clone();
        let call = tokio::spawn(async move {
            this.ready().await?;
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            this.grpc
                .client_streaming(
                    tonic::Request::new(body),
                    PathAndQuery::from_static(path),
                    codec,
                )
                .await
                .map(tonic::Response::into_inner)
        });
        polled_rx.await.expect("the held call's body is polled");
        HeldCall {
            message: Some((tx, request)),
            call,
        }
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))
    }
}

/// A call whose headers are sent and whose message is not.
pub struct HeldCall<Req, Resp> {
    message: Option<(mpsc::Sender<Req>, Req)>,
    call: tokio::task::JoinHandle<Result<Resp, Status>>,
}

impl<Req, Resp> HeldCall<Req, Resp> {
    /// Sends the message and ends the request; returns the call's result.
    pub async fn release(mut self) -> Result<Resp, Status> {
        if let Some((tx, message)) = self.message.take() {
            // The call may already have failed and dropped its body.
            let _ = tx.send(message).await;
        }
        self.call.await.expect("held call task")
    }
}

/// A request body that reports its first poll.
struct Announce<T> {
    inner: ReceiverStream<T>,
    polled: Option<oneshot::Sender<()>>,
}

impl<T> Stream for Announce<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(polled) = self.polled.take() {
            let _ = polled.send(());
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
