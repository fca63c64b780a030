//! `kekd serve` settings: built once from flags, `KEKD_*` environment
//! variables and an optional TOML file, then passed down as plain data.
//!
//! Precedence: a flag beats its environment variable, which beats the file,
//! which beats the built-in default. The same [`Settings`] struct is the
//! clap argument group and the file's schema, so the three sources cannot
//! drift apart; [`ServeConfig::resolve`] validates the merged result.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backend::{BackendConfig, BackendSettings, SettingsError};
use crate::file::{Links, OpenError, open_regular};
use crate::telemetry::LogFormat;

/// Default permission bits of the socket: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Default cap on one gRPC request (tonic's own default is 4 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Default cap on Encrypt/Decrypt calls running at once (also capped at 8 per
/// CPU, see `server::connection::running_limit`).
pub const DEFAULT_MAX_CONCURRENCY: usize = 1024;
/// Default budget of request bytes one connection's calls may hold at once
/// (see `server::admission` and docs/design.md): room for 64 typical
/// requests or 3 of the largest; raised to hold one `max_request_bytes`
/// message when that is larger.
pub const DEFAULT_MAX_CONNECTION_REQUEST_BYTES: usize = 256 << 10;
/// Default streams one connection may have open (HTTP/2
/// SETTINGS_MAX_CONCURRENT_STREAMS).
/// Whatever their state — waiting for a request, running, or holding a
/// response the client does not read. The apiserver multiplexes its calls
/// on one connection and queues past this (gRPC clients respect the
/// setting); kekd runs at most 8 calls per CPU anyway.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Default time a new connection gets to send the HTTP/2 client preface.
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a call's request message gets to arrive completely.
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default period of HTTP/2 keepalive PINGs on a silent connection.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Default time a peer gets to answer a keepalive PING.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time in-flight calls get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default age past which rotating the primary is due (Kubernetes guidance).
pub const DEFAULT_MAX_KEY_AGE: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default period of the keyring change poll (inotify usually reacts first).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Default period of the background self-check with the pkcs11 backend.
pub const DEFAULT_PKCS11_SELF_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Default period of the background self-check.
pub const DEFAULT_SELF_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// Default period of the usage file's write while its counters change.
pub const DEFAULT_USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Largest configuration file kekd reads (a few dozen settings).
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Default cap on ops listener connections open at once.
pub const DEFAULT_OPS_MAX_CONNECTIONS: usize = 32;
/// The largest cap `--ops-max-connections` accepts: half of the descriptors
/// the KMS socket's connection limit leaves free
/// (`server::connection::RESERVED_FDS`), so the ops
/// listener can never take the descriptors kekd needs for its own files.
pub const MAX_OPS_MAX_CONNECTIONS: usize = 64;
const _: () = assert!(DEFAULT_OPS_MAX_CONNECTIONS <= MAX_OPS_MAX_CONNECTIONS);
/// Default time a client gets to send a request's headers; it also bounds
/// how long a kept-alive connection may sit idle between requests.
pub const DEFAULT_OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest life of one ops connection, however busy.
pub const DEFAULT_OPS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How many connections the ops listener holds and for how long.
///
/// The listener is for a kubelet probe and a Prometheus scrape, never for
/// load: it holds at most `max_connections` (plus, for an instant, the one
/// just accepted), so its descriptors stay well inside the reserve the KMS
/// socket's connection limit keeps free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpsLimits {
    /// Connections held at once; at the cap, a new connection closes the
    /// oldest idle one, or the oldest when none is idle (so a probe always
    /// gets through a flood of idle ones, and one in progress completes).
    pub max_connections: usize,
    /// Time to send a request's headers, and most idle time between
    /// requests on a kept-alive connection.
    pub header_timeout: Duration,
    /// Longest life of one connection.
    pub connection_lifetime: Duration,
}

impl Default for OpsLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_OPS_MAX_CONNECTIONS,
            header_timeout: DEFAULT_OPS_HEADER_TIMEOUT,
            connection_lifetime: DEFAULT_OPS_CONNECTION_LIFETIME,
        }
    }
}

