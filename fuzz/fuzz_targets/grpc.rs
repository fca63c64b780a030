//! Decoded gRPC requests through kekd's real service.
//!
//! Input: one selector byte (Status, Encrypt or Decrypt), then the request
//! message's protobuf bytes. They are framed as a gRPC message and handed to
//! the tonic server `KmsService::into_server` returns, in process (no
//! socket): tonic's prost codec decodes them and kekd's handler answers from
//! a dev keyring (the fixture: fixed test KEKs, one version of every state).
//!
//! Checks: nothing panics; bytes that are not a valid message are refused by
//! the codec (INTERNAL "failed to decode Protobuf message", tonic's
//! behaviour) and never reach kekd; for a decoded request kekd answers OK or
//! a client error from the design's table (INVALID_ARGUMENT,
//! FAILED_PRECONDITION), never INTERNAL or UNAVAILABLE; an OK answer is
//! right: Status reports v2/ok/the primary's key id, Encrypt's envelope
//! opens to the plaintext sent, and Decrypt only ever returns the plaintext
//! of an envelope kekd sealed, sent with its own key id.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kekd::config::DEFAULT_MAX_REQUEST_BYTES;
use kekd::config::PeerPolicy;
use kekd::id::Timestamp;
use kekd::metrics::Metrics;
use kekd::service::KmsService;
use kekd::state::{ServingState, Snapshot};
use kekd::usage::UsageTracker;
use kekd_fuzz::proto::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use kekd_fuzz::{Fixture, Method, key_id, keyring_file, keyring_id};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tonic::Code;
use tower::ServiceExt as _;

/// Messages of INVALID_ARGUMENT answers: the design's error table.
const INVALID_ARGUMENT: [&str; 8] = [
    "plaintext is empty",
    "plaintext is ",
    "key_id was not issued by this keyring",
    "key_id names version ",
    "key version ",
    "malformed ciphertext: ",
    "ciphertext could not be decrypted",
    "ciphertext came with annotations, but kekd issues none",
];

struct Answer {
    code: Code,
    message: String,
    body: Option<Bytes>,
}

fn call(method: Method, message: &[u8]) -> Answer {
    static SERVICE: OnceLock<KmsService> = OnceLock::new();
    let fx = Fixture::get();
    let service = SERVICE.get_or_init(|| {
        let keyring = kekd::backend::local::keyring_from_file(keyring_file())
            .expect("the fixture keyring is valid");
        let state = ServingState::new(
            Snapshot::new(keyring, Timestamp::now(), true),
            UsageTracker::load(None, &keyring_id()),
            Arc::new(Metrics::new("local")),
            None,
        );
        KmsService::new(Arc::new(state), PeerPolicy::default())
    });
    let server = service.clone().into_server(DEFAULT_MAX_REQUEST_BYTES);

    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0); // not compressed
    frame.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(message);
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{}", method.path()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .expect("a request");

    fx.runtime.block_on(async move {
        let response = server
            .oneshot(request)
            .await
            .expect("the service is infallible");
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.expect("the response body");
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        let status = tonic::Status::from_header_map(&parts.headers)
            .or_else(|| trailers.as_ref().and_then(tonic::Status::from_header_map))
            .expect("every answer carries a grpc-status");
        let body = (status.code() == Code::Ok).then(|| {
            assert!(data.len() >= 5, "an OK answer carries a message");
            assert_eq!(data[0], 0, "kekd does not compress");
            let len = u32::from_be_bytes(data[1..5].try_into().expect("4 bytes")) as usize;
            assert_eq!(data.len(), 5 + len, "one message per answer");
            data.slice(5..)
        });
        Answer {
            code: status.code(),
            message: status.message().to_owned(),
            body,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, message)) = data.split_first() else {
        return;
    };
    let method = Method::from_selector(selector);
    let answer = call(method, message);

    let decodes = match method {
        Method::Status => StatusRequest::decode(message).is_ok(),
        Method::Encrypt => EncryptRequest::decode(message).is_ok(),
        Method::Decrypt => DecryptRequest::decode(message).is_ok(),
    };
    if !decodes {
        assert_eq!(answer.code, Code::Internal, "{}", answer.message);
        assert!(
            answer
                .message
                .starts_with("failed to decode Protobuf message"),
            "{}",
            answer.message
        );
        return;
    }

    match answer.code {
        Code::Ok => {}
        Code::InvalidArgument => {
            assert!(
                INVALID_ARGUMENT
                    .iter()
                    .any(|p| answer.message.starts_with(p)),
                "unexpected INVALID_ARGUMENT message: {}",
                answer.message
            );
            assert!(method != Method::Status);
        }
        Code::FailedPrecondition => {
            assert_eq!(method, Method::Decrypt);
            assert!(
                answer.message.starts_with("key version ")
                    && answer.message.contains(" cannot decrypt "),
                "{}",
                answer.message
            );
        }
        other => panic!("{method:?} answered {other:?}: {}", answer.message),
    }
    let fx = Fixture::get();
    match method {
        Method::Status => {
            let body = answer.body.expect("Status always answers");
            let r = StatusResponse::decode(body).expect("a StatusResponse");
            assert_eq!((r.version.as_str(), r.healthz.as_str()), ("v2", "ok"));
            assert_eq!(r.key_id, key_id(2));
        }
        Method::Encrypt => {
            let req = EncryptRequest::decode(message).expect("decoded above");
            let fits = (1..=kekd::envelope::MAX_PLAINTEXT_LEN).contains(&req.plaintext.len());
            assert_eq!(answer.code == Code::Ok, fits, "{}", answer.message);
            if let Some(body) = answer.body {
                let r = EncryptResponse::decode(body).expect("an EncryptResponse");
                assert_eq!(r.key_id, key_id(2));
                assert!(r.annotations.is_empty());
                assert!(r.ciphertext.len() <= kekd::envelope::MAX_CIPHERTEXT_LEN);
                let (_, pt) = fx
                    .runtime
                    .block_on(fx.keyring.decrypt(&r.key_id, &r.ciphertext))
                    .expect("Encrypt's envelope opens");
                assert_eq!(pt.expose_secret(), req.plaintext.as_slice());
            }
        }
        Method::Decrypt => {
            let req = DecryptRequest::decode(message).expect("decoded above");
            let known = fx
                .lookup(&req.ciphertext)
                .filter(|k| k.key_id == req.key_id);
            let must_open =
                known.is_some_and(|k| k.state.can_decrypt()) && req.annotations.is_empty();
            assert_eq!(answer.code == Code::Ok, must_open, "{}", answer.message);
            if let Some(body) = answer.body {
                let r = DecryptResponse::decode(body).expect("a DecryptResponse");
                let known = known.expect("checked above");
                assert_eq!(r.plaintext, known.plaintext);
            }
        }
    }
});
