//! Connection-level defences: who may hold a connection, how many
//! connections kekd holds, how long a new one may stay silent, and how much
//! a connection may make kekd hold.
//!
//! Anyone who can open the socket can open connections; each costs kekd a
//! file descriptor, a task and HTTP/2 buffers. Without bounds, a client that
//! leaks connections (or a local attacker with socket access) could run kekd
//! out of file descriptors or memory — and then the keyring reload, the
//! PKCS#11 token's files and the apiserver's next connection fail too. So:
//!
//! - a peer that `--allow-uid`/`--allow-gid` refuses is refused at accept,
//!   from its `SO_PEERCRED`: it gets a minimal HTTP/2 connection of its own
//!   (`server::refuse`) that answers PERMISSION_DENIED and never reads a
//!   request byte, and never takes one of the slots below;
//! - at most [`connection_limit`] connections are open at once, kept well
//!   below `RLIMIT_NOFILE`. At the limit a new connection evicts the idle
//!   connection least worth keeping ([`Registry::admit`]): one that never
//!   sent its preface, then one that never made a call, then the one idle
//!   longest — never one with a call in flight whose request has arrived
//!   (a call still waiting for its request, or whose response waits for a
//!   client that does not read it, protects nothing). Only when every
//!   connection has such a call is the new one closed, with a warning (at
//!   most one line per [`REFUSAL_LOG_INTERVAL`]);
//! - a connection that has not sent the 24-byte HTTP/2 client preface within
//!   the preface timeout is closed;
//! - after the preface, HTTP/2 keepalive pings (see `server.rs`) close a peer
//!   that stops answering. A healthy client — the apiserver's one long-lived
//!   connection — answers pings in its HTTP/2 stack and is never cut by them;
//! - everything a connection can make kekd hold is bounded **per
//!   connection** — its streams (SETTINGS_MAX_CONCURRENT_STREAMS, which
//!   counts a stream until its response is sent, so unread responses count
//!   too), one flow-control window of unread bytes, its header lists, and
//!   its request bytes as they really arrive (`server::admission`) — and no
//!   pool is shared between connections that one of them could fill and
//!   starve the others: the process-wide bound is the connection limit
//!   times the per-connection maximum ([`memory_bound`]);
//! - Encrypt/Decrypt across connections run at most [`running_limit`] at
//!   once (`KmsService::with_call_limit`, whose permit is taken only once a
//!   call's whole message has arrived and released when its work is done),
//!   while Status never waits: it is answered from cached state, and the
//!   apiserver must see it answered even while other calls fill every slot.
//!
//! One more thing is watched here, for the operator rather than as a
//! defence: h2, below tonic, resets a stream with PROTOCOL_ERROR when it
//! refuses the request's headers — most often an `:authority` that is not
//! a URI authority, such as the socket path python grpcio and apiservers
//! before 1.32 send — and says so only at debug. The client sees `INTERNAL`
//! `Received RST_STREAM with error code 1`. [`ResetWatch`] follows the
//! frames kekd itself writes (never the client's bytes) and logs the first
//! such reset of each connection at warn, with the client-side fix (at most
//! one line per [`REFUSAL_LOG_INTERVAL`] for all connections).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::service::Peer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tonic::transport::server::Connected;
use tracing::warn;

/// Most connections kekd serves at once. The apiserver multiplexes all its
/// KMS calls on one connection per kekd; probes and doctors need a few
/// more. Every connection may make kekd hold up to its per-connection
/// maximum, so this bounds kekd's memory ([`memory_bound`]): 64 leaves
/// ample room for legitimate clients, and eviction lets a new client in.
pub const MAX_CONNECTIONS: usize = 64;

/// Evicted connections whose sockets may still be open (their tasks have
/// not run since) before kekd stops accepting until one closes. Part of
/// [`RESERVED_FDS`].
pub const CLOSING_SLACK: usize = 8;

