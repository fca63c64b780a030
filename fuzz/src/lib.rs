//! Fixtures shared by the fuzz targets and the corpus generator
//! (`examples/gen_corpus.rs`): a keyring with fixed test KEKs, the envelopes
//! sealed under it with fixed nonces, and mirror messages of
//! `proto/v2/kms.proto` (kekd keeps its generated protobuf code private).
//!
//! Everything here is deterministic, so the targets can tell a ciphertext
//! kekd produced from one the fuzzer made: the only envelopes that may ever
//! open are the ones [`Fixture::known`] lists.

use std::sync::OnceLock;

use kekd::backend::KeyHandle;
use kekd::backend::local::{LocalKey, keyring_from_file};
use kekd::envelope::{self, Envelope};
use kekd::id::{KeyId, KeyVersion, KeyringId, Timestamp};
use kekd::keyring::store::{KeyringFile, Material, StoredVersion};
use kekd::keyring::{KeyState, Keyring, VersionInfo};
use kekd::secret::{Kek, Plaintext};

/// The fixture keyring's id.
pub const KEYRING_ID: &str = "0123456789abcdef0123456789abcdef";
/// Another keyring's id: key ids naming it are never ours.
pub const FOREIGN_KEYRING_ID: &str = "fedcba9876543210fedcba9876543210";

/// The fixture's versions: one of every state.
pub const VERSIONS: [(u32, KeyState); 5] = [
    (1, KeyState::DecryptOnly),
    (2, KeyState::Primary),
    (3, KeyState::Retired),
    (4, KeyState::Destroyed),
    (5, KeyState::Pending),
];

/// Plaintext lengths sealed per version: the smallest, the apiserver's
/// 32-byte seed, and the largest that fits the 1024-byte ciphertext limit.
pub const PLAINTEXT_LENS: [usize; 3] = [1, 32, envelope::MAX_PLAINTEXT_LEN];

/// The fixed test KEK of `version` (public test material, never a real key).
pub fn test_kek(version: u32) -> Kek {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (version as u8).wrapping_mul(0x3d) ^ (i as u8).wrapping_mul(0x1f) ^ 0xa7;
    }
    Kek::from_bytes(key)
}

/// The fixture keyring as a local keyring file (fixed id, KEKs and times).
pub fn keyring_file() -> KeyringFile {
    let t = |s: u64| Timestamp::from_unix(1_790_000_000 + s);
    let versions = VERSIONS
        .iter()
        .map(|&(n, state)| {
            let version = KeyVersion::new(n).expect("fixture versions are non-zero");
            let mut info = VersionInfo::new(version, state, t(u64::from(n) * 100));
            if matches!(state, KeyState::Primary | KeyState::DecryptOnly) {
                info.promoted = Some(t(u64::from(n) * 100 + 1));
            }
            if matches!(state, KeyState::Retired | KeyState::Destroyed) {
                info.retired = Some(t(u64::from(n) * 100 + 2));
            }
            if state == KeyState::Destroyed {
                info.destroyed = Some(t(u64::from(n) * 100 + 3));
            }
            StoredVersion {
                info,
                kek: state.has_material().then(|| test_kek(n)),
            }
        })
        .collect();
    KeyringFile {
        material: Material::Inline,
        id: keyring_id(),
        versions,
    }
}

/// The fixture keyring's id, parsed.
pub fn keyring_id() -> KeyringId {
    KEYRING_ID.parse().expect("a valid keyring id")
}

/// The key id of `version` in the fixture keyring.
pub fn key_id(version: u32) -> String {
    KeyId::new(
        &keyring_id(),
        KeyVersion::new(version).expect("non-zero version"),
    )
    .to_string()
}

/// An envelope kekd sealed, with the key id Encrypt returned and the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Key id as Encrypt returns it.
    pub key_id: String,
    /// The envelope.
    pub ciphertext: Vec<u8>,
    /// What it seals.
    pub plaintext: Vec<u8>,
    /// Its version's state: only decrypt-capable versions may open it.
    pub state: KeyState,
}

/// The keyring, the envelopes sealed under it, and a runtime to drive
/// kekd's async seal/open on.
pub struct Fixture {
    /// The serving snapshot built from [`keyring_file`].
    pub keyring: Keyring,
    /// Every envelope sealed under a version that holds material.
    pub known: Vec<Known>,
    /// A single-threaded runtime.
    pub runtime: tokio::runtime::Runtime,
}

impl Fixture {
    /// Built once per process.
    pub fn get() -> &'static Self {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a tokio runtime");
            let known = runtime.block_on(seal_known());
            Self {
                keyring: keyring_from_file(keyring_file()).expect("the fixture keyring is valid"),
                known,
                runtime,
            }
        })
    }

    /// The known envelope equal to `ciphertext`, if any.
    pub fn lookup(&self, ciphertext: &[u8]) -> Option<&Known> {
        self.known.iter().find(|k| k.ciphertext == ciphertext)
    }
}

