//! Admission of each call (an HTTP/2 stream) before tonic reads it: the
//! process-wide budgets that bound what held, unfinished streams can make
//! kekd buffer, whatever the number of connections.
//!
//! tonic reads a request's body as it arrives and releases HTTP/2 flow
//! control as it reads, so a stream whose message never completes would keep
//! up to the message cap buffered; many such streams on many connections
//! would add up without bound. Here, before any byte is read:
//!
//! - a call is marked in flight on its connection (so it is not evicted at
//!   the connection limit) — but only once its request message has
//!   arrived: a call still waiting for it protects nothing, or a client
//!   stalling one call per connection could make every connection
//!   unevictable and lock everyone else out;
//! - Encrypt/Decrypt take one of `max_concurrency` call slots, process-wide;
//!   without one the call is answered RESOURCE_EXHAUSTED at once;
//! - their request bytes are charged to a process-wide byte budget as they
//!   arrive — a message's whole declared length as soon as its 5-byte gRPC
//!   prefix is in, since tonic reserves that much at once; a call the budget
//!   cannot cover is answered RESOURCE_EXHAUSTED at once;
//! - Status takes no call slot and no budget (it must never be starved by
//!   them) but at most [`STATUS_STREAMS_PER_CONNECTION`] per connection, and
//!   its body may be at most [`MAX_STATUS_BODY_BYTES`];
//! - every request message must arrive completely within the request read
//!   timeout, or the call ends DEADLINE_EXCEEDED and frees what it held.
//!
//! Slots and bytes are released when the call's response is ready (or the
//! call is dropped), so a decoded message waiting for a running slot
//! (`KmsService::with_call_limit`) stays counted.

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

use super::connection::{
    CallGuard, ConnInfo, MAX_STATUS_BODY_BYTES, Receiving, Registry, STATUS_STREAMS_PER_CONNECTION,
};

/// The Status method's path.
const STATUS_PATH: &str = "/v2.KeyManagementService/Status";

/// gRPC's length prefix: a compression flag and a 4-byte length.
const GRPC_PREFIX: usize = 5;

/// The budgets shared by every connection.
#[derive(Debug)]
pub(crate) struct Budgets {
    registry: Arc<Registry>,
    calls: Arc<Semaphore>,
    max_calls: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    max_request_bytes: usize,
    read_timeout: Duration,
}

