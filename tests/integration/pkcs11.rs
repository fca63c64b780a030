//! The PKCS#11 backend on real SoftHSM2 tokens: a fresh token per
//! test (`softhsm::Token`), kekd as child processes configured through a
//! `[backend]` table, and the token inspected from outside with
//! `pkcs11-tool`.
//!
//! - the KMS API contract itself runs against a token as
//!   `contract::pkcs11::…` (tests/integration/contract.rs); here, what only
//!   a token has:
//! - the key objects really are in the token, sensitive and unextractable,
//!   restricted to AES-GCM, and the envelope is the documented one (the
//!   token's own AES-GCM, driven outside kekd, opens and seals it);
//! - the admin lifecycle through `--config`, several keyrings and several
//!   kekd instances on one token;
//! - 64 clients through a pool of 4 sessions;
//! - configuration mistakes (exit 78, never the PIN), a wrong PIN tried
//!   exactly once (counted with OpenSC's pkcs11-spy);
//! - a key object deleted behind kekd's back, and token outages.
//! - a token an older kekd wrote (v1 metadata, made here with its template
//!   through cryptoki) adopted by `kekd admin upgrade-token`, and what the
//!   upgrade refuses.
//!
//! Without SoftHSM2 every test prints `SKIPPED` and passes, unless
//! `KEKD_REQUIRE_ALL=1` (CI), which makes them fail.

use crate::common;
use crate::softhsm;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;

use common::apiserver::check_status;
use common::{
    OPAQUE, Process, assert_refused, eventually, keyring_id_of, log_excerpt, no_annotations, seed,
    uid,
};
use kekd::client::Client;
use softhsm::{
    Node, P11_KIT_CLIENT, P11KitServer, SPY_MODULE, Token, error_message, json_of, unhex,
};

const EX_CONFIG: i32 = 78;

/// How long a test waits for an event kekd reports (a reload, a
/// self-check, a log line, a changed Status) before it fails: a hang guard
/// only, never a bound a test asserts — what the tests assert are the
/// events, and their order or count.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// `CKA_ID` (hex) of a version's key object: keyring id ‖ version (BE u32).
fn object_id(key_id: &str, version: u32) -> String {
    format!("{}{version:08x}", keyring_id_of(key_id))
}

/// Spawns `kekd serve` for `node` and waits for a healthy Status.
async fn serving(token: &Token, node: &Node) -> (Process, Client) {
    let mut process = token.spawn_serve(node);
    let client = process.ready().await;
    (process, client)
}

/// Asserts that none of `outputs` contains `secret`.
#[track_caller]
fn assert_never_printed(secret: &str, outputs: &[(&str, &str)]) {
    for (name, text) in outputs {
        assert!(
            !text.contains(secret),
            "{name} contains the PIN {secret:?}:\n{text}"
        );
    }
}

// --------------------------------------------------- the contract, on a token

// The KMS API contract runs against a token as `contract::pkcs11::…`
// (tests/integration/contract.rs). What follows is the token's side of it.

/// Two keyrings share one token under different label prefixes (the
/// contract's `decrypt_refuses_*` tests serve both and find neither opens
/// the other's ciphertexts): each has its own key objects and its own
/// metadata key, named by its prefix and identified by its keyring id.
#[test]
fn a_second_keyring_on_the_same_token_has_objects_of_its_own() {
    let Some(token) = Token::create() else { return };
    let ours = token.default_node("a");
    let mut other_backend = token.backend("b");
    other_backend.key_label_prefix = Some("other-".to_owned());
    let other = token.node("b", &other_backend, &[]);
    let our_key_id = token.init(&ours);
    let their_key_id = token.init(&other);
    let (our_id, their_id) = (keyring_id_of(&our_key_id), keyring_id_of(&their_key_id));
    assert_ne!(our_id, their_id);
    let mut found: Vec<(String, String)> = token
        .secret_keys()
        .iter()
        .map(|k| (k.label(), k.field("ID").to_owned()))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("kekd-metadata-key".to_owned(), format!("{our_id}00000000")),
            ("kekd-v1".to_owned(), format!("{our_id}00000001")),
            (
                "other-metadata-key".to_owned(),
                format!("{their_id}00000000")
            ),
            ("other-v1".to_owned(), format!("{their_id}00000001")),
        ],
        "one key object per keyring version, and one metadata key per keyring"
    );
}

// ----------------------------------------- the token's objects, from outside

#[test]
fn key_objects_are_in_the_token_sensitive_unextractable_and_metadata_holds_no_key() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);

    let objects = token.objects();
    let keys: Vec<_> = objects.iter().filter(|o| o.is_secret_key()).collect();
    assert_eq!(
        keys.len(),
        2,
        "v1's key and the metadata key after init: {objects:#?}"
    );
    for (key, label, version) in [
        (keys[0], "kekd-metadata-key", "00000000"),
        (keys[1], "kekd-v1", "00000001"),
    ] {
        assert_eq!(key.heading, "Secret Key Object; AES length 32", "AES-256");
        assert_eq!(key.label(), label);
        assert_eq!(
            key.field("ID"),
            format!("{id}{version}"),
            "CKA_ID = id ‖ version"
        );
        assert_eq!(
            key.items("Usage"),
            ["encrypt", "decrypt"],
            "encrypt/decrypt only"
        );
        let access = key.items("Access");
        for flag in [
            "sensitive",
            "always sensitive",
            "never extractable",
            "local",
        ] {
            assert!(
                access.contains(&flag),
                "key access lacks {flag:?}: {access:?}"
            );
        }
        assert!(
            !access.contains(&"extractable"),
            "key is extractable: {access:?}"
        );
    }

    // CKA_LOCAL ("local"): generated inside the token, never imported.
    // CKA_TOKEN: this listing comes from another process (pkcs11-tool), so
    // the object persisted in the token. CKA_PRIVATE: without a login, no
    // kekd object is visible at all.
    let public = token.tool_public(&["--list-objects"]);
    assert!(public.status.success(), "{public:?}");
    let public = String::from_utf8_lossy(&public.stdout);
    assert!(
        !public.contains("Secret Key Object") && !public.contains("Data object"),
        "kekd objects visible without login:\n{public}"
    );

    // CKA_VALUE cannot be read: the token refuses.
    let read = token.read_value("secrkey", "kekd-v1");
    let refusal = read.expect_err("the key's CKA_VALUE was readable");
    assert!(
        refusal.contains("CKR_ATTRIBUTE_SENSITIVE"),
        "reading CKA_VALUE failed for another reason: {refusal}"
    );

    // The metadata object: private, application "kekd", revision 1, and
    // nothing but public facts.
    let data: Vec<_> = objects.iter().filter(|o| o.is_data()).collect();
    assert_eq!(data.len(), 1, "one metadata object: {objects:#?}");
    assert_eq!(data[0].label(), "kekd-keyring@1");
    assert_eq!(data[0].field("application"), "'kekd'");
    assert_eq!(data[0].field("flags"), "private");
    let metadata = token
        .read_value("data", "kekd-keyring@1")
        .expect("read the metadata object");
    let text = String::from_utf8(metadata).expect("metadata is text");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        6,
        "magic, keyring, one version, checksum, check value, MAC:\n{text}"
    );
    assert_eq!(lines[0], "kekd-keyring-meta v2");
    assert_eq!(lines[1], format!("keyring {id}"));
    assert!(lines[2].starts_with("version 1 primary created="), "{text}");
    assert!(!text.contains("kek="), "key material in metadata:\n{text}");
    let sha = lines[3].strip_prefix("sha256 ").expect("checksum line");
    assert_eq!(sha.len(), 64);
    // IV ‖ tag (28 bytes) each: public, and shorter than a key.
    let check = lines[4].strip_prefix("check 1 ").expect("v1's check value");
    let mac = lines[5].strip_prefix("mac ").expect("the MAC");
    assert_eq!((check.len(), mac.len()), (40, 40), "{text}");
    // No other long opaque token (base64 or hex of 32 bytes) but the
    // keyring id, the checksum, the check value and the MAC.
    for word in text.split([' ', '\n']) {
        if word.len() >= 32 {
            assert!(
                word == id || word == sha || word == check || word == mac,
                "unexpected opaque value {word:?} in metadata:\n{text}"
            );
        }
    }
}

/// The additional authenticated data of the documented envelope format.
fn envelope_aad(keyring_id_hex: &str, version: u32) -> Vec<u8> {
    let mut aad = b"kekd/envelope\0".to_vec();
    aad.push(0x01);
    aad.extend_from_slice(&unhex(keyring_id_hex));
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

// Environment of the child process that uses the token directly.
const CHILD: &str = "KEKD_TEST_TOKEN_CHILD";
const CHILD_LABEL: &str = "KEKD_TEST_TOKEN_LABEL";
const CHILD_PIN_FILE: &str = "KEKD_TEST_TOKEN_PIN_FILE";
const CHILD_OBJECT: &str = "KEKD_TEST_TOKEN_OBJECT";
const CHILD_KEYRING: &str = "KEKD_TEST_TOKEN_KEYRING";
const CHILD_ENVELOPE: &str = "KEKD_TEST_TOKEN_ENVELOPE";

/// The child: opens the token with cryptoki (SoftHSM2 reads `SOFTHSM2_CONF`
/// once per process, hence a process of its own), finds kekd's key object
/// by `CKA_ID`, and prints `name=hex` lines:
/// - `opened`: kekd's envelope opened by the token's AES-GCM with the
///   documented nonce position and AAD;
/// - `sealed_v1`, `sealed_as_v2`, `sealed_other_keyring`: a fresh seed
///   (`seed`) sealed by the token into the documented format, with the right
///   AAD and two wrong ones;
/// - `ecb`, `cbc`: the token's answer to using the key for anything but GCM.
fn token_child() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let var = |name: &str| std::env::var(name).unwrap();
    let pin = fs::read_to_string(var(CHILD_PIN_FILE)).unwrap();
    let ctx = Pkcs11::new(softhsm::MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| ctx.get_token_info(s).unwrap().label().trim_end() == var(CHILD_LABEL))
        .expect("the token's slot");
    let session = ctx.open_ro_session(slot).unwrap();
    session
        .login(
            UserType::User,
            Some(&cryptoki::types::AuthPin::from(pin.trim_end().to_owned())),
        )
        .unwrap();
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(unhex(&var(CHILD_OBJECT))),
        ])
        .unwrap();
    assert_eq!(keys.len(), 1, "one key object with that CKA_ID");
    let key = keys[0];
    let keyring = var(CHILD_KEYRING);
    let gcm = |nonce: &[u8; 12], aad: &[u8], encrypt: bool, data: &[u8]| {
        let mut iv = *nonce;
        let params = GcmParams::new(&mut iv, aad, 128.into()).unwrap();
        let mechanism = Mechanism::AesGcm(params);
        if encrypt {
            session.encrypt(&mechanism, key, data)
        } else {
            session.decrypt(&mechanism, key, data)
        }
    };

    let envelope = unhex(&var(CHILD_ENVELOPE));
    let nonce: [u8; 12] = envelope[5..17].try_into().unwrap();
    let opened = gcm(&nonce, &envelope_aad(&keyring, 1), false, &envelope[17..]).unwrap();
    println!("opened={}", softhsm::hex(&opened));

    let mine = seed();
    println!("seed={}", softhsm::hex(&mine));
    let mut nonce = [0u8; 12];
    common::getrandom(&mut nonce);
    for (name, aad) in [
        ("sealed_v1", envelope_aad(&keyring, 1)),
        ("sealed_as_v2", envelope_aad(&keyring, 2)),
        (
            "sealed_other_keyring",
            envelope_aad(&softhsm::random_hex(16), 1),
        ),
    ] {
        let body = gcm(&nonce, &aad, true, &mine).unwrap();
        let envelope = [&[0x01, 0, 0, 0, 1][..], &nonce, &body].concat();
        println!("{name}={}", softhsm::hex(&envelope));
    }
    for (name, mechanism) in [
        ("ecb", Mechanism::AesEcb),
        ("cbc", Mechanism::AesCbcPad([0; 16])),
    ] {
        let answer = match session.encrypt(&mechanism, key, &[0; 16]) {
            Ok(_) => "allowed".to_owned(),
            Err(cryptoki::error::Error::Pkcs11(rv, _)) => format!("{rv:?}"),
            Err(e) => format!("{e}"),
        };
        println!("{name}={answer}");
    }
}

