//! `v2.KeyManagementService`: protobuf in, domain calls, protobuf out.
//!
//! Every error becomes a gRPC status in [`ServiceError::to_status`], and only
//! there. The apiserver does not interpret codes, but operators and our own
//! probe do: client mistakes are `INVALID_ARGUMENT`, a retired key is
//! `FAILED_PRECONDITION`, an unhealthy keyring is `UNAVAILABLE`, and anything
//! internal is `INTERNAL` with a fixed message (the detail goes to the log,
//! tagged with the request's uid).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, debug_span, error, info_span, warn};

use crate::config::PeerPolicy;
use crate::id::Timestamp;
use crate::kek::ErrorKind;
use crate::keyring::KeyringError;
use crate::metrics::Method;
use crate::pb;
use crate::pb::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use crate::secret::Plaintext;
use crate::state::{Event, ServingState, Snapshot};
use crate::usage::Use;

/// The Status `version` kekd reports; accepted by kube-apiserver 1.29+.
pub const API_VERSION: &str = "v2";
/// The Status `healthz` the apiserver requires, byte for byte.
pub const HEALTHZ_OK: &str = "ok";

/// The gRPC service over a [`ServingState`].
#[derive(Debug, Clone)]
pub struct KmsService {
    state: Arc<ServingState>,
    peers: PeerPolicy,
    /// Bounds Encrypt/Decrypt calls running at once ([`Self::with_call_limit`]).
    calls: Option<Arc<tokio::sync::Semaphore>>,
}

/// A peer's credentials as the kernel reported them at accept. The server
/// puts them in every request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// uid, if reported.
    pub uid: Option<u32>,
    /// Primary gid, if reported.
    pub gid: Option<u32>,
    /// pid, if reported.
    pub pid: Option<i32>,
}

impl Peer {
    /// (uid, gid) when both are known.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.uid.zip(self.gid)
    }
}

impl KmsService {
    /// A service answering from `state`, to callers `peers` allows.
    pub fn new(state: Arc<ServingState>, peers: PeerPolicy) -> Self {
        Self {
            state,
            peers,
            calls: None,
        }
    }

    /// At most `running` Encrypt/Decrypt calls run at once; the rest wait,
    /// parked (FIFO), costing no CPU turns. Status never waits.
    ///
    /// The permit is taken here, in the handler — after tonic has read and
    /// decoded the whole request — not when a stream's headers arrive: a
    /// client that opens streams and never sends their messages holds no
    /// permit, and cannot starve the apiserver's calls (tests/integration/hostile.rs).
    pub fn with_call_limit(mut self, running: usize) -> Self {
        self.calls = Some(Arc::new(tokio::sync::Semaphore::new(running.max(1))));
        self
    }

    /// Waits for a call permit (none when unlimited).
    async fn call_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match &self.calls {
            // The semaphore is never closed, so `acquire` cannot fail.
            Some(calls) => calls.acquire().await.ok(),
            None => None,
        }
    }

    /// Refuses callers the peer policy does not allow, before any crypto.
    /// The server already refuses them at accept (`server::refuse`); this
    /// is the same check where the request is served, so a service built
    /// on another transport cannot forget it.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let cred = request.extensions().get::<Peer>().and_then(Peer::ids);
        if self.peers.allows(cred) {
            return Ok(());
        }
        Err(ServiceError::PeerNotAllowed {
            uid: cred.map(|c| c.0),
            gid: cred.map(|c| c.1),
        }
        .to_status(&Uid::none()))
    }

    /// The tonic server for this service, with message size caps.
    pub fn into_server(self, max_request_bytes: usize) -> KeyManagementServiceServer<Self> {
        KeyManagementServiceServer::new(self)
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(max_request_bytes)
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let started = Instant::now();
        let result = match self.authorize(&request) {
            Ok(()) => self.do_status(request).await,
            Err(e) => Err(e),
        };
        self.observe(Method::Status, started, &result);
        result
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let started = Instant::now();
        let result = match self.authorize(&request) {
            Ok(()) => {
                let _permit = self.call_permit().await;
                self.do_encrypt(request).await
            }
            Err(e) => Err(e),
        };
        self.observe(Method::Encrypt, started, &result);
        result
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let started = Instant::now();
        let result = match self.authorize(&request) {
            Ok(()) => {
                let _permit = self.call_permit().await;
                self.do_decrypt(request).await
            }
            Err(e) => Err(e),
        };
        self.observe(Method::Decrypt, started, &result);
        result
    }
}

