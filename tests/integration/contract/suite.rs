//! The contract tests, each generic over the [`Backend`] it runs against
//! (instantiated per backend by `suite!`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

use super::Backend;
use crate::common::apiserver::{check_decrypt, check_encrypt, check_status};
use crate::common::{
    self, NOT_OURS, OPAQUE, assert_refused, header_version, keyring_id_of, no_annotations, seed,
    uid, version_of, wire,
};

/// Hang guard of the waits on kekd's own events (a reload, a self-check):
/// never a bound the test asserts, only how long a stuck test takes to fail.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// What every Encrypt of a 32-byte seed returns: format (1), key version
/// (4), nonce (12), sealed seed (32), tag (16).
const SEED_CIPHERTEXT_LEN: usize = 1 + 4 + 12 + 32 + 16;

/// The refusal of a plaintext too large for the apiserver's ciphertext cap.
fn too_large(len: usize) -> String {
    format!("plaintext is {len} bytes; at most 991 fit the apiserver's 1024-byte ciphertext limit")
}

/// The key_id of `version` in the keyring whose version 1 is `v1`.
fn key_id_of_version(v1: &str, version: u32) -> String {
    format!("kekd/{}/v{version}", keyring_id_of(v1))
}

pub(super) async fn status_encrypt_decrypt_pass_every_apiserver_check<B: Backend>(b: B) {
    let key_id = b.key_id().to_owned();
    keyring_id_of(&key_id);
    assert_eq!(version_of(&key_id), 1, "a fresh keyring serves version 1");
    let mut client = b.client();
    for n in 0..50 {
        let status = client.status().await.unwrap();
        check_status(&status.version, &status.healthz, &status.key_id).unwrap();
        assert_eq!(status.version, "v2");
        assert_eq!(
            status.key_id, key_id,
            "Status reports the key_id of the keyring's version 1"
        );

        let seed = seed();
        let enc = client.encrypt(seed.clone(), &uid(n)).await.unwrap();
        check_encrypt(
            &status.key_id,
            &enc.key_id,
            &enc.ciphertext,
            &enc.annotations,
        )
        .unwrap();
        assert_eq!(enc.key_id, status.key_id, "Encrypt key_id = Status key_id");
        // The documented envelope, whatever the backend: format 0x01,
        // version 1 (big-endian), nonce, sealed seed, tag.
        assert_eq!(enc.ciphertext.len(), SEED_CIPHERTEXT_LEN);
        assert_eq!(&enc.ciphertext[..5], &[1, 0, 0, 0, 1]);

        let plaintext = client
            .decrypt(enc.ciphertext, &enc.key_id, enc.annotations, &uid(n))
            .await
            .unwrap();
        check_decrypt(&seed, &plaintext).unwrap();
    }
    b.finish();
}

pub(super) async fn equal_plaintexts_give_distinct_ciphertexts<B: Backend>(b: B) {
    let mut client = b.client();
    let seed = seed();
    let mut seen = HashSet::new();
    let mut nonces = HashSet::new();
    for n in 0..200 {
        let enc = client.encrypt(seed.clone(), &uid(n)).await.unwrap();
        // Header: format (1), version (4), nonce (12).
        assert!(
            nonces.insert(enc.ciphertext[5..17].to_vec()),
            "nonce reused at {n}"
        );
        assert!(seen.insert(enc.ciphertext.clone()), "ciphertext repeated");
        let plaintext = client
            .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(n))
            .await
            .unwrap();
        assert_eq!(plaintext, seed);
    }
    b.finish();
}

pub(super) async fn status_and_encrypt_report_the_same_stable_key_id<B: Backend>(b: B) {
    let mut client = b.client();
    let first = client.status().await.unwrap().key_id;
    assert_eq!(first, b.key_id());
    for n in 0..20 {
        let status = client.status().await.unwrap();
        let enc = client.encrypt(seed(), &uid(n)).await.unwrap();
        assert_eq!(status.key_id, first, "Status key_id must not flip-flop");
        assert_eq!(
            enc.key_id, status.key_id,
            "Encrypt key_id must equal Status key_id"
        );
    }
    b.finish();
}