/// The envelope is the documented format, whatever the backend: the token's
/// own AES-GCM (driven with cryptoki, outside kekd) opens kekd's
/// ciphertext with the documented nonce position and AAD, and kekd opens an
/// envelope the token sealed — but not one sealed for another version or
/// keyring. The key serves AES-GCM only (`CKA_ALLOWED_MECHANISMS`): ECB and
/// CBC are refused by the token.
#[tokio::test]
async fn envelopes_from_the_token_follow_the_documented_format() {
    if std::env::var_os(CHILD).is_some() {
        return token_child();
    }
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    let (_server, mut client) = serving(&token, &node).await;
    let seed = seed();
    let enc = client.encrypt(seed.clone(), &uid(0)).await.unwrap();
    assert_eq!(
        &enc.ciphertext[..5],
        &[0x01, 0, 0, 0, 1],
        "format 1, version 1"
    );

    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            &common::test_path(
                module_path!(),
                "envelopes_from_the_token_follow_the_documented_format",
            ),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD_LABEL, &token.label)
        .env(CHILD_PIN_FILE, &token.pin_file)
        .env(CHILD_OBJECT, object_id(&key_id, 1))
        .env(CHILD_KEYRING, &id)
        .env(CHILD_ENVELOPE, softhsm::hex(&enc.ciphertext));
    let out = tokio::task::spawn_blocking(move || child.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the token child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: HashMap<&str, &str> = stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        // The harness prints "test NAME ... " before the first line.
        .map(|(k, v)| (k.rsplit(' ').next().unwrap_or(k), v))
        .collect();

    // kekd → token.
    assert_eq!(
        unhex(answers["opened"]),
        seed,
        "the token opens kekd's envelope"
    );
    // token → kekd.
    let mine = unhex(answers["seed"]);
    assert_eq!(
        client
            .decrypt(
                unhex(answers["sealed_v1"]),
                &key_id,
                no_annotations(),
                &uid(1)
            )
            .await
            .unwrap(),
        mine,
        "kekd opens an envelope the token sealed"
    );
    for name in ["sealed_as_v2", "sealed_other_keyring"] {
        assert_refused(
            client
                .decrypt(unhex(answers[name]), &key_id, no_annotations(), &uid(2))
                .await,
            Code::InvalidArgument,
            OPAQUE,
        );
    }
    // GCM only.
    assert_eq!(answers["ecb"], "MechanismInvalid", "{stdout}");
    assert_eq!(answers["cbc"], "MechanismInvalid", "{stdout}");
}

// ------------------------------------------------------------ admin commands

/// One `kekd admin … --output json` that must succeed.
#[track_caller]
fn admin_json(token: &Token, node: &Node, command: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = token.admin(node, command, &all);
    assert_eq!(out.code(), 0, "admin {command} {args:?}: {out:#?}");
    assert_never_printed(
        &token.pin,
        &[("stdout", &out.stdout), ("stderr", &out.stderr)],
    );
    json_of(&out)
}

/// `(version, from, to)` of a change report.
fn transitions(report: &serde_json::Value) -> Vec<(u64, Option<String>, String)> {
    report["transitions"]
        .as_array()
        .unwrap_or_else(|| panic!("no transitions: {report}"))
        .iter()
        .map(|t| {
            (
                t["version"].as_u64().unwrap(),
                t["from"].as_str().map(str::to_owned),
                t["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn tr(version: u64, from: Option<&str>, to: &str) -> (u64, Option<String>, String) {
    (version, from.map(str::to_owned), to.to_owned())
}

/// The labels of the metadata objects.
fn metadata_labels(token: &Token) -> Vec<String> {
    token
        .objects()
        .iter()
        .filter(|o| o.is_data())
        .map(softhsm::Object::label)
        .collect()
}

#[test]
fn admin_lifecycle_on_the_token_through_config() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let init = admin_json(&token, &node, "init", &[]);
    assert_eq!(init["changed"], true);
    let key_id1 = init["key_id"].as_str().unwrap().to_owned();
    let id = keyring_id_of(&key_id1);
    assert_eq!(init["keyring_id"], id.as_str());
    assert_eq!(
        init["keyring"],
        format!("pkcs11 token {:?} (prefix \"kekd-\")", token.label)
    );

    let rotate = admin_json(&token, &node, "rotate", &[]);
    assert_eq!(transitions(&rotate), [tr(2, None, "pending")]);
    assert_eq!(
        rotate["transitions"][0]["key_id"],
        format!("kekd/{id}/v2"),
        "same keyring, next version"
    );
    let keys = token.secret_keys();
    let mut found: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.label(), k.field("ID").to_owned()))
        .collect();
    found.sort(); // pkcs11-tool lists objects in no particular order
    assert_eq!(
        found,
        [
            ("kekd-metadata-key".to_owned(), format!("{id}00000000")),
            ("kekd-v1".to_owned(), format!("{id}00000001")),
            ("kekd-v2".to_owned(), format!("{id}00000002")),
        ],
        "rotate generated v2 in the token"
    );
    let v2 = keys.iter().find(|k| k.label() == "kekd-v2").unwrap();
    assert_eq!(v2.heading, "Secret Key Object; AES length 32");
    assert_eq!(v2.items("Usage"), ["encrypt", "decrypt"]);
    for flag in [
        "sensitive",
        "always sensitive",
        "never extractable",
        "local",
    ] {
        assert!(v2.items("Access").contains(&flag), "{v2:#?}");
    }

    let promote = admin_json(&token, &node, "promote", &["2"]);
    let mut got = transitions(&promote);
    got.sort();
    assert_eq!(
        got,
        [
            tr(1, Some("primary"), "decrypt-only"),
            tr(2, Some("pending"), "primary")
        ]
    );

    // Version 1 was primary: without a scan only --force retires it.
    let retire = admin_json(&token, &node, "retire", &["1", "--force"]);
    assert_eq!(
        transitions(&retire),
        [tr(1, Some("decrypt-only"), "retired")]
    );
    let restore = admin_json(&token, &node, "restore", &["1"]);
    assert_eq!(
        transitions(&restore),
        [tr(1, Some("retired"), "decrypt-only")]
    );
    admin_json(&token, &node, "retire", &["1", "--force"]);

    let unconfirmed = token.admin(&node, "destroy", &["1"]);
    unconfirmed.exited(1);
    assert!(
        error_message(&unconfirmed)
            .starts_with("destroy erases the key material of version 1 forever"),
        "{unconfirmed:#?}"
    );
    assert_eq!(
        token.secret_key_labels(),
        ["kekd-metadata-key", "kekd-v1", "kekd-v2"]
    );

    let destroy = admin_json(
        &token,
        &node,
        "destroy",
        &["1", "--yes-destroy-key-material"],
    );
    assert_eq!(transitions(&destroy), [tr(1, Some("retired"), "destroyed")]);
    assert_eq!(
        token.secret_key_labels(),
        ["kekd-metadata-key", "kekd-v2"],
        "destroy removed the key object from the token"
    );

    // Version numbers (and so key_ids) are never reused.
    let rotate = admin_json(&token, &node, "rotate", &[]);
    assert_eq!(transitions(&rotate), [tr(3, None, "pending")]);
    assert_eq!(rotate["transitions"][0]["key_id"], format!("kekd/{id}/v3"));
    assert_eq!(
        token.secret_key_labels(),
        ["kekd-metadata-key", "kekd-v2", "kekd-v3"]
    );

    let list = admin_json(&token, &node, "list", &[]);
    assert_eq!(list["keyring_id"], id.as_str());
    assert_eq!(list["primary"], 2);
    let versions: Vec<(u64, String, String)> = list["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["state"].as_str().unwrap().to_owned(),
                v["key_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (1, "destroyed".to_owned(), format!("kekd/{id}/v1")),
            (2, "primary".to_owned(), format!("kekd/{id}/v2")),
            (3, "pending".to_owned(), format!("kekd/{id}/v3")),
        ]
    );

    // Eight writes, one live metadata revision: older ones are removed.
    assert_eq!(metadata_labels(&token), ["kekd-keyring@8"]);

    // The audit log of this node, in its state_dir.
    let state_dir = node.state_dir.clone().unwrap();
    let audit = state_dir.join(format!("pkcs11-{}-kekd-.audit.jsonl", token.label));
    let text =
        fs::read_to_string(&audit).unwrap_or_else(|e| panic!("audit log {}: {e}", audit.display()));
    assert_never_printed(&token.pin, &[("audit log", &text)]);
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect();
    let mut summary: Vec<(String, u64, Option<String>, String)> = records
        .iter()
        .map(|r| {
            assert_eq!(r["keyring_id"], id.as_str(), "{r}");
            assert_eq!(r["keyring"], init["keyring"], "{r}");
            assert_eq!(r["key_id"], format!("kekd/{id}/v{}", r["version"]), "{r}");
            (
                r["command"].as_str().unwrap().to_owned(),
                r["version"].as_u64().unwrap(),
                r["from"].as_str().map(str::to_owned),
                r["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The two promote lines may come in either order.
    summary[3..5].sort();
    let step = |c: &str, v: u64, from: Option<&str>, to: &str| {
        (c.to_owned(), v, from.map(str::to_owned), to.to_owned())
    };
    assert_eq!(
        summary,
        [
            step("init", 1, None, "primary"),
            step("rotate", 2, None, "pending"),
            step("promote", 1, Some("primary"), "decrypt-only"),
            step("promote", 2, Some("pending"), "primary"),
            step("retire", 1, Some("decrypt-only"), "retired"),
            step("restore", 1, Some("retired"), "decrypt-only"),
            step("retire", 1, Some("decrypt-only"), "retired"),
            step("destroy", 1, Some("retired"), "destroyed"),
            step("rotate", 3, None, "pending"),
        ]
    );
    let destroy_line = &records[7];
    assert_eq!(
        destroy_line["overrides"],
        serde_json::json!(["--yes-destroy-key-material"])
    );

    // The keyring exists: init refuses to replace it (whether it leaves
    // anything behind is `a_refused_init_leaves_no_object_behind`).
    let again = token.admin(&node, "init", &[]);
    assert_eq!(
        again.refused(1),
        format!(
            "token {:?} already holds a kekd keyring with prefix \"kekd-\"; refusing to replace it",
            token.label
        )
    );
    let list = admin_json(&token, &node, "list", &[]);
    assert_eq!(list["keyring_id"], id.as_str(), "the keyring is untouched");
    assert_eq!(metadata_labels(&token), ["kekd-keyring@8"]);
}

/// A refused `init` must leave the token as it was: no key object
/// generated for a keyring that was never written.
#[test]
fn a_refused_init_leaves_no_object_behind() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    token.init(&node);
    let before = token.objects();
    for _ in 0..2 {
        let again = token.admin(&node, "init", &[]);
        // A refusal (README's exit codes): the token keeps its keyring.
        again.exited(1);
    }
    let after = token.objects();
    let keys: Vec<String> = after
        .iter()
        .filter(|o| o.is_secret_key())
        .map(|k| format!("{} (CKA_ID {})", k.label(), k.field("ID")))
        .collect();
    assert_eq!(
        keys.len(),
        2,
        "refused inits left key objects of keyrings that were never written: {keys:#?}"
    );
    assert_eq!(after, before, "a refused init changed the token");
}

// -------------------------------------------------- two kekd on one token

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_token_switch_together_and_read_each_other() {
    let Some(token) = Token::create() else { return };
    let a = token.default_node("a");
    // Node b takes its PIN from KEKD_PKCS11_PIN instead of a pin file.
    let mut b_backend = token.backend("b");
    b_backend.pin_file = None;
    let b = token.node("b", &b_backend, &[]);
    let key_id1 = token.init(&a);

    let (server_a, mut ca) = serving(&token, &a).await;
    let mut b_cmd = token.kekd();
    b_cmd
        .args(["serve", "--config", b.config_arg()])
        .env("KEKD_PKCS11_PIN", &token.pin);
    let mut server_b = Process::spawn(b_cmd, &b.socket, token.path());
    let mut cb = server_b.ready().await;
    assert_eq!(ca.status().await.unwrap().key_id, key_id1);
    assert_eq!(cb.status().await.unwrap().key_id, key_id1);

    let (sa1, sb1) = (seed(), seed());
    let ea1 = ca.encrypt(sa1.clone(), &uid(1)).await.unwrap();
    let eb1 = cb.encrypt(sb1.clone(), &uid(2)).await.unwrap();
    assert_eq!((&ea1.key_id, &eb1.key_id), (&key_id1, &key_id1));
    let cross = |client: &Client, enc: &kekd::client::EncryptReply, n: usize| {
        let mut client = client.clone();
        let enc = enc.clone();
        async move {
            client
                .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(n))
                .await
                .unwrap()
        }
    };
    assert_eq!(cross(&cb, &ea1, 3).await, sa1, "b opens a's ciphertext");
    assert_eq!(cross(&ca, &eb1, 4).await, sb1, "a opens b's ciphertext");

    // One rotation, made once, through a's config.
    let rotate = admin_json(&token, &a, "rotate", &["--promote"]);
    let key_id2 = format!("kekd/{}/v2", keyring_id_of(&key_id1));
    let mut got = transitions(&rotate);
    got.sort();
    assert_eq!(
        got,
        [
            tr(1, Some("primary"), "decrypt-only"),
            tr(2, None, "pending"),
            tr(2, Some("pending"), "primary"),
        ]
    );

    for (name, client) in [("a", &ca), ("b", &cb)] {
        let mut client = client.clone();
        let (k1, k2) = (key_id1.clone(), key_id2.clone());
        eventually(
            &format!("kekd {name} reports the new key_id"),
            HANG_GUARD,
            || {
                let mut client = client.clone();
                let (k1, k2) = (k1.clone(), k2.clone());
                async move {
                    let status = client.status().await.map_err(|e| e.to_string())?;
                    check_status(&status.version, &status.healthz, &status.key_id)?;
                    assert!(
                        status.key_id == k1 || status.key_id == k2,
                        "kekd {name} reported {:?}",
                        status.key_id
                    );
                    (status.key_id == k2).then_some(()).ok_or(status.key_id)
                }
            },
        )
        .await;
        // Once switched, it stays switched.
        for _ in 0..5 {
            assert_eq!(client.status().await.unwrap().key_id, key_id2);
        }
    }

    let (sa2, sb2) = (seed(), seed());
    let ea2 = ca.encrypt(sa2.clone(), &uid(5)).await.unwrap();
    let eb2 = cb.encrypt(sb2.clone(), &uid(6)).await.unwrap();
    assert_eq!((&ea2.key_id, &eb2.key_id), (&key_id2, &key_id2));
    assert_eq!(cross(&cb, &ea2, 7).await, sa2, "b opens a's new ciphertext");
    assert_eq!(cross(&ca, &eb2, 8).await, sb2, "a opens b's new ciphertext");
    assert_eq!(cross(&cb, &ea1, 9).await, sa1, "b still opens a's old one");
    assert_eq!(cross(&ca, &eb1, 10).await, sb1, "a still opens b's old one");
    assert_eq!(cross(&ca, &ea1, 11).await, sa1);
    assert_eq!(cross(&cb, &eb1, 12).await, sb1);

    assert_never_printed(
        &token.pin,
        &[
            ("a stderr", &server_a.stderr()),
            ("b stderr", &server_b.stderr()),
        ],
    );
}

// -------------------------------------------------------------- concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_eight_clients_through_a_pool_of_four_sessions() {
    // Within kekd's connection limit (64, with this test's own client and
    // the self-check's), so no client is evicted mid-run.
    const CLIENTS: usize = 48;
    const ROUNDS: usize = 20;
    let Some(token) = Token::create() else { return };
    let mut backend = token.backend("a");
    backend.pool_size = Some(4);
    let node = token.node("a", &backend, &[]);
    let key_id = token.init(&node);
    let (server, _client) = serving(&token, &node).await;

    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let socket = node.socket.clone();
        let barrier = Arc::clone(&barrier);
        let key_id = key_id.clone();
        tasks.spawn(async move {
            let mut client = common::connect(&socket).await;
            barrier.wait().await;
            let mut errors = Vec::new();
            for n in 0..ROUNDS {
                let seed = seed();
                let id = uid(c * 1000 + n);
                match client.encrypt(seed.clone(), &id).await {
                    Ok(enc) if enc.key_id == key_id => {
                        match client
                            .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &id)
                            .await
                        {
                            Ok(p) if p == seed => {}
                            Ok(_) => errors.push(format!("{id}: decrypt returned another seed")),
                            Err(e) => errors.push(format!("{id}: decrypt: {e:?}")),
                        }
                    }
                    Ok(enc) => errors.push(format!("{id}: key_id {}", enc.key_id)),
                    Err(e) => errors.push(format!("{id}: encrypt: {e:?}")),
                }
            }
            errors
        });
    }
    let mut errors = Vec::new();
    while let Some(r) = tasks.join_next().await {
        errors.extend(r.expect("client task"));
    }
    assert!(
        errors.is_empty(),
        "{} of {} round trips failed: {:#?}",
        errors.len(),
        CLIENTS * ROUNDS,
        &errors[..errors.len().min(10)]
    );
    let log = server.stderr();
    for bad in [
        "internal error",
        "lost the PKCS#11 token",
        "request refused",
    ] {
        assert!(!log.contains(bad), "kekd logged {bad:?}:\n{log}");
    }
}