impl KmsService {
    async fn do_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // Answered from cached state: the apiserver polls this constantly.
        let snapshot = self.state.current();
        if !snapshot.is_healthy() {
            // A gRPC error, not a healthz string: only a failing RPC stops the
            // apiserver from writing with the current seed (kubernetes#138950).
            return Err(ServiceError::Unhealthy.to_status(&Uid::none()));
        }
        Ok(Response::new(pb::StatusResponse {
            version: API_VERSION.to_owned(),
            healthz: HEALTHZ_OK.to_owned(),
            key_id: snapshot.keyring.primary_key_id().to_string(),
        }))
    }

    async fn do_encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let peer = peer_uid(&request);
        let request = request.into_inner();
        let uid = Uid::from_wire(&request.uid);
        // A debug span: at the default `info` level a span per call would
        // cost a field-formatting allocation on every call (measured in
        // docs/benchmarks.md); a failure still logs inside an info span with
        // the same fields (`refused_in_span`).
        let span = debug_span!("encrypt", uid = %uid, peer.uid = peer);
        let in_span = !span.is_disabled();
        async move {
            let plaintext = Plaintext::new(request.plaintext);
            let snapshot = self.state.current();
            match snapshot.keyring.encrypt(&plaintext).await {
                Ok((key_id, ciphertext)) => {
                    let version = snapshot.keyring.primary();
                    self.state
                        .usage()
                        .record(version, Use::Encrypt, Timestamp::now());
                    self.state
                        .metrics()
                        .key_operation("encrypt", version.get(), key_id.as_str());
                    debug!(
                        key.version = version.get(),
                        plaintext.len = plaintext.len(),
                        ciphertext.len = ciphertext.len(),
                        "encrypted"
                    );
                    Ok(Response::new(pb::EncryptResponse {
                        ciphertext,
                        key_id: key_id.to_string(),
                        annotations: Default::default(),
                    }))
                }
                Err(e) => Err(refused_in_span(
                    Method::Encrypt,
                    in_span,
                    &uid,
                    peer,
                    || self.fail(&snapshot, e, &uid),
                )),
            }
        }
        .instrument(span)
        .await
    }

    async fn do_decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let peer = peer_uid(&request);
        let request = request.into_inner();
        let uid = Uid::from_wire(&request.uid);
        // Debug span, info span on failure: see `do_encrypt`.
        let span = debug_span!("decrypt", uid = %uid, peer.uid = peer);
        let in_span = !span.is_disabled();
        async move {
            // kekd never issues annotations, so a ciphertext that comes with
            // some was not produced as it is by kekd.
            if !request.annotations.is_empty() {
                return Err(refused_in_span(
                    Method::Decrypt,
                    in_span,
                    &uid,
                    peer,
                    || ServiceError::UnexpectedAnnotations.to_status(&uid),
                ));
            }
            let snapshot = self.state.current();
            match snapshot
                .keyring
                .decrypt(&request.key_id, &request.ciphertext)
                .await
            {
                Ok((version, plaintext)) => {
                    self.state
                        .usage()
                        .record(version, Use::Decrypt, Timestamp::now());
                    // Decrypt succeeded, so the request's key id is the
                    // canonical id of `version` (parsed strictly): no need to
                    // format it again.
                    self.state
                        .metrics()
                        .key_operation("decrypt", version.get(), &request.key_id);
                    self.state.note_decrypt(&snapshot, version);
                    debug!(
                        key.version = version.get(),
                        plaintext.len = plaintext.len(),
                        "decrypted"
                    );
                    Ok(Response::new(pb::DecryptResponse {
                        plaintext: plaintext.into_inner(),
                    }))
                }
                Err(e) => Err(refused_in_span(
                    Method::Decrypt,
                    in_span,
                    &uid,
                    peer,
                    || self.fail(&snapshot, e, &uid),
                )),
            }
        }
        .instrument(span)
        .await
    }
}

/// Maps a failure inside an info-level span naming the call, its uid and
/// the peer, so the one log line of a refusal carries them at the default
/// level too; when the call's own (debug) span is on (`in_span`), it
/// already does.
fn refused_in_span(
    method: Method,
    in_span: bool,
    uid: &Uid,
    peer: i64,
    map: impl FnOnce() -> Status,
) -> Status {
    if in_span {
        return map();
    }
    let span = match method {
        Method::Status => info_span!("status", uid = %uid, peer.uid = peer),
        Method::Encrypt => info_span!("encrypt", uid = %uid, peer.uid = peer),
        Method::Decrypt => info_span!("decrypt", uid = %uid, peer.uid = peer),
    };
    let _entered = span.enter();
    map()
}

impl KmsService {
    fn observe<T>(&self, method: Method, started: Instant, result: &Result<T, Status>) {
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.state.metrics().rpc(method, code, started.elapsed());
    }