/// Which local users may call: by the caller's uid or gid as the kernel
/// reports them for the socket (`SO_PEERCRED`). Empty lists allow everyone
/// the socket's permissions let in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Allowed uids.
    pub uids: Vec<u32>,
    /// Allowed gids (primary group of the calling process).
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    /// Whether a caller with these credentials may call; `None` when the
    /// kernel gave none (then only an unrestricted policy allows it).
    pub fn allows(&self, cred: Option<(u32, u32)>) -> bool {
        if self.uids.is_empty() && self.gids.is_empty() {
            return true;
        }
        cred.is_some_and(|(uid, gid)| self.uids.contains(&uid) || self.gids.contains(&gid))
    }
}

/// Every `kekd serve` setting, each optional; as flags, env and TOML keys.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Keyring file holding the KEKs (local backend).
    #[arg(long, env = "KEKD_KEYRING", value_name = "PATH")]
    pub keyring: Option<PathBuf>,
    /// Unix socket to serve on (the apiserver's `endpoint: unix://PATH`).
    #[arg(long, env = "KEKD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Socket permission bits, octal [default: 0600]; other-user bits are refused.
    #[arg(long, env = "KEKD_SOCKET_MODE", value_name = "OCTAL")]
    #[serde(default, deserialize_with = "mode_from_toml")]
    pub socket_mode: Option<String>,
    /// Group owning the socket (name in /etc/group or numeric gid); use with mode 0660.
    #[arg(long, env = "KEKD_SOCKET_GROUP", value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Largest accepted gRPC request in bytes [default: 65536].
    #[arg(long, env = "KEKD_MAX_REQUEST_BYTES", value_name = "BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most Encrypt/Decrypt calls running at once, all connections together (more wait; Status never does), capped at 8 per CPU or, when larger, the PKCS#11 pool size; also caps --max-streams-per-connection [default: 1024].
    #[arg(long, env = "KEKD_MAX_CONCURRENCY", value_name = "N")]
    pub max_concurrency: Option<usize>,
    /// Request bytes one connection's calls may hold at once, charged as they arrive; a call past it is refused with RESOURCE_EXHAUSTED [default: 262144].
    #[arg(long, env = "KEKD_MAX_CONNECTION_REQUEST_BYTES", value_name = "BYTES")]
    pub max_connection_request_bytes: Option<usize>,
    /// Streams one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; clients queue past it) [default: 64].
    #[arg(long, env = "KEKD_MAX_STREAMS_PER_CONNECTION", value_name = "N")]
    pub max_streams_per_connection: Option<u32>,
    /// Removed: the process-wide request byte budget let one client starve all others; see --max-connection-request-bytes.
    #[arg(
        long,
        env = "KEKD_MAX_BUFFERED_REQUEST_BYTES",
        value_name = "BYTES",
        hide = true
    )]
    pub max_buffered_request_bytes: Option<usize>,
    /// Time a new connection gets to send the HTTP/2 preface before it is closed [default: 10s].
    #[arg(long, env = "KEKD_PREFACE_TIMEOUT", value_name = "DURATION")]
    pub preface_timeout: Option<String>,
    /// Time a call's request message gets to arrive completely (DEADLINE_EXCEEDED past it) [default: 10s].
    #[arg(long, env = "KEKD_REQUEST_READ_TIMEOUT", value_name = "DURATION")]
    pub request_read_timeout: Option<String>,
    /// A silent connection is sent an HTTP/2 PING this often [default: 60s].
    #[arg(long, env = "KEKD_KEEPALIVE_INTERVAL", value_name = "DURATION")]
    pub keepalive_interval: Option<String>,
    /// ...and closed when the PING is not answered within this time [default: 20s].
    #[arg(long, env = "KEKD_KEEPALIVE_TIMEOUT", value_name = "DURATION")]
    pub keepalive_timeout: Option<String>,
    /// Time in-flight calls get to finish on SIGTERM [default: 10s].
    #[arg(long, env = "KEKD_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Period of the background KEK self-check [default: 60s].
    #[arg(long, env = "KEKD_SELF_CHECK_INTERVAL", value_name = "DURATION")]
    pub self_check_interval: Option<String>,
    /// Period of the keyring change poll, the fallback to inotify [default: 2s].
    #[arg(long, env = "KEKD_RELOAD_INTERVAL", value_name = "DURATION")]
    pub reload_interval: Option<String>,
    /// Period of writing the usage counters beside the keyring while they change (100ms..=1m) [default: 5s].
    #[arg(long, env = "KEKD_USAGE_FLUSH_INTERVAL", value_name = "DURATION")]
    pub usage_flush_interval: Option<String>,
    /// Only callers with this uid may call (repeatable, or comma-separated) [default: anyone the socket lets in].
    #[arg(
        long,
        env = "KEKD_ALLOW_UID",
        value_name = "UID",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub allow_uid: Vec<u32>,
    /// Only callers whose primary gid is this may call (repeatable, or comma-separated).
    #[arg(
        long,
        env = "KEKD_ALLOW_GID",
        value_name = "GID",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub allow_gid: Vec<u32>,
    /// Address of the ops listener (/metrics, /livez, /readyz), e.g. 127.0.0.1:9464 [default: off].
    #[arg(long, env = "KEKD_OPS_ADDR", value_name = "ADDR")]
    pub ops_addr: Option<String>,
    /// Most ops connections held at once (1..=64); a new one closes the oldest [default: 32].
    #[arg(long, env = "KEKD_OPS_MAX_CONNECTIONS", value_name = "N")]
    pub ops_max_connections: Option<usize>,
    /// Time an ops client gets to send its request headers, and most idle time between requests [default: 5s].
    #[arg(long, env = "KEKD_OPS_HEADER_TIMEOUT", value_name = "DURATION")]
    pub ops_header_timeout: Option<String>,
    /// Longest life of one ops connection [default: 60s].
    #[arg(long, env = "KEKD_OPS_CONNECTION_LIFETIME", value_name = "DURATION")]
    pub ops_connection_lifetime: Option<String>,
    /// Age of the primary key past which rotation is due (metric + warning) [default: 90d].
    #[arg(long, env = "KEKD_MAX_KEY_AGE", value_name = "DURATION")]
    pub max_key_age: Option<String>,
    /// `text` or `json` [default: text].
    #[arg(long, env = "KEKD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. `info` or `kekd=debug` [default: info].
    #[arg(long, env = "KEKD_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Where the KEKs live (the `[backend]` table).
    #[command(flatten)]
    #[serde(default)]
    pub backend: BackendSettings,
}

