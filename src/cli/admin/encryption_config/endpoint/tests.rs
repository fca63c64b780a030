use serde_json::Value;

use super::*;

/// The table the conformance suite checks against kube-apiserver's own
/// `ParseEndpoint` (tests/conformance/endpoint_test.go).
const TABLE: &str = include_str!("../../../../../tests/conformance/testdata/endpoints.json");

#[test]
fn every_endpoint_parses_as_the_apiserver_parses_it() {
    let rows: Vec<Value> = serde_json::from_str(TABLE).unwrap();
    assert!(rows.len() >= 30, "{} rows", rows.len());
    let mut wrong = Vec::new();
    for row in &rows {
        let endpoint = row["endpoint"].as_str().unwrap();
        let want = row["dials"].as_str();
        let got = parse_endpoint(endpoint);
        let same = match (&got, want) {
            (Ok(e), Some(w)) => e.address() == OsStr::new(w),
            (Err(_), None) => true,
            _ => false,
        };
        if !same {
            wrong.push(format!(
                "{endpoint:?}: kekd {got:?}, the apiserver {want:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_host_part_is_named_and_dropped() {
    let e = parse_endpoint("unix://kekd-dev/kms.sock").unwrap();
    assert_eq!(e.dial(), Dial::Path(Path::new("/kms.sock")));
    assert_eq!(e.authority.as_deref(), Some("kekd-dev"));
    let e = parse_endpoint("unix://kms.sock").unwrap();
    assert_eq!(e.dial(), Dial::Empty);
    assert_eq!(e.authority.as_deref(), Some("kms.sock"));
    let e = parse_endpoint("unix:kms.sock").unwrap();
    assert_eq!(e.dial(), Dial::Empty);
    assert_eq!(e.opaque.as_deref(), Some("kms.sock"));
    let e = parse_endpoint("unix:/run/x/kms.sock").unwrap();
    assert_eq!(e.dial(), Dial::Path(Path::new("/run/x/kms.sock")));
    assert_eq!((e.authority, e.opaque), (None, None));
    let e = parse_endpoint("unix:///@kekd").unwrap();
    assert_eq!(e.dial(), Dial::Abstract(OsStr::new("@kekd")));
}

#[test]
fn refusals_say_why_as_the_apiserver_does() {
    assert_eq!(
        parse_endpoint("").unwrap_err().to_string(),
        "remote KMS provider can't use empty string as endpoint"
    );
    assert_eq!(
        parse_endpoint("tcp://127.0.0.1:1").unwrap_err().to_string(),
        "unsupported scheme \"tcp\" for remote KMS provider"
    );
    assert_eq!(
        parse_endpoint("unix:///a%zz").unwrap_err().to_string(),
        "invalid endpoint \"unix:///a%zz\" for remote KMS provider, error: parse \"unix:///a%zz\": invalid URL \
         escape \"%zz\""
    );
    assert_eq!(
        parse_endpoint("unix://ho st/k.sock")
            .unwrap_err()
            .to_string(),
        "invalid endpoint \"unix://ho st/k.sock\" for remote KMS provider, error: parse \"unix://ho st/k.sock\": \
         invalid character \" \" in host name"
    );
}
