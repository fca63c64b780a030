//! The KMS v2 API contract — everything kube-apiserver sees of kekd over the
//! socket — written once ([`suite`]) and run against every backend.
//!
//! A contract test is a generic `async fn` in `contract/suite.rs` that takes
//! a [`Backend`] fixture: a fresh keyring in a fresh instance of that
//! backend, served by the real `kekd serve` over a real Unix socket. The
//! answers are judged by `common::apiserver` (the apiserver's own rules,
//! written independently of kekd) and by exact refusals. The [`suite!`]
//! macro turns every contract test into one `#[tokio::test]` per backend,
//! named after it: `contract::local::decrypt_refuses_every_truncation`,
//! `contract::pkcs11::decrypt_refuses_every_truncation`. So
//! `cargo test --test integration contract::` runs the contract everywhere,
//! and `contract::pkcs11::` on one backend.
//!
//! What is specific to one backend (token objects, PINs, outages, upgrades;
//! the keyring file) is tested in that backend's own module
//! (`tests/integration/pkcs11.rs`, `rotation.rs`, `faults.rs`, …), not here.
//!
//! # Adding a backend
//!
//! For a backend `transit` (say, OpenBao's Transit engine):
//!
//! 1. Write `contract/transit.rs`: a fixture `Transit` that implements
//!    [`Backend`] — `start` makes a fresh instance (or skips through
//!    `common::skip` when a tool is missing) with one keyring, and serves
//!    it with `kekd serve` plus [`SERVE_SETTINGS`] and a reload poll of
//!    200 ms; `second_keyring` makes another keyring in the same instance;
//!    `admin` runs `kekd admin … --output json` against the keyring; and
//!    `secrets` names what must never be logged (a token, a PIN, KEKs). Its
//!    last line is `suite!(Transit);`, which instantiates every contract
//!    test for it.
//! 2. Add `mod transit;` below, next to `mod local;` and `mod pkcs11;`.
//!
//! Nothing else changes: a contract test that fails on the new backend is a
//! contract the backend breaks. (`contract/local.rs` is the shortest
//! fixture to copy.)
//!
//! # Adding a contract test
//!
//! Write it in `contract/suite.rs` as `pub(super) async fn NAME<B: Backend>(b: B)`
//! ending in `b.finish()`, and add `NAME` to the list in [`suite!`] (the
//! compiler flags a test left out of the list as dead code).

use std::path::Path;

use kekd::client::Client;

use crate::common::{self, Process};

mod suite;

/// One `#[tokio::test]` per contract test, run against the fixture
/// `$fixture` (a [`Backend`]), in the module that invokes it. Each test
/// starts its own fixture; a fixture that cannot start here (SoftHSM2
/// missing, …) has skipped through `common::skip` and the test returns.
macro_rules! suite {
    ($fixture:ty) => {
        suite!(@tests $fixture;
            status_encrypt_decrypt_pass_every_apiserver_check,
            equal_plaintexts_give_distinct_ciphertexts,
            status_and_encrypt_report_the_same_stable_key_id,
            sixty_four_connections_round_trip_at_once,
            burst_of_2000_concurrent_decrypts_on_one_connection,
            empty_plaintext_is_invalid_argument,
            plaintext_limit_is_991_bytes_for_a_1024_byte_ciphertext,
            request_over_the_64_kib_cap_is_out_of_range_and_the_server_survives,
            decrypt_refuses_key_ids_this_keyring_did_not_issue,
            decrypt_refuses_a_key_id_that_disagrees_with_the_header,
            decrypt_refuses_another_keyrings_ciphertext_under_our_key_id,
            decrypt_refuses_every_truncation,
            decrypt_refuses_extended_ciphertexts,
            decrypt_refuses_every_single_bit_flip,
            decrypt_refuses_annotations_kekd_never_issues,
            a_refused_decrypt_does_not_break_the_calls_after_it,
            rotation_is_seen_through_status_encrypt_and_decrypt,
            wire_contract_matches_the_spec,
        );
    };
    (@tests $fixture:ty; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                if let Some(backend) = <$fixture as $crate::contract::Backend>::start().await {
                    $crate::contract::suite::$test(backend).await;
                }
            }
        )+
    };
}

// The backends, one fixture each: what the contract runs against.
mod local;
mod pkcs11;

/// Settings every fixture serves with, besides a reload poll of 200 ms:
/// a self-check every second and its passes logged, so a test can count
/// self-checks in the log instead of waiting on the clock. As
/// `(configuration key, value)`; the flag is `--` + the key with `-` for
/// `_`.
pub(crate) const SERVE_SETTINGS: [(&str, &str); 2] = [
    ("self_check_interval", "1s"),
    ("log_level", "info,kekd::keyring=debug"),
];

