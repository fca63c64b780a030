//! The Unix socket and the life of the serving process.
//!
//! Startup runs in a fixed order — keyring loaded and self-checked, then the
//! socket bound, then calls served — so a bad keyring never leaves a socket
//! behind that looks alive. Shutdown stops accepting, lets in-flight calls
//! finish within a grace period, and removes the socket this process created
//! (and only that one).

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::backend::{Backend, BackendError};
use crate::config::{ServeConfig, SocketConfig};
use crate::id::{KeyVersion, Timestamp};
use crate::keyring::KeyringError;
use crate::metrics::Metrics;
use crate::ops::{self, Readiness};
use crate::reload;
use crate::service::KmsService;
use crate::state::Event;
use crate::state::{ServingState, Snapshot};
use crate::usage::UsageTracker;

mod admission;
pub mod connection;
mod refuse;

use connection::{Admission, Connection, Registry};

/// How often changed usage counters are written to disk.
pub const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Longest socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

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
        let flusher = tokio::spawn(flush_loop(Arc::clone(&state)));

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

/// Writes the usage counters every few seconds while they change.
async fn flush_loop(state: Arc<ServingState>) {
    let mut ticker = tokio::time::interval(USAGE_FLUSH_INTERVAL);
    let mut failing = false;
    loop {
        ticker.tick().await;
        match state.usage().flush(Timestamp::now()) {
            Ok(()) if failing => {
                failing = false;
                info!("usage counters written again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "could not write usage counters; will retry");
            }
            Err(_) => {}
        }
    }
}

/// Re-runs the self-check of the served snapshot; Status reflects the result.
async fn self_check_loop(state: Arc<ServingState>, every: Duration, max_key_age: Duration) {
    // While unhealthy, check every second so recovery shows at once.
    const RECHECK: Duration = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    let mut warned_due: Option<KeyVersion> = None;
    loop {
        let snapshot = state.current();
        check_key_age(&state, &snapshot, max_key_age, &mut warned_due);
        tokio::time::sleep(if snapshot.is_healthy() {
            every
        } else {
            every.min(RECHECK)
        })
        .await;
        let snapshot = state.current();
        let result = snapshot
            .keyring
            .self_check()
            .await
            .map_err(|e| e.to_string());
        let was = state.record_self_check(&snapshot, result.clone());
        match result {
            Err(msg) => {
                if was || last_error.as_ref() != Some(&msg) {
                    error!(error = %msg, "self-check failed; Status fails until it passes");
                    if was {
                        state.event(Event::HealthLost {
                            reason: msg.clone(),
                        });
                    }
                }
                last_error = Some(msg);
            }
            Ok(()) if !was => {
                last_error = None;
                info!("self-check passes again; Status is healthy");
                state.event(Event::HealthRecovered);
            }
            Ok(()) => {}
        }
    }
}

/// Updates the key-age metrics and warns once per primary when it is older
/// than `max_key_age`. Readiness is not affected: an old key still works.
fn check_key_age(
    state: &ServingState,
    snapshot: &Snapshot,
    max_key_age: Duration,
    warned: &mut Option<KeyVersion>,
) {
    let keyring = &snapshot.keyring;
    let primary = keyring.primary();
    let Some(info) = keyring.versions().find(|v| v.version == primary) else {
        return;
    };
    let since = info.promoted.unwrap_or(info.created);
    let age = Duration::from_secs(Timestamp::now().unix().saturating_sub(since.unix()));
    let due = age > max_key_age;
    state.metrics().key_age(age, due);
    if due && *warned != Some(primary) {
        *warned = Some(primary);
        warn!(
            key.version = primary.get(),
            age = %humantime::format_duration(age),
            max_key_age = %humantime::format_duration(max_key_age),
            "the primary key is older than max_key_age: rotation is due (kekd admin rotate)"
        );
    }
}

/// The listening socket file this process created.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
    /// (device, inode) of the socket file, so we remove only our own.
    identity: (u64, u64),
}

