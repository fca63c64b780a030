#![allow(clippy::unwrap_used)]

use super::*;
use crate::envelope::Envelope;

const OURS: &str = "5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40";
const OTHER: &str = "00000000000000000000000000000001";

/// A KMS v2 value as the apiserver writes it, with field 3 our envelope
/// naming `header` (field numbers by hand: the test checks the decoder
/// against the documented format, `docs/kms-v2.md` §8, not against itself).
fn kms(provider: &str, keyring: &str, version: u32, header: u32) -> Vec<u8> {
    let key_id = format!("kekd/{keyring}/v{version}");
    let dek = Envelope::encode(KeyVersion::new(header).unwrap(), &[3; 12], &[4; 48]);
    let mut object = Vec::new();
    prost::encoding::bytes::encode(1, &vec![5u8; 100], &mut object);
    prost::encoding::string::encode(2, &key_id, &mut object);
    prost::encoding::bytes::encode(3, &dek, &mut object);
    prost::encoding::int32::encode(5, &1, &mut object);
    let mut value = format!("k8s:enc:kms:v2:{provider}:").into_bytes();
    value.extend(object);
    value
}

fn run(prefix: &str, finished: u64) -> ScanRun {
    ScanRun {
        started_at: Timestamp::from_unix(finished - 5),
        finished_at: Timestamp::from_unix(finished),
        endpoints: vec!["http://127.0.0.1:2379".to_owned()],
        prefix: prefix.to_owned(),
        provider_name: "kekd".to_owned(),
        consistency: "linearizable".to_owned(),
        revision: 7,
        expected_keys: 0,
        pages: 1,
        page_size: 500,
        final_page_size: 500,
        peak_rss_bytes: None,
    }
}

fn keyring() -> KeyringSeen {
    KeyringSeen {
        name: "/etc/kekd/keyring".to_owned(),
        id: OURS.to_owned(),
        versions: [(1, "retired"), (2, "decrypt-only"), (3, "primary")]
            .into_iter()
            .map(|(v, s)| KeyringVersion {
                version: v,
                state: s.to_owned(),
                key_id: format!("kekd/{OURS}/v{v}"),
            })
            .collect(),
    }
}

const NOW: u64 = 1_800_000_000;

fn sample() -> ScanReport {
    let mut t = Tally::default();
    let p = b"/registry/";
    for i in 0..7 {
        t.add(
            format!("/registry/secrets/default/s{i}").as_bytes(),
            &kms("kekd", OURS, 2, 2),
            p,
        );
    }
    for i in 0..3 {
        t.add(
            format!("/registry/secrets/ns2/n{i}").as_bytes(),
            &kms("kekd", OURS, 3, 3),
            p,
        );
    }
    t.add(b"/registry/configmaps/a/c", &kms("kekd", OURS, 2, 2), p);
    t.add(
        b"/registry/configmaps/a/mismatch",
        &kms("kekd", OURS, 3, 1),
        p,
    );
    t.add(
        b"/registry/secrets/x/renamed",
        &kms("kekd-old", OTHER, 1, 1),
        p,
    );
    t.add(
        b"/registry/secrets/x/aes",
        b"k8s:enc:aescbc:v1:key1:xxxx",
        p,
    );
    t.add(b"/registry/namespaces/default", b"k8s\x00\x0a\x02v1", p);
    t.add(
        b"/registry/example.com/widgets/ns/w",
        b"{\"kind\":\"Widget\"}",
        p,
    );
    t.add(b"/registry/secrets/x/garbage", b"plaintext-password", p);
    t.finish(run("/registry/", NOW), Some(keyring()))
}

#[test]
fn tally_counts_per_resource_provider_and_version() {
    let r = sample();
    assert_eq!(r.keys, 17);
    assert_eq!(
        r.totals,
        BTreeMap::from([
            ("aescbc:v1:key1".to_owned(), 1),
            ("identity".to_owned(), 2),
            ("kms:v2:kekd".to_owned(), 12),
            ("kms:v2:kekd-old".to_owned(), 1),
            ("unparseable".to_owned(), 1),
        ])
    );
    let secrets = r
        .resources
        .iter()
        .find(|x| x.resource == "secrets")
        .unwrap();
    assert_eq!(secrets.objects, 13);
    assert_eq!(secrets.key_ids[&format!("kekd/{OURS}/v2")], 7);
    assert_eq!(secrets.key_ids[&format!("kekd/{OURS}/v3")], 3);
    assert!(
        r.resources
            .iter()
            .any(|x| x.resource == "widgets.example.com")
    );

    let v = |id: &str, n: u32| {
        r.versions
            .iter()
            .find(|v| v.keyring_id == id && v.version == n)
            .unwrap()
    };
    assert_eq!((v(OURS, 1).objects, v(OURS, 1).header_mismatches), (0, 1));
    assert_eq!(v(OURS, 1).state.as_deref(), Some("retired"));
    assert_eq!(v(OURS, 1).examples, ["/registry/configmaps/a/mismatch"]);
    assert_eq!(v(OURS, 2).objects, 8);
    assert_eq!(
        v(OURS, 2).resources,
        BTreeMap::from([("configmaps".to_owned(), 1), ("secrets".to_owned(), 7)])
    );
    assert_eq!(v(OURS, 2).examples.len(), EXAMPLES);
    assert_eq!(v(OURS, 3).objects, 4);
    assert_eq!(
        (v(OTHER, 1).objects, v(OTHER, 1).state.as_deref()),
        (1, None)
    );

    assert_eq!(r.mismatch_total, 1);
    assert_eq!(r.mismatches[0].header, "version 1");
    assert_eq!(r.unparseable_total, 1);
    assert_eq!(r.unparseable[0].key, "/registry/secrets/x/garbage");
    let json = serde_json::to_string(&r).unwrap();
    assert!(
        !json.contains("plaintext-password"),
        "a value leaked into the report"
    );
}