impl Settings {
    /// Reads a TOML settings file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown keys or wrong types.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let file = |reason: String| ConfigError::File {
            path: path.to_owned(),
            reason,
        };
        let (f, _) = open_regular(path, Links::Follow).map_err(|e| match e {
            OpenError::NotRegular { what, .. } => file(format!(
                "it is {what}, not a regular file; nothing was read from it: give --config the TOML file itself"
            )),
            e => file(e.to_string()),
        })?;
        let mut text = String::new();
        f.take(MAX_CONFIG_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| file(e.to_string()))?;
        if text.len() as u64 > MAX_CONFIG_FILE {
            return Err(file(format!(
                "more than {MAX_CONFIG_FILE} bytes: not a kekd configuration"
            )));
        }
        Self::from_toml(&text, path)
    }

    /// Parses the text of a TOML settings file read from `path` (named in
    /// errors only). The parser [`Settings::from_file`] uses; public for
    /// the `config` fuzz target (`fuzz/`).
    ///
    /// # Errors
    /// TOML syntax, unknown keys or wrong types.
    #[doc(hidden)]
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut reason = e.to_string().trim_end().to_owned();
            // `socket_mode = 0660` is how a mode is written everywhere but
            // in TOML, which has no leading-zero integers.
            if reason.contains("leading zero") {
                reason.push_str(
                    "\nhint: write a mode as a string, `socket_mode = \"0660\"` (or as a TOML octal, 0o660)",
                );
            }
            ConfigError::File {
                path: path.to_owned(),
                reason,
            }
        })
    }

    /// Fills each unset field from `fallback`.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            keyring: self.keyring.or(fallback.keyring),
            socket: self.socket.or(fallback.socket),
            socket_mode: self.socket_mode.or(fallback.socket_mode),
            socket_group: self.socket_group.or(fallback.socket_group),
            max_request_bytes: self.max_request_bytes.or(fallback.max_request_bytes),
            max_concurrency: self.max_concurrency.or(fallback.max_concurrency),
            max_connection_request_bytes: self
                .max_connection_request_bytes
                .or(fallback.max_connection_request_bytes),
            max_streams_per_connection: self
                .max_streams_per_connection
                .or(fallback.max_streams_per_connection),
            max_buffered_request_bytes: self
                .max_buffered_request_bytes
                .or(fallback.max_buffered_request_bytes),
            preface_timeout: self.preface_timeout.or(fallback.preface_timeout),
            request_read_timeout: self.request_read_timeout.or(fallback.request_read_timeout),
            keepalive_interval: self.keepalive_interval.or(fallback.keepalive_interval),
            keepalive_timeout: self.keepalive_timeout.or(fallback.keepalive_timeout),
            shutdown_grace: self.shutdown_grace.or(fallback.shutdown_grace),
            self_check_interval: self.self_check_interval.or(fallback.self_check_interval),
            reload_interval: self.reload_interval.or(fallback.reload_interval),
            usage_flush_interval: self.usage_flush_interval.or(fallback.usage_flush_interval),
            ops_addr: self.ops_addr.or(fallback.ops_addr),
            ops_max_connections: self.ops_max_connections.or(fallback.ops_max_connections),
            ops_header_timeout: self.ops_header_timeout.or(fallback.ops_header_timeout),
            ops_connection_lifetime: self
                .ops_connection_lifetime
                .or(fallback.ops_connection_lifetime),
            allow_uid: if self.allow_uid.is_empty() {
                fallback.allow_uid
            } else {
                self.allow_uid
            },
            allow_gid: if self.allow_gid.is_empty() {
                fallback.allow_gid
            } else {
                self.allow_gid
            },
            max_key_age: self.max_key_age.or(fallback.max_key_age),
            log_format: self.log_format.or(fallback.log_format),
            log_level: self.log_level.or(fallback.log_level),
            backend: self.backend.or(fallback.backend),
        }
    }
}

