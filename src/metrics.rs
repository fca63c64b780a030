//! Prometheus metrics, served by the ops listener (`/metrics`).
//!
//! Labels are bounded: method and gRPC code names, operation names, key
//! versions and hashed key ids (`sha256:<hex>`, as the apiserver hashes them
//! in its own metrics) — never error strings or raw key ids.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

/// A gRPC method of the KMS service.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Method {
    /// Status.
    Status,
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
}

/// Labels of the RPC metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method.
    pub method: Method,
    /// The gRPC code name (`Ok`, `InvalidArgument`, …).
    pub code: String,
}

/// Labels of per-key counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// `encrypt` or `decrypt`.
    pub op: &'static str,
    /// The key version.
    pub version: u32,
    /// `sha256:<hex>` of the key id.
    pub key_id_hash: String,
}

/// Labels of the reload and self-check counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// A reload's `applied`, `unchanged`, `refused` or `unavailable`; a
    /// self-check's `ok` or `failed`.
    pub result: &'static str,
}

/// Labels of HSM operation latency.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The operation (`encrypt`, `decrypt`, …).
    pub op: &'static str,
}

/// Labels of the build info gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version.
    pub version: &'static str,
    /// The backend kind.
    pub backend: &'static str,
}

/// Labels of the ops listener's shed connections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `cap` (a new connection arrived at the cap) or `fd_exhausted`
    /// (accept failed with EMFILE/ENFILE).
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric kekd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<RpcLabels>,
    key_operations: Family<KeyLabels, Counter>,
    primary_key_age: Gauge<i64, std::sync::atomic::AtomicI64>,
    rotation_due: Gauge,
    reloads: Family<ResultLabels, Counter>,
    last_reload: Gauge,
    reload_refused: Gauge,
    self_check_ok: Gauge,
    self_checks: Family<ResultLabels, Counter>,
    hsm_duration: HistogramFamily<OpLabels>,
    hsm_sessions_open: Gauge,
    hsm_sessions_in_use: Gauge,
    ops_shed: Family<ShedLabels, Counter>,
    ops_accept_errors: Counter,
}