/// File descriptors kept free below `RLIMIT_NOFILE` for everything that is
/// not a connection: the listener, keyring and usage files, inotify, the ops
/// listener, the log, refused peers' connections ([`MAX_REFUSED_CONNECTIONS`]),
/// evicted connections not yet closed ([`CLOSING_SLACK`]) and a PKCS#11
/// module's own files and sockets.
pub const RESERVED_FDS: u64 = 128;

/// At most one "connection limit reached" or "evicted" warning per this
/// interval, and one "peer refused" warning per peer; the next line says how
/// many were left out meanwhile.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Connections of refused peers (`server::refuse`) open at once; past it a
/// refused peer's connection is closed at once. They cost no slot of
/// [`connection_limit`].
pub const MAX_REFUSED_CONNECTIONS: usize = 32;

/// The ops listener's descriptors fit in half of the reserve the KMS
/// socket's connection limit leaves free, so it can never take the
/// descriptors kekd needs for its own files.
const _: () = assert!((crate::config::MAX_OPS_MAX_CONNECTIONS as u64) * 2 <= RESERVED_FDS);

/// HTTP/2 flow-control windows, per stream and per connection: what a
/// client may send before kekd reads it. The connection window is the
/// protocol's initial 65,535 bytes, so a connection can never make kekd
/// hold more than that unread. The largest real request (a Decrypt with
/// annotations, ~33 KiB) fits in one window.
pub const FLOW_CONTROL_WINDOW: u32 = 65_535;

/// SETTINGS_MAX_HEADER_LIST_SIZE: the apiserver's headers take a few
/// hundred bytes; HPACK lets a client make a small frame decode to this much.
pub const MAX_HEADER_LIST_BYTES: u32 = 8 * 1024;

/// Largest Status request body (a StatusRequest is empty: 5 bytes framed).
pub const MAX_STATUS_BODY_BYTES: usize = 64;

/// Memory a connection costs beyond its flow-control window and streams
/// (h2 frame buffers, HPACK tables, the connection task), an upper estimate
/// checked by tests/integration/hostile.rs.
pub const CONNECTION_COST: u64 = 96 * 1024;

/// Memory a held stream costs beyond its request bytes: its header list, the
/// gRPC decoder's initial 8 KiB buffer, a response waiting to be sent (the
/// encoder's buffer) and its task (an upper estimate, checked by
/// tests/integration/hostile.rs).
pub const STREAM_COST: u64 = 24 * 1024;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

/// Calls running at once per CPU (see [`running_limit`]).
pub const RUNNING_PER_CPU: usize = 8;

/// How many connections to serve at once: [`MAX_CONNECTIONS`], or fewer when
/// the soft `RLIMIT_NOFILE` leaves less than that above [`RESERVED_FDS`]
/// (never below 1). Also returns the soft limit (`None`: unlimited).
pub fn connection_limit() -> (usize, Option<u64>) {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let limit = match soft {
        Some(soft) => usize::try_from(soft.saturating_sub(RESERVED_FDS))
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_CONNECTIONS),
        None => MAX_CONNECTIONS,
    };
    (limit, soft)
}

/// The most memory, in bytes, that clients can make kekd hold for their
/// calls at once, whatever they send (docs/design.md "Connection
/// defences"): `max_connections` times what one connection can make kekd
/// hold, plus the refused peers' connections:
///
/// - per connection: [`CONNECTION_COST`] and at most one flow-control
///   window of unread bytes;
/// - per stream, [`STREAM_COST`]: at most `streams_per_connection` open
///   streams per connection, in any state (an unread response keeps its
///   stream open, and so counted);
/// - request bytes: at most `connection_request_bytes` per connection,
///   charged as they arrive and held until the call's response is ready,
///   counted twice (kekd's buffer of a message and tonic's decoder buffer,
///   or that buffer and the decoded message, may coexist).
///
/// Refused peers add [`MAX_REFUSED_CONNECTIONS`] connections, which never
/// read a body.
pub fn memory_bound(
    max_connections: usize,
    streams_per_connection: u32,
    connection_request_bytes: usize,
) -> u64 {
    let conns = max_connections as u64;
    let per_connection = CONNECTION_COST
        + u64::from(FLOW_CONTROL_WINDOW)
        + u64::from(streams_per_connection) * STREAM_COST
        + 2 * connection_request_bytes as u64;
    conns * per_connection
        + MAX_REFUSED_CONNECTIONS as u64 * (CONNECTION_COST + u64::from(FLOW_CONTROL_WINDOW))
}