/// Validated settings of `kekd serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where the KEKs live.
    pub backend: BackendConfig,
    /// The socket.
    pub socket: SocketConfig,
    /// Largest accepted request.
    pub max_request_bytes: usize,
    /// Most calls in flight.
    pub max_concurrency: usize,
    /// Connection-level defences (`server::connection`).
    pub limits: Limits,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// Background self-check period.
    pub self_check_interval: Duration,
    /// Keyring change poll period.
    pub reload_interval: Duration,
    /// How often changed usage counters are written.
    pub usage_flush_interval: Duration,
    /// The ops listener's address, if any.
    pub ops_addr: Option<std::net::SocketAddr>,
    /// The ops listener's connection cap and timeouts.
    pub ops_limits: OpsLimits,
    /// Which callers may call.
    pub peers: PeerPolicy,
    /// Primary age past which rotation is due.
    pub max_key_age: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter directive.
    pub log_level: String,
}

/// Connection-level limits and timers (`server::connection`,
/// docs/design.md "Connection defences").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request bytes one connection's calls may hold at once.
    pub max_connection_request_bytes: usize,
    /// Streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Time a new connection gets to send the HTTP/2 client preface.
    pub preface_timeout: Duration,
    /// Time a call's request message gets to arrive completely.
    pub request_read_timeout: Duration,
    /// Period of HTTP/2 keepalive PINGs on a silent connection.
    pub keepalive_interval: Duration,
    /// Time a peer gets to answer a keepalive PING.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connection_request_bytes: DEFAULT_MAX_CONNECTION_REQUEST_BYTES,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            preface_timeout: DEFAULT_PREFACE_TIMEOUT,
            request_read_timeout: DEFAULT_REQUEST_READ_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