impl Metrics {
    /// A registry with every metric, for a server using `backend`.
    pub fn new(backend: &'static str) -> Self {
        let mut registry = Registry::with_prefix("kekd");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let key_operations = Family::<KeyLabels, Counter>::default();
        let primary_key_age = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        let rotation_due = Gauge::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let last_reload = Gauge::default();
        let reload_refused = Gauge::default();
        let self_check_ok = Gauge::default();
        let self_checks = Family::<ResultLabels, Counter>::default();
        let hsm_duration = HistogramFamily::<OpLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let hsm_sessions_open = Gauge::default();
        let hsm_sessions_in_use = Gauge::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        let ops_shed = Family::<ShedLabels, Counter>::default();
        let ops_accept_errors = Counter::default();

        registry.register(
            "rpc_requests",
            "KMS gRPC calls by method and gRPC code",
            rpc_requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "KMS gRPC call latency by method and gRPC code",
            rpc_duration.clone(),
        );
        registry.register(
            "key_operations",
            "Successful Encrypt and Decrypt calls per key version",
            key_operations.clone(),
        );
        registry.register(
            "primary_key_age_seconds",
            "Seconds since the primary key version was promoted",
            primary_key_age.clone(),
        );
        registry.register(
            "rotation_due",
            "1 when the primary is older than max_key_age: rotate (kekd admin rotate)",
            rotation_due.clone(),
        );
        registry.register(
            "keyring_reloads",
            "Keyring reload attempts by result",
            reloads.clone(),
        );
        registry.register(
            "keyring_last_reload_timestamp_seconds",
            "Unix time of the last applied keyring reload",
            last_reload.clone(),
        );
        registry.register(
            "keyring_reload_refused",
            "1 while the keyring on disk (or in the token) is refused and the last good one is served",
            reload_refused.clone(),
        );
        registry.register(
            "self_check_ok",
            "1 when the latest self-check of every decrypt-capable key passed (Status is healthy)",
            self_check_ok.clone(),
        );
        registry.register(
            "self_checks",
            "Background self-checks of every decrypt-capable key by result (ok, failed)",
            self_checks.clone(),
        );
        registry.register(
            "hsm_operation_duration_seconds",
            "Latency of PKCS#11 token operations",
            hsm_duration.clone(),
        );
        registry.register(
            "hsm_sessions_open",
            "PKCS#11 sessions open (idle or in use)",
            hsm_sessions_open.clone(),
        );
        registry.register(
            "hsm_sessions_in_use",
            "PKCS#11 sessions in use",
            hsm_sessions_in_use.clone(),
        );
        registry.register("build_info", "kekd build information", build_info.clone());
        registry.register(
            "ops_connections_shed",
            "Ops listener connections closed early to stay within its connection and descriptor budget",
            ops_shed.clone(),
        );
        registry.register(
            "ops_accept_errors",
            "Failed accepts on the ops listener (EMFILE and the like)",
            ops_accept_errors.clone(),
        );
        // Known series exist from the start, so rate() sees the first event
        // and dashboards show 0 rather than no data.
        for method in [Method::Status, Method::Encrypt, Method::Decrypt] {
            let labels = RpcLabels {
                method,
                code: "Ok".to_owned(),
            };
            let _ = rpc_requests.get_or_create(&labels);
            let _ = rpc_duration.get_or_create(&labels);
        }
        for result in ["applied", "unchanged", "refused", "unavailable"] {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        for result in ["ok", "failed"] {
            let _ = self_checks.get_or_create(&ResultLabels { result });
        }
        for reason in ["cap", "fd_exhausted"] {
            let _ = ops_shed.get_or_create(&ShedLabels { reason });
        }
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                backend,
            })
            .set(1);
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            key_operations,
            primary_key_age,
            rotation_due,
            reloads,
            last_reload,
            reload_refused,
            self_check_ok,
            self_checks,
            hsm_duration,
            hsm_sessions_open,
            hsm_sessions_in_use,
            ops_shed,
            ops_accept_errors,
        }
    }

    /// Records one RPC.
    pub fn rpc(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        let labels = RpcLabels {
            method,
            code: format!("{code:?}"),
        };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Records a successful Encrypt or Decrypt under `version`.
    pub fn key_operation(&self, op: &'static str, version: u32, key_id: &str) {
        self.key_operations
            .get_or_create(&KeyLabels {
                op,
                version,
                key_id_hash: key_id_hash(key_id),
            })
            .inc();
    }

    /// Records the primary's age and whether rotation is due.
    pub fn key_age(&self, age: Duration, due: bool) {
        self.primary_key_age
            .set(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
        self.rotation_due.set(i64::from(due));
    }

    /// Records a reload attempt (`applied`, `unchanged`, `refused`, or
    /// `unavailable` when the key store could not be read).
    pub fn reload(&self, result: &'static str, unix_now: u64) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if result == "applied" {
            self.last_reload
                .set(i64::try_from(unix_now).unwrap_or(i64::MAX));
        }
    }

    /// Records whether a changed keyring is currently refused.
    pub fn reload_refused(&self, refused: bool) {
        self.reload_refused.set(i64::from(refused));
    }

    /// Records the latest self-check result.
    pub fn self_check(&self, ok: bool) {
        self.self_check_ok.set(i64::from(ok));
    }

    /// Counts one background self-check, once its result is reported.
    pub fn background_self_check(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.self_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Records a PKCS#11 operation's latency.
    pub fn hsm_operation(&self, op: &'static str, elapsed: Duration) {
        self.hsm_duration
            .get_or_create(&OpLabels { op })
            .observe(elapsed.as_secs_f64());
    }

    /// Records the PKCS#11 session pool's state.
    pub fn hsm_sessions(&self, open: usize, in_use: usize) {
        self.hsm_sessions_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        self.hsm_sessions_in_use
            .set(i64::try_from(in_use).unwrap_or(i64::MAX));
    }

    /// Records an ops connection closed early (`cap` or `fd_exhausted`).
    pub fn ops_connection_shed(&self, reason: &'static str) {
        self.ops_shed.get_or_create(&ShedLabels { reason }).inc();
    }

    /// Records a failed accept on the ops listener.
    pub fn ops_accept_error(&self) {
        self.ops_accept_errors.inc();
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `sha256:<hex>` of a key id, as kube-apiserver labels key ids.
pub fn key_id_hash(key_id: &str) -> String {
    // Called on every Encrypt and Decrypt: one allocation, no formatting
    // machinery per byte (that was 3% of the server's CPU under load).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key_id.as_bytes());
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_names_types_and_counts() {
        let m = Metrics::new("local");
        m.rpc(Method::Encrypt, tonic::Code::Ok, Duration::from_micros(120));
        m.rpc(Method::Encrypt, tonic::Code::Ok, Duration::from_micros(80));
        m.key_operation("encrypt", 2, "kekd/x/v2");
        m.reload("refused", 0);
        m.background_self_check(true);
        m.background_self_check(true);
        m.background_self_check(false);
        let text = m.encode();
        assert!(text.contains("# TYPE kekd_rpc_requests counter"), "{text}");
        assert!(
            text.contains("kekd_rpc_requests_total{method=\"Encrypt\",code=\"Ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE kekd_rpc_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "kekd_key_operations_total{op=\"encrypt\",version=\"2\",key_id_hash=\"sha256:"
            ),
            "{text}"
        );
        assert!(!text.contains("kekd/x/v2"), "raw key id leaked: {text}");
        assert!(
            text.contains("kekd_keyring_reloads_total{result=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kekd_keyring_reloads_total{result=\"unavailable\"} 0"),
            "{text}"
        );
        assert!(text.contains("# TYPE kekd_self_checks counter"), "{text}");
        assert!(
            text.contains("kekd_self_checks_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kekd_self_checks_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("kekd_build_info{version=\""), "{text}");
    }

    #[test]
    fn key_id_hash_is_sha256_hex() {
        assert_eq!(
            key_id_hash(""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
