//! Connections of peers that `--allow-uid`/`--allow-gid` refuses.
//!
//! The kernel reports a peer's credentials (`SO_PEERCRED`) at accept, so a
//! refused peer is known before it sends a byte. It is not simply closed:
//! its operator must see why it fails (`kekd admin probe` run as the wrong
//! user prints the PERMISSION_DENIED message naming its uid and gid). So it
//! gets a minimal HTTP/2 connection of its own, outside tonic and outside
//! the connection limit, that answers every call PERMISSION_DENIED from its
//! headers alone and can make kekd buffer nothing:
//!
//! - every stream's flow-control window is 0, so the peer cannot send a
//!   single byte of a request body (doing so is a flow-control error that
//!   ends the connection), and the body is never read anyway;
//! - one stream at a time, headers of at most [`MAX_HEADER_LIST_BYTES`];
//! - the connection lives at most the preface timeout, then is closed;
//! - at most [`MAX_REFUSED_CONNECTIONS`] such connections at once; past that
//!   a refused peer's connection is closed at once.
//!
//! kekd logs one warning per refused peer per [`REFUSAL_LOG_INTERVAL`],
//! naming its uid and gid, how many refusals the line stands for, and the
//! setting that would let it in.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::Status;
use tonic::codegen::{Bytes, http};
use tracing::{debug, warn};

#[cfg(doc)]
use super::connection::MAX_REFUSED_CONNECTIONS;
use super::connection::{MAX_HEADER_LIST_BYTES, REFUSAL_LOG_INTERVAL};
use crate::service::Peer;
use crate::service::ServiceError;

/// Serves a refused peer's connection on a task of its own: every call is
/// answered PERMISSION_DENIED; the connection ends after `lifetime`.
pub(crate) fn serve(
    stream: UnixStream,
    peer: Peer,
    slot: OwnedSemaphorePermit,
    lifetime: Duration,
) {
    let message = ServiceError::PeerNotAllowed {
        uid: peer.uid,
        gid: peer.gid,
    }
    .to_string();
    tokio::spawn(async move {
        let _slot = slot;
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(0)
            .max_concurrent_streams(1)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_send_buf_size(1024);
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            // The body is dropped unread: hyper resets the stream's
            // receiving side.
            drop(request);
            let status = Status::permission_denied(message.clone());
            std::future::ready(Ok::<_, Infallible>(status.into_http::<Empty<Bytes>>()))
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        match tokio::time::timeout(lifetime, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "refused peer's connection failed"),
            Err(_) => debug!("refused peer's connection closed at its lifetime"),
        }
    });
}

/// One warning per refused peer per [`REFUSAL_LOG_INTERVAL`].
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    peers: HashMap<(Option<u32>, Option<u32>), (Instant, u64)>,
}

/// Peers remembered at most; past it, entries older than the interval go.
const MAX_REMEMBERED_PEERS: usize = 1024;

impl RefusalLog {
    /// Notes a refused connection from `peer`; logs a warning unless one
    /// was logged for this peer within the interval (then it is counted and
    /// reported with the next line).
    pub(crate) fn refused(&mut self, peer: Peer, closed_at_once: bool) {
        let now = Instant::now();
        if self.peers.len() >= MAX_REMEMBERED_PEERS {
            self.peers
                .retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
        }
        let key = (peer.uid, peer.gid);
        let entry = self.peers.entry(key).or_insert((now, u64::MAX));
        if entry.1 != u64::MAX && now.duration_since(entry.0) < REFUSAL_LOG_INTERVAL {
            entry.1 += 1;
            return;
        }
        let suppressed = if entry.1 == u64::MAX { 0 } else { entry.1 };
        *entry = (now, 0);
        let uid = peer
            .uid
            .map_or_else(|| "unknown".to_owned(), |u| u.to_string());
        let gid = peer
            .gid
            .map_or_else(|| "unknown".to_owned(), |g| g.to_string());
        warn!(
            peer.uid = peer.uid,
            peer.gid = peer.gid,
            peer.pid = peer.pid,
            suppressed,
            closed_at_once,
            "refused a connection from uid {uid} gid {gid}: not allowed by --allow-uid/--allow-gid \
             (if it should call kekd, add --allow-uid {uid} or --allow-gid {gid}); \
             {suppressed} more refusals of this peer were not logged in the last {}s",
            REFUSAL_LOG_INTERVAL.as_secs()
        );
    }
}
