//! kekd's integration tests, one binary organised by subject: each module
//! drives the real `kekd` binary or the real server over real Unix sockets,
//! real SoftHSM2 tokens and a real etcd.
//!
//! `cargo test --locked` runs them all; `cargo test --locked --test
//! integration SUBJECT::` runs one subject (e.g. `contract::`, `pkcs11::`).
//! The KMS API contract is written once and runs against every backend
//! ([`contract`]: `contract::local::…`, `contract::pkcs11::…`).
//! What a test needs and does not find fails it under `KEKD_REQUIRE_ALL=1`
//! (CI), and is skipped loudly otherwise ([`common::skip`]).
//!
//! The soak (`tests/soak.rs`) is the one other test binary: it runs only
//! when asked for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod softhsm;

/// The `kekd admin` keyring commands through the binary.
mod admin_cli;
/// `kekd admin backup` and `restore-backup`.
mod backup;
/// `admin init`, `admin probe` and `serve` with its configuration.
mod cli;
/// Real third-party clients: grpcurl and Python grpcio.
mod clients;
/// Wall-clock jumps under libfaketime.
mod clock;
/// The KMS v2 API over a real Unix socket, judged by the apiserver's rules:
/// one suite, run against every backend.
mod contract;
/// The files in `deploy/`, as an operator uses them.
mod deploy;
/// Filesystem faults, crashes and corrupt files.
mod faults;
/// Golden ciphertexts of every earlier release.
mod golden;
/// Hostile clients against a real `kekd serve`.
mod hostile;
/// The crate's module graph runs one way.
mod module_graph;
/// Two control-plane nodes sharing a keyring.
mod multinode;
/// The ops listener, doctor, probe, logs and metrics.
mod ops;
/// `--allow-uid` / `--allow-gid`: callers the kernel reports.
mod peers;
/// The PKCS#11 backend on real SoftHSM2 tokens.
mod pkcs11;
/// Every fenced block of README.md runs.
mod readme;
/// Rotation while serving.
mod rotation;
/// `kekd admin scan` and `retire --scan` against a real etcd.
mod scan;
/// `kekd admin scan` against a hostile or broken etcd endpoint.
mod scan_hostile;
/// No KEK, PIN or plaintext in logs, errors, memory or files.
mod secrets;
/// The socket's life: permissions, stale and live sockets.
mod socket;
/// Project Wycheproof's AES-GCM vectors.
mod wycheproof;