/// How many Encrypt/Decrypt calls run at once: `max_concurrency`, but no
/// more than [`RUNNING_PER_CPU`] per CPU — or the HSM's session pool, when
/// that is larger, since HSM calls wait on the token, not on a CPU.
///
/// Why: every running call is a task in the same runtime as the connection
/// tasks that read Status requests. With 1,024 calls runnable on 2 CPUs,
/// each waits its turn behind the others (over 100 ms on a CI host), and so
/// would Status. Calls past this limit wait parked on a FIFO semaphore,
/// costing no CPU turns, and Status, which takes no permit, is read and
/// answered at once (tests/integration/hostile.rs: a request flood with every
/// 100 ms Status probe answered).
pub fn running_limit(max_concurrency: usize, hsm_sessions: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    max_concurrency
        .min((RUNNING_PER_CPU * cpus).max(hsm_sessions))
        .max(1)
}

/// The connections being served, for admission and eviction at the limit.
#[derive(Debug)]
pub(crate) struct Registry {
    max: usize,
    /// Each connection's budget of request bytes (`server::admission`).
    request_bytes: usize,
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Shared>>>,
    next_id: AtomicU64,
    evictions: AtomicU64,
    /// Connections whose socket is still open: admitted ones, and evicted
    /// ones whose task has not dropped them yet.
    open: AtomicUsize,
    /// Woken whenever a connection's socket is closed.
    closed: tokio::sync::Notify,
    /// The "reset as malformed" warning, rate-limited across connections:
    /// when the last line was logged, and how many were left out since.
    malformed_log: Mutex<(Option<Instant>, u64)>,
}

/// What [`Registry::admit`] decided.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Admitted; `evicted` names the peer of the idle connection closed to
    /// make room, if one was.
    Admitted {
        shared: Arc<Shared>,
        evicted: Option<Peer>,
    },
    /// Every connection has a call in flight: the new one must be closed.
    Full,
}

/// The peer of `stream` (`SO_PEERCRED`).
pub(crate) fn peer_of(stream: &UnixStream) -> Peer {
    let cred = stream.peer_cred().ok();
    Peer {
        uid: cred.map(|c| c.uid()),
        gid: cred.map(|c| c.gid()),
        pid: cred.and_then(|c| c.pid()),
    }
}