#[test]
fn report_round_trips_through_json() {
    let r = sample();
    let text = serde_json::to_string_pretty(&r).unwrap();
    let back = ScanReport::from_json("scan.json", &text).unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&r).unwrap()
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], FORMAT);
    assert_eq!(v["revision"], 7);
    assert_eq!(v["keyring"]["id"], OURS);
}

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

fn ours() -> KeyringId {
    OURS.parse().unwrap()
}

#[test]
fn retire_refused_while_objects_reference_the_version() {
    let r = sample();
    let now = Timestamp::from_unix(NOW + 60);
    let e = r.check_retire("scan.json", &ours(), v(2), now).unwrap_err();
    assert_eq!(
        e.to_string(),
        "8 stored object(s) under /registry/ still reference version 2 (scan of 2027-01-15T08:00:00Z), e.g. \
         /registry/secrets/default/s0, /registry/secrets/default/s1, /registry/secrets/default/s2, \
         /registry/secrets/default/s3, /registry/secrets/default/s4. Rewrite them under the current key: \
         `kubectl get configmaps,secrets -A -o json | kubectl replace -f -`; then scan again and retire with the new result"
    );
    // A header naming version 1 is a reference too.
    assert!(matches!(
        r.check_retire("scan.json", &ours(), v(1), now),
        Err(RetireScanError::StillUsed { count: 1, .. })
    ));
}

#[test]
fn retire_allowed_when_no_object_references_the_version() {
    let mut t = Tally::default();
    t.add(
        b"/registry/secrets/a/b",
        &kms("kekd", OURS, 3, 3),
        b"/registry/",
    );
    let r = t.finish(run("/registry/", NOW), Some(keyring()));
    assert_eq!(
        r.check_retire("scan.json", &ours(), v(2), Timestamp::from_unix(NOW + 10))
            .unwrap(),
        "the scan of /registry/ at 2027-01-15T08:00:00Z found no object under version 2 (1 object(s) under this keyring's other versions)"
    );
}

#[test]
fn stale_future_foreign_and_empty_scans_are_refused() {
    let r = sample();
    let e = r
        .check_retire(
            "scan.json",
            &ours(),
            v(2),
            Timestamp::from_unix(NOW + 24 * 3600 + 1),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the scan in scan.json finished at 2027-01-15T08:00:00Z (1day 1s ago): a scan older than 24h may miss objects \
         written since; run `kekd admin scan` again and pass the fresh result"
    );
    assert!(matches!(
        r.check_retire("scan.json", &ours(), v(2), Timestamp::from_unix(NOW - 301)),
        Err(RetireScanError::Future { .. })
    ));
    let other: KeyringId = OTHER.parse().unwrap();
    assert_eq!(
        r.check_retire("scan.json", &other, v(2), Timestamp::from_unix(NOW))
            .unwrap_err()
            .to_string(),
        format!(
            "the scan in scan.json was matched against keyring {OURS}, but this keyring is {OTHER}: scan with --keyring \
             (or --config) naming this keyring"
        )
    );
    // Without --keyring, a scan that saw nothing of this keyring proves nothing.
    let empty = Tally::default().finish(run("/wrong/", NOW), None);
    assert_eq!(
        empty
            .check_retire("scan.json", &ours(), v(2), Timestamp::from_unix(NOW))
            .unwrap_err()
            .to_string(),
        format!(
            "the scan in scan.json found no object encrypted by keyring {OURS} under /wrong/ at http://127.0.0.1:2379: \
             wrong --etcd-endpoints or --prefix (the apiserver's --etcd-prefix plus `/`)? If nothing is encrypted by \
             this keyring, retire without --scan"
        )
    );
}

#[test]
fn documents_that_are_not_scans_are_named() {
    for (text, why) in [
        ("nope", "not JSON: expected ident at line 1 column 2"),
        ("{}", "no \"format\": \"kekd-scan v1\" field"),
        (
            "{\"format\":\"kekd-scan v2\"}",
            "format \"kekd-scan v2\", this kekd reads \"kekd-scan v1\"",
        ),
    ] {
        assert_eq!(
            ScanReport::from_json("f.json", text).unwrap_err(),
            RetireScanError::NotAScan {
                file: "f.json".to_owned(),
                why: why.to_owned()
            }
        );
    }
    assert!(matches!(
        ScanReport::from_json("f.json", "{\"format\":\"kekd-scan v1\"}"),
        Err(RetireScanError::NotAScan { .. })
    ));
}

#[test]
fn encrypted_object_field_numbers_match_the_spec() {
    // The decoder's struct, encoded, must put keyID in field 2 and the DEK
    // source in field 3, as the hand-encoded values above assume.
    let value = kms("kekd", OURS, 4, 4);
    let payload = &value[b"k8s:enc:kms:v2:kekd:".len()..];
    let mut buf = payload;
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let (tag, wire) = prost::encoding::decode_key(&mut buf).unwrap();
        fields.push(tag);
        prost::encoding::skip_field(wire, tag, &mut buf, Default::default()).unwrap();
    }
    assert_eq!(fields, [1, 2, 3, 5]);
    assert!(matches!(
        decode::classify(&value),
        decode::Stored::KmsV2 { .. }
    ));
}