impl Limits {
    fn resolve(s: &Settings, max_request_bytes: usize) -> Result<Self, ConfigError> {
        if s.max_buffered_request_bytes.is_some() {
            return Err(ConfigError::Invalid {
                what: "max_buffered_request_bytes",
                reason: "it is gone: a budget shared by all connections let one client starve \
                         every other; use max_connection_request_bytes (per connection; \
                         docs/design.md \"Connection defences\") instead"
                    .to_owned(),
            });
        }
        // One whole message of the largest size, with its gRPC prefix.
        let smallest = max_request_bytes + 5;
        let max_connection_request_bytes = s
            .max_connection_request_bytes
            .unwrap_or(DEFAULT_MAX_CONNECTION_REQUEST_BYTES.max(smallest));
        if !(smallest..=64 << 20).contains(&max_connection_request_bytes) {
            return Err(ConfigError::Invalid {
                what: "max_connection_request_bytes",
                reason: format!(
                    "{max_connection_request_bytes} is outside {smallest}..=67108864 \
                     (at least max_request_bytes + 5: one whole message)"
                ),
            });
        }
        let max_streams_per_connection = s
            .max_streams_per_connection
            .unwrap_or(DEFAULT_MAX_STREAMS_PER_CONNECTION);
        if !(1..=1024).contains(&max_streams_per_connection) {
            return Err(ConfigError::Invalid {
                what: "max_streams_per_connection",
                reason: format!("{max_streams_per_connection} is outside 1..=1024"),
            });
        }
        let timer = |what: &'static str, value: Option<&str>, default: Duration| {
            let d = parse_duration(what, value, default)?;
            if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&d) {
                return Err(ConfigError::Invalid {
                    what,
                    reason: "must be between 10ms and 1h".to_owned(),
                });
            }
            Ok(d)
        };
        Ok(Self {
            max_connection_request_bytes,
            max_streams_per_connection,
            preface_timeout: timer(
                "preface_timeout",
                s.preface_timeout.as_deref(),
                DEFAULT_PREFACE_TIMEOUT,
            )?,
            request_read_timeout: timer(
                "request_read_timeout",
                s.request_read_timeout.as_deref(),
                DEFAULT_REQUEST_READ_TIMEOUT,
            )?,
            keepalive_interval: timer(
                "keepalive_interval",
                s.keepalive_interval.as_deref(),
                DEFAULT_KEEPALIVE_INTERVAL,
            )?,
            keepalive_timeout: timer(
                "keepalive_timeout",
                s.keepalive_timeout.as_deref(),
                DEFAULT_KEEPALIVE_TIMEOUT,
            )?,
        })
    }
}

/// Where and how the socket is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    /// Its path.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// Its group, if not the process's.
    pub group: Option<u32>,
}

impl ServeConfig {
    /// Validates merged settings.
    ///
    /// # Errors
    /// The first missing or invalid setting, with the flag that fixes it.
    pub fn resolve(s: Settings) -> Result<Self, ConfigError> {
        let ops_limits = resolve_ops_limits(&s)?;
        let limits = Limits::resolve(&s, s.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES))?;
        let backend = BackendConfig::resolve(s.keyring, s.backend)?;
        let path = s.socket.ok_or(ConfigError::Missing {
            what: "socket",
            how: "--socket PATH, KEKD_SOCKET or `socket = \"PATH\"` in --config (or try --dev)",
        })?;
        let mode = match s.socket_mode {
            Some(m) => parse_mode(&m)?,
            None => DEFAULT_SOCKET_MODE,
        };
        let group = s.socket_group.as_deref().map(resolve_group).transpose()?;
        let max_request_bytes = s.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if !(1024..=4 << 20).contains(&max_request_bytes) {
            return Err(ConfigError::Invalid {
                what: "max_request_bytes",
                reason: format!("{max_request_bytes} is outside 1024..=4194304"),
            });
        }
        let max_concurrency = s.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
        if !(1..=65536).contains(&max_concurrency) {
            return Err(ConfigError::Invalid {
                what: "max_concurrency",
                reason: format!("{max_concurrency} is outside 1..=65536"),
            });
        }
        let shutdown_grace = parse_duration(
            "shutdown_grace",
            s.shutdown_grace.as_deref(),
            DEFAULT_SHUTDOWN_GRACE,
        )?;
        // An HSM can vanish; a keyring file in memory cannot: probe the
        // token more often so Status reflects an outage quickly.
        let default_check = match backend {
            BackendConfig::Pkcs11(_) => DEFAULT_PKCS11_SELF_CHECK_INTERVAL,
            BackendConfig::Local { .. } => DEFAULT_SELF_CHECK_INTERVAL,
        };
        let self_check_interval = parse_duration(
            "self_check_interval",
            s.self_check_interval.as_deref(),
            default_check,
        )?;
        if self_check_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                what: "self_check_interval",
                reason: "must be at least 1s".to_owned(),
            });
        }
        let reload_interval = parse_duration(
            "reload_interval",
            s.reload_interval.as_deref(),
            DEFAULT_RELOAD_INTERVAL,
        )?;
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&reload_interval) {
            return Err(ConfigError::Invalid {
                what: "reload_interval",
                reason: "must be between 100ms and 1h".to_owned(),
            });
        }
        let usage_flush_interval = parse_duration(
            "usage_flush_interval",
            s.usage_flush_interval.as_deref(),
            DEFAULT_USAGE_FLUSH_INTERVAL,
        )?;
        // The usage file feeds `kekd admin list` and the retire guard (the
        // last Decrypt of each version): a longer period leaves them further
        // behind, and a crash loses up to one period of counts.
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&usage_flush_interval) {
            return Err(ConfigError::Invalid {
                what: "usage_flush_interval",
                reason: "must be between 100ms and 1m".to_owned(),
            });
        }
        let ops_addr = s
            .ops_addr
            .as_deref()
            .map(|a| {
                a.parse().map_err(|_| ConfigError::Invalid {
                    what: "ops_addr",
                    reason: format!("{a:?} is not an address like 127.0.0.1:9464"),
                })
            })
            .transpose()?;
        let max_key_age =
            parse_duration("max_key_age", s.max_key_age.as_deref(), DEFAULT_MAX_KEY_AGE)?;
        let log_format = match s.log_format {
            Some(f) => f.parse().map_err(|reason| ConfigError::Invalid {
                what: "log_format",
                reason,
            })?,
            None => LogFormat::Text,
        };
        Ok(Self {
            backend,
            socket: SocketConfig { path, mode, group },
            max_request_bytes,
            max_concurrency,
            limits,
            shutdown_grace,
            self_check_interval,
            reload_interval,
            usage_flush_interval,
            ops_addr,
            ops_limits,
            peers: PeerPolicy {
                uids: s.allow_uid,
                gids: s.allow_gid,
            },
            max_key_age,
            log_format,
            log_level: s.log_level.unwrap_or_else(|| "info".to_owned()),
        })
    }
}

