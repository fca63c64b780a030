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

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::config::OpsLimits;
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

/// At most one "accept failed" log line per this period; the rest are
/// counted (`kekd_ops_accept_errors_total`) and summarised in the next line.
pub const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// First pause after a failed accept; it doubles per consecutive failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after a failed accept.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Largest request head (request line and headers) an ops client may send.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Serves the ops endpoints until `shutdown` completes, within `limits`.
///
/// The listener is the lowest-priority user of kekd's descriptors: at its
/// connection cap it closes a connection (see [`shed`]), and when accept
/// fails because the process is out of descriptors (EMFILE/ENFILE) it
/// closes one too and backs off, so it never competes with the KMS socket. Accept failures are logged at most once per
/// [`ACCEPT_ERROR_LOG_EVERY`].
pub async fn serve(
    listener: TcpListener,
    limits: OpsLimits,
    state: Arc<ServingState>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let cap = limits.max_connections.max(1);
    // Every connection task; dropping the set at return closes them all.
    let mut tasks = JoinSet::new();
    // Connections not yet shed, oldest first.
    let mut open: VecDeque<Conn> = VecDeque::new();
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            Some(done) = tasks.join_next_with_id() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                open.retain(|c| c.handle.id() != id);
                continue;
            }
            // `tasks` also counts shed connections not yet dropped: accept
            // only while it is within the cap, so at most `cap + 1`
            // connection descriptors exist at any instant.
            r = listener.accept(), if tasks.len() <= cap => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                errors.succeeded();
                stream
            }
            Err(e) => {
                state.metrics().ops_accept_error();
                if is_fd_exhaustion(&e) && shed(&mut open, 0).is_some() {
                    state.metrics().ops_connection_shed("fd_exhausted");
                }
                let (pause, log) = errors.failed(Instant::now());
                if let Some(suppressed) = log {
                    warn!(
                        error = %e,
                        suppressed,
                        pause = ?pause,
                        "ops listener: accept failed; closing an ops connection and backing off"
                    );
                }
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        let (state_c, readiness) = (Arc::clone(&state), Arc::clone(&readiness));
        let stream = Tracked::new(stream);
        let (busy, weak) = (Arc::clone(&stream.busy), Arc::downgrade(&stream.stream));
        let handle = tasks.spawn(serve_connection(stream, limits, state_c, readiness));
        open.push_back(Conn {
            handle,
            busy,
            stream: weak,
        });
        // The connection just accepted is never the one closed: a flood of
        // new connections must not keep a probe out.
        if open.len() > cap
            && let Some(idle) = shed(&mut open, 1)
        {
            state.metrics().ops_connection_shed("cap");
            debug!(
                cap,
                idle, "ops listener at its connection cap: closed a connection"
            );
        }
    }
}

/// One open ops connection, as the accept loop sees it.
struct Conn {
    handle: AbortHandle,
    /// Set by [`Tracked`] while a request is in progress.
    busy: Arc<AtomicBool>,
    /// The socket, while its connection task holds it.
    stream: Weak<TcpStream>,
}

impl Conn {
    /// Between requests: none being answered, and no byte of a next one
    /// waiting in the socket's receive queue (a probe whose request has
    /// arrived is in progress, even before kekd has read it).
    fn is_idle(&self) -> bool {
        if self.busy.load(Ordering::Acquire) {
            return false;
        }
        // A socket already gone (the task is ending) frees nothing by
        // waiting: idle. One whose queue cannot be read counts as busy.
        self.stream
            .upgrade()
            .is_none_or(|s| rustix::io::ioctl_fionread(&*s).is_ok_and(|queued| queued == 0))
    }
}

/// Closes the oldest idle connection of `open` or, when none is idle, the
/// oldest; the newest `spare` are never closed. Returns whether the one
/// closed was idle, or `None` when there was none to close.
///
/// A connection counts as idle between requests, so a kubelet probe whose
/// request has arrived gets its answer while a flood of idle connections
/// goes first.
fn shed(open: &mut VecDeque<Conn>, spare: usize) -> Option<bool> {
    let candidates = open.len().saturating_sub(spare);
    if candidates == 0 {
        return None;
    }
    let idle = (0..candidates).find(|&i| open[i].is_idle());
    let victim = open.remove(idle.unwrap_or(0))?;
    victim.handle.abort();
    Some(idle.is_some())
}

