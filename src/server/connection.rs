//! Connection-level defences: how many connections kekd holds, how long a
//! new one may stay silent, and a call limit that Status never waits behind.
//!
//! Anyone who can open the socket can open connections; each costs kekd a
//! file descriptor, a task and HTTP/2 buffers. Without bounds, a client that
//! leaks connections (or a local attacker with socket access) could run kekd
//! out of file descriptors — and then the keyring reload, the PKCS#11 token's
//! files and the apiserver's next connection fail too. So:
//!
//! - at most [`connection_limit`] connections are open at once, kept well
//!   below `RLIMIT_NOFILE`; past it a new connection is closed at once and a
//!   warning names the limit and the peer (at most one line per
//!   [`REFUSAL_LOG_INTERVAL`]);
//! - a connection that has not sent the 24-byte HTTP/2 client preface within
//!   [`PREFACE_TIMEOUT`] is closed (an idle or slow-dripping socket cannot
//!   hold a slot);
//! - after the preface, HTTP/2 keepalive pings (see `server.rs`) close a peer
//!   that stops answering. A healthy client — the apiserver's one long-lived
//!   connection — answers pings in its HTTP/2 stack and is never cut, however
//!   long it stays idle;
//! - Encrypt/Decrypt across connections are bounded to [`running_limit`]
//!   (`KmsService::with_call_limit`, which takes a call's permit only once its
//!   message has arrived) while Status never waits: it is answered from cached
//!   state, and the apiserver must see it answered even while other calls
//!   fill every slot.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// Most connections kekd serves at once (the apiserver needs one per
/// apiserver process; probes and doctors a few more).
pub const MAX_CONNECTIONS: usize = 512;

/// File descriptors kept free below `RLIMIT_NOFILE` for everything that is
/// not a connection: the listener, keyring and usage files, inotify, the ops
/// listener, the log and a PKCS#11 module's own files and sockets.
pub const RESERVED_FDS: u64 = 128;

/// How long a new connection may take to send the HTTP/2 client preface.
/// Every HTTP/2 client sends it at once; the apiserver within milliseconds.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one "connection limit reached" warning per this interval; the
/// next one says how many connections were closed meanwhile.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

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

/// How many Encrypt/Decrypt calls run at once: `max_concurrency`, but no
/// more than [`RUNNING_PER_CPU`] per CPU — or the HSM's session pool, when
/// that is larger, since HSM calls wait on the token, not on a CPU.
///
/// Why: every running call is a task in the same runtime as the connection
/// tasks that read Status requests. With 1,024 calls runnable on 2 CPUs,
/// each waits its turn behind the others (over 100 ms on a CI host), and so
/// would Status. Calls past this limit wait parked on a FIFO semaphore,
/// costing no CPU turns, and Status, which takes no permit, is read and
/// answered at once (tests/hostile.rs: a 1,024-stream flood with every
/// 100 ms Status probe answered).
pub fn running_limit(max_concurrency: usize, hsm_sessions: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    max_concurrency
        .min((RUNNING_PER_CPU * cpus).max(hsm_sessions))
        .max(1)
}

/// An accepted connection: the socket, its slot under the connection limit
/// (released when the connection is dropped), and until the client preface
/// has arrived, the deadline for it.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: UnixStream,
    _slot: OwnedSemaphorePermit,
    preface: Option<Preface>,
}

#[derive(Debug)]
struct Preface {
    missing: usize,
    deadline: Pin<Box<Sleep>>,
}

impl Connection {
    pub(crate) fn new(stream: UnixStream, slot: OwnedSemaphorePermit) -> Self {
        Self {
            stream,
            _slot: slot,
            preface: Some(Preface {
                missing: PREFACE_LEN,
                deadline: Box::pin(tokio::time::sleep(PREFACE_TIMEOUT)),
            }),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // The deadline is polled with the same waker as the read, so the
        // HTTP/2 handshake waiting on this read is woken when it expires.
        if let Some(preface) = &mut this.preface
            && preface.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no HTTP/2 client preface within {PREFACE_TIMEOUT:?}"),
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(preface)) = (&read, &mut this.preface) {
            let got = buf.filled().len() - before;
            if got >= preface.missing {
                this.preface = None;
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
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
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
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}
