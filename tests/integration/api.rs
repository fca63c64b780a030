//! The KMS v2 API over a real Unix socket, judged by the apiserver's rules
//! (`docs/kms-v2.md` §3 "Answers the apiserver accepts", re-implemented in
//! `common::apiserver`) and by exact refusals.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tonic::{Code, Status};

use common::apiserver::{check_decrypt, check_encrypt, check_status};
use common::{TestServer, seed, uid, wire};

const OPAQUE: &str = "ciphertext could not be decrypted";
const NOT_OURS: &str = "key_id was not issued by this keyring";

fn no_annotations() -> HashMap<String, Vec<u8>> {
    HashMap::new()
}

/// Asserts that a call was refused with `code` and exactly `message`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} {message:?}, got a success: {v:?}"),
        Err(status) => {
            assert_eq!(
                (status.code(), status.message()),
                (code, message),
                "wrong refusal"
            );
        }
    }
}

#[tokio::test]
async fn status_encrypt_decrypt_pass_every_apiserver_check() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for n in 0..50 {
        let status = client.status().await.unwrap();
        check_status(&status.version, &status.healthz, &status.key_id).unwrap();
        assert_eq!(status.version, "v2");
        assert_eq!(
            status.key_id, server.key_id,
            "key_id of the keyring's version 1"
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

        let plaintext = client
            .decrypt(enc.ciphertext, &enc.key_id, enc.annotations, &uid(n))
            .await
            .unwrap();
        check_decrypt(&seed, &plaintext).unwrap();
    }
}

#[tokio::test]
async fn equal_plaintexts_give_distinct_ciphertexts() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let seed = seed();
    let mut seen = HashSet::new();
    let mut nonces = HashSet::new();
    for n in 0..200 {
        let enc = client.encrypt(seed.clone(), &uid(n)).await.unwrap();
        // Header: format (1), version (4), nonce (12).
        assert!(
            nonces.insert(enc.ciphertext[5..17].to_vec()),
            "nonce reused"
        );
        assert!(seen.insert(enc.ciphertext.clone()), "ciphertext repeated");
        let plaintext = client
            .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(n))
            .await
            .unwrap();
        assert_eq!(plaintext, seed);
    }
}

#[tokio::test]
async fn status_and_encrypt_report_the_same_stable_key_id() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = client.status().await.unwrap().key_id;
    for n in 0..20 {
        let status = client.status().await.unwrap();
        let enc = client.encrypt(seed(), &uid(n)).await.unwrap();
        assert_eq!(status.key_id, first, "Status key_id must not flip-flop");
        assert_eq!(
            enc.key_id, status.key_id,
            "Encrypt key_id must equal Status key_id"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_clients_round_trip() {
    let server = TestServer::start().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..64 {
        let socket = server.socket.clone();
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            // A connection of its own per client.
            let mut client = common::connect(&socket).await;
            barrier.wait().await;
            let status = client.status().await.unwrap();
            check_status(&status.version, &status.healthz, &status.key_id).unwrap();
            for n in 0..16 {
                let seed = seed();
                let enc = client
                    .encrypt(seed.clone(), &uid(c * 100 + n))
                    .await
                    .unwrap();
                check_encrypt(
                    &status.key_id,
                    &enc.key_id,
                    &enc.ciphertext,
                    &enc.annotations,
                )
                .unwrap();
                let plaintext = client
                    .decrypt(
                        enc.ciphertext,
                        &enc.key_id,
                        enc.annotations,
                        &uid(c * 100 + n),
                    )
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
    assert_eq!(done, 64);
}

/// After an apiserver restart: one Decrypt per stored seed, thousands at
/// once, all multiplexed on one HTTP/2 connection, none de-duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_2000_concurrent_decrypts_on_one_connection() {
    const N: usize = 2000;
    let server = TestServer::start().await;
    let mut client = server.client().await;
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
}

#[tokio::test]
async fn empty_plaintext_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    assert_refused(
        client.encrypt(Vec::new(), &uid(0)).await,
        Code::InvalidArgument,
        "plaintext is empty",
    );
}

#[tokio::test]
async fn plaintext_limit_is_991_bytes_for_a_1024_byte_ciphertext() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let status = client.status().await.unwrap();

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

    assert_refused(
        client.encrypt(vec![7u8; 992], &uid(2)).await,
        Code::InvalidArgument,
        "plaintext is 992 bytes; at most 991 fit the apiserver's 1024-byte ciphertext limit",
    );
    assert_refused(
        client.encrypt(vec![7u8; 4096], &uid(3)).await,
        Code::InvalidArgument,
        "plaintext is 4096 bytes; at most 991 fit the apiserver's 1024-byte ciphertext limit",
    );
}

/// tonic refuses a message over `max_decoding_message_size` with
/// OUT_OF_RANGE before kekd sees it; the server keeps serving.
#[tokio::test]
async fn request_over_the_64_kib_cap_is_out_of_range_and_the_server_survives() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
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
        .decrypt(
            vec![1u8; 100 * 1024],
            &server.key_id,
            no_annotations(),
            &uid(1),
        )
        .await
        .expect_err("a 100 KiB Decrypt must be refused");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Below the request cap, the plaintext rule applies instead.
    assert_refused(
        client.encrypt(vec![1u8; 60 * 1024], &uid(2)).await,
        Code::InvalidArgument,
        "plaintext is 61440 bytes; at most 991 fit the apiserver's 1024-byte ciphertext limit",
    );

    // The same connection and a new one still work.
    let status = client.status().await.unwrap();
    check_status(&status.version, &status.healthz, &status.key_id).unwrap();
    let mut fresh = server.client().await;
    let seed = seed();
    let enc = fresh.encrypt(seed.clone(), &uid(3)).await.unwrap();
    let plaintext = fresh
        .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(3))
        .await
        .unwrap();
    assert_eq!(plaintext, seed);
}