    /// Maps a failed call; a key store outage also turns Status into an
    /// error at once, until the background self-check passes again.
    fn fail(&self, snapshot: &Snapshot, e: KeyringError, uid: &Uid) -> Status {
        if matches!(&e, KeyringError::Backend(b) if b.kind() == ErrorKind::Unavailable)
            && self.state.record_self_check(snapshot, Err(e.to_string()))
        {
            warn!(error = %e, "key store unavailable; Status fails until it is back");
            self.state.event(Event::HealthLost {
                reason: e.to_string(),
            });
        }
        ServiceError::Keyring(e).to_status(uid)
    }
}

fn peer_uid<T>(request: &Request<T>) -> i64 {
    request
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.uid)
        .map_or(-1, i64::from)
}

fn fmt_id(id: Option<u32>) -> String {
    id.map_or_else(|| "unknown".to_owned(), |i| i.to_string())
}

/// Why a call failed, before it becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The keyring refused or failed.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// Decrypt came with annotations kekd never issues.
    #[error("ciphertext came with annotations, but kekd issues none: it was not produced by kekd")]
    UnexpectedAnnotations,
    /// The latest self-check failed.
    #[error("kekd is unhealthy: the KEK self-check failed (see kekd's log)")]
    Unhealthy,
    /// The caller's uid/gid is not in --allow-uid / --allow-gid.
    #[error("caller uid {} gid {} is not allowed by kekd's --allow-uid/--allow-gid", fmt_id(*uid), fmt_id(*gid))]
    PeerNotAllowed {
        /// The caller's uid, if the kernel reported it.
        uid: Option<u32>,
        /// The caller's gid, if the kernel reported it.
        gid: Option<u32>,
    },
}

impl ServiceError {
    /// The one mapping from errors to gRPC statuses. Logs failures once.
    pub fn to_status(&self, uid: &Uid) -> Status {
        use KeyringError as K;
        let code = match self {
            Self::UnexpectedAnnotations => tonic::Code::InvalidArgument,
            Self::Unhealthy => tonic::Code::Unavailable,
            Self::PeerNotAllowed { .. } => tonic::Code::PermissionDenied,
            Self::Keyring(e) => match e {
                K::EmptyPlaintext
                | K::PlaintextTooLong { .. }
                | K::UnknownKeyId
                | K::KeyIdMismatch { .. }
                | K::UnknownVersion { .. }
                | K::Envelope(_)
                | K::Decrypt => tonic::Code::InvalidArgument,
                K::Unusable { .. } => tonic::Code::FailedPrecondition,
                K::Backend(b) => match b.kind() {
                    ErrorKind::Unavailable => tonic::Code::Unavailable,
                    // A backend's own Decrypt reaches here only from a seal
                    // or a self-check: kekd's problem, not the caller's.
                    ErrorKind::Decrypt
                    | ErrorKind::StoreMissing
                    | ErrorKind::NoKeyring
                    | ErrorKind::KeyringExists
                    | ErrorKind::Locked
                    | ErrorKind::AuthenticationFailed
                    | ErrorKind::Misconfigured
                    | ErrorKind::Damaged
                    | ErrorKind::Io
                    | ErrorKind::NotDurable
                    | ErrorKind::Internal => tonic::Code::Internal,
                },
                K::SelfCheck { .. } | K::Invalid(_) | K::Random(_) => tonic::Code::Internal,
            },
        };
        if code == tonic::Code::Internal {
            error!(uid = %uid, error = %self, "internal error");
            return Status::internal(format!(
                "internal error in kekd (request uid {uid}); see kekd's log"
            ));
        }
        warn!(uid = %uid, code = ?code, error = %self, "request refused");
        Status::new(code, self.to_string())
    }
}

/// The request uid, safe to log: a UUID-like string or a placeholder.
///
/// The apiserver sends a fresh UUID; anything else (very long, or with
/// characters that could forge log lines) is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uid(String);

impl Uid {
    /// Sanitizes a uid received on the wire.
    pub fn from_wire(s: &str) -> Self {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
        Self(if ok {
            s.to_owned()
        } else if s.is_empty() {
            "-".to_owned()
        } else {
            "<invalid>".to_owned()
        })
    }

    /// For calls without a uid (Status).
    pub fn none() -> Self {
        Self("-".to_owned())
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Hand-written Debug for the messages that carry plaintext (build.rs skips
// the derived ones): lengths and uid only.
impl fmt::Debug for pb::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("uid", &self.uid)
            .finish()
    }
}

impl fmt::Debug for pb::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests;
