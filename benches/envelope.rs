//! Micro-benchmarks of kekd's hot path, through the crate's public API:
//! sealing and opening a 32-byte seed (what the apiserver sends) with the
//! local backend, parsing and encoding the envelope, and finding a key by
//! its key id in keyrings of 1, 16 and 256 versions.
//!
//! `cargo bench --bench envelope` (benches/run.sh runs it in its full mode);
//! `cargo bench --bench envelope -- --test` runs each once, as a smoke test.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kekd::backend::KeyHandle;
use kekd::backend::local::LocalKey;
use kekd::envelope::Envelope;
use kekd::id::{KeyId, KeyVersion, KeyringId, Timestamp};
use kekd::keyring::{KeyState, Keyring, VersionInfo};
use kekd::secret::{Kek, Plaintext};

/// A keyring of `n` versions: version 1 primary, the others pending (as
/// after `kekd admin rotate` without `--promote`), every one able to decrypt.
fn keyring(n: u32) -> Keyring {
    let id = KeyringId::generate().unwrap();
    let versions = (1..=n)
        .map(|v| {
            let state = if v == 1 {
                KeyState::Primary
            } else {
                KeyState::Pending
            };
            let info =
                VersionInfo::new(KeyVersion::new(v).unwrap(), state, Timestamp::from_unix(0));
            let key: Box<dyn KeyHandle> = Box::new(LocalKey::new(&Kek::generate().unwrap()));
            (info, Some(key))
        })
        .collect();
    Keyring::new(id, versions).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn seal_open(c: &mut Criterion) {
    let rt = runtime();
    let ring = keyring(1);
    let seed = [7u8; 32];
    let (key_id, ciphertext) = rt
        .block_on(ring.encrypt(&Plaintext::new(seed.to_vec())))
        .unwrap();

    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal 32-byte seed (Keyring::encrypt)", |b| {
        b.to_async(&rt).iter(|| async {
            let plaintext = Plaintext::new(black_box(seed).to_vec());
            black_box(ring.encrypt(&plaintext).await.unwrap())
        });
    });
    g.bench_function("open 65-byte ciphertext (Keyring::decrypt)", |b| {
        b.to_async(&rt).iter(|| async {
            let (_, plaintext) = ring
                .decrypt(black_box(key_id.as_str()), black_box(&ciphertext))
                .await
                .unwrap();
            black_box(plaintext)
        });
    });
    g.bench_function("parse envelope", |b| {
        b.iter(|| black_box(Envelope::parse(black_box(&ciphertext)).unwrap()));
    });
    let parsed = Envelope::parse(&ciphertext).unwrap();
    g.bench_function("encode envelope", |b| {
        b.iter(|| {
            black_box(Envelope::encode(
                black_box(parsed.version),
                black_box(parsed.nonce),
                black_box(parsed.sealed),
            ))
        });
    });
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("key lookup");
    g.throughput(Throughput::Elements(1));
    for n in [1u32, 16, 256] {
        let ring = keyring(n);
        let (key_id, ciphertext) = rt
            .block_on(ring.encrypt(&Plaintext::new(vec![1; 32])))
            .unwrap();
        g.bench_with_input(BenchmarkId::new("KeyId::parse", n), &key_id, |b, id| {
            b.iter(|| black_box(KeyId::parse(black_box(id.as_str())).unwrap()));
        });
        // Decrypt by key id among n versions: lookup, then AES-GCM open.
        g.bench_with_input(
            BenchmarkId::new("Keyring::decrypt by key id", n),
            &key_id,
            |b, id| {
                b.to_async(&rt).iter(|| async {
                    black_box(
                        ring.decrypt(black_box(id.as_str()), &ciphertext)
                            .await
                            .unwrap(),
                    )
                });
            },
        );
        // A key id naming a version this keyring lacks: parse, compare the
        // keyring id, find nothing — the whole lookup, no AES.
        let missing = KeyId::new(ring.id(), KeyVersion::new(n + 1).unwrap());
        let mut foreign = ciphertext.clone();
        foreign[1..5].copy_from_slice(&(n + 1).to_be_bytes());
        g.bench_with_input(
            BenchmarkId::new("lookup of a missing version (Keyring::decrypt error)", n),
            &missing,
            |b, id| {
                b.to_async(&rt).iter(|| async {
                    black_box(
                        ring.decrypt(black_box(id.as_str()), &foreign)
                            .await
                            .unwrap_err(),
                    )
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, seal_open, lookup);
criterion_main!(benches);