/// As many connections as kekd serves at once (the fixture's own and 63
/// more), all calling at the same moment: none is evicted, every round trip
/// passes the apiserver's checks.
pub(super) async fn sixty_four_connections_round_trip_at_once<B: Backend>(b: B) {
    const CLIENTS: usize = kekd::server::connection::MAX_CONNECTIONS - 1;
    const ROUNDS: usize = 16;
    assert_eq!(CLIENTS + 1, 64);
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let socket = b.socket().to_owned();
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            // A connection of its own per client.
            let mut client = common::connect(&socket).await;
            barrier.wait().await;
            let status = client.status().await.unwrap();
            check_status(&status.version, &status.healthz, &status.key_id).unwrap();
            for n in 0..ROUNDS {
                let seed = seed();
                let id = uid(c * 100 + n);
                let enc = client.encrypt(seed.clone(), &id).await.unwrap();
                check_encrypt(
                    &status.key_id,
                    &enc.key_id,
                    &enc.ciphertext,
                    &enc.annotations,
                )
                .unwrap();
                let plaintext = client
                    .decrypt(enc.ciphertext, &enc.key_id, enc.annotations, &id)
                    .await
                    .unwrap();
                check_decrypt(&seed, &plaintext).unwrap();
            }
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.expect("client task");
        done += 1;
    }
    assert_eq!(done, CLIENTS);
    // The fixture's connection, idle all along, was not evicted either.
    let status = b.client().status().await.unwrap();
    assert_eq!(status.key_id, b.key_id());
    b.finish();
}

/// After an apiserver restart: one Decrypt per stored seed, thousands at
/// once, all multiplexed on one HTTP/2 connection, none de-duplicated.
pub(super) async fn burst_of_2000_concurrent_decrypts_on_one_connection<B: Backend>(b: B) {
    const N: usize = 2000;
    let mut client = b.client();
    // As the apiserver does, a first call before the burst: once the
    // server's SETTINGS (at most 64 streams per connection) have arrived,
    // the client queues past the limit. Before them h2 assumes no limit,
    // and the server refuses the excess streams (REFUSED_STREAM), which
    // grpc-go retries transparently and tonic does not.
    client.status().await.expect("a first Status");

    let mut encrypts = tokio::task::JoinSet::new();
    for n in 0..N {
        let mut client = client.clone();
        encrypts.spawn(async move {
            let seed = seed();
            let enc = client.encrypt(seed.clone(), &uid(n)).await.unwrap();
            (n, seed, enc)
        });
    }
    let mut stored = Vec::with_capacity(N);
    while let Some(r) = encrypts.join_next().await {
        stored.push(r.expect("encrypt task"));
    }
    let distinct: HashSet<&Vec<u8>> = stored.iter().map(|(_, s, _)| s).collect();
    assert_eq!(distinct.len(), N, "seeds are distinct");

    let go = Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut decrypts = tokio::task::JoinSet::new();
    for (n, seed, enc) in stored {
        let mut client = client.clone();
        let go = Arc::clone(&go);
        decrypts.spawn(async move {
            go.wait().await;
            let plaintext = client
                .decrypt(enc.ciphertext, &enc.key_id, enc.annotations, &uid(n))
                .await
                .unwrap_or_else(|e| panic!("decrypt {n}: {e:?}"));
            assert_eq!(plaintext, seed, "decrypt {n} returned another seed");
        });
    }
    go.wait().await;
    let mut ok = 0;
    while let Some(r) = decrypts.join_next().await {
        r.expect("decrypt task");
        ok += 1;
    }
    assert_eq!(ok, N);
    b.finish();
}

pub(super) async fn empty_plaintext_is_invalid_argument<B: Backend>(b: B) {
    assert_refused(
        b.client().encrypt(Vec::new(), &uid(0)).await,
        Code::InvalidArgument,
        "plaintext is empty",
    );
    b.finish();
}

pub(super) async fn plaintext_limit_is_991_bytes_for_a_1024_byte_ciphertext<B: Backend>(b: B) {
    let mut client = b.client();
    let status = client.status().await.unwrap();
    assert_eq!(status.key_id, b.key_id());

    let mut largest = vec![0u8; 991];
    common::getrandom(&mut largest);
    let enc = client.encrypt(largest.clone(), &uid(1)).await.unwrap();
    assert_eq!(enc.ciphertext.len(), 1024);
    check_encrypt(
        &status.key_id,
        &enc.key_id,
        &enc.ciphertext,
        &enc.annotations,
    )
    .unwrap();
    let plaintext = client
        .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(1))
        .await
        .unwrap();
    assert_eq!(plaintext, largest);

    for len in [992, 4096] {
        assert_refused(
            client.encrypt(vec![7u8; len], &uid(len)).await,
            Code::InvalidArgument,
            &too_large(len),
        );
    }
    b.finish();
}