/// Every PKCS#11 call kekd makes, logged by pkcs11-spy in front of SoftHSM:
/// the user logs in once, at most `pool_size` sessions are open at any time
/// however many clients call, and serving creates no objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_pool_is_bounded_and_logs_in_once() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("init");
    token.init(&node);
    let mut backend = token.backend("a");
    backend.module = Some(SPY_MODULE.to_owned());
    backend.pool_size = Some(2);
    let spied = token.node("a", &backend, &[]);
    let spy_log = token.path().join("spy.log");
    let mut cmd = token.kekd();
    cmd.args(["serve", "--config", spied.config_arg()])
        .env("PKCS11SPY", softhsm::MODULE)
        .env("PKCS11SPY_OUTPUT", &spy_log);
    let mut server = Process::spawn(cmd, &spied.socket, token.path());
    let client = server.ready().await;

    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..32 {
        let mut client = client.clone();
        tasks.spawn(async move {
            for n in 0..4 {
                let seed = seed();
                let enc = client
                    .encrypt(seed.clone(), &uid(c * 10 + n))
                    .await
                    .unwrap();
                let p = client
                    .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(n))
                    .await
                    .unwrap();
                assert_eq!(p, seed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("client task");
    }
    drop(client);
    server.signal(rustix::process::Signal::TERM);
    let out = server.wait_exit().await;
    assert!(out.status.success(), "{out:#?}");

    let calls = SpyLog::read(&spy_log);
    assert_eq!(calls.count("C_Login"), 1, "logged in once");
    // How many the pool needed depends on timing (pkcs11-spy serializes
    // calls while it logs them); more than pool_size must never be open.
    let max = calls.max_open_sessions();
    assert!(
        (1..=2).contains(&max),
        "{max} sessions open at once with pool_size 2 (+ open, - close): {}",
        calls.session_trace()
    );

    for create in ["C_CreateObject", "C_GenerateKey", "C_DestroyObject"] {
        assert_eq!(calls.count(create), 0, "serving called {create}");
    }
}

/// The calls in a pkcs11-spy log: `N: C_Name` lines and what they returned.
struct SpyLog {
    calls: Vec<(String, String)>,
}

impl SpyLog {
    /// The calls logged at `path`; none if kekd never loaded the module
    /// (the spy writes its log from the first call on).
    fn read_if_any(path: &std::path::Path) -> Self {
        if path.exists() {
            Self::read(path)
        } else {
            Self { calls: Vec::new() }
        }
    }

    fn read(path: &std::path::Path) -> Self {
        let text = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("pkcs11-spy log {}: {e}", path.display()));
        let mut calls: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if let Some((n, name)) = line.split_once(": ")
                && n.bytes().all(|c| c.is_ascii_digit())
                && name.starts_with("C_")
            {
                calls.push((name.trim().to_owned(), String::new()));
            } else if let (Some(rv), Some(last)) =
                (line.strip_prefix("Returned:"), calls.last_mut())
            {
                last.1 = rv.split_whitespace().nth(1).unwrap_or_default().to_owned();
            }
        }
        assert!(!calls.is_empty(), "empty pkcs11-spy log:\n{text}");
        Self { calls }
    }

    fn count(&self, name: &str) -> usize {
        self.calls.iter().filter(|(n, _)| n == name).count()
    }

    fn returns(&self, name: &str) -> Vec<&str> {
        self.calls
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, rv)| rv.as_str())
            .collect()
    }

    /// The open/close sequence of sessions.
    fn session_trace(&self) -> String {
        self.calls
            .iter()
            .filter_map(|(n, rv)| match (n.as_str(), rv.as_str()) {
                ("C_OpenSession", "CKR_OK") => Some('+'),
                ("C_CloseSession", "CKR_OK") => Some('-'),
                ("C_CloseAllSessions", _) => Some('0'),
                _ => None,
            })
            .collect()
    }

    fn max_open_sessions(&self) -> i64 {
        let (mut open, mut max) = (0i64, 0i64);
        for c in self.session_trace().chars() {
            open = match c {
                '+' => open + 1,
                '-' => open - 1,
                _ => 0,
            };
            max = max.max(open);
        }
        max
    }
}

// ---------------------------------------------------- configuration mistakes

/// Each mistake: `serve` and `admin list` exit 78 at once — the error line
/// is all they print, and behind pkcs11-spy they reach the token once if
/// at all — with the message naming the problem and the fix, never printing
/// the PIN, leaving no socket.
#[test]
fn configuration_mistakes_exit_78_naming_the_fix() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("ok");
    token.init(&node);
    let dir = token.path().to_owned();
    let loose_pin = dir.join("pin-0644");
    fs::write(&loose_pin, format!("{}\n", token.pin)).unwrap();
    fs::set_permissions(&loose_pin, fs::Permissions::from_mode(0o644)).unwrap();
    let no_module = dir.join("no-such-module.so");
    let not_a_module = token.conf.clone();

    type Check = Box<dyn Fn(&str) -> bool>;
    let exact = |m: String| -> Check { Box::new(move |got: &str| got == m) };
    let mut cases: Vec<(&str, softhsm::BackendTable, Check)> = Vec::new();
    let base = token.backend("bad");

    let mut b = base.clone();
    b.module = Some(no_module.display().to_string());
    cases.push((
        "missing module file",
        b,
        exact(format!(
            "cannot load PKCS#11 module {}: no such file (check `module`; e.g. /usr/lib/softhsm/libsofthsm2.so)",
            no_module.display()
        )),
    ));
    let mut b = base.clone();
    b.module = Some(not_a_module.display().to_string());
    let prefix = format!("cannot load PKCS#11 module {}: ", not_a_module.display());
    cases.push((
        "not a module",
        b,
        Box::new(move |got: &str| {
            got.starts_with(&prefix)
                && got.ends_with(" (check `module`; e.g. /usr/lib/softhsm/libsofthsm2.so)")
        }),
    ));
    let mut b = base.clone();
    b.module = None;
    cases.push((
        "no module",
        b,
        exact(
            "no PKCS#11 module given: set `module = \"/path/to/module.so\"` in [backend], --pkcs11-module or KEKD_PKCS11_MODULE"
                .to_owned(),
        ),
    ));
    let mut b = base.clone();
    b.token_label = Some("no-such-token".to_owned());
    let (start, present) = (
        format!(
            "no token labelled \"no-such-token\" in PKCS#11 module {} (tokens present: ",
            softhsm::MODULE
        ),
        format!("{:?}", token.label),
    );
    cases.push((
        "unknown token label",
        b,
        Box::new(move |got: &str| {
            got.starts_with(&start)
                && got.contains(&present)
                && got.ends_with("); check `token_label`")
        }),
    ));
    let mut b = base.clone();
    b.token_label = None;
    cases.push((
        "no token label",
        b,
        exact(
            "no PKCS#11 token label given: set `token_label = \"LABEL\"` in [backend], --pkcs11-token-label or KEKD_PKCS11_TOKEN_LABEL"
                .to_owned(),
        ),
    ));
    let mut b = base.clone();
    b.pin_file = None;
    cases.push((
        "no PIN",
        b,
        exact(
            "no PKCS#11 PIN given: set `pin_file = \"PATH\"` in [backend], --pkcs11-pin-file PATH or the KEKD_PKCS11_PIN environment variable"
                .to_owned(),
        ),
    ));
    let mut b = base.clone();
    b.pin_file = Some(loose_pin.clone());
    cases.push((
        "pin file readable by others",
        b,
        exact(format!(
            "invalid pin_file: {0} has permissions 0644, which let other users read the PIN; run `chmod 600 {0}`",
            loose_pin.display()
        )),
    ));
    let mut b = base.clone();
    b.key_label_prefix = Some("nothing-here-".to_owned());
    cases.push((
        "no keyring under this prefix",
        b,
        exact(format!(
            "token {:?} holds no kekd keyring with prefix \"nothing-here-\"; create one with `kekd admin init --config …`",
            token.label
        )),
    ));

    for (what, backend, check) in cases {
        let bad = token.node("bad", &backend, &[]);
        // Where SoftHSM is the module, the same mistake once more behind
        // pkcs11-spy, which counts kekd's attempts.
        let spied = (backend.module.as_deref() == Some(softhsm::MODULE)).then(|| {
            let mut spied = backend.clone();
            spied.module = Some(SPY_MODULE.to_owned());
            token.node("bad-spied", &spied, &[])
        });
        for command in [&["serve"][..], &["admin", "list"]] {
            let args = [command, &["--config", bad.config_arg()]].concat();
            let out = token.run(&args);
            assert_eq!(out.code(), EX_CONFIG, "{what}: {args:?}: {out:#?}");
            let message = error_message(&out);
            assert!(check(&message), "{what}: {args:?}: message {message:?}");
            assert_never_printed(
                &token.pin,
                &[("stdout", &out.stdout), ("stderr", &out.stderr)],
            );
            // At once: the error is all kekd printed (no retry, no wait
            // announced) ...
            assert_eq!(
                out.stderr.lines().count(),
                1,
                "{what}: {args:?}: more than the error: {out:#?}"
            );
            assert!(!bad.socket.exists(), "{what}: a socket was left behind");
            // ... and it tried the token once, if at all.
            if let Some(spied) = &spied {
                let spy_log = token
                    .path()
                    .join(format!("spy-{}.log", softhsm::random_hex(4)));
                let mut cmd = token.kekd();
                cmd.args(command)
                    .args(["--config", spied.config_arg()])
                    .env("PKCS11SPY", softhsm::MODULE)
                    .env("PKCS11SPY_OUTPUT", &spy_log);
                let out = common::run(cmd, token.path());
                assert_eq!(out.code(), EX_CONFIG, "{what}: spied {args:?}: {out:#?}");
                let calls = SpyLog::read_if_any(&spy_log);
                // C_GetSlotList twice: once for the count, once for the list.
                for (call, most) in [
                    ("C_Initialize", 1),
                    ("C_GetSlotList", 2),
                    ("C_OpenSession", 1),
                    ("C_Login", 1),
                ] {
                    assert!(
                        calls.count(call) <= most,
                        "{what}: {args:?}: {call} {} times, kekd tried again: {:?}",
                        calls.count(call),
                        calls.calls
                    );
                }
            }
        }
    }
}