impl Registry {
    pub(crate) fn new(max: usize, request_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            request_bytes: request_bytes.min(Semaphore::MAX_PERMITS),
            epoch: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            closed: tokio::sync::Notify::new(),
            malformed_log: Mutex::new((None, 0)),
        })
    }

    /// `Some(lines left out since the last one)` when a "reset as
    /// malformed" line is due (one per [`REFUSAL_LOG_INTERVAL`]).
    fn malformed_line_due(&self) -> Option<u64> {
        let mut log = self
            .malformed_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (last, left_out) = &mut *log;
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL) {
            *left_out += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(left_out))
    }

    /// The most connections served at once.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Waits until fewer than `max` + [`CLOSING_SLACK`] connection sockets
    /// are open. An evicted connection's socket closes only when its task
    /// next runs; accepting faster than that (a connect flood on a loaded
    /// host) would spend descriptors kekd keeps for itself.
    pub(crate) async fn wait_for_descriptors(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            // Registered before the check, so a close in between wakes it.
            closed.as_mut().enable();
            if self.open.load(Ordering::Acquire) < self.max + CLOSING_SLACK {
                return;
            }
            closed.await;
        }
    }

    /// Idle connections closed to admit new ones, since start.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes a slot for a new connection from `peer`. At the limit, the
    /// idle connection least worth keeping is closed to make room: one of
    /// the peer process holding the most connections, and of those first
    /// one that never sent its preface, then one that never made a call,
    /// then the one idle longest (oldest first within each). A connection
    /// with a call in flight is never chosen: the apiserver's connection is
    /// only at risk when every other connection made calls more recently
    /// than it did, and then its client reconnects at its next call.
    pub(crate) fn admit(&self, peer: Peer) -> Admission {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let mut evicted = None;
        if conns.len() >= self.max {
            // Connections per peer process: a flood from one peer evicts
            // its own connections before anyone else's, so with a small
            // connection limit a flooder still cannot push out the
            // apiserver's reconnect before its first call.
            let mut per_peer: HashMap<(Option<u32>, Option<i32>), usize> = HashMap::new();
            for c in conns.values() {
                *per_peer.entry((c.peer.uid, c.peer.pid)).or_default() += 1;
            }
            let victim = conns
                .values()
                // A call still waiting for its request message protects
                // nothing: a client stalling its requests on every
                // connection would otherwise make them all unevictable and
                // lock out everyone else, the apiserver included.
                .filter(|c| {
                    c.in_flight.load(Ordering::Acquire) <= c.receiving.load(Ordering::Acquire)
                })
                .min_by_key(|c| {
                    let tier = if !c.preface_done.load(Ordering::Relaxed) {
                        0
                    } else if !c.served.load(Ordering::Relaxed) {
                        1
                    } else {
                        2
                    };
                    (
                        std::cmp::Reverse(per_peer[&(c.peer.uid, c.peer.pid)]),
                        tier,
                        c.last_active_ms.load(Ordering::Relaxed),
                        c.id,
                    )
                })
                .map(|c| c.id);
            let Some(id) = victim else {
                return Admission::Full;
            };
            if let Some(victim) = conns.remove(&id) {
                victim.evict();
                evicted = Some(victim.peer);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            id,
            peer,
            preface_done: AtomicBool::new(false),
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            receiving: AtomicUsize::new(0),
            request_bytes: Arc::new(Semaphore::new(self.request_bytes)),
            request_bytes_max: self.request_bytes,
            last_active_ms: AtomicU64::new(self.now_ms()),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        conns.insert(id, Arc::clone(&shared));
        Admission::Admitted { shared, evicted }
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// What the accept loop, the connection's I/O and the admission layer
/// (`server::admission`) share about one connection.
#[derive(Debug)]
pub(crate) struct Shared {
    id: u64,
    peer: Peer,
    preface_done: AtomicBool,
    /// Made at least one call.
    served: AtomicBool,
    /// Streams between their headers and their response.
    in_flight: AtomicUsize,
    /// Of those, calls whose request message has not fully arrived
    /// ([`Receiving`]); a connection whose calls in flight are all such is
    /// as evictable as an idle one.
    receiving: AtomicUsize,
    /// This connection's request bytes, charged as they arrive and held
    /// until each call's response is ready (`server::admission`). Its own:
    /// a client that fills it starves only itself.
    request_bytes: Arc<Semaphore>,
    request_bytes_max: usize,
    last_active_ms: AtomicU64,
    evicted: AtomicBool,
    /// The task serving the connection, woken to notice an eviction.
    waker: Mutex<Option<Waker>>,
}

impl Shared {
    /// This connection's budget of request bytes, and its size.
    pub(crate) fn request_budget(&self) -> (Arc<Semaphore>, usize) {
        (Arc::clone(&self.request_bytes), self.request_bytes_max)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            w.wake();
        }
    }

    fn check_evicted(&self, cx: &Context<'_>) -> io::Result<()> {
        if self.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed at the connection limit to admit a new connection",
            ));
        }
        let mut waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        drop(waker);
        // Re-check: an eviction between the load and storing the waker
        // would otherwise go unnoticed until the next wake-up.
        if self.evicted.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed at the connection limit to admit a new connection",
            ));
        }
        Ok(())
    }

    /// A call started on this connection: it is no longer idle.
    pub(crate) fn start_call(self: &Arc<Self>, registry: &Registry) -> CallGuard {
        // `receiving` first: a call is never seen in flight and complete
        // before its request has arrived.
        self.receiving.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Relaxed);
        self.last_active_ms
            .store(registry.now_ms(), Ordering::Relaxed);
        CallGuard {
            shared: Arc::clone(self),
            epoch: registry.epoch,
        }
    }
}