/// tonic refuses a message over `max_decoding_message_size` with
/// OUT_OF_RANGE before kekd sees it; the server keeps serving.
pub(super) async fn request_over_the_64_kib_cap_is_out_of_range_and_the_server_survives<
    B: Backend,
>(
    b: B,
) {
    let mut client = b.client();
    let err = client
        .encrypt(vec![1u8; 100 * 1024], &uid(0))
        .await
        .expect_err("a 100 KiB request must be refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // Field 1 (tag, 3-byte length, 102400 bytes) and field 2 (tag, length, 36-byte uid).
    assert_eq!(
        err.message(),
        "Error, decoded message length too large: found 102442 bytes, the limit is: 65536 bytes"
    );
    let err = client
        .decrypt(vec![1u8; 100 * 1024], b.key_id(), no_annotations(), &uid(1))
        .await
        .expect_err("a 100 KiB Decrypt must be refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Below the request cap, the plaintext rule applies instead.
    assert_refused(
        client.encrypt(vec![1u8; 60 * 1024], &uid(2)).await,
        Code::InvalidArgument,
        &too_large(60 * 1024),
    );

    // The same connection and a new one still work.
    let status = client.status().await.unwrap();
    check_status(&status.version, &status.healthz, &status.key_id).unwrap();
    let mut fresh = b.connect().await;
    let seed = seed();
    let enc = fresh.encrypt(seed.clone(), &uid(3)).await.unwrap();
    let plaintext = fresh
        .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(3))
        .await
        .unwrap();
    assert_eq!(plaintext, seed);
    b.finish();
}

/// Decrypt takes only key_ids this keyring issued, exactly as issued:
/// another keyring's (in the same backend), and every near miss.
pub(super) async fn decrypt_refuses_key_ids_this_keyring_did_not_issue<B: Backend>(b: B) {
    let foreign = b.second_keyring().await;
    let mut client = b.client();
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    let ours = enc.key_id.clone();
    assert_eq!(ours, b.key_id());

    // A ciphertext from another keyring, presented with its own key_id.
    let mut other = foreign.client();
    assert_eq!(other.status().await.unwrap().key_id, foreign.key_id());
    let foreign_enc = other.encrypt(seed(), &uid(1)).await.unwrap();
    assert_ne!(
        keyring_id_of(&foreign_enc.key_id),
        keyring_id_of(&ours),
        "independent keyrings share no keyring id"
    );
    assert_refused(
        client
            .decrypt(
                foreign_enc.ciphertext,
                &foreign_enc.key_id,
                no_annotations(),
                &uid(1),
            )
            .await,
        Code::InvalidArgument,
        NOT_OURS,
    );

    let hex_changed = {
        let mut k = ours.clone().into_bytes();
        k[5] = if k[5] == b'0' { b'1' } else { b'0' };
        String::from_utf8(k).unwrap()
    };
    for key_id in [
        String::new(),
        "garbage".to_owned(),
        "kekd/".to_owned(),
        "kekd//v1".to_owned(),
        hex_changed,
        ours.to_uppercase(),
        ours.replace("/v1", "/v01"),
        ours.replace("/v1", "/v0"),
        ours.replace("/v1", "/v+1"),
        ours.replace("/v1", "/v"),
        ours.replace("/v1", "/v99999999999"),
        format!("{ours} "),
        format!(" {ours}"),
        format!("{ours}/"),
        ours.replace("kekd/", "kekd2/"),
        "x".repeat(1024),
    ] {
        assert_refused(
            client
                .decrypt(enc.ciphertext.clone(), &key_id, no_annotations(), &uid(2))
                .await,
            Code::InvalidArgument,
            NOT_OURS,
        );
    }
    foreign.finish();
    b.finish();
}

pub(super) async fn decrypt_refuses_a_key_id_that_disagrees_with_the_header<B: Backend>(b: B) {
    let mut client = b.client();
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    for version in [2u32, 10, u32::MAX] {
        let key_id = enc.key_id.replace("/v1", &format!("/v{version}"));
        assert_refused(
            client
                .decrypt(enc.ciphertext.clone(), &key_id, no_annotations(), &uid(1))
                .await,
            Code::InvalidArgument,
            &format!("key_id names version {version} but the ciphertext header names version 1"),
        );
    }
    b.finish();
}

/// A ciphertext of another keyring (in the same backend) under our key_id:
/// the header parses, the key_id is ours, only authentication can tell (the
/// AAD binds the keyring id), and it must — both ways round.
pub(super) async fn decrypt_refuses_another_keyrings_ciphertext_under_our_key_id<B: Backend>(b: B) {
    let foreign = b.second_keyring().await;
    let mut client = b.client();
    let mut other = foreign.client();
    let theirs = other.encrypt(seed(), &uid(0)).await.unwrap();
    let mine = client.encrypt(seed(), &uid(1)).await.unwrap();
    assert_refused(
        client
            .decrypt(theirs.ciphertext, b.key_id(), no_annotations(), &uid(2))
            .await,
        Code::InvalidArgument,
        OPAQUE,
    );
    assert_refused(
        other
            .decrypt(mine.ciphertext, foreign.key_id(), no_annotations(), &uid(3))
            .await,
        Code::InvalidArgument,
        OPAQUE,
    );
    foreign.finish();
    b.finish();
}

pub(super) async fn decrypt_refuses_every_truncation<B: Backend>(b: B) {
    let mut client = b.client();
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    assert_eq!(enc.ciphertext.len(), SEED_CIPHERTEXT_LEN);
    for len in 0..enc.ciphertext.len() {
        let expected = match len {
            0 => "malformed ciphertext: ciphertext is empty".to_owned(),
            1..=33 => format!(
                "malformed ciphertext: ciphertext is truncated ({len} bytes, at least 34 needed)"
            ),
            _ => OPAQUE.to_owned(),
        };
        assert_refused(
            client
                .decrypt(
                    enc.ciphertext[..len].to_vec(),
                    &enc.key_id,
                    no_annotations(),
                    &uid(len),
                )
                .await,
            Code::InvalidArgument,
            &expected,
        );
    }
    b.finish();
}

pub(super) async fn decrypt_refuses_extended_ciphertexts<B: Backend>(b: B) {
    let mut client = b.client();
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    for extra in [0x00u8, 0x01, 0xff] {
        let mut longer = enc.ciphertext.clone();
        longer.push(extra);
        assert_refused(
            client
                .decrypt(longer, &enc.key_id, no_annotations(), &uid(1))
                .await,
            Code::InvalidArgument,
            OPAQUE,
        );
    }
    let mut doubled = enc.ciphertext.clone();
    doubled.extend_from_slice(&enc.ciphertext);
    assert_refused(
        client
            .decrypt(doubled, &enc.key_id, no_annotations(), &uid(2))
            .await,
        Code::InvalidArgument,
        OPAQUE,
    );

    // A maximal ciphertext plus one byte is longer than any kekd produces.
    let full = client.encrypt(vec![3u8; 991], &uid(3)).await.unwrap();
    let mut over = full.ciphertext.clone();
    over.push(0);
    assert_refused(
        client
            .decrypt(over, &full.key_id, no_annotations(), &uid(3))
            .await,
        Code::InvalidArgument,
        "malformed ciphertext: ciphertext is 1025 bytes, longer than the 1024-byte maximum",
    );
    b.finish();
}

/// Every single-bit flip of a ciphertext is refused, with the structural
/// error for header fields and the one opaque error for nonce, body and tag
/// (which the backend's AES-GCM decides); the untouched ciphertext still
/// opens after all those refusals (no key handle or session was poisoned).
pub(super) async fn decrypt_refuses_every_single_bit_flip<B: Backend>(b: B) {
    let mut client = b.client();
    let seed = seed();
    let enc = client.encrypt(seed.clone(), &uid(0)).await.unwrap();
    let ct = &enc.ciphertext;
    assert_eq!(ct[0], 0x01, "format byte");
    assert_eq!(&ct[1..5], &[0, 0, 0, 1], "key version 1, big-endian");
    common::assert_every_bit_flip_refused(&mut client, &enc, &seed).await;
    let plaintext = client
        .decrypt(
            enc.ciphertext.clone(),
            &enc.key_id,
            no_annotations(),
            &uid(0),
        )
        .await
        .unwrap();
    assert_eq!(plaintext, seed);
    b.finish();
}

pub(super) async fn decrypt_refuses_annotations_kekd_never_issues<B: Backend>(b: B) {
    let mut client = b.client();
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    assert!(enc.annotations.is_empty(), "kekd issues no annotations");
    for annotations in [
        HashMap::from([("a.com".to_owned(), b"x".to_vec())]),
        HashMap::from([("version.encryption.remote.io".to_owned(), Vec::new())]),
        HashMap::from([("Not A Key".to_owned(), b"x".to_vec())]),
    ] {
        assert_refused(
            client
                .decrypt(enc.ciphertext.clone(), &enc.key_id, annotations, &uid(1))
                .await,
            Code::InvalidArgument,
            "ciphertext came with annotations, but kekd issues none: it was not produced by kekd",
        );
    }
    b.finish();
}

/// A refused Decrypt (a bad tag: the backend's decryption fails) must not
/// cost kekd its key handles, session or login, nor poison what comes
/// after: the next calls succeed, and Status stays healthy through the next
/// two self-checks (counted in kekd's log). On a PKCS#11 token, closing an
/// application's last session logs it out of the token.
pub(super) async fn a_refused_decrypt_does_not_break_the_calls_after_it<B: Backend>(b: B) {
    let mut client = b.client();
    let seed = seed();
    let enc = client.encrypt(seed.clone(), &uid(0)).await.unwrap();
    let mut bad = enc.ciphertext.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_refused(
        client
            .decrypt(bad, &enc.key_id, no_annotations(), &uid(1))
            .await,
        Code::InvalidArgument,
        OPAQUE,
    );
    let checks = b.self_checks_passed();
    let opened = client
        .decrypt(
            enc.ciphertext.clone(),
            &enc.key_id,
            no_annotations(),
            &uid(2),
        )
        .await;
    assert_eq!(
        opened.as_ref().ok(),
        Some(&seed),
        "the good ciphertext after a refused one: {opened:?}\n{}",
        common::log_excerpt(&b.log())
    );
    let again = client.encrypt(seed.clone(), &uid(3)).await;
    assert!(
        again.as_ref().is_ok_and(|e| e.key_id == b.key_id()),
        "Encrypt after a refused Decrypt: {again:?}"
    );
    // Status at every poll until two more self-checks have passed.
    let key_id = b.key_id().to_owned();
    common::eventually("two more self-checks pass", HANG_GUARD, || {
        let mut client = client.clone();
        let passed = b.self_checks_passed();
        let key_id = key_id.clone();
        async move {
            let status = client.status().await;
            assert!(
                status.as_ref().is_ok_and(|s| s.key_id == key_id),
                "Status after a refused Decrypt: {status:?}"
            );
            (passed >= checks + 2)
                .then_some(())
                .ok_or(format!("{} self-checks since", passed - checks))
        }
    })
    .await;
    let status = client.status().await;
    assert!(
        status.as_ref().is_ok_and(|s| s.key_id == key_id),
        "Status after two self-checks: {status:?}"
    );
    b.finish();
}

/// A rotation as the apiserver sees it: a pending version changes nothing
/// it sees; once promoted, Status switches to the new key_id (reporting
/// only the old or the new one meanwhile) and stays switched, Encrypt seals
/// under it, and what the old version sealed still opens under its own
/// key_id — and under no other.
pub(super) async fn rotation_is_seen_through_status_encrypt_and_decrypt<B: Backend>(b: B) {
    let v1 = b.key_id().to_owned();
    let mut client = b.client();
    let s1 = seed();
    let e1 = client.encrypt(s1.clone(), &uid(1)).await.unwrap();
    assert_eq!(
        (e1.key_id.as_str(), header_version(&e1.ciphertext)),
        (v1.as_str(), 1)
    );

    // A pending version: kekd loads it (logged) and goes on as before.
    let reloads = b.log().matches("keyring reloaded").count();
    let v2 = b.rotate().await;
    assert_eq!(v2, key_id_of_version(&v1, 2), "same keyring, next version");
    b.wait_for_log("keyring reloaded", reloads + 1).await;
    let status = client.status().await.unwrap();
    assert_eq!(status.key_id, v1, "a pending version is not announced");
    let sp = seed();
    let pending = client.encrypt(sp.clone(), &uid(2)).await.unwrap();
    assert_eq!(
        (pending.key_id.as_str(), header_version(&pending.ciphertext)),
        (v1.as_str(), 1),
        "nothing is sealed under a pending version"
    );

    // Promoted: Status switches, and stays switched.
    b.promote(2).await;
    common::eventually("Status reports the promoted key_id", HANG_GUARD, || {
        let mut client = client.clone();
        let (v1, v2) = (v1.clone(), v2.clone());
        async move {
            let status = client.status().await.map_err(|e| e.to_string())?;
            check_status(&status.version, &status.healthz, &status.key_id)?;
            assert!(
                status.key_id == v1 || status.key_id == v2,
                "Status reported {:?} during the switch",
                status.key_id
            );
            (status.key_id == v2).then_some(()).ok_or(status.key_id)
        }
    })
    .await;
    for _ in 0..5 {
        assert_eq!(client.status().await.unwrap().key_id, v2);
    }

    let s2 = seed();
    let e2 = client.encrypt(s2.clone(), &uid(3)).await.unwrap();
    check_encrypt(&v2, &e2.key_id, &e2.ciphertext, &e2.annotations).unwrap();
    assert_eq!(header_version(&e2.ciphertext), 2);
    let opened = client
        .decrypt(e2.ciphertext.clone(), &e2.key_id, no_annotations(), &uid(4))
        .await
        .unwrap();
    check_decrypt(&s2, &opened).unwrap();
    // The old version opens what it sealed, before the rotation and while
    // the new version was pending, under its own key_id only.
    for (n, (enc, seed)) in [(&e1, &s1), (&pending, &sp)].into_iter().enumerate() {
        let opened = client
            .decrypt(enc.ciphertext.clone(), &v1, no_annotations(), &uid(10 + n))
            .await
            .unwrap();
        check_decrypt(seed, &opened).unwrap();
    }
    assert_refused(
        client
            .decrypt(e1.ciphertext.clone(), &v2, no_annotations(), &uid(6))
            .await,
        Code::InvalidArgument,
        "key_id names version 2 but the ciphertext header names version 1",
    );
    assert_refused(
        client
            .decrypt(e2.ciphertext, &v1, no_annotations(), &uid(7))
            .await,
        Code::InvalidArgument,
        "key_id names version 1 but the ciphertext header names version 2",
    );
    b.finish();
}

/// The method paths and field numbers of `docs/kms-v2.md` §1 "The service
/// and its messages", spoken by a client built from that table rather than
/// from kekd's `.proto`.
pub(super) async fn wire_contract_matches_the_spec<B: Backend>(b: B) {
    let mut raw = wire::RawClient::connect(b.socket(), common::CALL_TIMEOUT).await;
    let status: wire::StatusResponse = raw
        .unary(wire::STATUS, wire::StatusRequest {})
        .await
        .unwrap();
    check_status(&status.version, &status.healthz, &status.key_id).unwrap();
    assert_eq!(status.key_id, b.key_id());

    let seed = seed();
    let enc: wire::EncryptResponse = raw
        .unary(
            wire::ENCRYPT,
            wire::EncryptRequest {
                plaintext: seed.clone(),
                uid: uid(0),
            },
        )
        .await
        .unwrap();
    check_encrypt(
        &status.key_id,
        &enc.key_id,
        &enc.ciphertext,
        &enc.annotations,
    )
    .unwrap();

    let dec: wire::DecryptResponse = raw
        .unary(
            wire::DECRYPT,
            wire::DecryptRequest {
                ciphertext: enc.ciphertext.clone(),
                uid: uid(0),
                key_id: enc.key_id.clone(),
                annotations: enc.annotations.clone(),
            },
        )
        .await
        .unwrap();
    check_decrypt(&seed, &dec.plaintext).unwrap();

    // DecryptRequest's annotations field (4) reaches kekd: it refuses them.
    let refused: Result<wire::DecryptResponse, Status> = raw
        .unary(
            wire::DECRYPT,
            wire::DecryptRequest {
                ciphertext: enc.ciphertext,
                uid: uid(1),
                key_id: enc.key_id,
                annotations: HashMap::from([("a.com".to_owned(), vec![1])]),
            },
        )
        .await;
    assert_refused(
        refused,
        Code::InvalidArgument,
        "ciphertext came with annotations, but kekd issues none: it was not produced by kekd",
    );

    let unknown: Result<wire::StatusResponse, Status> = raw
        .unary("/v2.KeyManagementService/Nope", wire::StatusRequest {})
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::Unimplemented);
    b.finish();
}