/// A wrong PIN: exit 78 naming it, and exactly one C_Login attempt (counted
/// by pkcs11-spy), so a token's lockout counter is never run down. The
/// right PIN still works afterwards.
#[test]
fn a_wrong_pin_is_tried_exactly_once() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("ok");
    token.init(&node);
    let wrong_pin = format!("wrong-{}", softhsm::random_hex(6));
    let wrong_file = token.path().join("wrong-pin");
    softhsm::write_private(&wrong_file, &format!("{wrong_pin}\n"));
    let mut backend = token.backend("bad");
    backend.module = Some(SPY_MODULE.to_owned());
    backend.pin_file = Some(wrong_file);
    let bad = token.node("bad", &backend, &[]);

    for (n, args) in [
        vec!["serve", "--config", bad.config_arg()],
        vec!["admin", "rotate", "--config", bad.config_arg()],
    ]
    .into_iter()
    .enumerate()
    {
        let spy_log = token.path().join(format!("spy-{n}.log"));
        let mut cmd = token.kekd();
        cmd.args(&args)
            .env("PKCS11SPY", softhsm::MODULE)
            .env("PKCS11SPY_OUTPUT", &spy_log);
        let out = common::run(cmd, token.path());
        assert_eq!(out.code(), EX_CONFIG, "{args:?}: {out:#?}");
        assert_eq!(
            error_message(&out),
            format!(
                "the token {:?} rejected the PIN; kekd will not try again (to protect the token from lockout): \
                 fix the PIN in `pin_file` or KEKD_PKCS11_PIN and restart",
                token.label
            )
        );
        for secret in [&token.pin, &wrong_pin] {
            assert_never_printed(secret, &[("stdout", &out.stdout), ("stderr", &out.stderr)]);
        }
        // At once: the error is all kekd printed, and it made one login
        // attempt (no retry, so no wait for a lockout timer either).
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {out:#?}");
        let calls = SpyLog::read(&spy_log);
        assert_eq!(
            calls.returns("C_Login"),
            ["CKR_PIN_INCORRECT"],
            "{args:?}: exactly one login attempt"
        );
        assert!(!bad.socket.exists());
    }
    assert_eq!(
        token.secret_key_labels(),
        ["kekd-metadata-key", "kekd-v1"],
        "the refused rotate changed nothing"
    );
    let list = token.admin(&node, "list", &[]);
    assert_eq!(list.code(), 0, "the right PIN still works: {list:#?}");
}

// ------------------------------------------- key deleted behind kekd's back

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_object_deleted_behind_kekds_back() {
    let Some(token) = Token::create() else { return };
    let node = token.node("a", &token.backend("a"), &["self_check_interval = \"1s\""]);
    let key_id1 = token.init(&node);
    let (mut server, mut client) = serving(&token, &node).await;
    let s1 = seed();
    let c1 = client.encrypt(s1.clone(), &uid(1)).await.unwrap();

    admin_json(&token, &node, "rotate", &["--promote"]);
    let key_id2 = format!("kekd/{}/v2", keyring_id_of(&key_id1));
    {
        let key_id2 = key_id2.clone();
        eventually("kekd serves v2", HANG_GUARD, || {
            let mut client = client.clone();
            let key_id2 = key_id2.clone();
            async move {
                let s = client.status().await.map_err(|e| e.to_string())?;
                (s.key_id == key_id2).then_some(()).ok_or(s.key_id)
            }
        })
        .await;
    }
    let s2 = seed();
    let c2 = client.encrypt(s2.clone(), &uid(2)).await.unwrap();
    assert_eq!(c2.key_id, key_id2);

    token.delete_secret_key(&object_id(&key_id1, 2));
    assert_eq!(token.secret_key_labels(), ["kekd-metadata-key", "kekd-v1"]);

    // kekd keeps running on its snapshot: v1 still decrypts, and Status
    // never reports another key_id than v2. Without v2's key it cannot
    // encrypt, so Status fails (an RPC error) instead of claiming health.
    let status = eventually(
        "Status fails once the primary's key object is gone",
        HANG_GUARD,
        || {
            let mut client = client.clone();
            let key_id2 = key_id2.clone();
            async move {
                match client.status().await {
                    Ok(s) => {
                        assert_eq!(s.key_id, key_id2, "Status flipped key_id");
                        Err(format!("still healthy: {s:?}"))
                    }
                    Err(e) => Ok(e),
                }
            }
        },
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for n in 0..5 {
        assert_eq!(
            client
                .decrypt(
                    c1.ciphertext.clone(),
                    &c1.key_id,
                    no_annotations(),
                    &uid(10 + n)
                )
                .await
                .unwrap(),
            s1,
            "v1 still decrypts"
        );
    }
    server.wait_for_stderr("keyring change refused").await;

    // The refused reload is reported by `kekd admin list`.
    let missing = "the key object of version 2 (kekd-v2) is missing from the token";
    eventually("admin list reports the refused reload", HANG_GUARD, || {
        let token = &token;
        let node = &node;
        async move {
            let out = token.admin(node, "list", &["--output", "json"]);
            if out.code() != 0 {
                // SoftHSM readers can catch the token files mid-write
                // by another process; the next poll reads them whole.
                return Err(format!("{out:?}"));
            }
            let json = json_of(&out);
            match json["reload_error"]["message"].as_str() {
                Some(m) if m == missing => Ok(()),
                _ => Err(format!("{json}")),
            }
        }
    })
    .await;
    let text = token.admin(&node, "list", &[]);
    assert!(
        text.stdout
            .contains("WARNING: kekd refused the keyring change at "),
        "{text:#?}"
    );
    assert!(text.stdout.contains(missing), "{text:#?}");

    // A fresh kekd refuses to start on the broken keyring.
    let fresh = token.default_node("fresh");
    let out = token.run(&["serve", "--config", fresh.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), missing);
    assert!(!fresh.socket.exists());

    // A ciphertext under the deleted key is not a bad ciphertext: the
    // refusal must not say so (INVALID_ARGUMENT "could not be decrypted"
    // tells the operator the stored data is damaged). It is kekd's side
    // that lacks the key: INTERNAL (details in the log) or
    // FAILED_PRECONDITION naming the key, as for a destroyed version.
    let err = client
        .decrypt(
            c2.ciphertext.clone(),
            &c2.key_id,
            no_annotations(),
            &uid(20),
        )
        .await
        .expect_err("decrypted under a deleted key");
    assert!(
        matches!(err.code(), Code::Internal | Code::FailedPrecondition) && err.message() != OPAQUE,
        "Decrypt under the deleted key v2: {err:?}"
    );
    assert!(
        server.try_exit().is_none(),
        "kekd died: {}",
        server.stderr()
    );
}

// ------------------------------------------------------------------ outages

/// What an outage scenario observed that breaks the contract.
#[derive(Default)]
struct Violations(Vec<String>);

impl Violations {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    #[track_caller]
    fn assert_none(&self, scenario: &str, log: &str) {
        assert!(
            self.0.is_empty(),
            "{scenario}:\n  - {}\nkekd's log (excerpt):\n{}",
            self.0.join("\n  - "),
            log_excerpt(log)
        );
    }
}

/// A way to make the token unavailable and bring it back.
trait Outage {
    fn begin(&mut self);
    fn end(&mut self);
}

/// SoftHSM's token directory moved away and back.
struct MovedTokenDir<'a> {
    token: &'a Token,
    away: Option<softhsm::TakenAway>,
}

impl Outage for MovedTokenDir<'_> {
    fn begin(&mut self) {
        self.away = Some(self.token.take_away());
    }

    fn end(&mut self) {
        self.away.take().expect("taken away").put_back();
    }
}

/// The `p11-kit server` in front of the token killed and started again on
/// the same address.
struct KilledP11Kit<'a> {
    token: &'a Token,
    server: P11KitServer,
}

impl Outage for KilledP11Kit<'_> {
    fn begin(&mut self) {
        self.server.kill();
    }

    fn end(&mut self) {
        self.server = P11KitServer::start(self.token);
    }
}

/// Node settings for the outage scenarios: a self-check every second
/// (kekd re-checks every second while unhealthy anyway), each pass logged,
/// so the scenario counts self-checks instead of waiting on the clock.
const COUNTED_SELF_CHECKS: [&str; 2] = [
    "self_check_interval = \"1s\"",
    "log_level = \"info,kekd::keyring=debug\"",
];

/// Self-checks `server` logged as passed so far.
fn self_checks_passed(server: &Process) -> usize {
    server.stderr_count("keyring self-check passed")
}