fn resolve_ops_limits(s: &Settings) -> Result<OpsLimits, ConfigError> {
    let max_connections = s.ops_max_connections.unwrap_or(DEFAULT_OPS_MAX_CONNECTIONS);
    if !(1..=MAX_OPS_MAX_CONNECTIONS).contains(&max_connections) {
        return Err(ConfigError::Invalid {
            what: "ops_max_connections",
            reason: format!(
                "{max_connections} is outside 1..={} (the ops listener must stay inside the descriptors kept free for kekd itself)",
                MAX_OPS_MAX_CONNECTIONS
            ),
        });
    }
    let header_timeout = parse_duration(
        "ops_header_timeout",
        s.ops_header_timeout.as_deref(),
        DEFAULT_OPS_HEADER_TIMEOUT,
    )?;
    let connection_lifetime = parse_duration(
        "ops_connection_lifetime",
        s.ops_connection_lifetime.as_deref(),
        DEFAULT_OPS_CONNECTION_LIFETIME,
    )?;
    let range = Duration::from_millis(10)..=Duration::from_secs(3600);
    for (what, d) in [
        ("ops_header_timeout", header_timeout),
        ("ops_connection_lifetime", connection_lifetime),
    ] {
        if !range.contains(&d) {
            return Err(ConfigError::Invalid {
                what,
                reason: "must be between 10ms and 1h".to_owned(),
            });
        }
    }
    Ok(OpsLimits {
        max_connections,
        header_timeout,
        connection_lifetime,
    })
}

/// `socket_mode` in TOML: a string (`"0660"`) or an integer, which TOML
/// can write in octal (`0o660`); the integer's value is the mode bits.
fn mode_from_toml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Text(String),
        Bits(u32),
    }
    Ok(Option::<Mode>::deserialize(d)?.map(|m| match m {
        Mode::Text(t) => t,
        Mode::Bits(b) => format!("0o{b:o}"),
    }))
}

fn parse_mode(s: &str) -> Result<u32, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        what: "socket_mode",
        reason: format!("{s:?} {reason}"),
    };
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|c| (b'0'..=b'7').contains(&c))
    {
        return Err(invalid("is not an octal mode like 0600 or 0660"));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| invalid("is not an octal mode"))?;
    if mode & !0o777 != 0 {
        return Err(invalid(
            "sets setuid/setgid/sticky bits, which a socket must not have",
        ));
    }
    if mode & 0o007 != 0 {
        return Err(invalid(
            "lets every local user unwrap the cluster's keys; use 0660 with --socket-group instead",
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(invalid("must give the owner read and write (0600 or 0660)"));
    }
    Ok(mode)
}

fn resolve_group(name: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let groups = fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| ConfigError::Invalid {
            what: "socket_group",
            reason: format!("no group named {name:?} in /etc/group (give a numeric gid instead)"),
        })
}

fn parse_duration(
    what: &'static str,
    s: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    s.map_or(Ok(default), |s| {
        humantime::parse_duration(s).map_err(|e| ConfigError::Invalid {
            what,
            reason: format!("{s:?} is not a duration like 10s or 1m30s ({e})"),
        })
    })
}

