//! Admission of each call (an HTTP/2 stream) before tonic reads it: what a
//! call may make kekd hold, bounded per connection, so that the bound holds
//! for the whole process (connections × per-connection maximum) and no
//! client can fill a pool the others need.
//!
//! tonic reads a request's body as it arrives and releases HTTP/2 flow
//! control as it reads, and as soon as a message's 5-byte gRPC prefix is in
//! it reserves the whole declared length. So a stream whose message never
//! completes would make kekd reserve up to the message cap for 5 bytes sent;
//! many such streams would add up without bound. Here, for each call:
//!
//! - the call is marked in flight on its connection (so it is not evicted at
//!   the connection limit) — but only once its request message has
//!   arrived: a call still waiting for it protects nothing, or a client
//!   stalling one call per connection could make every connection
//!   unevictable and lock everyone else out;
//! - Encrypt/Decrypt request bytes are charged to **their connection's**
//!   budget (`--max-connection-request-bytes`) as they really arrive, never
//!   as declared, and held back from tonic until the whole message is in:
//!   tonic only ever sees (and reserves for) complete messages. A chunk the
//!   budget cannot cover ends the call RESOURCE_EXHAUSTED at once. The
//!   budget is the connection's own, so a client that fills it starves only
//!   itself; nothing here is shared between connections. A message that
//!   declares more than `--max-request-bytes` is handed to tonic at once,
//!   which refuses it OUT_OF_RANGE;
//! - no call slot is taken here: the process-wide limit on calls is on
//!   calls *running* (`KmsService::with_call_limit`), taken once the whole
//!   message has arrived and released when the work is done, so a stream
//!   whose message never completes holds nothing anyone else needs;
//! - Status takes no budget (it must never be starved by it); its body may
//!   be at most [`MAX_STATUS_BODY_BYTES`], and like every call it is one of
//!   its connection's streams (answered from cached state, it needs no
//!   other limit);
//! - every request message must arrive completely within the request read
//!   timeout, or the call ends DEADLINE_EXCEEDED and frees what it held.
//!
//! Bytes are released when the call's response is ready (or the call is
//! dropped), so a decoded message waiting for a running slot stays counted.
//! A response the client never reads keeps its stream open, and so counted
//! against the connection's stream limit (`connection::memory_bound`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Bytes, http};

use super::connection::{CallGuard, ConnInfo, MAX_STATUS_BODY_BYTES, Receiving, Registry};

/// The Status method's path.
const STATUS_PATH: &str = "/v2.KeyManagementService/Status";

/// gRPC's length prefix: a compression flag and a 4-byte length.
const GRPC_PREFIX: usize = 5;

/// What admission needs from the server's settings.
#[derive(Debug)]
pub(crate) struct Budgets {
    registry: Arc<Registry>,
    max_request_bytes: usize,
    read_timeout: Duration,
}

impl Budgets {
    pub(crate) fn new(
        registry: Arc<Registry>,
        max_request_bytes: usize,
        read_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            max_request_bytes,
            read_timeout,
        })
    }
}

/// The tower layer putting [`Admit`] in front of the gRPC routes.
#[derive(Debug, Clone)]
pub(crate) struct AdmitLayer(pub(crate) Arc<Budgets>);

impl<S> tower::Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Admit<S> {
        Admit {
            inner,
            budgets: Arc::clone(&self.0),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Admit<S> {
    inner: S,
    budgets: Arc<Budgets>,
}

/// What a call holds until its response is ready.
#[derive(Debug)]
struct Held {
    _call: CallGuard,
    /// The bytes charged by the body, which tonic drops once the message is
    /// decoded: the decoded message is still held until the response.
    _bytes: Charged,
}

/// Budget bytes charged for one call, shared by its body and its [`Held`].
type Charged = Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Admit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let budgets = &self.budgets;
        let status = request.uri().path() == STATUS_PATH;
        // Every connection kekd serves is a `Connection`, which tonic puts
        // here; without it there is no budget to charge: fail closed.
        let Some(conn) = request.extensions().get::<ConnInfo>().cloned() else {
            return refuse(Status::internal("a call without its connection's state"));
        };
        let call = conn.shared.start_call(&budgets.registry);
        let limit = if status {
            Limit::Status
        } else {
            let (bytes, max) = conn.shared.request_budget();
            Limit::Budget { bytes, max }
        };
        let (mut parts, body) = request.into_parts();
        // What the service checks the caller against (`service::Peer`).
        parts.extensions.insert(conn.peer());
        let charged = Charged::default();
        let body = ChargedBody {
            inner: Some(body),
            receiving: Some(Receiving::of(&call)),
            limit,
            max_request_bytes: budgets.max_request_bytes,
            received: 0,
            held: Vec::new(),
            passthrough: false,
            trailers: None,
            permits: Arc::clone(&charged),
            read_timeout: budgets.read_timeout,
            started: tokio::time::Instant::now(),
            deadline: None,
        };
        let request = http::Request::from_parts(parts, Body::new(body));
        let held = Held {
            _call: call,
            _bytes: charged,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(held);
            response
        })
    }
}