impl Budgets {
    pub(crate) fn new(
        registry: Arc<Registry>,
        max_calls: usize,
        max_bytes: usize,
        max_request_bytes: usize,
        read_timeout: Duration,
    ) -> Arc<Self> {
        let max_bytes = max_bytes.min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            registry,
            calls: Arc::new(Semaphore::new(max_calls.max(1))),
            max_calls: max_calls.max(1),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
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
    _call: Option<CallGuard>,
    _slot: Option<OwnedSemaphorePermit>,
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
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let call = match &conn {
            Some(c) => match c.shared.start_call(&budgets.registry, status) {
                Some(guard) => Some(guard),
                None => {
                    return refuse(Status::resource_exhausted(format!(
                        "this connection already has {STATUS_STREAMS_PER_CONNECTION} Status calls in flight"
                    )));
                }
            },
            None => None,
        };
        let (slot, limit) = if status {
            (None, Limit::Status)
        } else {
            match Arc::clone(&budgets.calls).try_acquire_owned() {
                Ok(slot) => (Some(slot), Limit::Budget(Arc::clone(&budgets.bytes))),
                Err(_) => {
                    return refuse(Status::resource_exhausted(format!(
                        "kekd has {} calls in flight (--max-concurrency); retry later",
                        budgets.max_calls
                    )));
                }
            }
        };
        let (parts, body) = request.into_parts();
        let charged = Charged::default();
        let receiving = call.as_ref().map(Receiving::of);
        let body = ChargedBody {
            inner: Some(body),
            receiving,
            limit,
            max_bytes: budgets.max_bytes,
            max_request_bytes: budgets.max_request_bytes,
            received: 0,
            charged: 0,
            prefix: Vec::new(),
            message_end: 0,
            permits: Arc::clone(&charged),
            read_timeout: budgets.read_timeout,
            started: tokio::time::Instant::now(),
            deadline: None,
        };
        let request = http::Request::from_parts(parts, Body::new(body));
        let held = Held {
            _call: call,
            _slot: slot,
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
    /// Charged to the process-wide byte budget.
    Budget(Arc<Semaphore>),
}

/// A request body that charges what it delivers (see the module docs) and
/// ends with DEADLINE_EXCEEDED if it has not ended by the read timeout.
struct ChargedBody {
    inner: Option<Body>,
    /// Until the request has arrived (or failed), the call does not keep
    /// its connection from being evicted (`Registry::admit`).
    receiving: Option<Receiving>,
    limit: Limit,
    max_bytes: usize,
    max_request_bytes: usize,
    /// Bytes delivered so far.
    received: usize,
    /// Bytes charged to the budget so far (≥ `received`).
    charged: usize,
    /// The bytes of a gRPC prefix not yet complete.
    prefix: Vec<u8>,
    /// Where the last message whose prefix is complete ends (in `received`
    /// terms): the next prefix starts there.
    message_end: usize,
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
            .field("charged", &self.charged)
            .finish_non_exhaustive()
    }
}

impl ChargedBody {
    /// Charges for `chunk`, which is about to be delivered: its bytes, and
    /// for every message whose prefix completes in it, the message's whole
    /// declared length.
    fn charge(&mut self, chunk: &[u8]) -> Result<(), Status> {
        let mut need = self.received + chunk.len();
        // Walk the gRPC framing through this chunk.
        let mut pos = 0;
        while pos < chunk.len() {
            if self.message_end > self.received + pos {
                // Inside a message body: skip to its end.
                pos = (self.message_end - self.received).min(chunk.len());
                continue;
            }
            let take = (GRPC_PREFIX - self.prefix.len()).min(chunk.len() - pos);
            self.prefix.extend_from_slice(&chunk[pos..pos + take]);
            pos += take;
            if self.prefix.len() == GRPC_PREFIX {
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                // tonic refuses a longer message itself (OUT_OF_RANGE).
                let len = len.min(self.max_request_bytes);
                self.message_end = self.received + pos + len;
                self.prefix.clear();
            }
        }
        need = need.max(self.message_end);
        match &self.limit {
            Limit::Status => {
                if need > MAX_STATUS_BODY_BYTES {
                    return Err(Status::out_of_range(format!(
                        "a Status request is at most {MAX_STATUS_BODY_BYTES} bytes"
                    )));
                }
            }
            Limit::Budget(bytes) => {
                if need > self.charged {
                    let more = u32::try_from(need - self.charged).unwrap_or(u32::MAX);
                    let permit = Arc::clone(bytes)
                        .try_acquire_many_owned(more)
                        .map_err(|_| {
                            Status::resource_exhausted(format!(
                                "kekd is buffering its limit of {} request bytes \
                             (--max-buffered-request-bytes); retry later",
                                self.max_bytes
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
                    self.charged = need;
                }
            }
        }
        self.received += chunk.len();
        Ok(())
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        let frame = match polled {
            Poll::Pending => {
                let deadline = this.deadline.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(this.started + this.read_timeout))
                });
                if deadline.as_mut().poll(cx).is_ready() {
                    this.inner = None;
                    this.receiving = None;
                    return Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "the request message did not arrive within {:?} (--request-read-timeout)",
                        this.read_timeout
                    )))));
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.receiving = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                this.receiving = None;
                return Poll::Ready(Some(Err(Status::from_error(e.into()))));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = this.charge(data)
        {
            // Dropping the body resets the stream: the client sends no more.
            this.inner = None;
            this.receiving = None;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}