/// Seals [`PLAINTEXT_LENS`] plaintexts under every version with material,
/// through kekd's local seal with fixed nonces and kekd's own AAD.
async fn seal_known() -> Vec<Known> {
    let id = keyring_id();
    let mut out = Vec::new();
    for &(n, state) in &VERSIONS {
        if !state.has_material() {
            continue;
        }
        let version = KeyVersion::new(n).expect("non-zero version");
        let key: Box<dyn KeyHandle> = Box::new(LocalKey::new(&test_kek(n)));
        for (i, &len) in PLAINTEXT_LENS.iter().enumerate() {
            let mut nonce = [0xa5u8; envelope::NONCE_LEN];
            nonce[0] = n as u8;
            nonce[1] = i as u8;
            let plaintext: Vec<u8> = (0..len)
                .map(|j| (j as u8).wrapping_mul(31) ^ (n as u8) ^ (i as u8))
                .collect();
            let (nonce, sealed) = key
                .seal(
                    &nonce,
                    &envelope::aad(&id, version),
                    &Plaintext::new(plaintext.clone()),
                )
                .await
                .expect("local seal of a fixture plaintext");
            out.push(Known {
                key_id: key_id(n),
                ciphertext: Envelope::encode(version, &nonce, &sealed),
                plaintext,
                state,
            });
        }
    }
    out
}

/// Mirror messages of `proto/v2/kms.proto` (same field numbers and types).
pub mod proto {
    use std::collections::HashMap;

    /// `v2.StatusRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}

    /// `v2.StatusResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        /// API version.
        #[prost(string, tag = "1")]
        pub version: String,
        /// Health.
        #[prost(string, tag = "2")]
        pub healthz: String,
        /// Current key id.
        #[prost(string, tag = "3")]
        pub key_id: String,
    }

    /// `v2.EncryptRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EncryptRequest {
        /// The seed.
        #[prost(bytes = "vec", tag = "1")]
        pub plaintext: Vec<u8>,
        /// Request uid.
        #[prost(string, tag = "2")]
        pub uid: String,
    }

    /// `v2.EncryptResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EncryptResponse {
        /// The envelope.
        #[prost(bytes = "vec", tag = "1")]
        pub ciphertext: Vec<u8>,
        /// Key id.
        #[prost(string, tag = "2")]
        pub key_id: String,
        /// Annotations (kekd issues none).
        #[prost(map = "string, bytes", tag = "3")]
        pub annotations: HashMap<String, Vec<u8>>,
    }

    /// `v2.DecryptRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DecryptRequest {
        /// The envelope.
        #[prost(bytes = "vec", tag = "1")]
        pub ciphertext: Vec<u8>,
        /// Request uid.
        #[prost(string, tag = "2")]
        pub uid: String,
        /// Key id Encrypt returned.
        #[prost(string, tag = "3")]
        pub key_id: String,
        /// Annotations Encrypt returned.
        #[prost(map = "string, bytes", tag = "4")]
        pub annotations: HashMap<String, Vec<u8>>,
    }

    /// `v2.DecryptResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DecryptResponse {
        /// The seed.
        #[prost(bytes = "vec", tag = "1")]
        pub plaintext: Vec<u8>,
    }
}

/// The gRPC methods, selected by the first byte of a `grpc` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `/v2.KeyManagementService/Status`.
    Status,
    /// `/v2.KeyManagementService/Encrypt`.
    Encrypt,
    /// `/v2.KeyManagementService/Decrypt`.
    Decrypt,
}

impl Method {
    /// The method a selector byte picks.
    pub fn from_selector(b: u8) -> Self {
        match b % 3 {
            0 => Self::Status,
            1 => Self::Encrypt,
            _ => Self::Decrypt,
        }
    }

    /// The selector byte [`Method::from_selector`] maps to this method.
    pub fn selector(self) -> u8 {
        match self {
            Self::Status => 0,
            Self::Encrypt => 1,
            Self::Decrypt => 2,
        }
    }

    /// The HTTP/2 path.
    pub fn path(self) -> &'static str {
        match self {
            Self::Status => "/v2.KeyManagementService/Status",
            Self::Encrypt => "/v2.KeyManagementService/Encrypt",
            Self::Decrypt => "/v2.KeyManagementService/Decrypt",
        }
    }
}

/// How an `envelope` input's first byte picks the key id sent with the
/// ciphertext: versions 1..=6 of the fixture keyring (6 does not exist), a
/// foreign keyring, or the version the ciphertext's header names (what the
/// apiserver would send back).
pub fn envelope_key_id(selector: u8, ciphertext: &[u8]) -> String {
    match selector % 8 {
        s @ 0..=5 => key_id(u32::from(s) + 1),
        6 => format!("kekd/{FOREIGN_KEYRING_ID}/v2"),
        _ => match Envelope::parse(ciphertext) {
            Ok(e) => key_id(e.version.get()),
            Err(_) => key_id(2),
        },
    }
}

/// The selector byte with which [`envelope_key_id`] uses the header's version.
pub const SELECT_HEADER_VERSION: u8 = 7;

/// `body` followed by the `sha256 <hex>` line that ends every keyring file,
/// so a mutated body gets past the checksum to the line parser.
pub fn with_checksum(body: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(body);
    let mut out = body.to_vec();
    out.extend_from_slice(b"sha256 ");
    for b in digest {
        out.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    out.push(b'\n');
    out
}

/// The first byte of a `keyring_file` input: the rest is a whole file.
pub const KEYRING_AS_IS: u8 = 0;
/// The first byte of a `keyring_file` input: the rest is a body, to which
/// [`with_checksum`] appends the checksum line.
pub const KEYRING_ADD_CHECKSUM: u8 = 1;