/// Marks a call's request as still arriving, until dropped (when the
/// request body ends, fails, or is dropped unread).
#[derive(Debug)]
pub(crate) struct Receiving(Arc<Shared>);

impl Receiving {
    /// For a call [`Shared::start_call`] just counted.
    pub(crate) fn of(guard: &CallGuard) -> Self {
        Self(Arc::clone(&guard.shared))
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.0.receiving.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks a call in flight on its connection until dropped.
#[derive(Debug)]
pub(crate) struct CallGuard {
    shared: Arc<Shared>,
    epoch: Instant,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.shared.last_active_ms.store(now, Ordering::Relaxed);
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request learns about its connection (tonic puts it in the
/// request's extensions): the peer's credentials and the connection's
/// shared state.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) shared: Arc<Shared>,
}

impl ConnInfo {
    /// The peer's (uid, gid), as the kernel reported them at accept.
    pub(crate) fn peer(&self) -> Peer {
        self.shared.peer
    }
}

/// An accepted connection: the socket, its slot in the [`Registry`]
/// (released when the connection is dropped), and until the client preface
/// has arrived, the deadline for it.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: UnixStream,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    preface: Option<Preface>,
    resets: ResetWatch,
}

#[derive(Debug)]
struct Preface {
    missing: usize,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Connection {
    pub(crate) fn new(
        stream: UnixStream,
        shared: Arc<Shared>,
        registry: Arc<Registry>,
        preface_timeout: Duration,
    ) -> Self {
        registry.open.fetch_add(1, Ordering::AcqRel);
        Self {
            stream,
            shared,
            registry,
            preface: Some(Preface {
                missing: PREFACE_LEN,
                timeout: preface_timeout,
                deadline: Box::pin(tokio::time::sleep(preface_timeout)),
            }),
            resets: ResetWatch::default(),
        }
    }

    /// Follows `written`, the next bytes kekd sent on this connection, and
    /// warns (once per connection) at the first stream it reset as
    /// malformed.
    fn wrote(&mut self, written: &[u8]) {
        if !self.resets.protocol_error(written) {
            return;
        }
        let Some(left_out) = self.registry.malformed_line_due() else {
            return;
        };
        let peer = self.shared.peer;
        warn!(
            peer.uid = peer.uid,
            peer.pid = peer.pid,
            left_out,
            "reset a call as malformed (HTTP/2 PROTOCOL_ERROR; the client sees INTERNAL \"Received RST_STREAM with \
             error code 1\"): most likely the client sends the socket path as :authority, which HTTP/2 refuses. \
             Fix the client: python grpcio options=[(\"grpc.default_authority\", \"localhost\")], grpc-go \
             grpc.WithAuthority(\"localhost\"); kube-apiserver before 1.32 does this (upgrade it)"
        );
    }
}

/// Follows the HTTP/2 frames kekd writes on one connection — its own
/// bytes, framed by h2: a 9-byte header (24-bit length, type, flags,
/// stream id), then the payload — to notice the first RST_STREAM with
/// error code PROTOCOL_ERROR (1). Then it stops looking.
#[derive(Debug, Default)]
struct ResetWatch {
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: usize,
    /// The current frame is a RST_STREAM: its 4-byte error code so far.
    rst: Option<([u8; 4], usize)>,
    /// Found one: nothing more to follow.
    done: bool,
}

/// HTTP/2 frame type RST_STREAM, and the error code PROTOCOL_ERROR.
const RST_STREAM: u8 = 0x3;
const PROTOCOL_ERROR: u32 = 0x1;

impl ResetWatch {
    /// Feeds the next written bytes; true exactly once, at the first
    /// RST_STREAM carrying PROTOCOL_ERROR.
    fn protocol_error(&mut self, mut bytes: &[u8]) -> bool {
        if self.done {
            return false;
        }
        while !self.done && !bytes.is_empty() {
            if self.header_len < self.header.len() {
                let n = (self.header.len() - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == self.header.len() {
                    let [a, b, c, kind, ..] = self.header;
                    self.payload_left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                    self.rst =
                        (kind == RST_STREAM && self.payload_left == 4).then_some(([0; 4], 0));
                    self.end_of_frame_if_done();
                }
                continue;
            }
            let n = self.payload_left.min(bytes.len());
            if let Some((code, have)) = &mut self.rst {
                code[*have..*have + n].copy_from_slice(&bytes[..n]);
                *have += n;
            }
            self.payload_left -= n;
            bytes = &bytes[n..];
            self.end_of_frame_if_done();
        }
        self.done
    }

    /// At the end of a frame: checks a RST_STREAM's code, then expects the
    /// next header.
    fn end_of_frame_if_done(&mut self) {
        if self.payload_left > 0 {
            return;
        }
        if let Some((code, 4)) = self.rst.take() {
            self.done = u32::from_be_bytes(code) == PROTOCOL_ERROR;
        }
        self.header_len = 0;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.remove(self.shared.id);
        // The socket closes with `self.stream`, right after this.
        self.registry.open.fetch_sub(1, Ordering::AcqRel);
        self.registry.closed.notify_waiters();
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shared.check_evicted(cx)?;
        // The deadline is polled with the same waker as the read, so the
        // HTTP/2 handshake waiting on this read is woken when it expires.
        if let Some(preface) = &mut this.preface
            && preface.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no HTTP/2 client preface within {:?}", preface.timeout),
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(preface)) = (&read, &mut this.preface) {
            let got = buf.filled().len() - before;
            if got >= preface.missing {
                this.preface = None;
                this.shared.preface_done.store(true, Ordering::Relaxed);
            } else {
                preface.missing -= got;
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.shared.check_evicted(cx)?;
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.wrote(&buf[..n]);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.shared.check_evicted(cx)?;
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = written {
            for buf in bufs {
                if n == 0 {
                    break;
                }
                let part = n.min(buf.len());
                this.wrote(&buf[..part]);
                n -= part;
            }
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// The first RST_STREAM(PROTOCOL_ERROR) is found wherever the writes
    /// split the frames, once; other codes, and look-alike payload bytes,
    /// are not.
    #[test]
    fn the_first_protocol_error_reset_is_found_once() {
        let settings = frame(0x4, 0, &[0, 3, 0, 0, 0, 64]);
        let cancel = frame(RST_STREAM, 1, &8u32.to_be_bytes());
        // DATA whose payload is itself a RST_STREAM(PROTOCOL_ERROR) frame.
        let data = frame(0x0, 3, &frame(RST_STREAM, 3, &1u32.to_be_bytes()));
        let ping = frame(0x6, 0, &[0; 8]);
        let reset = frame(RST_STREAM, 5, &PROTOCOL_ERROR.to_be_bytes());
        let innocent: Vec<u8> = [settings, cancel, data, ping].concat();
        let all: Vec<u8> = [innocent.clone(), reset.clone(), reset].concat();
        for split in 1..=all.len() {
            let mut watch = ResetWatch::default();
            let found: Vec<bool> = all.chunks(split).map(|c| watch.protocol_error(c)).collect();
            let first = found.iter().position(|f| *f).unwrap();
            // Found in the chunk holding the reset's last byte.
            assert_eq!(first, (innocent.len() + 13 - 1) / split, "split {split}");
            assert_eq!(found.iter().filter(|f| **f).count(), 1, "split {split}");
        }
        let mut watch = ResetWatch::default();
        assert!(!watch.protocol_error(&innocent));
    }
}
