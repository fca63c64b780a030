//! The transport floor of kekd's benchmark (`benches/run.sh`): a tonic
//! server for `v2.KeyManagementService` on a Unix socket, with the same
//! generated code, tonic and tokio as kekd, that answers without any crypto.
//! Whatever latency it shows is the cost of the socket, HTTP/2, gRPC framing
//! and protobuf alone — the limit kekd can approach, never pass.
//!
//! Encrypt returns 33 zero bytes followed by the plaintext (the size of
//! kekd's ciphertext) and Decrypt returns what follows those 33 bytes, so
//! the driver checks its answers exactly as it checks a real plugin's.
//!
//! Usage: `transport-floor --socket PATH`. SIGTERM or SIGINT stops it and
//! removes the socket.

use std::fmt;
use std::path::PathBuf;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// The generated protobuf code of `proto/v2/kms.proto`, from kekd's build
/// script (its `OUT_DIR`).
mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("v2");
}

use pb::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};

/// Header bytes before the plaintext: the size of kekd's envelope overhead
/// less its tag, so ciphertexts have kekd's length (33 + 32 = 65 bytes).
const HEADER: usize = 33;
/// The key id every answer names.
const KEY_ID: &str = "transport-floor/v1";

struct Floor;

#[tonic::async_trait]
impl KeyManagementService for Floor {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            version: "v2".to_owned(),
            healthz: "ok".to_owned(),
            key_id: KEY_ID.to_owned(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let plaintext = request.into_inner().plaintext;
        let mut ciphertext = Vec::with_capacity(HEADER + plaintext.len());
        ciphertext.resize(HEADER, 0);
        ciphertext.extend_from_slice(&plaintext);
        Ok(Response::new(pb::EncryptResponse {
            ciphertext,
            key_id: KEY_ID.to_owned(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let mut ciphertext = request.into_inner().ciphertext;
        if ciphertext.len() <= HEADER {
            return Err(Status::invalid_argument("ciphertext too short"));
        }
        Ok(Response::new(pb::DecryptResponse {
            plaintext: ciphertext.split_off(HEADER),
        }))
    }
}

// build.rs skips the derived Debug of the messages that carry plaintext;
// prost requires one, so print lengths only, as kekd does.
impl fmt::Debug for pb::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("plaintext_len", &self.plaintext.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let socket = match (args.next().as_deref(), args.next(), args.next()) {
        (Some("--socket"), Some(path), None) => PathBuf::from(path),
        _ => {
            eprintln!("usage: transport-floor --socket PATH");
            return std::process::ExitCode::from(64);
        }
    };
    // The same runtime kekd builds (src/cli/serve.rs).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("transport-floor: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(&socket)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("transport-floor: {}: {e}", socket.display());
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(socket: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = UnixListener::bind(socket)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let result = tonic::transport::Server::builder()
        .add_service(KeyManagementServiceServer::new(Floor))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}