/// Polls `server`'s log until it contains `needle`; false after [`HANG_GUARD`].
async fn logged(server: &Process, needle: &str) -> bool {
    let guard = Instant::now() + HANG_GUARD;
    while !server.stderr().contains(needle) {
        if Instant::now() > guard {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

/// The outage contract: while the token is gone Status fails as an RPC
/// error (UNAVAILABLE) from the first self-check without the token,
/// Decrypt and Encrypt fail with UNAVAILABLE while the token is still away
/// (kekd does not hold a call until it returns), kekd stays up and keeps
/// its key_id; once the token is back kekd recovers by itself — its
/// self-check passes again — with the same key_id, and opens what it sealed
/// before. Each step waits for kekd's own event, never on the clock.
async fn outage_scenario(
    server: &mut Process,
    client: &Client,
    key_id: &str,
    outage: &mut dyn Outage,
) -> Violations {
    let mut v = Violations::default();
    let mut client = client.clone();
    let seed = seed();
    let before = client.encrypt(seed.clone(), &uid(0)).await.unwrap();

    let passed_before = self_checks_passed(server);
    outage.begin();

    // Status fails as an RPC error once a self-check has run without the
    // token: at most one self-check (the one under way as the token went)
    // passes after it went. Polled until Status fails or a second
    // self-check passes.
    let guard = Instant::now() + HANG_GUARD;
    let status_error = loop {
        let passed = self_checks_passed(server) - passed_before;
        match client.status().await {
            Err(e) => break Ok(e),
            Ok(s) => {
                v.check(s.key_id == key_id, || {
                    format!("Status changed key_id during the outage: {s:?}")
                });
                if passed > 1 || Instant::now() > guard {
                    break Err(passed);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    match &status_error {
        Ok(e) => v.check(e.code() == Code::Unavailable, || {
            format!(
                "Status failed with {:?} {:?}, not UNAVAILABLE",
                e.code(),
                e.message()
            )
        }),
        Err(passed) => v.check(false, || {
            format!(
                "Status still answered ok after {passed} self-check(s) passed without the token"
            )
        }),
    }

    // Decrypt and Encrypt fail with UNAVAILABLE while the token is still
    // away: the token comes back only after both returned, so a kekd that
    // held a call until the token returned would end it at the client's
    // deadline instead (DEADLINE_EXCEEDED), and the apiserver, which gives
    // up after 3 s, would have seen no answer at all.
    let decrypt = client
        .decrypt(
            before.ciphertext.clone(),
            &before.key_id,
            no_annotations(),
            &uid(1),
        )
        .await;
    match &decrypt {
        Ok(_) => v.check(false, || {
            "Decrypt succeeded while the token was gone".to_owned()
        }),
        Err(e) => v.check(e.code() == Code::Unavailable, || {
            format!(
                "Decrypt during the outage failed with {:?} {:?}, not UNAVAILABLE",
                e.code(),
                e.message()
            )
        }),
    }
    let encrypt = client.encrypt(common::seed(), &uid(2)).await;
    match &encrypt {
        Ok(e) => v.check(false, || {
            format!("Encrypt succeeded while the token was gone: {:?}", e.key_id)
        }),
        Err(e) => v.check(e.code() == Code::Unavailable, || {
            format!(
                "Encrypt during the outage failed with {:?} {:?}, not UNAVAILABLE",
                e.code(),
                e.message()
            )
        }),
    }
    v.check(server.try_exit().is_none(), || {
        "kekd exited during the outage".to_owned()
    });

    outage.end();

    // Recovery by itself: kekd's self-check passes again (and says so);
    // from then on Status is healthy with the same key_id, Decrypt opens
    // what was sealed before, Encrypt seals again.
    if logged(server, "self-check passes again; Status is healthy").await {
        let status = client.status().await;
        v.check(status.as_ref().is_ok_and(|s| s.key_id == key_id), || {
            format!("Status once the self-check passed again: {status:?}")
        });
        let opened = client
            .decrypt(
                before.ciphertext.clone(),
                &before.key_id,
                no_annotations(),
                &uid(3),
            )
            .await;
        v.check(opened.as_ref().is_ok_and(|p| *p == seed), || {
            format!("Decrypt once the self-check passed again: {opened:?}")
        });
        let enc = client.encrypt(common::seed(), &uid(4)).await;
        v.check(enc.as_ref().is_ok_and(|e| e.key_id == key_id), || {
            format!("Encrypt after recovery: {enc:?}")
        });
    } else {
        v.check(false, || {
            "kekd never logged that its self-check passes again".to_owned()
        });
    }
    v.check(server.try_exit().is_none(), || "kekd exited".to_owned());
    v
}

/// The token directory of a plain SoftHSM token is moved away while kekd
/// serves, then moved back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_directory_moved_away_and_back_while_serving() {
    let Some(token) = Token::create() else { return };
    let node = token.node("a", &token.backend("a"), &COUNTED_SELF_CHECKS);
    let key_id = token.init(&node);
    let (mut server, client) = serving(&token, &node).await;
    let mut outage = MovedTokenDir {
        token: &token,
        away: None,
    };
    let violations = outage_scenario(&mut server, &client, &key_id, &mut outage).await;
    violations.assert_none("token directory moved away and back", &server.stderr());
}

/// The token behind `p11-kit server`, kekd on p11-kit's client module. The
/// p11-kit of Debian 12 (0.24.1) does not carry CKM_AES_GCM over its RPC
/// (the client module filters it out of the mechanism list), so kekd must
/// refuse such a token at startup naming the missing mechanism. With a
/// p11-kit that carries AES-GCM, the server is killed and restarted on the
/// same address while kekd serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_behind_p11_kit_server() {
    let Some(token) = Token::create() else { return };
    if !P11KitServer::available() {
        common::skip::skip("p11-kit not installed: apt-get install -y p11-kit p11-kit-modules");
        return;
    }
    let direct = token.default_node("direct");
    let key_id = token.init(&direct);
    let p11 = P11KitServer::start(&token);
    let mut backend = token.backend("a");
    backend.module = Some(P11_KIT_CLIENT.to_owned());
    let node = token.node("a", &backend, &COUNTED_SELF_CHECKS);
    let address = p11.address.clone();
    let serve = |token: &Token| {
        let mut cmd = token.kekd();
        cmd.args(["serve", "--config", node.config_arg()])
            .env("P11_KIT_SERVER_ADDRESS", &address)
            .env_remove("SOFTHSM2_CONF");
        cmd
    };

    if !p11.client_mechanisms().contains("AES-GCM") {
        let out = common::run(serve(&token), token.path());
        assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
        assert_eq!(
            error_message(&out),
            format!(
                "token {:?} does not offer CKM_AES_GCM, which kekd needs (YubiHSM 2 and TPMs through \
                 tpm2-pkcs11 do not implement AES-GCM); use a token that does",
                token.label
            )
        );
        assert!(!node.socket.exists());
        return;
    }

    let mut server = Process::spawn(serve(&token), &node.socket, token.path());
    let client = server.ready().await;
    let mut outage = KilledP11Kit {
        token: &token,
        server: p11,
    };
    let violations = outage_scenario(&mut server, &client, &key_id, &mut outage).await;
    violations.assert_none("p11-kit server killed and restarted", &server.stderr());
}

// ------------------------------------------------ planted and edited objects

/// `pkcs11-tool --write-object FILE --type TYPE ARGS…` with `bytes` in FILE,
/// logged in (`login`) or not.
fn write_object(token: &Token, login: bool, bytes: &[u8], args: &[&str]) {
    let file = token
        .path()
        .join(format!("object-{}", softhsm::random_hex(4)));
    fs::write(&file, bytes).unwrap();
    let mut all = vec!["--write-object", file.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = if login {
        token.tool(&all)
    } else {
        token.tool_public(&all)
    };
    let _ = fs::remove_file(&file);
    assert!(out.status.success(), "pkcs11-tool {all:?}: {out:?}");
}

/// Keyring metadata text (the local format's checksum included) claiming
/// `lines` as the versions of keyring `id`.
fn metadata_text(magic: &str, id: &str, lines: &[&str]) -> String {
    use sha2::Digest as _;
    let mut text = format!("{magic}\nkeyring {id}\n");
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    let digest = sha2::Sha256::digest(text.as_bytes());
    text.push_str(&format!("sha256 {}\n", softhsm::hex(&digest)));
    text
}

async fn status_key_id(client: &Client) -> String {
    client.clone().status().await.unwrap().key_id
}

/// The attack of the review: without the PIN, a public AES key with the
/// CKA_ID of version 2 and a public metadata object saying "v2 primary".
/// kekd ignores both (and says so), keeps sealing under v1's key, and a
/// restart serves v1 too.
#[tokio::test]
async fn public_objects_planted_without_the_pin_are_ignored() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    let (server, client) = serving(&token, &node).await;

    let mut attacker_key = [0u8; 32];
    common::getrandom(&mut attacker_key);
    write_object(
        &token,
        false,
        &attacker_key,
        &[
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--id",
            &format!("{id}00000002"),
            "--label",
            "kekd-v2",
        ],
    );
    let planted = metadata_text(
        "kekd-keyring-meta v1",
        &id,
        &[
            "version 1 decrypt-only created=2026-01-01T00:00:00Z promoted=2026-01-01T00:00:00Z",
            "version 2 primary created=2026-01-02T00:00:00Z promoted=2026-01-02T00:00:00Z",
        ],
    );
    write_object(
        &token,
        false,
        planted.as_bytes(),
        &[
            "--type",
            "data",
            "--label",
            "kekd-keyring@999",
            "--application-label",
            "kekd",
        ],
    );
    server
        .wait_for_stderr("public data object \"kekd-keyring@999\"")
        .await;
    server
        .wait_for_stderr("kekd reads only private objects; it was created without the PIN")
        .await;
    server
        .wait_for_stderr("public secret key \"kekd-v2\"")
        .await;
    // More polls after the warning: still v1.
    for _ in 0..5 {
        assert_eq!(status_key_id(&client).await, key_id);
    }
    let seed = seed();
    let sealed = client.clone().encrypt(seed.clone(), &uid(1)).await.unwrap();
    assert_eq!(sealed.key_id, key_id, "sealed under v1");
    assert_eq!(&sealed.ciphertext[..5], &[0x01, 0, 0, 0, 1]);
    // Not under the attacker's key, whatever the header says.
    {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&attacker_key).unwrap();
        for version in [1, 2] {
            let opened = cipher.decrypt(
                sealed.ciphertext[5..17].try_into().unwrap(),
                Payload {
                    msg: &sealed.ciphertext[17..],
                    aad: &envelope_aad(&id, version),
                },
            );
            assert!(opened.is_err(), "the attacker's key opened kekd's envelope");
        }
    }
    assert!(
        !server.stderr().contains("keyring reloaded"),
        "{}",
        server.stderr()
    );

    // A restart (a second node, fresh process) serves v1 as well.
    let fresh = token.default_node("fresh");
    let (fresh_server, fresh_client) = serving(&token, &fresh).await;
    assert_eq!(status_key_id(&fresh_client).await, key_id);
    fresh_server
        .wait_for_stderr("public secret key \"kekd-v2\"")
        .await;
}

/// A public object with v1's CKA_ID is not a duplicate: it is ignored.
#[tokio::test]
async fn a_public_duplicate_of_a_key_is_ignored() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    write_object(
        &token,
        false,
        &[7; 32],
        &[
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--id",
            &format!("{id}00000001"),
            "--label",
            "kekd-v1",
        ],
    );
    let (server, client) = serving(&token, &node).await;
    assert_eq!(status_key_id(&client).await, key_id);
    let sealed = client.clone().encrypt(seed(), &uid(1)).await.unwrap();
    assert_eq!(sealed.key_id, key_id);
    server
        .wait_for_stderr("public secret key \"kekd-v1\"")
        .await;
}

/// A second *private* key with v1's CKA_ID (only a PIN holder can make one):
/// kekd refuses to guess, naming both objects.
#[test]
fn a_private_duplicate_of_a_key_is_refused_naming_both() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    write_object(
        &token,
        true,
        &[7; 32],
        &[
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--private",
            "--sensitive",
            "--id",
            &format!("{id}00000001"),
            "--label",
            "planted",
        ],
    );
    let out = token.run(&["serve", "--config", node.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    let message = error_message(&out);
    assert!(
        message.starts_with(&format!(
            "the token holds two private objects for the key object of version 1 (CKA_ID {id}00000001): "
        )),
        "{message}"
    );
    assert!(
        message.contains("\"kekd-v1\" (handle ") && message.contains("\"planted\" (handle "),
        "{message}"
    );
}

/// A private key that was imported (not generated in the token) in place of
/// a pending version's key: refused by name, while serving and at startup.
#[tokio::test]
async fn an_imported_key_object_is_refused_by_name() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    admin_json(&token, &node, "rotate", &[]);
    let (server, client) = serving(&token, &node).await;
    token.delete_secret_key(&format!("{id}00000002"));
    write_object(
        &token,
        true,
        &[9; 32],
        &[
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--private",
            "--sensitive",
            "--id",
            &format!("{id}00000002"),
            "--label",
            "kekd-v2",
        ],
    );
    let expected = format!(
        "key object kekd-v2 of version 2 was not always sensitive (CKA_ALWAYS_SENSITIVE): its bytes were \
         readable once: refusing it; kekd uses only keys it generated in the token (private, sensitive, never \
         extractable, CKA_LOCAL, AES-GCM only). If kekd did not make this object, delete it (`pkcs11-tool \
         --login --delete-object --type secrkey --id {id}00000002`) and restore the original from the token's \
         backup"
    );
    // (A reload between the delete and the write may first report the key
    // as missing: wait for this refusal itself.)
    server.wait_for_stderr(&expected).await;
    assert!(server.stderr().contains("keyring change refused"));
    assert_eq!(status_key_id(&client).await, key_id, "still serving v1");

    let fresh = token.default_node("fresh");
    let out = token.run(&["serve", "--config", fresh.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), expected);
}

/// A PIN holder's key made with pkcs11-tool's defaults (CKA_WRAP) in place of
/// v1's: refused by name.
#[test]
fn a_key_object_generated_with_other_attributes_is_refused() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    token.delete_secret_key(&format!("{id}00000001"));
    let out = token.tool(&[
        "--keygen",
        "--key-type",
        "AES:32",
        "--private",
        "--sensitive",
        "--allowed-mechanisms",
        "AES-GCM",
        "--id",
        &format!("{id}00000001"),
        "--label",
        "kekd-v1",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = token.run(&["serve", "--config", node.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out).starts_with(
            "key object kekd-v1 of version 1 may wrap other keys (CKA_WRAP): refusing it"
        ),
        "{out:#?}"
    );
}

/// A PIN holder edits the metadata (a new revision with other content, the
/// checksum made right): it fails authentication. kekd keeps serving the last
/// good keyring and refuses it at startup; deleting it restores service.
#[tokio::test]
async fn edited_metadata_fails_authentication() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    let (server, client) = serving(&token, &node).await;

    let real = token.read_value("data", "kekd-keyring@1").unwrap();
    let real = String::from_utf8(real).unwrap();
    let lines: Vec<&str> = real.lines().collect();
    // v1 back-dated a year, checksum recomputed, the real check value and
    // MAC kept.
    let edited_version = lines[2]
        .split(' ')
        .map(|word| match word.split_once('=') {
            Some((name, time)) => {
                let year: u32 = time[..4].parse().unwrap();
                format!("{name}={}{}", year - 1, &time[4..])
            }
            None => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut edited = metadata_text("kekd-keyring-meta v2", &id, &[&edited_version]);
    edited.push_str(&format!("{}\n{}\n", lines[4], lines[5]));
    write_object(
        &token,
        true,
        edited.as_bytes(),
        &[
            "--type",
            "data",
            "--private",
            "--label",
            "kekd-keyring@2",
            "--application-label",
            "kekd",
        ],
    );
    let expected = "keyring metadata object kekd-keyring@2 fails authentication (its MAC does not verify): it \
                    was edited or planted, not written by kekd; refusing it. If no kekd wrote it, delete it \
                    (`pkcs11-tool --login --delete-object --type data --label kekd-keyring@2`): kekd then reads \
                    the revision before it";
    server.wait_for_stderr(expected).await;
    assert!(server.stderr().contains("keyring change refused"));
    assert_eq!(status_key_id(&client).await, key_id);
    let fresh = token.default_node("fresh");
    let out = token.run(&["serve", "--config", fresh.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), expected);
    // Admin commands refuse it too (nothing is written over it).
    let rotate = token.admin(&node, "rotate", &[]);
    assert_eq!(rotate.code(), EX_CONFIG, "{rotate:#?}");

    // The same bytes as revision 1, replayed under a newer label: the MAC
    // binds the revision, so this fails too.
    let out = token.tool(&[
        "--delete-object",
        "--type",
        "data",
        "--label",
        "kekd-keyring@2",
    ]);
    assert!(out.status.success(), "{out:?}");
    write_object(
        &token,
        true,
        real.as_bytes(),
        &[
            "--type",
            "data",
            "--private",
            "--label",
            "kekd-keyring@3",
            "--application-label",
            "kekd",
        ],
    );
    let out = token.run(&["serve", "--config", fresh.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out).starts_with(
            "keyring metadata object kekd-keyring@3 fails authentication (its MAC does not verify)"
        ),
        "{out:#?}"
    );
    let out = token.tool(&[
        "--delete-object",
        "--type",
        "data",
        "--label",
        "kekd-keyring@3",
    ]);
    assert!(out.status.success(), "{out:?}");
    let (_fresh_server, fresh_client) = serving(&token, &fresh).await;
    assert_eq!(status_key_id(&fresh_client).await, key_id);
}

/// Metadata written by a kekd before the MAC (format v1) is not served; the
/// message names the fix.
#[test]
fn legacy_metadata_is_refused_naming_the_fix() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    let real = String::from_utf8(token.read_value("data", "kekd-keyring@1").unwrap()).unwrap();
    let lines: Vec<&str> = real.lines().collect();
    let legacy = metadata_text("kekd-keyring-meta v1", &id, &[lines[2]]);
    write_object(
        &token,
        true,
        legacy.as_bytes(),
        &[
            "--type",
            "data",
            "--private",
            "--label",
            "kekd-keyring@2",
            "--application-label",
            "kekd",
        ],
    );
    let out = token.run(&["serve", "--config", node.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out)
            .contains("was written by an older kekd, without a MAC or key check values"),
        "{out:#?}"
    );
    assert!(
        error_message(&out).contains("run `kekd admin upgrade-token --config …` once"),
        "{out:#?}"
    );
}

/// In a child process (the test binary again, `CHILD` set): logs in, deletes
/// the key with `CKA_ID` = `CHILD_OBJECT` and generates another with kekd's
/// exact template and label — a key that passes every attribute rule.
fn swap_child() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let var = |name: &str| std::env::var(name).unwrap();
    let pin = fs::read_to_string(var(CHILD_PIN_FILE)).unwrap();
    let ctx = Pkcs11::new(softhsm::MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| ctx.get_token_info(s).unwrap().label().trim_end() == var(CHILD_LABEL))
        .expect("the token's slot");
    let session = ctx.open_rw_session(slot).unwrap();
    session
        .login(
            UserType::User,
            Some(&cryptoki::types::AuthPin::from(pin.trim_end().to_owned())),
        )
        .unwrap();
    let id = unhex(&var(CHILD_OBJECT));
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(id.clone()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    let label = session
        .get_attributes(found[0], &[AttributeType::Label])
        .unwrap();
    session.destroy_object(found[0]).unwrap();
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Id(id),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
    ];
    template.extend(label);
    session
        .generate_key(&Mechanism::AesKeyGen, &template)
        .unwrap();
    println!("swapped");
}

/// A PIN holder replaces v1's key object by another key generated in the
/// token with kekd's very template, CKA_ID and label: its check value does
/// not open, so it is refused — on reload (kekd keeps serving) and at
/// startup.
#[tokio::test]
async fn a_swapped_key_object_fails_its_check_value() {
    const TEST: &str = "a_swapped_key_object_fails_its_check_value";
    if std::env::var_os(CHILD).is_some() {
        return swap_child();
    }
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let id = keyring_id_of(&key_id);
    let (server, client) = serving(&token, &node).await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            &common::test_path(module_path!(), TEST),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD_LABEL, &token.label)
        .env(CHILD_PIN_FILE, &token.pin_file)
        .env(CHILD_OBJECT, format!("{id}00000001"));
    let out = tokio::task::spawn_blocking(move || child.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("swapped"),
        "the swap child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = "the key object kekd-v1 of version 1 is not the key kekd generated for it (its key check \
                    value does not open): refusing it; delete the impostor and restore the original key object \
                    from the token's backup";
    server.wait_for_stderr(expected).await;
    assert!(server.stderr().contains("keyring change refused"));
    assert_eq!(status_key_id(&client).await, key_id);
    let fresh = token.default_node("fresh");
    let out = token.run(&["serve", "--config", fresh.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(error_message(&out), expected);
}

// ----------------------------------------------- tokens of an older kekd

// Environment of the child that writes what an older kekd left in a token.
const LEGACY_ID: &str = "KEKD_TEST_LEGACY_ID";
const LEGACY_KEYS: &str = "KEKD_TEST_LEGACY_KEYS";
const LEGACY_META: &str = "KEKD_TEST_LEGACY_META";
const LEGACY_REVISION: &str = "KEKD_TEST_LEGACY_REVISION";
const LEGACY_SEAL: &str = "KEKD_TEST_LEGACY_SEAL";

/// In a child process: writes into the token what the kekd before version-2
/// metadata wrote (its template, from `git show 3f45c0d:src/backend/pkcs11.rs`),
/// through cryptoki. `LEGACY_KEYS` lists `version:kind` (version 0: the
/// metadata key an interrupted upgrade left):
/// - `gcm`: generated with the older kekd's template, restricted to AES-GCM;
/// - `unrestricted`: the same without `CKA_ALLOWED_MECHANISMS` (the older
///   kekd's fallback on tokens that refused the attribute);
/// - `public`: the same, but public (`CKA_PRIVATE` false);
/// - `imported`: created from 32 bytes given by the caller (not `CKA_LOCAL`).
///
/// Then the v1 metadata object `kekd-keyring@<LEGACY_REVISION>` with the
/// value `LEGACY_META`, and, if `LEGACY_SEAL` names a version, a fresh seed
/// sealed under that version's key by the token into the documented
/// envelope (`seed=…`, `envelope=…`).
fn legacy_child() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;

    let var = |name: &str| std::env::var(name).unwrap();
    let pin = fs::read_to_string(var(CHILD_PIN_FILE)).unwrap();
    let ctx = Pkcs11::new(softhsm::MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| ctx.get_token_info(s).unwrap().label().trim_end() == var(CHILD_LABEL))
        .expect("the token's slot");
    let session = ctx.open_rw_session(slot).unwrap();
    session
        .login(
            UserType::User,
            Some(&cryptoki::types::AuthPin::from(pin.trim_end().to_owned())),
        )
        .unwrap();
    let id = var(LEGACY_ID);
    let mut handles = HashMap::new();
    for spec in var(LEGACY_KEYS).split(',') {
        let (version, kind) = spec.split_once(':').unwrap();
        let version: u32 = version.parse().unwrap();
        let object_id = unhex(&format!("{id}{version:08x}"));
        let label = if version == 0 {
            "kekd-metadata-key".to_owned()
        } else {
            format!("kekd-v{version}")
        };
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Id(object_id),
            Attribute::Label(label.into_bytes()),
            Attribute::Token(true),
            Attribute::Private(kind != "public"),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
        ];
        if kind != "unrestricted" {
            template.push(Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]));
        }
        let handle = if kind == "imported" {
            template.push(Attribute::Value(seed()));
            session.create_object(&template).unwrap()
        } else {
            template.push(Attribute::ValueLen(32.into()));
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .unwrap()
        };
        handles.insert(version, handle);
    }
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(b"kekd".to_vec()),
            Attribute::Label(format!("kekd-keyring@{}", var(LEGACY_REVISION)).into_bytes()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Modifiable(false),
            Attribute::Value(var(LEGACY_META).into_bytes()),
        ])
        .unwrap();
    if let Ok(version) = std::env::var(LEGACY_SEAL) {
        let version: u32 = version.parse().unwrap();
        let mine = seed();
        let mut nonce = [0u8; 12];
        common::getrandom(&mut nonce);
        let mut iv = nonce;
        let aad = envelope_aad(&id, version);
        let params = GcmParams::new(&mut iv, &aad, 128.into()).unwrap();
        let body = session
            .encrypt(&Mechanism::AesGcm(params), handles[&version], &mine)
            .unwrap();
        let envelope = [&[0x01][..], &version.to_be_bytes(), &nonce, &body].concat();
        println!("seed={}", softhsm::hex(&mine));
        println!("envelope={}", softhsm::hex(&envelope));
    }
    println!("written=1");
}

