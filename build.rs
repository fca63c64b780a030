//! Compiles `proto/v2/kms.proto` with the pure-Rust `protox` compiler, so a
//! build needs no `protoc`, and generates the tonic server and client. The
//! file descriptor set is also written to `$OUT_DIR/kms_descriptor.bin` for
//! gRPC server reflection (`grpcurl` then needs no `.proto`).

use std::error::Error;
use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let proto = "proto/v2/kms.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(out.join("kms_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages that carry a seed in plaintext get a hand-written Debug
        // (src/service.rs) that prints lengths, never bytes.
        .skip_debug(["v2.EncryptRequest", "v2.DecryptResponse"])
        .compile_fds(descriptors)?;
    Ok(())
}