#[tokio::test]
async fn decrypt_refuses_key_ids_this_keyring_did_not_issue() {
    let server = TestServer::start().await;
    let foreign = TestServer::start().await;
    let mut client = server.client().await;
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    let ours = enc.key_id.clone();
    assert_eq!(ours, server.key_id);

    // A ciphertext from another keyring, presented with its own key_id.
    let mut other = foreign.client().await;
    let foreign_enc = other.encrypt(seed(), &uid(1)).await.unwrap();
    assert_ne!(
        foreign_enc.key_id, ours,
        "independent keyrings share no key_id"
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
}

#[tokio::test]
async fn decrypt_refuses_a_key_id_that_disagrees_with_the_header() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
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
}

/// A ciphertext of another keyring under our key_id: the header parses, the
/// key_id is ours, only authentication can tell, and it must.
#[tokio::test]
async fn decrypt_refuses_another_keyrings_ciphertext_under_our_key_id() {
    let server = TestServer::start().await;
    let foreign = TestServer::start().await;
    let mut client = server.client().await;
    let foreign_enc = foreign
        .client()
        .await
        .encrypt(seed(), &uid(0))
        .await
        .unwrap();
    assert_refused(
        client
            .decrypt(
                foreign_enc.ciphertext,
                &server.key_id,
                no_annotations(),
                &uid(0),
            )
            .await,
        Code::InvalidArgument,
        OPAQUE,
    );
}

#[tokio::test]
async fn decrypt_refuses_every_truncation() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let enc = client.encrypt(seed(), &uid(0)).await.unwrap();
    assert_eq!(enc.ciphertext.len(), 1 + 4 + 12 + 32 + 16);
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
}

#[tokio::test]
async fn decrypt_refuses_extended_ciphertexts() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
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
}

/// Every single-bit flip of a ciphertext is refused, with the structural
/// error for header fields and the one opaque error for nonce, body and tag.
#[tokio::test]
async fn decrypt_refuses_every_single_bit_flip() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let seed = seed();
    let enc = client.encrypt(seed.clone(), &uid(0)).await.unwrap();
    let ct = &enc.ciphertext;
    assert_eq!(ct[0], 0x01, "format byte");
    assert_eq!(&ct[1..5], &[0, 0, 0, 1], "key version 1, big-endian");
    common::assert_every_bit_flip_refused(&mut client, &enc, &seed).await;
    // The untouched ciphertext still opens.
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
}

#[tokio::test]
async fn decrypt_refuses_annotations_kekd_never_issues() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
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
}

/// The method paths and field numbers of `docs/kms-v2.md` §1 "The service
/// and its messages", spoken by a client built from that table rather than
/// from kekd's `.proto`.
#[tokio::test]
async fn wire_contract_matches_the_spec() {
    let server = TestServer::start().await;
    let mut raw = wire::RawClient::connect(&server.socket, common::CALL_TIMEOUT).await;
    let status: wire::StatusResponse = raw
        .unary(wire::STATUS, wire::StatusRequest {})
        .await
        .unwrap();
    check_status(&status.version, &status.healthz, &status.key_id).unwrap();

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
}