/// What an older kekd left in `token` (see [`legacy_child`]), made by the
/// child run of `test`: keyring `id` with metadata `versions` at revision 3,
/// key objects `keys`, and a seed sealed under version `seal`. Returns the
/// child's `name=value` lines.
fn write_legacy(
    token: &softhsm::Token,
    test: &str,
    id: &str,
    versions: &[&str],
    keys: &str,
    seal: Option<u32>,
) -> HashMap<String, String> {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            &common::test_path(module_path!(), test),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD_LABEL, &token.label)
        .env(CHILD_PIN_FILE, &token.pin_file)
        .env(LEGACY_ID, id)
        .env(LEGACY_KEYS, keys)
        .env(LEGACY_REVISION, "3")
        .env(
            LEGACY_META,
            metadata_text("kekd-keyring-meta v1", id, versions),
        );
    if let Some(v) = seal {
        child.env(LEGACY_SEAL, v.to_string());
    }
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("written=1"),
        "the legacy child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.rsplit(' ').next().unwrap_or(k).to_owned(), v.to_owned()))
        .collect()
}

/// The metadata of a keyring an older kekd rotated twice and destroyed v1 of.
const LEGACY_VERSIONS: [&str; 3] = [
    "version 1 destroyed created=2025-01-01T00:00:00Z promoted=2025-01-01T00:00:00Z \
     retired=2025-03-01T00:00:00Z destroyed=2025-04-01T00:00:00Z",
    "version 2 decrypt-only created=2025-02-01T00:00:00Z promoted=2025-02-02T00:00:00Z",
    "version 3 primary created=2025-05-01T00:00:00Z promoted=2025-05-02T00:00:00Z",
];

