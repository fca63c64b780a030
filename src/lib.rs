//! kekd — a Kubernetes KMS v2 plugin.
//!
//! kube-apiserver encrypts resources at rest with data keys derived from a
//! random 32-byte seed, and asks a KMS plugin, over gRPC on a Unix socket, to
//! wrap that seed under a key-encryption key (KEK). kekd is that plugin.
//!
//! # The path of one request
//!
//! 1. [`server`] owns the Unix socket: it creates it under a umask, refuses
//!    symlinks, regular files and live listeners, removes a verified-stale
//!    socket, accepts connections with backoff, bounds connections, silent
//!    peers, request size and running calls (`server/connection.rs`), and
//!    drains calls on shutdown. Refused peers are answered at accept by a
//!    minimal connection that reads nothing (`server/refuse.rs`); request
//!    bytes are charged to their connection in `server/admission.rs`.
//!    `server/connection.rs` also pauses accepting while evicted sockets are
//!    still closing and warns once per connection about a malformed-header
//!    reset (a client without the authority option). The server serves gRPC
//!    reflection beside the KMS service, under the same limits.
//! 2. [`service`] implements `v2.KeyManagementService`: it turns the protobuf
//!    request into domain types, calls the current [`keyring::Keyring`]
//!    snapshot, and maps every error to a gRPC status in one place.
//! 3. [`keyring`] holds KEK versions, their states and the primary, derives
//!    the public key id ([`id`]), and seals or opens an [`envelope`] (our
//!    versioned, authenticated ciphertext format) with the version's
//!    [`kek::KeyHandle`].
//! 4. [`backend`] is where KEKs live, behind the traits in [`backend`] and
//!    [`kek`] and the backend-neutral [`kek::ErrorKind`]; [`backend::open`]
//!    is the one constructor. [`backend::local`] reads KEKs from a keyring
//!    file ([`keyring::store`]: strict parser; writes through [`file`]);
//!    [`backend::pkcs11`] keeps them in an HSM token, with the keyring's
//!    metadata in the token too, reached through a bounded session pool.
//!    docs/design.md §6a says what a new backend implements;
//!    `tests/integration/module_graph.rs` keeps the module graph one way.
//!
//! What is served lives in [`state`]: the current snapshot behind an atomic
//! pointer, its health, and [`usage`] counters per key version. [`reload`]
//! watches the keyring and swaps in a changed one only after it validates
//! and self-checks; the admin commands change the keyring through
//! [`keyring::lifecycle`] under [`keyring::lock`] and record each change in
//! [`audit`].
//! [`keyring`] also checks who may change the keyring's file and directories
//! (`keyring/access.rs`, OpenSSH StrictModes, every link of a chain), opens
//! [`file`] opens only regular files and writes atomically and durably;
//! [`backend::served`] remembers the keyring each node served. The PKCS#11 backend checks every token
//! object it trusts and authenticates its metadata (`backend/pkcs11/objects.rs`;
//! `backend/pkcs11/upgrade.rs` adopts older tokens).
//! [`backup`] seals a local keyring under a passphrase (argon2id,
//! AES-256-GCM) and decides when a restore may replace a keyring.
//! [`scan`] reads what the apiserver stored in etcd, page by page, and
//! counts which provider and which of our key versions each object needs,
//! so `kekd admin retire --scan` can refuse a version still in use.
//!
//! Operators see it through [`ops`] (the `/metrics`, `/livez`, `/readyz`
//! listener) with [`metrics`], and through the audit log. [`hardening`] turns
//! off core dumps before any key is read.
//!
//! Exit codes and their mapping from error kinds are in [`exit`].
//!
//! Around it: [`config`] (flags, `KEKD_*` environment, TOML file), [`cli`]
//! (the `kekd serve` and `kekd admin …` commands; `cli/admin/encryption_config`
//! reads kube-apiserver's EncryptionConfiguration and, in `endpoint.rs`,
//! parses a kms `endpoint` exactly as the apiserver does), [`client`] (a UDS client
//! for `kekd admin probe` and tests), [`secret`] (zeroizing, redacted types
//! for KEKs and plaintexts; KEKs and the PIN in locked pages left out of core
//! dumps) and [`telemetry`] (the one place logging is set up).
//!
//! `docs/design.md` describes the formats; `docs/security.md` the threat
//! model and the test behind each security claim.

pub mod audit;
pub mod backend;
pub mod backup;
pub mod cli;
pub mod client;
pub mod config;
pub mod envelope;
pub mod exit;
pub mod file;
pub mod hardening;
pub mod id;
pub mod kek;
pub mod keyring;
pub mod metrics;
pub mod ops;
pub mod reload;
pub mod scan;
pub mod secret;
pub mod server;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod usage;

/// Code generated from `proto/v2/kms.proto`. Private: domain types cross
/// module borders, protobuf structs stay at the edges (`service`, `client`).
mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("v2");
}