/// A setting is missing or invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting was not given.
    #[error("no {what} given: set {how}")]
    Missing {
        /// The setting.
        what: &'static str,
        /// Ways to give it.
        how: &'static str,
    },
    /// A setting has a bad value.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The setting.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A backend setting is missing or wrong.
    #[error(transparent)]
    Backend(#[from] SettingsError),
    /// The config file cannot be used.
    #[error("config file {path}: {reason}")]
    File {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    #[test]
    fn socket_mode_in_toml_takes_a_string_or_an_octal_integer_and_hints_at_a_leading_zero() {
        use std::path::Path;
        let path = Path::new("/etc/kekd/kekd.toml");
        let mode = |text: &str| {
            super::Settings::from_toml(text, path)
                .map(|s| s.socket_mode.map(|m| super::parse_mode(&m)))
        };
        assert_eq!(
            mode("socket_mode = \"0660\"\n").unwrap().unwrap().unwrap(),
            0o660
        );
        assert_eq!(
            mode("socket_mode = 0o660\n").unwrap().unwrap().unwrap(),
            0o660
        );
        // Decimal 660 is not 0660: its bits include the sticky bit, refused.
        assert!(mode("socket_mode = 660\n").unwrap().unwrap().is_err());
        let e = mode("socket_mode = 0660\n").unwrap_err().to_string();
        assert!(e.contains("leading zero"), "{e}");
        assert!(
            e.contains("hint: write a mode as a string, `socket_mode = \"0660\"` (or as a TOML octal, 0o660)"),
            "{e}"
        );
    }

    use super::*;

    fn minimal() -> Settings {
        Settings {
            keyring: Some("/k".into()),
            socket: Some("/s".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let c = ServeConfig::resolve(minimal()).unwrap();
        assert_eq!(c.socket.mode, 0o600);
        assert_eq!(c.socket.group, None);
        assert_eq!(c.max_request_bytes, 65536);
        assert_eq!(c.max_concurrency, 1024);
        assert_eq!(c.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.usage_flush_interval, Duration::from_secs(5));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_connection_request_bytes, 256 << 10);
        assert_eq!(c.limits.max_streams_per_connection, 64);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn connection_limits_are_validated() {
        let s = Settings {
            max_connection_request_bytes: Some(65536),
            ..minimal()
        };
        assert_eq!(
            ServeConfig::resolve(s).unwrap_err().to_string(),
            "invalid max_connection_request_bytes: 65536 is outside 65541..=67108864 \
             (at least max_request_bytes + 5: one whole message)"
        );
        let s = Settings {
            max_streams_per_connection: Some(0),
            ..minimal()
        };
        assert_eq!(
            ServeConfig::resolve(s).unwrap_err().to_string(),
            "invalid max_streams_per_connection: 0 is outside 1..=1024"
        );
        // The old process-wide budget names its replacement.
        let s = Settings {
            max_buffered_request_bytes: Some(16 << 20),
            ..minimal()
        };
        let err = ServeConfig::resolve(s).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid max_buffered_request_bytes: it is gone")
                && err.contains("use max_connection_request_bytes (per connection"),
            "{err}"
        );
        // A larger max_request_bytes raises the default to one whole message.
        let s = Settings {
            max_request_bytes: Some(1 << 20),
            ..minimal()
        };
        assert_eq!(
            ServeConfig::resolve(s)
                .unwrap()
                .limits
                .max_connection_request_bytes,
            (1 << 20) + 5
        );
        let s = Settings {
            preface_timeout: Some("1ms".into()),
            ..minimal()
        };
        assert_eq!(
            ServeConfig::resolve(s).unwrap_err().to_string(),
            "invalid preface_timeout: must be between 10ms and 1h"
        );
        let s = Settings {
            request_read_timeout: Some("250ms".into()),
            keepalive_interval: Some("2s".into()),
            keepalive_timeout: Some("1s".into()),
            preface_timeout: Some("300ms".into()),
            max_connection_request_bytes: Some(1 << 20),
            max_streams_per_connection: Some(8),
            ..minimal()
        };
        let limits = ServeConfig::resolve(s).unwrap().limits;
        assert_eq!(
            limits,
            Limits {
                max_connection_request_bytes: 1 << 20,
                max_streams_per_connection: 8,
                preface_timeout: Duration::from_millis(300),
                request_read_timeout: Duration::from_millis(250),
                keepalive_interval: Duration::from_secs(2),
                keepalive_timeout: Duration::from_secs(1),
            }
        );
    }

    #[test]
    fn usage_flush_interval_is_a_duration_from_100ms_to_1m() {
        let resolve = |d: &str| {
            ServeConfig::resolve(Settings {
                usage_flush_interval: Some(d.to_owned()),
                ..minimal()
            })
            .map(|c| c.usage_flush_interval)
            .map_err(|e| e.to_string())
        };
        assert_eq!(resolve("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(resolve("1m"), Ok(Duration::from_secs(60)));
        for bad in ["99ms", "0s", "61s", "1h"] {
            assert_eq!(
                resolve(bad),
                Err("invalid usage_flush_interval: must be between 100ms and 1m".to_owned()),
                "{bad}"
            );
        }
        assert_eq!(
            resolve("often"),
            Err(
                "invalid usage_flush_interval: \"often\" is not a duration like 10s or 1m30s \
                 (expected number at 0)"
                    .to_owned()
            )
        );
        // From the file, under the flag.
        let file: Settings = toml::from_str("usage_flush_interval = \"30s\"\n").unwrap();
        let flag = Settings {
            usage_flush_interval: Some("2s".into()),
            ..minimal()
        };
        let c = ServeConfig::resolve(flag.or(file.clone())).unwrap();
        assert_eq!(c.usage_flush_interval, Duration::from_secs(2));
        let c = ServeConfig::resolve(minimal().or(file)).unwrap();
        assert_eq!(c.usage_flush_interval, Duration::from_secs(30));
    }

    #[test]
    fn flags_beat_file() {
        let file: Settings = toml::from_str(
            "keyring = \"/file/k\"\nsocket = \"/file/s\"\nsocket_mode = \"0660\"\nsocket_group = \"0\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        let flags = Settings {
            keyring: Some("/flag/k".into()),
            ..Settings::default()
        };
        let c = ServeConfig::resolve(flags.or(file)).unwrap();
        assert!(
            matches!(c.backend, BackendConfig::Local { keyring } if keyring == Path::new("/flag/k"))
        );
        assert_eq!(c.socket.path, PathBuf::from("/file/s"));
        assert_eq!(c.socket.mode, 0o660);
        assert_eq!(c.socket.group, Some(0));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn unknown_file_key_is_refused() {
        let err = toml::from_str::<Settings>("keyrng = \"/k\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `keyrng`"), "{err}");
    }

    #[test]
    fn missing_keyring_names_the_fix() {
        let err = ServeConfig::resolve(Settings {
            socket: Some("/s".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no keyring given: set --keyring PATH, KEKD_KEYRING or `keyring = \"PATH\"` in --config (or try --dev)"
        );
    }

    #[test]
    fn socket_modes() {
        for (mode, ok) in [
            ("0600", Some(0o600)),
            ("660", Some(0o660)),
            ("0o640", Some(0o640)),
            ("0666", None),
            ("0601", None),
            ("4600", None),
            ("0400", None),
            ("rw", None),
            ("", None),
        ] {
            let s = Settings {
                socket_mode: Some(mode.into()),
                ..minimal()
            };
            assert_eq!(
                ServeConfig::resolve(s).ok().map(|c| c.socket.mode),
                ok,
                "mode {mode:?}"
            );
        }
        let err = parse_mode("0666").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid socket_mode: \"0666\" lets every local user unwrap the cluster's keys; use 0660 with --socket-group instead"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let s = Settings {
            shutdown_grace: Some("soon".into()),
            ..minimal()
        };
        let err = ServeConfig::resolve(s).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid shutdown_grace: \"soon\" is not a duration"),
            "{err}"
        );
        let s = Settings {
            max_request_bytes: Some(10),
            ..minimal()
        };
        assert_eq!(
            ServeConfig::resolve(s).unwrap_err().to_string(),
            "invalid max_request_bytes: 10 is outside 1024..=4194304"
        );
        let s = Settings {
            socket_group: Some("no-such-group-kekd".into()),
            ..minimal()
        };
        assert_eq!(
            ServeConfig::resolve(s).unwrap_err().to_string(),
            "invalid socket_group: no group named \"no-such-group-kekd\" in /etc/group (give a numeric gid instead)"
        );
    }
}
