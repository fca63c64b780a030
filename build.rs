//! Compiles the `.proto` files with the pure-Rust `protox` compiler, so a
//! build needs no `protoc`:
//!
//! - `proto/v2/kms.proto`: the tonic server and client of the KMS v2 API.
//!   Its file descriptor set is also written to
//!   `$OUT_DIR/kms_descriptor.bin` for gRPC server reflection (`grpcurl`
//!   then needs no `.proto`).
//! - `proto/etcd/`: the tonic client of etcd's KV service, for
//!   `kekd admin scan` (`proto/etcd/README.md`). No server, and not in the
//!   reflection descriptors.

use std::error::Error;
use std::path::PathBuf;

use protox::prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let kms = "proto/v2/kms.proto";
    let etcd = [
        "proto/etcd/api/etcdserverpb/rpc.proto",
        "proto/etcd/api/mvccpb/kv.proto",
    ];
    for proto in std::iter::once(kms).chain(etcd) {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile([kms], ["proto"])?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(out.join("kms_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Messages that carry a seed in plaintext get a hand-written Debug
        // (src/service.rs) that prints lengths, never bytes.
        .skip_debug(["v2.EncryptRequest", "v2.DecryptResponse"])
        .compile_fds(descriptors)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        // A stored value may be a plaintext object (a Secret written before
        // encryption was on): a hand-written Debug (src/scan/etcd.rs)
        // prints lengths, never bytes.
        .skip_debug(["mvccpb.KeyValue"])
        .compile_fds(protox::compile(etcd, ["proto"])?)?;
    Ok(())
}