/// [`SERVE_SETTINGS`] as `kekd serve` flags.
pub(crate) fn serve_flags() -> Vec<String> {
    SERVE_SETTINGS
        .iter()
        .flat_map(|(key, value)| [format!("--{}", key.replace('_', "-")), (*value).to_owned()])
        .collect()
}

/// [`SERVE_SETTINGS`] as lines of a kekd configuration file.
pub(crate) fn serve_config_lines() -> Vec<String> {
    SERVE_SETTINGS
        .iter()
        .map(|(key, value)| format!("{key} = {value:?}"))
        .collect()
}

/// A `kekd serve` process that answered a healthy Status, and the
/// connection that asked (the one the apiserver would keep).
pub(crate) struct Serving {
    process: Process,
    client: Client,
}

impl Serving {
    /// Waits until `process` answers a healthy Status.
    pub(crate) async fn ready(mut process: Process) -> Self {
        let client = process.ready().await;
        Self { process, client }
    }
}

/// A fixture: one keyring in one instance of a backend, served by
/// `kekd serve` (see the module docs for how to add one).
pub(crate) trait Backend: Sized {
    /// What the backend is, for failure messages ("a PKCS#11 token").
    const NAME: &'static str;

    /// A fresh instance of the backend with a fresh keyring (version 1
    /// primary), served with [`SERVE_SETTINGS`]; `None` once
    /// `common::skip` has skipped the test (what the backend needs is not
    /// installed).
    async fn start() -> Option<Self>;

    /// Another keyring, independent of this one, in the same instance of
    /// the backend (the same token, the same server), served by a kekd of
    /// its own.
    async fn second_keyring(&self) -> Self;

    /// The key_id of version 1, as the tool that made the keyring reported
    /// it (not read through the API).
    fn key_id(&self) -> &str;

    /// The `kekd serve` serving this keyring.
    fn serving(&self) -> &Serving;

    /// [`Backend::serving`], mutably.
    fn serving_mut(&mut self) -> &mut Serving;

    /// `kekd admin ARGS… --output json` on this keyring, which must succeed;
    /// its report.
    async fn admin(&self, args: &[&str]) -> serde_json::Value;

    /// What must never appear in kekd's output: KEKs, a PIN, a token.
    fn secrets(&self) -> Vec<String>;

    /// The socket kekd serves on.
    fn socket(&self) -> &Path {
        &self.serving().process.socket
    }

    /// A client on the connection that found kekd ready: calls on it share
    /// one HTTP/2 connection, as the apiserver's do.
    fn client(&self) -> Client {
        self.serving().client.clone()
    }

    /// A client on a new connection.
    async fn connect(&self) -> Client {
        common::connect(self.socket()).await
    }

    /// Everything kekd logged so far.
    fn log(&self) -> String {
        self.serving().process.stderr()
    }

    /// Self-checks that passed so far (startup, periodic, reloads), counted
    /// in the log.
    fn self_checks_passed(&self) -> usize {
        self.serving()
            .process
            .stderr_count("keyring self-check passed")
    }

    /// Waits until kekd has logged `needle` `count` times.
    async fn wait_for_log(&self, needle: &str, count: usize) {
        self.serving()
            .process
            .wait_for_stderr_count(needle, count)
            .await;
    }

    /// `kekd admin rotate`: a new pending version; returns its key_id as
    /// the command reported it.
    async fn rotate(&self) -> String {
        let report = self.admin(&["rotate"]).await;
        report["transitions"][0]["key_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: rotate reported no key_id: {report}", Self::NAME))
            .to_owned()
    }

    /// `kekd admin promote VERSION`.
    async fn promote(&self, version: u32) {
        self.admin(&["promote", &version.to_string()]).await;
    }

    /// What every contract test ends with: kekd is still serving, never
    /// logged a secret, a failed self-check or a panic. Then stops it.
    fn finish(mut self) {
        let log = self.log();
        if let Some(status) = self.serving_mut().process.try_exit() {
            panic!(
                "{}: kekd exited ({status}) during the test:\n{}",
                Self::NAME,
                common::log_excerpt(&log)
            );
        }
        for secret in self.secrets() {
            assert!(
                !log.contains(&secret),
                "{}: kekd logged a secret:\n{log}",
                Self::NAME
            );
        }
        for bad in ["self-check failed", "panicked"] {
            assert!(
                !log.contains(bad),
                "{}: kekd logged {bad:?}:\n{}",
                Self::NAME,
                common::log_excerpt(&log)
            );
        }
    }
}
