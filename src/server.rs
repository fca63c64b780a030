//! The Unix socket and the life of the serving process.
//!
//! Startup runs in a fixed order — keyring loaded and self-checked, then the
//! socket bound, then calls served — so a bad keyring never leaves a socket
//! behind that looks alive. Shutdown stops accepting, lets in-flight calls
//! finish within a grace period, and removes the socket this process created
//! (and only that one).
//!
//! Here: the startup order, the accept loop and shutdown. `socket.rs` owns
//! the socket file; `connection.rs`, `admission.rs` and `refuse.rs` bound
//! what clients can make kekd hold; `health.rs` runs the usage flushes and
//! the periodic self-check.

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::backend::{Backend, BackendError};
use crate::config::ServeConfig;
use crate::id::Timestamp;
use crate::keyring::KeyringError;
use crate::metrics::Metrics;
use crate::ops::{self, Readiness};
use crate::reload;
use crate::service::KmsService;
use crate::state::{ServingState, Snapshot};
use crate::usage::UsageTracker;

mod admission;
pub mod connection;
mod health;
mod refuse;
mod socket;

pub use socket::{BoundSocket, MAX_SOCKET_PATH, SocketError};

use connection::{Admission, Connection, Registry};
use health::{flush_loop, self_check_loop};

/// A server that has loaded its keyring and bound its socket.
#[derive(Debug)]
pub struct Server {
    state: Arc<ServingState>,
    socket: BoundSocket,
    config: ServeConfig,
    backend: Arc<dyn Backend>,
    /// The backend's revision read just before the keyring was loaded: the
    /// reload loop compares against it, so a change made between the load
    /// and the loop's first poll is not missed.
    loaded_revision: Option<String>,
    ops: Option<tokio::net::TcpListener>,
}