impl BoundSocket {
    /// Creates the socket at `config.path`.
    ///
    /// The parent directory is created `0750` if missing. An existing path is
    /// removed only if it is a socket nobody accepts on. The mode is applied
    /// through the umask at bind; with a group, the socket is created owner-only,
    /// handed to the group, and only then widened to the mode, so it is never
    /// reachable by anyone the configuration did not name.
    ///
    /// # Errors
    /// See [`SocketError`].
    pub fn bind(config: &SocketConfig) -> Result<Self, SocketError> {
        let path = &config.path;
        let io = |op: &'static str| {
            move |source: io::Error| SocketError::Io {
                path: path.clone(),
                op,
                source,
            }
        };
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SocketError::PathTooLong {
                path: path.clone(),
                len: path.as_os_str().len(),
            });
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if parent.exists() {
                check_directory(parent)?;
            } else {
                create_dirs(parent).map_err(io("create its directory"))?;
            }
        }
        clear_stale(path)?;

        let bind_mode = if config.group.is_some() {
            0o600
        } else {
            config.mode
        };
        let listener = {
            // The umask is process-wide: one bind at a time sets and restores it.
            static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _guard = UMASK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(!bind_mode & 0o777));
            let bound = std::os::unix::net::UnixListener::bind(path);
            rustix::process::umask(old);
            bound.map_err(io("bind"))?
        };
        let mut socket = Self {
            listener: None,
            path: path.clone(),
            identity: (0, 0),
        };
        let meta = std::fs::symlink_metadata(path).map_err(io("stat"))?;
        socket.identity = (meta.dev(), meta.ino());
        socket.listener = Some(listener);
        if let Some(gid) = config.group {
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| io("change its group")(e.into()))?;
            rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(config.mode))
                .map_err(|e| io("set its mode")(e.into()))?;
        }
        Ok(socket)
    }

    fn take_listener(&self) -> Result<UnixListener, ServerError> {
        let std = self
            .listener
            .as_ref()
            .ok_or_else(|| ServerError::Task("socket already served".to_owned()))?
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(|e| ServerError::Transport(e.to_string()))?;
        UnixListener::from_std(std).map_err(|e| ServerError::Transport(e.to_string()))
    }

    /// Removes the socket file if it is still the one this process bound.
    pub fn remove(mut self) {
        self.remove_own();
    }

    fn remove_own(&mut self) {
        if self.listener.take().is_none() {
            return;
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(socket = %self.path.display(), error = %e, "could not remove socket");
                }
            }
            _ => {
                warn!(socket = %self.path.display(), "socket was replaced by someone else; leaving it")
            }
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        self.remove_own();
    }
}

/// Creates `dir` and its missing ancestors with mode 0750 exactly — set
/// explicitly, since the umask may narrow a mode given at creation and a
/// group member must be able to reach a 0660 socket inside.
fn create_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        cur = d.parent();
    }
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o750).create(d) {
            Ok(()) => {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))?;
                // A typo in --socket serves somewhere new: say so.
                info!(directory = %d.display(), "created the socket's directory (0750); it did not exist");
            }
            // Created meanwhile by someone else: theirs to own.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Refuses a socket directory someone else could use to replace the socket
/// (as OpenSSH's StrictModes does for key files): it must be owned by kekd's
/// user or root, and not writable by group or others — unless it is sticky
/// (like `/tmp`), where others cannot remove or rename kekd's socket.
fn check_directory(dir: &Path) -> Result<(), SocketError> {
    let meta = std::fs::metadata(dir).map_err(|source| SocketError::Io {
        path: dir.to_owned(),
        op: "stat its directory",
        source,
    })?;
    let me = rustix::process::geteuid().as_raw();
    let unsafe_dir = |reason: String, fix: String| SocketError::UnsafeDirectory {
        path: dir.to_owned(),
        reason,
        fix,
    };
    if !meta.is_dir() {
        return Err(SocketError::Io {
            path: dir.to_owned(),
            op: "use its directory",
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_dir(
            format!(
                "owned by uid {}, not by kekd's user (uid {me}) or root",
                meta.uid()
            ),
            format!("chown {me} {}", dir.display()),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(
            format!("writable by its group or others (mode {mode:04o}) and not sticky"),
            format!("chmod go-w {}", dir.display()),
        ));
    }
    Ok(())
}

/// Makes `path` free for bind, or says why it cannot be.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Io {
                path: path.to_owned(),
                op: "stat",
                source,
            });
        }
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(SocketError::Symlink {
            path: path.to_owned(),
        });
    }
    if !kind.is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|source| SocketError::Io {
                path: path.to_owned(),
                op: "remove the stale socket",
                source,
            })?;
            info!(socket = %path.display(), "removed stale socket left by an earlier run");
            Ok(())
        }
        Err(source) => Err(SocketError::Io {
            path: path.to_owned(),
            op: "probe the existing socket",
            source,
        }),
    }
}

/// The socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A live process accepts on the socket.
    #[error(
        "socket {path} is in use by another process (is kekd already running?); stop it or choose another --socket"
    )]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The path is a symlink.
    #[error("socket path {path} is a symlink; refusing to follow or remove it")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Something other than a socket is in the way.
    #[error(
        "socket path {path} exists and is not a socket; refusing to remove it (choose another --socket)"
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket's existing directory lets someone else replace the socket.
    #[error(
        "socket directory {path} is {reason}: whoever can write it could replace kekd's socket; \
         fix it (`{fix}`) or choose another --socket"
    )]
    UnsafeDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// The command that fixes it.
        fix: String,
    },
    /// Too long for `sun_path`.
    #[error("socket path {path} is {len} bytes; Unix sockets allow at most {MAX_SOCKET_PATH}")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The OS refused an operation.
    #[error("socket {path}: cannot {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
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
