//! The ops listener: `/metrics`, `/livez` and `/readyz` over plain HTTP on a
//! TCP address (loopback by default; off unless `--ops-addr` is given).
//!
//! - `/livez` answers 200 while the process runs its event loop. It never
//!   fails for a keyring or HSM problem: a restart cannot fix those, and
//!   killing the plugin would only make the apiserver's situation worse.
//! - `/readyz` answers 200 when the keyring is loaded, the latest self-check
//!   (which really touches the HSM) passed and the socket is bound and
//!   accepting; otherwise 503 with the reason as plain text.
//! - `/metrics` is the OpenMetrics text of [`crate::metrics::Metrics`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::state::ServingState;

/// Whether the KMS socket is bound and accepting.
#[derive(Debug, Default)]
pub struct Readiness {
    serving: AtomicBool,
}

impl Readiness {
    /// Records that the socket accepts (or, at shutdown, no longer does).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// Whether the socket accepts.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
}

/// Binds the ops listener.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        warn!(%addr, "ops listener is reachable from other hosts; metrics reveal key ids' hashes and usage");
    }
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr().unwrap_or(addr), "ops listener: /metrics /livez /readyz");
    Ok(listener)
}

/// Serves the ops endpoints until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServingState>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "ops listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (state, readiness) = (Arc::clone(&state), Arc::clone(&readiness));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (state, readiness) = (Arc::clone(&state), Arc::clone(&readiness));
                async move { Ok::<_, Infallible>(route(&req, &state, &readiness)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "ops connection ended");
            }
        });
    }
}

fn route(
    req: &Request<Incoming>,
    state: &ServingState,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/livez") => text(StatusCode::OK, "ok\n".to_owned()),
        (&hyper::Method::GET, "/readyz") => match not_ready(state, readiness) {
            None => text(StatusCode::OK, "ok\n".to_owned()),
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
        (&hyper::Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics().encode())));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (_, "/livez" | "/readyz" | "/metrics") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /livez or /readyz\n".to_owned(),
        ),
    }
}

/// Why kekd is not ready, or `None` when it is.
pub fn not_ready(state: &ServingState, readiness: &Readiness) -> Option<String> {
    if !readiness.is_serving() {
        return Some("the KMS socket is not accepting (starting or shutting down)".to_owned());
    }
    let snapshot = state.current();
    if !snapshot.is_healthy() {
        return Some(match state.last_self_check_error() {
            Some(e) => format!("the key self-check fails: {e}"),
            None => "the key self-check fails".to_owned(),
        });
    }
    None
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