impl Server {
    /// Loads and self-checks the keyring, then binds the socket.
    ///
    /// # Errors
    /// Keyring problems ([`ServerError::Keyring`], [`ServerError::SelfCheck`])
    /// and socket problems ([`ServerError::Socket`]); nothing is bound then.
    pub async fn start(
        config: ServeConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, ServerError> {
        let loaded_revision = backend.revision();
        let loader = Arc::clone(&backend);
        // As in `reload`: raw keys passed through this thread's stack.
        let keyring = tokio::task::spawn_blocking(move || {
            crate::secret::with_scrubbed_stack::<{ crate::secret::SCRUB_AFTER_SETUP }, _>(|| {
                loader.load()
            })
        })
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
        keyring.self_check().await.map_err(ServerError::SelfCheck)?;
        info!(
            keyring = %backend.describe(),
            keyring.id = %keyring.id(),
            key.version = keyring.primary().get(),
            key_id = %keyring.primary_key_id(),
            "keyring loaded and self-checked"
        );
        let usage = UsageTracker::load(backend.state_anchor().as_deref(), keyring.id());
        let metrics = Arc::new(Metrics::new(backend.kind()));
        backend.attach_metrics(Arc::clone(&metrics));
        let events = backend.state_anchor().map(|a| crate::audit::audit_path(&a));
        let state = Arc::new(ServingState::new(
            Snapshot::new(keyring, Timestamp::now(), true),
            usage,
            metrics,
            events,
        ));
        let socket = BoundSocket::bind(&config.socket)?;
        info!(socket = %socket.path.display(), mode = format_args!("{:04o}", config.socket.mode), "listening");
        let ops = match config.ops_addr {
            Some(addr) => Some(
                ops::bind(addr)
                    .await
                    .map_err(|source| ServerError::Ops { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            state,
            socket,
            config,
            backend,
            loaded_revision,
            ops,
        })
    }

    /// The ops listener's address, when one is bound.
    pub fn ops_addr(&self) -> Option<std::net::SocketAddr> {
        self.ops.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared serving state (snapshot, usage, metrics).
    pub fn state(&self) -> &Arc<ServingState> {
        &self.state
    }

    /// The bound socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// Serves until `shutdown` completes, then drains within the grace period
    /// and removes the socket.
    ///
    /// # Errors
    /// When the transport fails.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Self {
            state,
            socket,
            config,
            backend,
            loaded_revision,
            ops,
        } = self;
        let readiness = Arc::new(Readiness::default());
        let (ops_stop_tx, ops_stop_rx) = oneshot::channel::<()>();
        let ops_task = ops.map(|listener| {
            tokio::spawn(ops::serve(
                listener,
                config.ops_limits,
                Arc::clone(&state),
                Arc::clone(&readiness),
                async {
                    let _ = ops_stop_rx.await;
                },
            ))
        });
        let (conn_tx, conn_rx) = mpsc::channel(64);
        let listener = socket.take_listener()?;
        let (max_connections, nofile) = connection::connection_limit();
        info!(
            max_connections,
            rlimit_nofile = nofile.map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
            "serving at most {max_connections} connections at once"
        );
        let limits = &config.limits;
        let registry = Registry::new(max_connections, limits.max_connection_request_bytes);
        // Streams per connection: never more than may run at once anyway.
        let streams = u32::try_from(config.max_concurrency)
            .unwrap_or(u32::MAX)
            .min(limits.max_streams_per_connection);
        info!(
            max_connections,
            max_streams_per_connection = streams,
            max_connection_request_bytes = limits.max_connection_request_bytes,
            bound_mib = connection::memory_bound(
                max_connections,
                streams,
                limits.max_connection_request_bytes
            )
            .div_ceil(1 << 20),
            "what clients can make kekd hold is bounded per connection (docs/design.md \"Connection defences\")"
        );
        let accept = tokio::spawn(accept_loop(
            listener,
            conn_tx,
            Arc::clone(&registry),
            config.peers.clone(),
            limits.preface_timeout,
        ));
        let checker = tokio::spawn(self_check_loop(
            Arc::clone(&state),
            config.self_check_interval,
            config.max_key_age,
        ));
        let reloader = tokio::spawn(reload::reload_loop(
            Arc::clone(&state),
            backend,
            config.reload_interval,
            loaded_revision,
        ));
        let flusher = tokio::spawn(flush_loop(Arc::clone(&state), config.usage_flush_interval));

        let budgets = admission::Budgets::new(
            Arc::clone(&registry),
            config.max_request_bytes,
            limits.request_read_timeout,
        );
        let hsm_sessions = config.backend.blocking_threads();
        let running = connection::running_limit(config.max_concurrency, hsm_sessions);
        info!(
            running,
            max_concurrency = config.max_concurrency,
            "at most {running} Encrypt/Decrypt calls run at once; Status never waits for one"
        );
        // What one connection can make kekd hold: `max_concurrent_streams`
        // streams (h2 counts a stream until its response is sent, so
        // unread responses count), each with a header list, and one window
        // of unread bytes (the connection window bounds them all
        // together); request bytes read are charged to the connection's
        // own budget (`server::admission`).
        // Server reflection (`grpcurl list`, `describe`) for the peers the
        // policy allows: a refused peer never reaches the router, and its
        // streams pass the same admission and per-connection limits.
        let reflection = reflection_services(config.max_request_bytes)?;
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(streams)
            .initial_stream_window_size(connection::FLOW_CONTROL_WINDOW)
            .initial_connection_window_size(connection::FLOW_CONTROL_WINDOW)
            .http2_adaptive_window(Some(false))
            .http2_max_header_list_size(connection::MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .layer(admission::AdmitLayer(budgets))
            .add_service(
                KmsService::new(Arc::clone(&state), config.peers.clone())
                    .with_call_limit(running)
                    .into_server(config.max_request_bytes),
            )
            .add_service(reflection.0)
            .add_service(reflection.1);
        // Shutdown is driven by the end of `incoming`, not by a signal: when
        // the accept task stops, tonic still takes every connection already
        // accepted (queued in the channel), then stops accepting and drains
        // them gracefully (GOAWAY, in-flight calls finish). A signal would
        // drop the queued connections, and with them calls already sent.
        let serving = router.serve_with_incoming_shutdown(
            ReceiverStream::new(conn_rx),
            std::future::pending::<()>(),
        );
        tokio::pin!(serving);
        readiness.set_serving(true);

        let result = tokio::select! {
            r = &mut serving => r.map_err(|e| ServerError::Transport(e.to_string())),
            () = shutdown => {
                info!(grace = ?config.shutdown_grace, "shutting down: no new connections, draining calls");
                readiness.set_serving(false);
                accept.abort();
                match tokio::time::timeout(config.shutdown_grace, &mut serving).await {
                    Ok(r) => r.map_err(|e| ServerError::Transport(e.to_string())),
                    Err(_) => {
                        warn!(grace = ?config.shutdown_grace, "grace period expired; abandoning calls still in flight");
                        Ok(())
                    }
                }
            }
        };
        readiness.set_serving(false);
        accept.abort();
        checker.abort();
        reloader.abort();
        flusher.abort();
        let _ = ops_stop_tx.send(());
        if let Some(task) = ops_task {
            let _ = task.await;
        }
        if let Err(e) = state.usage().flush(Timestamp::now()) {
            warn!(error = %e, "could not write usage counters at shutdown");
        }
        socket.remove();
        info!("stopped");
        result
    }
}

/// The file descriptor set of `proto/v2/kms.proto` (build.rs).
const KMS_DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("kms_descriptor");

/// gRPC server reflection of the KMS service (and of reflection itself),
/// in both versions clients ask for: `grpc.reflection.v1` and `v1alpha`.
///
/// Its streams pass `server::admission` like any call: request bytes are
/// charged to the connection's budget, a stream that keeps its request open
/// stays evictable and ends at the read timeout, and it takes no running
/// slot. Like the KMS service it decodes at most `max_request_bytes` per
/// message, which admission relies on: a message declared larger is passed
/// through for the decoder to refuse before it reserves anything.
fn reflection_services(
    max_request_bytes: usize,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServerError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(KMS_DESCRIPTOR)
    };
    let broken = |e: tonic_reflection::server::Error| {
        ServerError::Transport(format!("the reflection service: {e}"))
    };
    Ok((
        builder()
            .build_v1()
            .map_err(broken)?
            .max_decoding_message_size(max_request_bytes),
        builder()
            .build_v1alpha()
            .map_err(broken)?
            .max_decoding_message_size(max_request_bytes),
    ))
}

/// Loads the keyring, binds, and serves until `shutdown`.
///
/// # Errors
/// See [`Server::start`] and [`Server::serve`].
pub async fn run(
    config: ServeConfig,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::start(config, backend).await?.serve(shutdown).await
}

/// Accepts connections and hands them to tonic.
///
/// A peer the policy refuses is refused here, from its `SO_PEERCRED`,
/// before it sends a byte (`server::refuse`). An allowed peer takes a slot
/// in `registry`; at the limit the least useful idle connection is closed
/// to make room (`Registry::admit`), and only when every connection has a
/// call in flight is the new one closed. Warnings are rate-limited. Accept
/// errors (EMFILE under a connection flood) are logged and retried after a
/// pause instead of ending the server or spinning.
async fn accept_loop(
    listener: UnixListener,
    tx: mpsc::Sender<io::Result<Connection>>,
    registry: Arc<Registry>,
    peers: crate::config::PeerPolicy,
    preface_timeout: Duration,
) {
    let refused_slots = Arc::new(Semaphore::new(connection::MAX_REFUSED_CONNECTIONS));
    let mut refusals = refuse::RefusalLog::default();
    let mut full = RateLimited::default();
    let mut evictions = RateLimited::default();
    let mut backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            () = tx.closed() => return,
            () = registry.wait_for_descriptors() => {}
        }
        tokio::select! {
            () = tx.closed() => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    let peer = connection::peer_of(&stream);
                    if !peers.allows(peer.ids()) {
                        match Arc::clone(&refused_slots).try_acquire_owned() {
                            Ok(slot) => {
                                refusals.refused(peer, false);
                                refuse::serve(stream, peer, slot, preface_timeout);
                            }
                            Err(_) => {
                                refusals.refused(peer, true);
                                drop(stream);
                            }
                        }
                        continue;
                    }
                    let shared = match registry.admit(peer) {
                        Admission::Admitted { shared, evicted } => {
                            if let Some(victim) = evicted
                                && let Some(left_out) = evictions.due()
                            {
                                warn!(
                                    max_connections = registry.max(),
                                    evicted.uid = victim.uid,
                                    evicted.pid = victim.pid,
                                    evictions = registry.evictions(),
                                    left_out,
                                    "connection limit reached: closed an idle connection to admit a new one \
                                     (a client is leaking connections; find it by evicted.pid)"
                                );
                            }
                            shared
                        }
                        Admission::Full => {
                            if let Some(left_out) = full.due() {
                                let max_connections = registry.max();
                                warn!(
                                    max_connections,
                                    left_out,
                                    peer.uid = peer.uid,
                                    peer.pid = peer.pid,
                                    "connection limit reached: {max_connections} connections all have calls in flight, \
                                     closing new ones until some finish"
                                );
                            }
                            drop(stream);
                            continue;
                        }
                    };
                    let conn = Connection::new(stream, shared, Arc::clone(&registry), preface_timeout);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// At most one log line per [`connection::REFUSAL_LOG_INTERVAL`].
#[derive(Debug, Default)]
struct RateLimited {
    last: Option<Instant>,
    left_out: u64,
}

impl RateLimited {
    /// `Some(events left out since the last line)` when a line is due.
    fn due(&mut self) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| t.elapsed() < connection::REFUSAL_LOG_INTERVAL)
        {
            self.left_out += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.left_out))
    }
}

/// Why the server did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The keyring could not be loaded.
    #[error(transparent)]
    Keyring(#[from] BackendError),
    /// The keyring loaded but a key failed its round trip.
    #[error("keyring self-check failed: {0}")]
    SelfCheck(KeyringError),
    /// The socket could not be bound.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The gRPC transport failed.
    #[error("transport error: {0}")]
    Transport(String),
    /// The ops listener could not be bound.
    #[error("cannot listen on ops address {addr}: {source} (change --ops-addr)")]
    Ops {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A background task died.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl ServerError {
    /// The process exit code: 78 (EX_CONFIG) for what the operator must fix
    /// in the setup, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            // A keyring that cannot be served at start is for the operator
            // to fix, whatever the kind: kekd never starts without one.
            Self::Keyring(_) | Self::SelfCheck(_) | Self::Socket(_) | Self::Ops { .. } => {
                crate::exit::CONFIG
            }
            Self::Transport(_) | Self::Task(_) => crate::exit::RUNTIME,
        }
    }
}