/// The lines of a node's audit log.
fn audit_lines(token: &softhsm::Token, node: &Node) -> Vec<serde_json::Value> {
    let path = node
        .state_dir
        .as_ref()
        .unwrap()
        .join(format!("pkcs11-{}-kekd-.audit.jsonl", token.label));
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A token an older kekd initialised (v1 metadata at revision 3; v1
/// destroyed — its key object still there, as a destroy that stopped
/// half-way leaves it —, v2 decrypt-only, v3 primary): `serve` refuses it
/// naming `upgrade-token`; `--dry-run` reports what it would adopt and
/// writes nothing; `upgrade-token` adopts it (one audit line); then kekd
/// serves it, and a seed the token sealed under v2's key before the
/// upgrade still decrypts. A re-run is a no-op that says so.
#[tokio::test]
async fn an_older_kekds_token_is_upgraded_and_keeps_its_keys() {
    const TEST: &str = "an_older_kekds_token_is_upgraded_and_keeps_its_keys";
    if std::env::var_os(CHILD).is_some() {
        return legacy_child();
    }
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let id = softhsm::random_hex(16);
    let written = write_legacy(
        &token,
        TEST,
        &id,
        &LEGACY_VERSIONS,
        "1:gcm,2:gcm,3:gcm",
        Some(2),
    );

    // Refused, naming the command.
    let out = token.run(&["serve", "--config", node.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "the keyring metadata in token {:?} (prefix \"kekd-\") was written by an older kekd, without a MAC \
             or key check values, and is no longer served (a planted or edited object could not be told from \
             kekd's own); as the PIN holder, run `kekd admin upgrade-token --config …` once (it checks every \
             key object and authenticates the metadata; docs/hsm.md), or keep the kekd version that wrote it \
             serving this token",
            token.label
        )
    );

    // A dry run: what would be adopted, nothing written.
    let before = token.objects();
    let dry = token.admin(&node, "upgrade-token", &["--dry-run"]);
    dry.ok();
    assert_eq!(
        dry.stdout,
        format!(
            "upgrade-token --dry-run: would adopt keyring {id} in pkcs11 token {:?} (prefix \"kekd-\") \
             (revision 3, kekd-keyring-meta v1):\n  \
             version 1    destroyed     no key material\n  \
             version 2    decrypt-only  key object kekd-v2: checked\n  \
             version 3    primary       key object kekd-v3: checked\n  \
             metadata key kekd-metadata-key: would be generated in the token\n\
             dry run: every key object passed; nothing was written. Run `kekd admin upgrade-token --config {}` \
             to adopt it\n",
            token.label,
            node.config_arg()
        )
    );
    let dry = admin_json(&token, &node, "upgrade-token", &["--dry-run"]);
    assert_eq!(dry["changed"], false);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["metadata_key"]["source"], "generated");
    assert_eq!(token.objects(), before, "a dry run writes nothing");
    assert!(audit_lines(&token, &node).is_empty());

    // The upgrade.
    let up = admin_json(&token, &node, "upgrade-token", &[]);
    assert_eq!(
        up,
        serde_json::json!({
            "command": "upgrade-token",
            "changed": true,
            "dry_run": false,
            "keyring": format!("pkcs11 token {:?} (prefix \"kekd-\")", token.label),
            "keyring_id": id,
            "from_format": "kekd-keyring-meta v1",
            "format": "kekd-keyring-meta v2",
            "from_revision": 3,
            "revision": 4,
            "versions": [
                {"version": 1, "state": "destroyed", "key_id": format!("kekd/{id}/v1"), "key_object": null},
                {"version": 2, "state": "decrypt-only", "key_id": format!("kekd/{id}/v2"), "key_object": "kekd-v2"},
                {"version": 3, "state": "primary", "key_id": format!("kekd/{id}/v3"), "key_object": "kekd-v3"},
            ],
            "metadata_key": {"label": "kekd-metadata-key", "source": "generated"},
            "erased": [1],
            "message": "revision 3 (kekd-keyring-meta v1) → revision 4 (kekd-keyring-meta v2, authenticated)",
            "next": "start (or restart) every kekd serving this token with this version: it serves the upgraded \
                     keyring. An older kekd cannot read the new metadata: replace it on every node now, and run \
                     admin commands with this version only",
        })
    );
    assert_eq!(metadata_labels(&token), ["kekd-keyring@4"]);
    assert_eq!(
        token.secret_key_labels(),
        ["kekd-metadata-key", "kekd-v2", "kekd-v3"],
        "v1's leftover key is erased, the others kept"
    );
    let value = String::from_utf8(token.read_value("data", "kekd-keyring@4").unwrap()).unwrap();
    assert!(value.starts_with("kekd-keyring-meta v2\n"), "{value}");
    assert_eq!(
        value
            .lines()
            .filter_map(|l| l.strip_prefix("check "))
            .map(|l| l.split(' ').next().unwrap())
            .collect::<Vec<_>>(),
        ["2", "3"],
        "one check value per version with a key: {value}"
    );
    assert!(value.lines().last().unwrap().starts_with("mac "), "{value}");
    let audit = audit_lines(&token, &node);
    assert_eq!(audit.len(), 1, "{audit:#?}");
    for (field, expected) in [
        ("format", serde_json::json!(2)),
        ("command", serde_json::json!("upgrade-token")),
        ("keyring_id", serde_json::json!(id)),
        ("version", serde_json::json!(3)),
        ("key_id", serde_json::json!(format!("kekd/{id}/v3"))),
        ("from", serde_json::json!("primary")),
        ("to", serde_json::json!("primary")),
        ("overrides", serde_json::json!([])),
    ] {
        assert_eq!(audit[0][field], expected, "{field}: {audit:#?}");
    }

    // Served: v3 seals, and v2's key still opens what it sealed before.
    let (_server, mut client) = serving(&token, &node).await;
    assert_eq!(status_key_id(&client).await, format!("kekd/{id}/v3"));
    let mine = seed();
    let enc = client.encrypt(mine.clone(), &uid(0)).await.unwrap();
    assert_eq!(enc.key_id, format!("kekd/{id}/v3"));
    assert_eq!(
        client
            .decrypt(enc.ciphertext, &enc.key_id, no_annotations(), &uid(1))
            .await
            .unwrap(),
        mine
    );
    assert_eq!(
        client
            .decrypt(
                unhex(&written["envelope"]),
                &format!("kekd/{id}/v2"),
                no_annotations(),
                &uid(2)
            )
            .await
            .unwrap(),
        unhex(&written["seed"]),
        "a seed v2's key sealed before the upgrade"
    );

    // Again: nothing to do, nothing written, no audit line.
    let before = token.objects();
    let again = token.admin(&node, "upgrade-token", &[]);
    again.ok();
    assert_eq!(
        again.stdout,
        format!(
            "upgrade-token: nothing to do: keyring {id} in pkcs11 token {:?} (prefix \"kekd-\"): the keyring \
             metadata is kekd-keyring-meta v2 already (revision 4, authenticated)\n",
            token.label
        )
    );
    let again = admin_json(&token, &node, "upgrade-token", &[]);
    assert_eq!(again["changed"], false);
    assert_eq!(again["format"], "kekd-keyring-meta v2");
    assert_eq!(again["metadata_key"]["source"], "existing");
    assert_eq!(token.objects(), before);
    assert_eq!(
        audit_lines(&token, &node)
            .iter()
            .filter(|l| l["command"] == "upgrade-token")
            .count(),
        1,
        "no second audit line"
    );
}

/// A key object of the older kekd's keyring that this kekd would not serve
/// — not restricted to AES-GCM (the older kekd's fallback), public, or
/// imported — is refused by name, by the dry run too, and nothing is
/// written.
#[test]
fn an_older_kekds_key_this_kekd_would_not_serve_is_not_adopted() {
    const TEST: &str = "an_older_kekds_key_this_kekd_would_not_serve_is_not_adopted";
    if std::env::var_os(CHILD).is_some() {
        return legacy_child();
    }
    for (kind, reason) in [
        (
            "unrestricted",
            "is not restricted to CKM_AES_GCM (CKA_ALLOWED_MECHANISMS): it could be used in other modes",
        ),
        (
            "public",
            "is not private (CKA_PRIVATE): anyone could have created it without the PIN",
        ),
        (
            "imported",
            "was not always sensitive (CKA_ALWAYS_SENSITIVE): its bytes were readable once",
        ),
    ] {
        let Some(token) = Token::create() else { return };
        let node = token.default_node("a");
        let id = softhsm::random_hex(16);
        write_legacy(
            &token,
            TEST,
            &id,
            &LEGACY_VERSIONS[1..],
            &format!("2:gcm,3:{kind}"),
            None,
        );
        let before = token.objects();
        let expected = format!(
            "cannot upgrade token {:?}: the key object kekd-v3 of version 3 (CKA_ID {id}00000003) {reason}; \
             this kekd uses only keys the token generated and keeps to itself (private, sensitive, never \
             extractable, CKA_LOCAL, AES-GCM only), so it will not adopt it, and nothing was written. Keep the \
             older kekd serving this token; or, with the older kekd, rotate to a new version and promote it, \
             rewrite the stored data, retire and destroy version 3, then run `kekd admin upgrade-token \
             --config …` again (a token that cannot restrict keys to CKM_AES_GCM cannot be served by this kekd \
             at all)",
            token.label
        );
        for args in [&["--dry-run"][..], &[]] {
            let out = token.admin(&node, "upgrade-token", args);
            assert_eq!(out.code(), EX_CONFIG, "{kind} {args:?}: {out:#?}");
            assert_eq!(error_message(&out), expected, "{kind} {args:?}");
        }
        let out = token.admin(&node, "upgrade-token", &["--output", "json"]);
        assert_eq!(
            json_of(&out),
            serde_json::json!({"error": expected, "exit_code": EX_CONFIG})
        );
        assert_eq!(token.objects(), before, "{kind}: nothing written");
        assert!(audit_lines(&token, &node).is_empty(), "{kind}");
    }
}

/// An upgrade that stopped after generating the metadata key and before
/// writing left v1 metadata and that key: the token is still v1 (refused by
/// `serve`), and a re-run checks the key and completes with it.
#[tokio::test]
async fn an_interrupted_upgrade_completes_when_run_again() {
    const TEST: &str = "an_interrupted_upgrade_completes_when_run_again";
    if std::env::var_os(CHILD).is_some() {
        return legacy_child();
    }
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let id = softhsm::random_hex(16);
    let written = write_legacy(
        &token,
        TEST,
        &id,
        &LEGACY_VERSIONS[2..],
        "3:gcm,0:gcm",
        Some(3),
    );
    let out = token.run(&["serve", "--config", node.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(error_message(&out).contains("was written by an older kekd"));

    let up = admin_json(&token, &node, "upgrade-token", &[]);
    assert_eq!(up["changed"], true);
    assert_eq!(up["metadata_key"]["source"], "leftover");
    assert_eq!(
        token.secret_key_labels(),
        ["kekd-metadata-key", "kekd-v3"],
        "no second metadata key"
    );
    let (_server, mut client) = serving(&token, &node).await;
    assert_eq!(
        client
            .decrypt(
                unhex(&written["envelope"]),
                &format!("kekd/{id}/v3"),
                no_annotations(),
                &uid(0)
            )
            .await
            .unwrap(),
        unhex(&written["seed"])
    );
}

/// `upgrade-token` on a token without a keyring gives the usual error; on a
/// keyring this kekd made, it is a no-op; on a local keyring it refuses.
#[test]
fn upgrade_token_without_a_legacy_keyring() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let out = token.admin(&node, "upgrade-token", &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "token {:?} holds no kekd keyring with prefix \"kekd-\"; create one with `kekd admin init --config …`",
            token.label
        )
    );
    let key_id = token.init(&node);
    let before = token.objects();
    let up = admin_json(&token, &node, "upgrade-token", &[]);
    assert_eq!(up["changed"], false);
    assert_eq!(up["keyring_id"], keyring_id_of(&key_id).as_str());
    assert_eq!(
        up["message"],
        "the keyring metadata is kekd-keyring-meta v2 already (revision 1, authenticated)"
    );
    assert_eq!(token.objects(), before);
    assert!(
        audit_lines(&token, &node)
            .iter()
            .all(|l| l["command"] != "upgrade-token")
    );

    let keyring = token.path().join("local-keyring");
    let out = token.run(&[
        "admin",
        "upgrade-token",
        "--keyring",
        keyring.to_str().unwrap(),
    ]);
    assert_eq!(
        out.refused(1),
        format!(
            "upgrade-token is for keyrings in a PKCS#11 token ([backend] kind = \"pkcs11\"); {} is a local \
             keyring file, which has no older format to upgrade",
            keyring.display()
        )
    );
}

/// Attacks on the upgrade itself:
/// - without the PIN, a public v1 keyring and a public key planted in an
///   empty token (hoping a PIN holder adopts them): the upgrade sees no
///   keyring, and writes nothing;
/// - two private v1 objects of the newest revision: refused naming both;
/// - a metadata key in place before the upgrade (not kekd's: unrestricted):
///   refused by name, nothing written.
#[test]
fn what_the_upgrade_will_not_adopt() {
    const TEST: &str = "what_the_upgrade_will_not_adopt";
    if std::env::var_os(CHILD).is_some() {
        return legacy_child();
    }
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let id = softhsm::random_hex(16);
    write_object(
        &token,
        false,
        &seed(),
        &[
            "--type",
            "secrkey",
            "--key-type",
            "AES:32",
            "--id",
            &format!("{id}00000001"),
            "--label",
            "kekd-v1",
        ],
    );
    let planted = metadata_text("kekd-keyring-meta v1", &id, &LEGACY_VERSIONS[2..]);
    write_object(
        &token,
        false,
        planted.as_bytes(),
        &[
            "--type",
            "data",
            "--label",
            "kekd-keyring@1",
            "--application-label",
            "kekd",
        ],
    );
    let before = token.objects();
    let out = token.admin(&node, "upgrade-token", &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out).starts_with(&format!(
            "token {:?} holds no kekd keyring with prefix \"kekd-\"",
            token.label
        )),
        "{out:#?}"
    );
    assert_eq!(token.objects(), before);

    // Two private objects of revision 3.
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let id = softhsm::random_hex(16);
    write_legacy(&token, TEST, &id, &LEGACY_VERSIONS[2..], "3:gcm", None);
    let other = metadata_text("kekd-keyring-meta v1", &id, &LEGACY_VERSIONS[1..]);
    write_object(
        &token,
        true,
        other.as_bytes(),
        &[
            "--type",
            "data",
            "--private",
            "--label",
            "kekd-keyring@3",
            "--application-label",
            "kekd",
        ],
    );
    let before = token.objects();
    let out = token.admin(&node, "upgrade-token", &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    let message = error_message(&out);
    assert!(
        message.starts_with(
            "the token holds two private objects for keyring metadata revision 3: kekd-keyring@3 (handle "
        ) && message.contains(") and kekd-keyring@3 (handle "),
        "{out:#?}"
    );
    assert_eq!(token.objects(), before);

    // A metadata key kekd would not use.
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let id = softhsm::random_hex(16);
    write_legacy(
        &token,
        TEST,
        &id,
        &LEGACY_VERSIONS[2..],
        "3:gcm,0:unrestricted",
        None,
    );
    let before = token.objects();
    let out = token.admin(&node, "upgrade-token", &[]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert!(
        error_message(&out).starts_with(
            "key object kekd-metadata-key of the metadata key is not restricted to CKM_AES_GCM \
             (CKA_ALLOWED_MECHANISMS): it could be used in other modes: refusing it"
        ),
        "{out:#?}"
    );
    assert_eq!(token.objects(), before);
}

/// StrictModes for the token's node state: `state_dir` holds the served
/// record (a restart's rollback check), the admin lock and the audit log.
/// In a directory another user can write, that user could delete the record
/// (a rolled-back token starts unnoticed), plant one (kekd refuses to
/// start), or plant the lock as a link for root's next admin command.
#[test]
fn serve_refuses_a_state_dir_another_user_can_write() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("open");
    token.init(&node);
    let state_dir = node.state_dir.clone().unwrap();
    for (mode, who) in [
        (0o777, "every user"),
        (0o770, "its group"),
        (0o1777, "every user"),
    ] {
        fs::set_permissions(&state_dir, fs::Permissions::from_mode(mode)).unwrap();
        let out = token.run(&["serve", "--config", node.config_arg()]);
        assert_eq!(out.code(), EX_CONFIG, "{mode:04o}: {out:#?}");
        assert_eq!(
            error_message(&out),
            format!(
                "{0} is a directory {who} can write (mode {mode:04o}) and holds kekd's state, so another user \
                 could replace the keyring with keys of their own; refusing to serve it: run `chmod go-w {0}`",
                fs::canonicalize(&state_dir).unwrap().display()
            ),
            "{mode:04o}"
        );
        assert!(!node.socket.exists(), "a socket was left behind");
        // doctor gives the same verdict (the same check), with its fix.
        let doctor = token.run(&[
            "admin",
            "doctor",
            "--config",
            node.config_arg(),
            "--output",
            "json",
        ]);
        assert_eq!(doctor.code(), 1, "{mode:04o}: {doctor:#?}");
        let access = state_dir_access(&doctor);
        let real = fs::canonicalize(&state_dir).unwrap();
        assert_eq!(access["level"], "fail", "{access:#}");
        assert_eq!(
            access["detail"],
            format!(
                "{} is a directory {who} can write (mode {mode:04o}) and holds kekd's state: another user could \
                 plant or remove kekd's state (the served record, the lock); kekd serve refuses it",
                real.display()
            ),
            "{access:#}"
        );
        assert_eq!(
            access["fix"],
            format!("chmod go-w {}", real.display()),
            "{access:#}"
        );
    }
    // Fixed: serve's check passes, and so does doctor's.
    fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let doctor = token.run(&[
        "admin",
        "doctor",
        "--config",
        node.config_arg(),
        "--output",
        "json",
    ]);
    assert_eq!(state_dir_access(&doctor)["level"], "ok", "{doctor:#?}");
}

/// `kekd admin doctor` only looks: on a node whose `state_dir` does not
/// exist yet, it reaches the token and reads the keyring, and leaves the
/// state directory uncreated (only `serve` and the changing commands make
/// it, 0700).
#[test]
fn doctor_creates_no_state_dir() {
    let Some(token) = Token::create() else { return };
    let first = token.default_node("first");
    token.init(&first);
    let fresh = token.default_node("fresh");
    let state_dir = fresh.state_dir.clone().unwrap();
    assert!(!state_dir.exists());
    let doctor = token.admin(&fresh, "doctor", &["--output", "json"]);
    let findings = json_of(&doctor)["findings"].clone();
    let level = |check: &str| {
        findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("no {check} finding: {findings:#}"))["level"]
            .clone()
    };
    assert_eq!(level("token"), "ok", "{doctor:#?}");
    assert_eq!(level("keyring"), "ok", "{doctor:#?}");
    assert!(
        !state_dir.exists(),
        "doctor created {}",
        state_dir.display()
    );
}