/// Answers a call with `status` at once, without reading its body.
fn refuse<E: Send + 'static>(status: Status) -> BoxFuture<Result<http::Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(status.into_http::<Body>())))
}

/// Which limit a request body is read under.
#[derive(Debug)]
enum Limit {
    /// At most [`MAX_STATUS_BODY_BYTES`], no budget.
    Status,
    /// Charged to the connection's budget of `max` request bytes.
    Budget { bytes: Arc<Semaphore>, max: usize },
}

/// A request body that charges what it delivers (see the module docs),
/// delivers only whole gRPC messages, and ends with DEADLINE_EXCEEDED if it
/// has not ended by the read timeout.
struct ChargedBody {
    inner: Option<Body>,
    /// Until the request has arrived (or failed), the call does not keep
    /// its connection from being evicted (`Registry::admit`).
    receiving: Option<Receiving>,
    limit: Limit,
    max_request_bytes: usize,
    /// Bytes received so far (all charged).
    received: usize,
    /// Received bytes of a message not yet complete, held back from tonic;
    /// it starts at a message boundary.
    held: Vec<u8>,
    /// A message declared more than `max_request_bytes`: everything goes
    /// to tonic as it comes, and tonic refuses it (OUT_OF_RANGE).
    passthrough: bool,
    /// Trailers that arrived while `held` was not empty: delivered next.
    trailers: Option<Frame<Bytes>>,
    permits: Charged,
    read_timeout: Duration,
    started: tokio::time::Instant,
    /// Armed only when the body first has to wait: most requests arrive in
    /// the frame that opens them, and cost no timer.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for ChargedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChargedBody")
            .field("received", &self.received)
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl ChargedBody {
    /// Charges for `chunk`, which has just arrived: its bytes, to the
    /// connection's budget (Status: checks its size instead).
    fn charge(&mut self, chunk: &[u8]) -> Result<(), Status> {
        let need = self.received + chunk.len();
        match &self.limit {
            Limit::Status => {
                if need > MAX_STATUS_BODY_BYTES {
                    return Err(Status::out_of_range(format!(
                        "a Status request is at most {MAX_STATUS_BODY_BYTES} bytes"
                    )));
                }
            }
            Limit::Budget { bytes, max } => {
                let more = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                let permit = Arc::clone(bytes)
                    .try_acquire_many_owned(more)
                    .map_err(|_| {
                        Status::resource_exhausted(format!(
                            "this connection's calls hold its limit of {max} request bytes \
                             (--max-connection-request-bytes); retry when they finish"
                        ))
                    })?;
                let mut permits = self
                    .permits
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match permits.as_mut() {
                    Some(p) => p.merge(permit),
                    None => *permits = Some(permit),
                }
            }
        }
        self.received = need;
        Ok(())
    }

    /// How many bytes at the start of `held` tonic may have now: the whole
    /// messages there, or everything once a message declares more than
    /// `max_request_bytes` (tonic refuses it before reserving anything).
    fn deliverable(&mut self) -> usize {
        if self.passthrough {
            return self.held.len();
        }
        let mut pos = 0;
        while self.held.len() - pos >= GRPC_PREFIX {
            let p = &self.held[pos..pos + GRPC_PREFIX];
            let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
            if len > self.max_request_bytes {
                self.passthrough = true;
                return self.held.len();
            }
            if self.held.len() - pos - GRPC_PREFIX < len {
                break;
            }
            pos += GRPC_PREFIX + len;
        }
        pos
    }

    /// Ends the body with `status`; dropping the inner body resets the
    /// stream, so the client sends no more.
    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.inner = None;
        self.receiving = None;
        self.held = Vec::new();
        self.trailers = None;
        Poll::Ready(Some(Err(status)))
    }
}

impl HttpBody for ChargedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                // Ended with part of a message: tonic reports it truncated.
                if this.held.is_empty() {
                    return Poll::Ready(None);
                }
                let rest = Bytes::from(std::mem::take(&mut this.held));
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            };
            let frame = match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => {
                    let deadline = this.deadline.get_or_insert_with(|| {
                        Box::pin(tokio::time::sleep_until(this.started + this.read_timeout))
                    });
                    if deadline.as_mut().poll(cx).is_ready() {
                        let timeout = this.read_timeout;
                        return this.fail(Status::deadline_exceeded(format!(
                            "the request message did not arrive within {timeout:?} (--request-read-timeout)"
                        )));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    this.inner = None;
                    this.receiving = None;
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return this.fail(Status::from_error(e.into())),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    // Trailers (or another non-data frame) after the data.
                    if this.held.is_empty() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    this.trailers = Some(frame);
                    let rest = Bytes::from(std::mem::take(&mut this.held));
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            };
            if let Err(status) = this.charge(&data) {
                return this.fail(status);
            }
            if matches!(this.limit, Limit::Status) {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            this.held.extend_from_slice(&data);
            let ready = this.deliverable();
            if ready > 0 {
                let rest = this.held.split_off(ready);
                let whole = Bytes::from(std::mem::replace(&mut this.held, rest));
                return Poll::Ready(Some(Ok(Frame::data(whole))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && self.trailers.is_none()
            && self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