/// An ops connection's socket, marking its connection busy from the first
/// byte of a request until its response has been written and flushed.
///
/// Hyper drives one connection from one task and flushes after writing a
/// response, so "read bytes" then "wrote and flushed" brackets a request
/// (a pipelined request read together with the previous one counts as
/// idle once that one's answer is out: probes do not pipeline).
struct Tracked {
    stream: Arc<TcpStream>,
    busy: Arc<AtomicBool>,
    /// Bytes were written since the last flush.
    wrote: bool,
}

impl Tracked {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream: Arc::new(stream),
            busy: Arc::new(AtomicBool::new(false)),
            wrote: false,
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    if n > 0 {
                        self.busy.store(true, Ordering::Release);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: wait for the next event.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Ok(n) => {
                    self.wrote |= n > 0;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A TCP socket has no user-space buffer: what was written is sent.
        // Hyper also flushes while waiting for a request: only a flush
        // after a write ends one.
        if std::mem::take(&mut self.wrote) {
            self.busy.store(false, Ordering::Release);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(&*self.stream, rustix::net::Shutdown::Write)
                .map_err(std::io::Error::from),
        )
    }
}

/// Serves one ops connection within the header timeout and lifetime.
async fn serve_connection(
    stream: Tracked,
    limits: OpsLimits,
    state: Arc<ServingState>,
    readiness: Arc<Readiness>,
) {
    let service = hyper::service::service_fn(move |req| {
        let (state, readiness) = (Arc::clone(&state), Arc::clone(&readiness));
        async move { Ok::<_, Infallible>(route(&req, &state, &readiness)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_lifetime, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "ops connection ended"),
        Err(_) => {
            debug!(lifetime = ?limits.connection_lifetime, "ops connection closed at the end of its lifetime")
        }
    }
}

/// Whether an accept error means the process (or system) is out of file
/// descriptors.
fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
}

/// Backoff and log rate limit for failed accepts.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// Consecutive failures since the last successful accept.
    consecutive: u32,
    /// When the last "accept failed" line was logged.
    last_logged: Option<Instant>,
    /// Failures since then that were not logged.
    suppressed: u64,
}

impl AcceptErrors {
    fn succeeded(&mut self) {
        self.consecutive = 0;
    }

    /// Records a failure at `now`: how long to pause, and whether to log
    /// (`Some(failures not logged since the last line)`) or stay quiet.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = ACCEPT_BACKOFF_MIN
            .saturating_mul(1 << self.consecutive.min(16))
            .min(ACCEPT_BACKOFF_MAX);
        self.consecutive = self.consecutive.saturating_add(1);
        let due = self
            .last_logged
            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_ERROR_LOG_EVERY);
        if due {
            self.last_logged = Some(now);
            let suppressed = std::mem::take(&mut self.suppressed);
            (pause, Some(suppressed))
        } else {
            self.suppressed += 1;
            (pause, None)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_and_are_logged_once_per_period() {
        let mut errors = AcceptErrors::default();
        let t0 = Instant::now();
        assert_eq!(errors.failed(t0), (ACCEPT_BACKOFF_MIN, Some(0)));
        let mut pauses = Vec::new();
        for i in 1..=20u32 {
            let (pause, log) = errors.failed(t0 + Duration::from_millis(u64::from(i)));
            assert_eq!(log, None, "failure {i} within the period is not logged");
            pauses.push(pause);
        }
        assert_eq!(pauses[0], ACCEPT_BACKOFF_MIN * 2);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses.last(), Some(&ACCEPT_BACKOFF_MAX));
        // The next line, a period later, says how many were not logged.
        let (_, log) = errors.failed(t0 + ACCEPT_ERROR_LOG_EVERY);
        assert_eq!(log, Some(20));
        // A success resets the backoff, not the log period.
        errors.succeeded();
        let (pause, log) = errors.failed(t0 + ACCEPT_ERROR_LOG_EVERY + Duration::from_millis(1));
        assert_eq!((pause, log), (ACCEPT_BACKOFF_MIN, None));
    }

    #[test]
    fn fd_exhaustion_is_emfile_or_enfile_only() {
        for (code, expected) in [
            (rustix::io::Errno::MFILE, true),
            (rustix::io::Errno::NFILE, true),
            (rustix::io::Errno::CONNABORTED, false),
            (rustix::io::Errno::NOBUFS, false),
        ] {
            let e = std::io::Error::from_raw_os_error(code.raw_os_error());
            assert_eq!(is_fd_exhaustion(&e), expected, "{e}");
        }
    }
}