/// doctor's `state_dir access` finding.
#[track_caller]
fn state_dir_access(doctor: &common::Finished) -> serde_json::Value {
    let findings = json_of(doctor)["findings"].clone();
    findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "state_dir access")
        .unwrap_or_else(|| panic!("no state_dir finding: {findings:#}"))
        .clone()
}

/// StrictModes covers the directory the state_dir is *named* in, as it does
/// for a keyring: a link in a directory every user can write lets any of
/// them repoint it after the check — at their own directory (plant or keep
/// the lock, the record), or at any root-owned directory without a served
/// record, so the next start takes a rolled-back token for a first start.
#[test]
fn serve_and_doctor_refuse_a_state_dir_linked_from_a_directory_others_can_write() {
    let Some(token) = Token::create() else { return };
    let real = token.path().join("real-state");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    let public = token.path().join("public");
    fs::create_dir(&public).unwrap();
    fs::set_permissions(&public, fs::Permissions::from_mode(0o777)).unwrap();
    let link = public.join("state");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut backend = token.backend("linked");
    backend.state_dir = Some(link.clone());
    let node = token.node("linked", &backend, &[]);
    token.init(&node);

    let doctor = token.run(&[
        "admin",
        "doctor",
        "--config",
        node.config_arg(),
        "--output",
        "json",
    ]);
    let access = state_dir_access(&doctor);
    assert_eq!(access["level"], "fail", "{access:#}");
    assert_eq!(
        access["fix"],
        format!("chmod go-w {}", public.display()),
        "{access:#}"
    );
    doctor.exited(1);

    let out = token.run(&["serve", "--config", node.config_arg()]);
    assert_eq!(out.code(), EX_CONFIG, "{out:#?}");
    assert_eq!(
        error_message(&out),
        format!(
            "{0} is a directory every user can write (mode 0777) and holds the link to kekd's state, so another \
             user could replace the keyring with keys of their own; refusing to serve it: run `chmod go-w {0}`",
            public.display()
        )
    );
    assert!(!node.socket.exists(), "a socket was left behind");
}

// ------------------------------------------- round 2: attacks on the hardening

/// The file whose creation tells [`churn_child`] to stop.
const CHURN_STOP: &str = "KEKD_TEST_CHURN_STOP";

/// In a child process, **without the PIN**: keeps 100 public AES keys
/// labelled `kekd-churn-<n>` in the token and replaces the oldest by a new
/// one, as fast as the token allows, until the file `CHURN_STOP` exists;
/// prints `churned=<n>`.
fn churn_child() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};

    let var = |name: &str| std::env::var(name).unwrap();
    let ctx = Pkcs11::new(softhsm::MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|&s| ctx.get_token_info(s).unwrap().label().trim_end() == var(CHILD_LABEL))
        .expect("the token's slot");
    let session = ctx.open_rw_session(slot).unwrap();
    let stop = std::path::PathBuf::from(var(CHURN_STOP));
    let mut alive = std::collections::VecDeque::new();
    let mut n: u32 = 0;
    while !stop.exists() {
        n += 1;
        let handle = session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Label(format!("kekd-churn-{n}").into_bytes()),
                Attribute::Id([&[0xff][..], &n.to_be_bytes()].concat()),
                Attribute::Value(vec![7; 32]),
            ])
            .unwrap();
        let _ = handle;
        alive.push_back(n);
        if alive.len() > 100 {
            // By label: SoftHSM renumbers this session's handles when
            // another process (kekd) changes the token.
            let oldest = alive.pop_front().unwrap();
            let found = session
                .find_objects(&[Attribute::Label(
                    format!("kekd-churn-{oldest}").into_bytes(),
                )])
                .unwrap();
            for h in found {
                session.destroy_object(h).unwrap();
            }
        }
    }
    println!("churned={n}");
}

/// Someone without the PIN creates and deletes public look-alike objects
/// as fast as the token allows, so objects vanish while kekd reads them. kekd
/// only reports public objects: one gone mid-read is skipped, never a failed
/// load (before the fix, reloads failed with "object handle is not valid",
/// so a real rotation could be held off, and a start could fail). Each
/// object is logged once, by label and CKA_ID, at most 256 in all (before,
/// once per handle, remembered forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_objects_churned_without_the_pin_never_fail_a_load() {
    const TEST: &str = "public_objects_churned_without_the_pin_never_fail_a_load";
    if std::env::var_os(CHILD).is_some() {
        return churn_child();
    }
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let key_id = token.init(&node);
    let (server, client) = serving(&token, &node).await;
    let stop = token.path().join("stop-churn");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            &common::test_path(module_path!(), TEST),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD_LABEL, &token.label)
        .env(CHURN_STOP, &stop)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Progress: each load logs the churned objects it had not seen. 200
    // distinct ones are a few loads, each racing the deletions.
    let distinct = |log: &str| {
        log.lines()
            .filter_map(|l| l.split("public secret key \"kekd-churn-").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect::<HashSet<_>>()
            .len()
    };
    eventually("200 distinct churned objects logged", HANG_GUARD, || {
        let log = server.stderr();
        let seen = distinct(&log);
        let refused = log.contains("keyring change refused");
        async move {
            (seen >= 200 || refused)
                .then_some(())
                .ok_or(format!("{seen} distinct"))
        }
    })
    .await;
    // A rotation made meanwhile is picked up.
    let out = token.admin(&node, "rotate", &["--promote"]);
    out.ok();
    let v2 = key_id.replace("/v1", "/v2");
    eventually("the rotation is served", HANG_GUARD, || {
        let c = client.clone();
        let v2 = v2.clone();
        async move {
            let now = status_key_id(&c).await;
            if now == v2 { Ok(()) } else { Err(now) }
        }
    })
    .await;
    // A start while look-alikes come and go works too.
    let fresh = token.default_node("fresh");
    let (_fresh_server, fresh_client) = serving(&token, &fresh).await;
    assert_eq!(status_key_id(&fresh_client).await, v2);
    fs::write(&stop, "").unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "the churn child failed: {out:?}");
    let log = server.stderr();
    assert!(!log.contains("keyring change refused"), "{log}");
    assert!(!log.contains("load the keyring failed"), "{log}");
    let reported = log.matches("public secret key \"kekd-churn-").count();
    assert!(reported <= 256, "{reported} objects logged one by one");
    assert_eq!(reported, distinct(&log), "an object was logged twice");
}

/// A PIN holder keeps a copy of an older metadata revision and, after a
/// promotion, deletes the newest and puts the copy back under its own label:
/// its MAC (bound to that revision) verifies, so only the keyring rules can
/// catch it. The running kekd refuses it at the next reload (a primary never
/// goes backwards) and keeps sealing under v2; admin commands see v1 as
/// primary again. A node starting now takes it — the documented limit (a
/// PIN holder can drive the token as kekd does), kept here so the docs stay
/// precise about it.
#[tokio::test]
async fn a_pin_holder_replaying_an_older_revision_is_refused_while_serving() {
    let Some(token) = Token::create() else { return };
    let node = token.default_node("a");
    let v1 = token.init(&node);
    admin_json(&token, &node, "rotate", &[]);
    let saved = token.read_value("data", "kekd-keyring@2").unwrap();
    admin_json(&token, &node, "promote", &["2"]);
    assert_eq!(metadata_labels(&token), ["kekd-keyring@3"]);
    let v2 = v1.replace("/v1", "/v2");
    let (server, client) = serving(&token, &node).await;
    assert_eq!(status_key_id(&client).await, v2);

    let out = token.tool(&[
        "--delete-object",
        "--type",
        "data",
        "--label",
        "kekd-keyring@3",
    ]);
    assert!(out.status.success(), "{out:?}");
    write_object(
        &token,
        true,
        &saved,
        &[
            "--type",
            "data",
            "--private",
            "--label",
            "kekd-keyring@2",
            "--application-label",
            "kekd",
        ],
    );
    server.wait_for_stderr("keyring change refused").await;
    assert_eq!(status_key_id(&client).await, v2);
    let sealed = client.clone().encrypt(seed(), &uid(1)).await.unwrap();
    assert_eq!(sealed.key_id, v2, "sealed under the replayed primary");

    // The limit: a node with no record of its own takes the replayed
    // revision (v1 primary again).
    let fresh = token.default_node("fresh");
    let (_fresh_server, fresh_client) = serving(&token, &fresh).await;
    assert_eq!(status_key_id(&fresh_client).await, v1);
}
